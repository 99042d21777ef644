"""Patch2Self: self-supervised denoising of diffusion MRI by leave-one-volume-out regression.

Each volume of a group (the b0 volumes; the diffusion-weighted volumes, or each
shell) is predicted from all the other volumes of that group by linear
regression with an intercept. Noise is independent across volumes, so the
prediction keeps the signal the volumes share and drops the noise (Fadnavis et
al. 2020).

DIPY fits one regression per volume. Here every leave-one-out fit of a group
follows from a single Gram matrix: with ``C`` the centred Gram matrix of the
group's features and ``P = inv(C + alpha I)``, the coefficients that predict
feature ``t`` of held-out block ``I`` from the features outside the block are
``-P[-I, I] inv(P[I, I]) e_t``. The residual of that prediction is
``Xc @ P[:, I] inv(P[I, I]) e_t``, so one inversion and one product give all
predictions. For ``patch_radius = 0`` a block is one column and this is the
classical ``-P[j, i] / P[i, i]`` identity. The Gram matrix is accumulated over
voxel chunks (bounded memory) in float64; no design matrix of the whole image
is ever built. There is no randomness.

References
----------
.. [1] Fadnavis S., Batson J., Garyfallidis E. Patch2Self: Denoising Diffusion
       MRI with Self-Supervised Learning. NeurIPS 2020.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch

from bids_denoise.methods._device import resolve_device
from bids_denoise.methods.errors import UnsuitableDataError
from bids_denoise.methods.networks import power_of_two_exponent
from bids_denoise.methods.shells import cluster_shells

LOGGER = logging.getLogger(__name__)

#: Bytes of design matrix handled per chunk (CPU); bounds memory, keeps BLAS busy.
CHUNK_BYTES = 32 * 2**20


@dataclass
class Patch2SelfInfo:
    """What a Patch2Self run did, for sidecars and reports."""

    groups: list[list[int]]
    passed_through: list[int]
    fit_voxels: int
    regularised_groups: list[int]


def volume_groups(bvals, *, b0_threshold=50.0, grouping="b0_dwi", shell_tolerance=100.0):
    """Split volumes into the groups Patch2Self regresses within.

    Parameters
    ----------
    bvals : array-like, shape (n_volumes,)
    b0_threshold : float
        Volumes with ``b <= b0_threshold`` are b0 volumes.
    grouping : {"b0_dwi", "shell"}
        ``b0_dwi``: one group of b0s, one of all diffusion-weighted volumes (as
        DIPY). ``shell``: one group per shell.
    shell_tolerance : float
        Gap between b-values that separates shells (``grouping="shell"``).

    Returns
    -------
    list of ndarray
        Volume indices of each group, b0 group first (empty groups dropped).
    """
    shell_of_volume = cluster_shells(bvals, b0_threshold=b0_threshold, tolerance=shell_tolerance)
    if grouping == "b0_dwi":
        shell_of_volume = np.minimum(shell_of_volume, 1)
    elif grouping != "shell":
        raise ValueError(f"grouping must be 'b0_dwi' or 'shell', not {grouping!r}")
    return [np.flatnonzero(shell_of_volume == label) for label in np.unique(shell_of_volume)]


def patch2self(
    data,
    bvals,
    *,
    patch_radius=0,
    model="ols",
    alpha=1.0,
    b0_threshold=50.0,
    b0_denoising=True,
    shift_intensity=False,
    clip_negative_vals=False,
    grouping="b0_dwi",
    shell_tolerance=100.0,
    mask=None,
    device="cpu",
    out_dtype=np.float32,
    return_info=False,
):
    """Denoise a 4D diffusion series with Patch2Self.

    Parameters
    ----------
    data : ndarray, shape (X, Y, Z, V)
        The diffusion series.
    bvals : array-like, shape (V,)
        b-values of the volumes.
    patch_radius : int or sequence of 3 int, optional
        Radius of the cube of neighbouring voxels each volume contributes as
        features (0, the default, uses the voxel alone). Outside the image the
        cube is zero-padded, as in DIPY.
    model : {"ols", "ridge"}, optional
        Ordinary least squares or ridge regression (penalty ``alpha`` on the
        coefficients, not on the intercept, as scikit-learn's ``Ridge``).
    alpha : float, optional
        Ridge penalty (default 1.0); ignored for ``ols``.
    b0_threshold : float, optional
        b-values up to this are b0 volumes (default 50).
    b0_denoising : bool, optional
        Denoise the b0 group (default True). A single b0 is always passed
        through unchanged.
    shift_intensity : bool, optional
        If a denoised volume has negative values, add the constant that makes
        its minimum zero (default False). A per-volume offset biases model
        fits, so it is off by default; DIPY 1.10-1.12.1 enable it by default
        but compute a shift of zero, so False also matches what they return.
    clip_negative_vals : bool, optional
        Set negative denoised values to zero (default False). Takes precedence
        over ``shift_intensity``.
    grouping : {"b0_dwi", "shell"}, optional
        Regress within b0s and within all DWIs (default, as DIPY), or within
        each shell.
    shell_tolerance : float, optional
        b-value gap that separates shells for ``grouping="shell"``.
    mask : ndarray of bool, shape (X, Y, Z), optional
        Fit the regressions on these voxels only (e.g. the brain); the
        prediction is made everywhere.
    device : str or torch.device, optional
        ``cpu`` (default), ``cuda``, ``cuda:N`` or ``auto``.
    out_dtype : dtype, optional
        Data type of the result (default float32).
    return_info : bool, optional
        Also return a :class:`Patch2SelfInfo`.

    Returns
    -------
    denoised : ndarray, shape (X, Y, Z, V)
        Volumes alone in their group (a single b0; a lone b-value with ``grouping="shell"``)
        are passed through unchanged, listed in ``info.passed_through``.
    info : Patch2SelfInfo
        Only if ``return_info``.

    Raises
    ------
    UnsuitableDataError
        Not a 4D series; no group of at least 2 volumes to denoise; an empty mask; or no more
        voxels (in the mask, if given) than regression features (volumes of the largest group x
        patch voxels).

    Notes
    -----
    Scale-invariant: ``patch2self(c * x)`` is ``c * patch2self(x)`` to rounding for any ``c``
    (for ``model="ridge"`` with ``alpha`` times ``c**2``: the penalty is in the data's squared
    units, as DIPY's and scikit-learn's).
    Data whose largest magnitude is outside [1e-6, 1e6] are divided by a power of two first and
    multiplied back after, which is exact; float32 Gram sums of 1e30 would overflow.
    """
    data = np.asarray(data)
    if data.ndim != 4:
        raise UnsuitableDataError(f"Patch2Self needs a 4D series, got an image of shape {data.shape}")
    bvals = np.asarray(bvals, dtype=float).ravel()
    if bvals.size != data.shape[3]:
        raise ValueError(f"{bvals.size} b-values for {data.shape[3]} volumes")
    if model not in ("ols", "ridge"):
        raise ValueError(f"model must be 'ols' or 'ridge', not {model!r}")
    radius = _as_radius(patch_radius)
    device = resolve_device(device)
    compute_dtype = torch.float64 if data.dtype == np.float64 else torch.float32
    series = np.ascontiguousarray(data, dtype=np.float64 if data.dtype == np.float64 else np.float32)

    fit_rows = None if mask is None else np.flatnonzero(np.asarray(mask, dtype=bool).ravel())
    if fit_rows is not None and fit_rows.size == 0:
        raise UnsuitableDataError("Patch2Self: the fitting mask is empty")
    info = Patch2SelfInfo(groups=[], passed_through=[], fit_voxels=0, regularised_groups=[])
    info.fit_voxels = int(series[..., 0].size if fit_rows is None else fit_rows.size)

    groups = volume_groups(
        bvals, b0_threshold=b0_threshold, grouping=grouping, shell_tolerance=shell_tolerance
    )
    fitted = _groups_to_fit(groups, bvals, b0_threshold, b0_denoising, info)
    patch_size = int(np.prod([2 * r + 1 for r in radius]))
    _check_enough_voxels(fitted, patch_size, info.fit_voxels, masked=fit_rows is not None)

    # exact rescaling of extreme intensities (a power of two): float32 Gram sums neither
    # overflow nor underflow, and the ridge penalty keeps its meaning in the data's units
    exponent = power_of_two_exponent(series)
    if exponent:
        series = np.ldexp(series, -exponent)
    ridge = float(np.ldexp(alpha, -2 * exponent)) if model == "ridge" else 0.0
    if radius == (0, 0, 0):
        denoised = np.empty(series.shape, dtype=out_dtype)
        regularised = _denoise_voxelwise(
            series, denoised, fitted, ridge, fit_rows, device, compute_dtype
        )
    else:
        denoised = series.astype(out_dtype, copy=True)
        regularised = [
            _denoise_group(series, denoised, group, radius, ridge, fit_rows, device, compute_dtype)
            for group in fitted
        ]
    info.regularised_groups = [i for i, flag in enumerate(regularised) if flag]

    _post_process(denoised, shift_intensity, clip_negative_vals, skip=info.passed_through)
    if exponent:
        np.ldexp(denoised, exponent, out=denoised)
    if return_info:
        return denoised, info
    return denoised


def _groups_to_fit(groups, bvals, b0_threshold, b0_denoising, info):
    """The groups with volumes to predict; the others' volumes go to ``info.passed_through``.

    A volume alone in its group has nothing to be predicted from: it is passed through
    unchanged (a single b0, or a lone b-value with ``grouping="shell"``). Where no group is left,
    the series cannot be denoised at all: UnsuitableDataError rather than a copy of the input.
    """
    fitted = []
    for group in groups:
        is_b0 = bool(bvals[group[0]] <= b0_threshold)
        if group.size == 1 or (is_b0 and not b0_denoising):
            info.passed_through.extend(int(v) for v in group)
            continue
        if group.size < 10:
            LOGGER.warning(
                "Patch2Self: only %d volumes in a group (volumes %s): fewer than 10 volumes "
                "give a poor prediction",
                group.size,
                group.tolist(),
            )
        fitted.append(group)
        info.groups.append([int(v) for v in group])
    if not fitted:
        sizes = ", ".join(str(group.size) for group in groups)
        raise UnsuitableDataError(
            f"Patch2Self needs a group of at least 2 volumes to denoise (b0s, or diffusion-weighted "
            f"volumes), got groups of {sizes} volume(s)"
            + ("" if b0_denoising else " with b0 denoising off")
        )
    return fitted


def _check_enough_voxels(groups, patch_size, n_fit, masked):
    """Refuse a fit with no more voxels than features.

    The regressions of a group come from the inverse of its centred Gram matrix, of rank at most
    ``n_fit - 1``: with no more voxels than features (volumes x patch size) it is singular, each
    volume is reproduced exactly from the others and nothing is denoised.
    """
    n_features = max(group.size for group in groups) * patch_size
    if n_fit > n_features:
        return
    where = "the fitting mask holds" if masked else "the image holds"
    raise UnsuitableDataError(
        f"Patch2Self needs more voxels than regression features: {where} {n_fit} voxel(s), "
        f"the largest group has {n_features} features ({n_features // patch_size} volumes x "
        f"{patch_size} patch voxels)"
    )


def _as_radius(patch_radius):
    radius = np.atleast_1d(np.asarray(patch_radius, dtype=int))
    if radius.size == 1:
        radius = np.repeat(radius, 3)
    if radius.size != 3 or (radius < 0).any():
        raise ValueError(f"patch_radius must be a non-negative int or 3 ints, got {patch_radius!r}")
    return tuple(int(r) for r in radius)


class _GroupDesign:
    """Rows of a group's design matrix, built chunk by chunk.

    Feature order is (volume, offset): block ``i`` holds the ``k`` patch
    features of the group's ``i``-th volume, the centre feature at ``k // 2``.
    """

    def __init__(self, series, group, radius):
        self.shape = series.shape[:3]
        self.n_volumes = group.size
        self.radius = radius
        self.patch_size = int(np.prod([2 * r + 1 for r in radius]))
        if self.patch_size == 1:
            self._table = torch.from_numpy(series.reshape(-1, series.shape[3]))
            self._columns = torch.from_numpy(group)
            self._offsets = None
        else:
            padded = np.pad(series[..., group], [(r, r) for r in radius] + [(0, 0)])
            self._padded_shape = padded.shape[:3]
            self._table = torch.from_numpy(padded.reshape(-1, group.size))
            self._columns = None
            grids = np.meshgrid(*[np.arange(2 * r + 1) for r in radius], indexing="ij")
            self._offsets = torch.from_numpy(
                np.ravel_multi_index([g.ravel() for g in grids], self._padded_shape)
            )

    @property
    def n_features(self):
        return self.n_volumes * self.patch_size

    def rows(self, voxel_rows) -> torch.Tensor:
        """Design rows (n_rows, n_features) for flat voxel indices (array or slice)."""
        if self._offsets is None:
            if isinstance(voxel_rows, slice):
                return self._table[voxel_rows, self._columns]
            return self._table[torch.from_numpy(voxel_rows)][:, self._columns]
        if isinstance(voxel_rows, slice):
            voxel_rows = np.arange(voxel_rows.start, voxel_rows.stop)
        corner = np.ravel_multi_index(np.unravel_index(voxel_rows, self.shape), self._padded_shape)
        index = torch.from_numpy(corner)[:, None] + self._offsets[None, :]
        patches = self._table[index]  # (rows, k, n)
        return patches.transpose(1, 2).reshape(len(voxel_rows), self.n_features)


def _chunks(rows, n_features: int, device: torch.device):
    """Split voxel rows (an index array, or an int meaning all rows) into chunks."""
    size = max(256, CHUNK_BYTES // (4 * max(n_features, 1)))
    if device.type == "cuda":
        size *= 16
    total = rows if isinstance(rows, int) else rows.size
    for start in range(0, total, size):
        stop = min(start + size, total)
        yield slice(start, stop) if isinstance(rows, int) else rows[start:stop]


def _denoise_voxelwise(series, denoised, groups, ridge, fit_rows, device, compute_dtype):
    """Patch radius 0: every group from one Gram matrix of all volumes, one pass to predict.

    The prediction of the whole series is ``X @ (I - W) + mean @ W`` with ``W``
    block-diagonal (one block of leave-one-out residual weights per group, zero
    for volumes passed through), so each chunk of contiguous voxel rows is one
    matrix product written straight into the output: no gathers, no scattered
    writes.
    """
    n_volumes = series.shape[3]
    table = torch.from_numpy(series.reshape(-1, n_volumes))
    output = torch.from_numpy(denoised.reshape(-1, n_volumes))
    fit = table.shape[0] if fit_rows is None else fit_rows

    def fit_chunks():
        for rows in _chunks(fit, n_volumes, device):
            chunk = table[rows] if isinstance(rows, slice) else table[torch.from_numpy(rows)]
            yield chunk.to(device, compute_dtype)

    n_fit = table.shape[0] if fit_rows is None else fit_rows.size
    mean = torch.zeros(n_volumes, dtype=torch.float64, device=device)
    for chunk in fit_chunks():
        # a BLAS product sums far faster than a reduction with a dtype change
        ones = torch.ones(1, chunk.shape[0], dtype=compute_dtype, device=device)
        mean += (ones @ chunk)[0].to(torch.float64)
    mean /= n_fit
    gram = torch.zeros(n_volumes, n_volumes, dtype=torch.float64, device=device)
    mean_c = mean.to(compute_dtype)
    for chunk in fit_chunks():
        centred = chunk - mean_c
        gram += (centred.T @ centred).to(torch.float64)

    weights = torch.zeros(n_volumes, n_volumes, dtype=torch.float64, device=device)
    regularised = []
    for group in groups:
        index = torch.from_numpy(group).to(device)
        group_weights, flag = _loo_weights(gram[index][:, index], ridge, group.size, 1)
        weights[index.unsqueeze(1), index.unsqueeze(0)] = group_weights
        regularised.append(flag)
    transform = (torch.eye(n_volumes, dtype=torch.float64, device=device) - weights).to(
        compute_dtype
    )
    offset = (mean @ weights).to(compute_dtype)
    for rows in _chunks(table.shape[0], n_volumes, device):
        chunk = table[rows].to(device, compute_dtype)
        if device.type == "cpu" and output.dtype == compute_dtype:
            torch.addmm(offset, chunk, transform, out=output[rows])
        else:
            output[rows] = torch.addmm(offset, chunk, transform).to("cpu", output.dtype)
    return regularised


def _denoise_group(series, denoised, group, radius, ridge, fit_rows, device, compute_dtype):
    """Fit all leave-one-out regressions of one group and write its predictions."""
    design = _GroupDesign(series, group, radius)
    n_voxels = int(np.prod(series.shape[:3]))
    fit = n_voxels if fit_rows is None else fit_rows
    n_fit = n_voxels if fit_rows is None else fit_rows.size

    mean = torch.zeros(design.n_features, dtype=torch.float64, device=device)
    for rows in _chunks(fit, design.n_features, device):
        mean += design.rows(rows).to(device, torch.float64).sum(dim=0)
    mean /= n_fit

    gram = torch.zeros(design.n_features, design.n_features, dtype=torch.float64, device=device)
    mean_c = mean.to(compute_dtype)
    for rows in _chunks(fit, design.n_features, device):
        centred = design.rows(rows).to(device, compute_dtype) - mean_c
        gram += (centred.T @ centred).to(torch.float64)

    weights, regularised = _loo_weights(gram, ridge, design.n_volumes, design.patch_size)
    weights_c = weights.to(compute_dtype)
    offset = (mean @ weights).to(compute_dtype)

    out2d = denoised.reshape(n_voxels, denoised.shape[3])
    for rows in _chunks(n_voxels, design.n_features, device):
        block = design.rows(rows).to(device, compute_dtype)
        own = block[:, design.patch_size // 2 :: design.patch_size]
        residual = block @ weights_c - offset
        out2d[rows, group] = (own - residual).cpu().numpy()
    return regularised


def _loo_weights(gram, ridge, n_volumes, patch_size):
    """Residual weights W (n_features, n_volumes) of every leave-one-block-out fit.

    Column ``i`` of ``Xc @ W`` is the residual of predicting the centre feature
    of block ``i`` from all features outside block ``i``.
    """
    n_features = gram.shape[0]
    eye = torch.eye(n_features, dtype=gram.dtype, device=gram.device)
    system = gram + ridge * eye
    precision, regularised = _spd_inverse(system)
    blocks = precision.reshape(n_volumes, patch_size, n_volumes, patch_size)
    index = torch.arange(n_volumes, device=gram.device)
    diagonal_blocks = blocks[index, :, index, :]  # (n, k, k)
    centre = torch.zeros(n_volumes, patch_size, 1, dtype=gram.dtype, device=gram.device)
    centre[:, patch_size // 2, 0] = 1.0
    coefficients = torch.linalg.solve(diagonal_blocks, centre)[..., 0]  # (n, k)
    # W[:, i] = P[:, block i] @ coefficients[i]
    columns = precision.reshape(n_features, n_volumes, patch_size)
    weights = torch.einsum("fik,ik->fi", columns, coefficients)
    return weights, regularised


def _spd_inverse(matrix):
    """Inverse of a symmetric positive (semi-)definite matrix.

    A singular Gram matrix (duplicated volumes, constant features) gets the
    smallest diagonal loading that makes it invertible; the caller records it.
    """
    factor, status = torch.linalg.cholesky_ex(matrix)
    if int(status) == 0:
        return torch.cholesky_inverse(factor), False
    scale = float(torch.diagonal(matrix).mean())
    loading = max(scale, 1e-30) * 1e-10
    eye = torch.eye(matrix.shape[0], dtype=matrix.dtype, device=matrix.device)
    while True:
        factor, status = torch.linalg.cholesky_ex(matrix + loading * eye)
        if int(status) == 0:
            LOGGER.warning(
                "Patch2Self: the Gram matrix is singular; added %.3g to its diagonal", loading
            )
            return torch.cholesky_inverse(factor), True
        loading *= 100.0
        if not math.isfinite(loading):
            raise FloatingPointError("Patch2Self: Gram matrix is not finite")


def _post_process(denoised, shift_intensity, clip_negative_vals, skip=()):
    skip = set(skip)
    for volume in range(denoised.shape[3]):
        if volume in skip:
            continue
        values = denoised[..., volume]
        if clip_negative_vals:
            np.maximum(values, 0, out=values)
        elif shift_intensity:
            lowest = float(values.min())
            if lowest < 0:
                values -= lowest
