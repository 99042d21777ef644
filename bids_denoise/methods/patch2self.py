"""Patch2Self: self-supervised denoising of diffusion MRI by leave-one-volume-out regression.

Each volume of a group (as DIPY, the b0 volumes and the diffusion-weighted
volumes apart; or the whole series; or each shell) is predicted
from all the other volumes of that group by linear regression with an
intercept. Noise is independent across volumes, so the prediction keeps the
signal the volumes share and drops the noise (Fadnavis et al. 2020).

Where the bias comes from, and what the defaults do about it. The regression
is fitted over voxels and is the best linear predictor in mean squared error;
its coefficients are attenuated by the noise of the predictors (regression
dilution), most along the directions of little variance across voxels. The
angular contrast of white matter is such a direction, so the prediction
flattens it and DTI's FA drops: on the phantom, further below the truth than
the noise alone puts the noisy input's FA. Five things make it worse or better
(measured in ``benchmarks/patch2self_bias.py``):

* Background voxels (Rayleigh noise, two thirds of a small phantom's image) in
  the fit: they dominate the Gram matrix, so the fit serves them. Fitting
  inside a brain mask (``mask="auto"``) lowers the FA and MD errors most.
* Fewer predictors, more dilution: one group per shell is worse than one group
  of all DWIs; one group of every volume, the b0s included as predictors
  (``grouping="all"``), is better still.
* One fit for the whole image: the intercept reproduces the mean signal of the
  fitted voxels without shrinkage, but the angular profile of each fibre
  direction is a small deviation from that mean. Fitting also in overlapping
  cubes (``tile="auto"``) gives each region its own intercept, so the profile
  its coherent fibres share is kept whole; on a single-shell phantom this is
  what brings the FA error below the noisy input's, and it halves the MD error.
* The prediction ``f`` of a volume does not see that volume (J-invariance),
  so with noise variance ``s2`` and ``A = E|f - x|^2 - s2`` (the error of
  ``f``), the blend ``a f + (1 - a) x`` has expected error
  ``a^2 A + (1 - a)^2 s2``, least at ``a = s2 / (A + s2)``. Each volume is
  blended so (``blend="volume"``), with ``A`` and ``s2`` averaged over the
  fitted voxels and ``s2`` the Marchenko-Pastur noise variance of the fitted
  voxels' Gram matrix (the whole fit as one MP-PCA window): PSNR rises and the
  flattened contrast is partly given back. Voxels outside a fit mask get their
  own weights: there the prediction extrapolates, and background keeps mostly
  its input.
* Magnitude data keep a Rician noise floor where the signal is low (it biases
  the noisy input too): ``noise_floor="koay"`` removes it with that noise
  level, as MP-PCA's default does.

The function's defaults are DIPY's Patch2Self (``DIPY_OPTIONS``, spelled
out); ``LOW_BIAS_OPTIONS`` (``grouping="all", fit_mask="auto", tile="auto",
blend="volume", noise_floor="koay"``) are the app's defaults, which do no harm on the phantom
(``tests/methods/test_harm.py``).

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
.. [2] Batson J., Royer L. Noise2Self: Blind Denoising by Self-Supervision.
       ICML 2019 (J-invariance; the blend's error).
.. [3] Cordero-Grande L. et al. Complex diffusion-weighted image estimation via
       matrix recovery under general noise models. NeuroImage 200 (2019) 391-404
       (the Marchenko-Pastur noise estimate).
.. [4] Koay C.G., Basser P.J. Analytically exact correction scheme for signal
       extraction from noisy magnitude MR signals. J Magn Reson 179 (2006) 317-322.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch

from bids_denoise.methods.core.device import resolve_device
from bids_denoise.methods.core.errors import UnsuitableDataError
from bids_denoise.methods.core.masking import b0_brain_mask
from bids_denoise.methods.core.noise_floor import remove_noise_floor
from bids_denoise.methods.core.options import Options, auto_or, integers, option, positive, resolve_options
from bids_denoise.methods.core.randmat import marchenko_pastur_cutoff
from bids_denoise.methods.core.scaling import power_of_two_exponent
from bids_denoise.methods.core.shells import cluster_shells

LOGGER = logging.getLogger(__name__)

#: Bytes of design matrix handled per chunk (CPU); bounds memory, keeps BLAS busy.
CHUNK_BYTES = 32 * 2**20

def tile_option(text):
    """``auto``, ``none`` (one fit for the whole image), or a tile edge: one integer or three (``x,y,z``)."""
    if str(text).strip() == "none":
        return None
    return auto_or(integers(minimum=2))(text)


@dataclass(frozen=True)
class Patch2SelfOptions(Options):
    """The options of :func:`patch2self`; the defaults are DIPY's Patch2Self (:data:`DIPY_OPTIONS`).

    Attributes
    ----------
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
        Denoise the b0 volumes (default True). A single b0 is always passed
        through unchanged (with ``grouping="all"`` it still helps predict the
        others).
    shift_intensity : bool, optional
        If a denoised volume has negative values, add the constant that makes
        its minimum zero (default False). A per-volume offset biases model
        fits, so it is off by default; DIPY 1.10-1.12.1 enable it by default
        but compute a shift of zero, so False also matches what they return.
    clip_negative_vals : bool, optional
        Set negative denoised values to zero (default False). Takes precedence
        over ``shift_intensity``.
    grouping : {"b0_dwi", "all", "shell"}, optional
        Regress within b0s and within all DWIs (default, as DIPY), or predict
        each volume from every other volume, or regress within each shell.
    shell_tolerance : float, optional
        b-value gap that separates shells for ``grouping="shell"``.
    tile : None, "auto", int or sequence of 3 int, optional
        None (default, DIPY): one regression per volume for the whole image. Otherwise the image is
        also cut into cubes of this edge (``"auto"``: the smallest edge whose cube holds
        ``TILE_VOXELS_PER_VOLUME`` voxels per volume), overlapping by half an edge, and each volume
        is predicted in each cube from the regressions fitted on that cube's fitted voxels (the
        mask's); predictions of overlapping cubes are averaged. A cube's intercept is its own mean
        signal, so the contrast shared by its voxels (the angular profile of coherent fibres) is
        kept whole instead of shrunk. Fitted voxels in no cube with more than
        ``TILE_MIN_FIT_RATIO`` times the features fitted keep the whole-image prediction, as do
        voxels outside the mask. Patch radius 0 only.
    blend : {"none", "volume"}, optional
        ``none`` (default): the prediction. ``volume``: output ``a f + (1 - a) x`` per volume, ``f`` the
        prediction, ``x`` the input, ``a = s2 / (A + s2)`` with ``s2`` the
        noise variance and ``A = mean (f - x)^2 - s2`` over the fitted voxels,
        which minimises the expected squared error of the blend for a ``f``
        that does not see its own volume's noise. Where the fit is masked, the voxels outside it
        get their own weights and noise variance (the prediction extrapolates there; pure
        background keeps little of it).
    noise_floor : {"none", "koay"}, optional
        ``none`` (default): no correction. ``koay``: remove the noncentral-chi noise floor of magnitude
        data from the denoised volumes with the noise level (Koay & Basser 2006;
        :func:`bids_denoise.methods.core.noise_floor.remove_noise_floor`).
    n_coils : int, optional
        Receive channels of a sum-of-squares magnitude, for ``noise_floor``
        (default 1, Rician).
    fit_mask : {"none", "auto"}, optional
        ``none`` (default, DIPY): fit the regressions on every voxel. ``auto``: on the b0 brain mask of
        :func:`bids_denoise.methods.core.masking.b0_brain_mask` where what it leaves out is background
        (median mean b0 outside it below ``BACKGROUND_SIGMAS`` noise standard deviations) and it holds
        more voxels than features; every voxel otherwise (``info.fit_mask`` says which). A ``mask``
        given to :func:`patch2self` takes its place.
    """

    patch_radius: int | tuple = option(0, "radius of the neighbourhood each volume contributes (0, or 'r' or "
                                          "'rx,ry,rz')", parse=integers(minimum=0))
    model: str = option("ols", "regression model", choices=("ols", "ridge"))
    alpha: float = option(1.0, "ridge penalty (model ridge)")
    b0_threshold: float = option(50.0, "b-values up to this are b0 volumes")
    b0_denoising: bool = option(True, "denoise the b0 volumes too (true/false)")
    shift_intensity: bool = option(False, "shift a volume with negative values so its minimum is zero (true/false)")
    clip_negative_vals: bool = option(False, "set negative values to zero (true/false)")
    grouping: str = option("b0_dwi", "predict each volume from all others (all), regress within b0s and within "
                                     "DWIs (b0_dwi, DIPY), or within each shell", choices=("all", "b0_dwi", "shell"))
    shell_tolerance: float = option(100.0, "b-value gap that separates shells (grouping shell)", app=False)
    fit_mask: str = option("none", "fit the regressions inside an automatic b0 brain mask where the image has "
                                   "background around the brain (auto), or on every voxel (none, DIPY); the "
                                   "prediction is made everywhere", choices=("auto", "none"))
    tile: int | tuple | str | None = option(
        None, "fit the regressions also in cubes overlapping by half (auto: an edge holding 5 voxels per volume; "
              "or an edge 'e' or 'x,y,z'), or once for the whole image (none, DIPY)", parse=tile_option)
    blend: str = option("none", "blend each volume's prediction with the input by the weight of least expected "
                                "error, from the Marchenko-Pastur noise level of the fitted voxels (volume), or not "
                                "(none, DIPY)", choices=("volume", "none"))
    noise_floor: str = option("none", "remove the Rician/noncentral-chi noise floor with that noise level (koay) "
                                      "or not (none, DIPY)", choices=("koay", "none"))
    n_coils: int = option(1, "receive channels of a sum-of-squares magnitude, for noise_floor koay",
                          parse=positive(int))


#: DIPY's Patch2Self (the function's defaults, spelled out).
DIPY_OPTIONS = Patch2SelfOptions()
#: The app's defaults: fit in the brain and in local cubes, every volume a predictor, blend with the input,
#: remove the noise floor.
LOW_BIAS_OPTIONS = Patch2SelfOptions(grouping="all", fit_mask="auto", tile="auto", blend="volume", noise_floor="koay")

#: ``mask="auto"`` keeps the automatic brain mask only where what it leaves out is background: the
#: median mean b0 outside it below this many noise standard deviations (pure noise gives about 1.25
#: times the Gaussian sigma; tissue a b0 SNR of tens). A crop of the brain, where Otsu's threshold
#: splits tissue from CSF instead, is fitted on every voxel.
BACKGROUND_SIGMAS = 5.0

#: ``tile="auto"``: the smallest cube edge that holds this many voxels per volume of the series.
TILE_VOXELS_PER_VOLUME = 5
#: A tile is fitted only if it has more fitted voxels than this many times the regression features
#: (an in-sample fit gives back about features / voxels of each voxel's own noise).
TILE_MIN_FIT_RATIO = 4


@dataclass
class Patch2SelfInfo:
    """What a Patch2Self run did, for sidecars and reports."""

    groups: list[list[int]]
    passed_through: list[int]
    fit_voxels: int
    regularised_groups: list[int]
    #: how the fit voxels were chosen: "all", "given" or "auto" (the brain mask), or "all (...)" with why
    fit_mask: str = "all"
    #: Marchenko-Pastur noise standard deviation of the fitted voxels (data units); None if not needed
    noise_sigma: float | None = None
    #: per volume, the weight of the prediction in the output (1: the prediction; the input has 1 - a)
    blend_weights: list[float] | None = None
    #: the same for the voxels outside a fit mask
    outside_blend_weights: list[float] | None = None
    #: the tiles' edge, and how many tiles were fitted (``tile``)
    tile: list[int] | None = None
    tiles: int = 0


def volume_groups(bvals, *, b0_threshold=50.0, grouping="b0_dwi", shell_tolerance=100.0):
    """Split volumes into the groups Patch2Self regresses within.

    Parameters
    ----------
    bvals : array-like, shape (n_volumes,)
    b0_threshold : float
        Volumes with ``b <= b0_threshold`` are b0 volumes.
    grouping : {"all", "b0_dwi", "shell"}
        ``all``: one group of every volume. ``b0_dwi``: one group of b0s, one
        of all diffusion-weighted volumes (as DIPY). ``shell``: one group per
        shell (the b0s one of them).
    shell_tolerance : float
        Gap between b-values that separates shells (``grouping="shell"``).

    Returns
    -------
    list of ndarray
        Volume indices of each group, b0 group first (empty groups dropped).
    """
    shell_of_volume = cluster_shells(bvals, b0_threshold=b0_threshold, tolerance=shell_tolerance)
    if grouping == "all":
        return [np.arange(shell_of_volume.size)]
    if grouping == "b0_dwi":
        shell_of_volume = np.minimum(shell_of_volume, 1)
    elif grouping != "shell":
        raise ValueError(f"grouping must be 'all', 'b0_dwi' or 'shell', not {grouping!r}")
    return [np.flatnonzero(shell_of_volume == label) for label in np.unique(shell_of_volume)]


def patch2self(data, bvals, options: Patch2SelfOptions | None = None, *, mask=None, device="cpu",
               out_dtype=np.float32, return_info=False, **changes):
    """Denoise a 4D diffusion series with Patch2Self.

    Parameters
    ----------
    data : ndarray, shape (X, Y, Z, V)
        The diffusion series.
    bvals : array-like, shape (V,)
        b-values of the volumes.
    options : Patch2SelfOptions, optional
        The method's options (default: DIPY's behaviour); keyword ``changes`` replace single options,
        e.g. ``patch2self(data, bvals, LOW_BIAS_OPTIONS, blend="none")``.
    mask : ndarray of bool, shape (X, Y, Z), optional
        Fit the regressions on these voxels only (in place of ``options.fit_mask``); the prediction is
        made everywhere.
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
        The noise level (for ``blend`` and ``noise_floor``) is the Marchenko-Pastur estimate from
        the eigenvalues of the fitted voxels' centred Gram matrix of all volumes, in ``info``;
        where it finds no noise component (too few voxels, or no noise) neither step is taken
        and a warning is logged.
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
    units, as DIPY's and scikit-learn's). With ``noise_floor="koay"``, "to rounding" is looser
    just above the floor, where the inverse of the noncentral-chi mean is steep (a relative change
    of 1e-7 in the input moved the output by 1.5e-5 of its maximum on a 12x12x6 phantom).
    Data whose largest magnitude is outside [1e-6, 1e6] are divided by a power of two first and
    multiplied back after, which is exact; float32 Gram sums of 1e30 would overflow.
    """
    options = resolve_options(Patch2SelfOptions, options, changes)
    b0_threshold, b0_denoising, blend, noise_floor = (options.b0_threshold, options.b0_denoising, options.blend,
                                                      options.noise_floor)
    data = np.asarray(data)
    if data.ndim != 4:
        raise UnsuitableDataError(f"Patch2Self needs a 4D series, got an image of shape {data.shape}")
    bvals = np.asarray(bvals, dtype=float).ravel()
    if bvals.size != data.shape[3]:
        raise ValueError(f"{bvals.size} b-values for {data.shape[3]} volumes")
    radius = _as_radius(options.patch_radius)
    edge = tile_edge(options.tile, data.shape, radius)
    device = resolve_device(device)
    compute_dtype = torch.float64 if data.dtype == np.float64 else torch.float32
    series = np.ascontiguousarray(data, dtype=np.float64 if data.dtype == np.float64 else np.float32)

    info = Patch2SelfInfo(groups=[], passed_through=[], fit_voxels=0, regularised_groups=[])
    groups = volume_groups(
        bvals, b0_threshold=b0_threshold, grouping=options.grouping, shell_tolerance=options.shell_tolerance
    )
    fitted = _groups_to_fit(groups, bvals, b0_threshold, b0_denoising, info)
    patch_size = int(np.prod([2 * r + 1 for r in radius]))
    n_features = max(group.size for group in fitted) * patch_size

    # exact rescaling of extreme intensities (a power of two): float32 Gram sums neither
    # overflow nor underflow, and the ridge penalty keeps its meaning in the data's units
    exponent = power_of_two_exponent(series)
    if exponent:
        series = np.ldexp(series, -exponent)

    if mask is not None:
        info.fit_mask = "given"
    elif options.fit_mask == "auto":
        mask, info.fit_mask = _auto_fit_mask(series, bvals, b0_threshold, n_features, device, compute_dtype)
    fit_rows = None if mask is None else np.flatnonzero(np.asarray(mask, dtype=bool).ravel())
    if fit_rows is not None and fit_rows.size == 0:
        raise UnsuitableDataError("Patch2Self: the fitting mask is empty")
    info.fit_voxels = int(series[..., 0].size if fit_rows is None else fit_rows.size)
    _check_enough_voxels(fitted, patch_size, info.fit_voxels, masked=fit_rows is not None)
    ridge = float(np.ldexp(options.alpha, -2 * exponent)) if options.model == "ridge" else 0.0
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
    if edge is not None:
        info.tile, info.tiles = list(edge), _predict_in_tiles(
            series, denoised, fitted, ridge, mask, edge, n_features, device, compute_dtype)
    # volumes that only predict (a lone b0 in the "all" group, b0s not denoised) keep their values
    denoised[..., info.passed_through] = series[..., info.passed_through]

    if blend != "none" or noise_floor != "none":
        variance = _noise_variance(series, fit_rows, device, compute_dtype)
        info.noise_sigma = float(np.ldexp(np.sqrt(variance), exponent))
        if variance > 0:
            predicted = [v for v in range(series.shape[3]) if v not in set(info.passed_through)]
            if blend != "none":
                info.blend_weights = _blend_with_input(denoised, series, predicted, variance, fit_rows)
                if fit_rows is not None and fit_rows.size < series[..., 0].size:
                    # outside the fit the prediction extrapolates: its own weights, its own noise level
                    others = np.setdiff1d(np.arange(series[..., 0].size), fit_rows)
                    outside_variance = _noise_variance(series, others, device, compute_dtype)
                    info.outside_blend_weights = _blend_with_input(denoised, series, predicted, outside_variance,
                                                                   others)
            if noise_floor != "none":
                for volume in predicted:
                    denoised[..., volume] = remove_noise_floor(denoised[..., volume], np.sqrt(variance),
                                                               options.n_coils)
        else:
            LOGGER.warning("Patch2Self: no noise component found in the fitted voxels (%d voxels, %d volumes): "
                           "no blend with the input, no noise-floor removal", info.fit_voxels, series.shape[3])
    _post_process(denoised, options.shift_intensity, options.clip_negative_vals, skip=info.passed_through)
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
    is_b0 = bvals <= b0_threshold
    for group in groups:
        if group.size == 1 or (is_b0[group].all() and not b0_denoising):
            info.passed_through.extend(int(v) for v in group)
            continue
        # in a mixed group (grouping="all"), b0s that are not denoised, or a lone b0, only predict
        if not is_b0[group].all() and (not b0_denoising or is_b0[group].sum() == 1):
            info.passed_through.extend(int(v) for v in group[is_b0[group]])
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
    mean, gram = _centred_gram(series, fit_rows, device, compute_dtype)

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


def _centred_gram(series, fit_rows, device, compute_dtype):
    """Mean (V,) and centred Gram matrix (V, V) of all volumes over the fitted voxels, float64."""
    n_volumes = series.shape[3]
    table = torch.from_numpy(series.reshape(-1, n_volumes))
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
    return mean, gram


def tile_edge(tile, shape, radius):
    """The tile edge per axis (capped at the image), or None for no tiles."""
    if tile is None:
        return None
    if radius != (0, 0, 0):
        raise ValueError("tile needs patch_radius 0")
    if isinstance(tile, str):
        if tile != "auto":
            raise ValueError(f"tile must be None, 'auto' or edge lengths, not {tile!r}")
        edge = int(math.ceil((TILE_VOXELS_PER_VOLUME * shape[3]) ** (1 / 3) - 1e-9))
        return tuple(min(edge, size) for size in shape[:3])
    edges = np.atleast_1d(np.asarray(tile, dtype=int))
    edges = np.repeat(edges, 3) if edges.size == 1 else edges
    if edges.size != 3 or (edges < 2).any():
        raise ValueError(f"tile must be one or three edge lengths of at least 2, got {tile!r}")
    return tuple(int(min(edge, size)) for edge, size in zip(edges, shape[:3]))


def tile_corners(shape, edge):
    """Corners of tiles overlapping by half an edge that cover the image (the last flush with its end)."""
    starts = []
    for size, length in zip(shape, edge):
        step = max(length // 2, 1)
        axis = list(range(0, size - length + 1, step))
        if axis[-1] + length < size:
            axis.append(size - length)
        starts.append(axis)
    return [(i, j, k) for i in starts[0] for j in starts[1] for k in starts[2]]


def _predict_in_tiles(series, denoised, groups, ridge, mask, edge, n_features, device, compute_dtype) -> int:
    """Replace the fitted voxels' predictions by the mean of their tiles' local predictions, in place.

    Returns the number of tiles fitted. ``denoised`` holds the whole-image prediction, kept where no
    tile was fitted and outside ``mask``.
    """
    shape = series.shape[:3]
    fitted = np.ones(shape, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    # the sums of at most 8 overlapping tiles' predictions, in the output's precision: one more series in
    # memory, not two (float64) and their masked copies
    total = np.zeros(series.shape, dtype=denoised.dtype)
    count = np.zeros(shape, dtype=np.int32)
    tiles = 0
    for corner in tile_corners(shape, edge):
        region = tuple(slice(start, start + length) for start, length in zip(corner, edge))
        inside = fitted[region]
        if inside.sum() <= TILE_MIN_FIT_RATIO * n_features:
            continue
        local = np.empty(inside.shape + (series.shape[3],), dtype=denoised.dtype)
        rows = None if inside.all() else np.flatnonzero(inside.ravel())
        _denoise_voxelwise(np.ascontiguousarray(series[region]), local, groups, ridge, rows, device, compute_dtype)
        local[~inside] = 0
        total[region] += local
        count[region] += inside
        tiles += 1
    for x in range(shape[0]):  # plane by plane: no full-size temporaries
        covered = count[x] > 0
        denoised[x][covered] = total[x][covered] / count[x][covered][:, None]
    return tiles


def _noise_variance(series, fit_rows, device, compute_dtype) -> float:
    """Noise variance of the fitted voxels: Marchenko-Pastur (Exp2) on the eigenvalues of their
    centred Gram matrix of all volumes, the whole fit as one MP-PCA window; 0 if no noise component."""
    _, gram = _centred_gram(series, fit_rows, device, compute_dtype)
    n_fit = series[..., 0].size if fit_rows is None else fit_rows.size
    eigenvalues = torch.linalg.eigvalsh(gram.cpu())[None]
    _, variance = marchenko_pastur_cutoff(eigenvalues, series.shape[3], n_fit)
    return float(variance[0])


def _auto_fit_mask(series, bvals, b0_threshold, n_features, device, compute_dtype):
    """The b0 brain mask where it leaves out background and holds more voxels than features, else None.

    Returns (mask or None, what ``info.fit_mask`` records).
    """
    mask = b0_brain_mask(series, bvals, b0_threshold=b0_threshold)
    if mask.all():
        return None, "all (the brain mask holds every voxel)"
    if mask.sum() <= n_features:
        return None, f"all (the brain mask holds {int(mask.sum())} voxels, not more than {n_features} features)"
    b0 = bvals <= b0_threshold
    reference = series[..., b0].mean(axis=3) if b0.any() else series.mean(axis=3)
    sigma = np.sqrt(_noise_variance(series, None, device, compute_dtype))
    outside = float(np.median(reference[~mask]))
    if outside < BACKGROUND_SIGMAS * sigma or outside <= 0:
        return mask, "auto"
    return None, "all (outside the brain mask is not background)"


def _blend_with_input(denoised, series, volumes, variance, rows) -> list[float]:
    """Replace each predicted volume by ``a f + (1 - a) x`` on ``rows`` (flat voxel indices, None for
    all), in place; the weights ``a`` per volume.

    ``a = s2 / (A + s2)``, ``A = mean (f - x)^2 - s2`` over those voxels (at least 0): the least
    expected squared error of the blend for a prediction ``f`` blind to its own volume's noise. A
    noise variance of 0 gives ``a = 0``, the input. Fitted on the voxels it predicts, ``f`` gives each
    back a share of its own noise (features / fitted voxels: small for one fit, up to 1 /
    ``TILE_MIN_FIT_RATIO`` in a tile), which this estimate ignores; a version that models it gave
    lower weights and a lower PSNR on the phantom, where the weight of least error against the true
    signal is 1 for every tiled volume, as these nearly all are.
    """
    weights = [1.0] * series.shape[3]
    flat_denoised = denoised.reshape(-1, denoised.shape[3])
    flat_series = series.reshape(-1, series.shape[3])
    for volume in volumes:
        prediction, values = flat_denoised[:, volume], flat_series[:, volume]
        if rows is not None:
            prediction, values = prediction[rows], values[rows]
        error = max(float(np.mean((prediction.astype(np.float64) - values) ** 2)) - variance, 0.0)
        weight = variance / (error + variance) if variance > 0 else 0.0
        weights[volume] = weight
        blended = weight * prediction + (1.0 - weight) * values
        if rows is None:
            flat_denoised[:, volume] = blended
        else:
            flat_denoised[rows, volume] = blended
    return weights


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
