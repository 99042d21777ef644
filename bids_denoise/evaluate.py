"""Did denoising help this run? A leak-free score on the user's own data, no ground truth needed.

The volumes of a run are split into folds. For each fold, the method denoises the run *without* the fold's
volumes (so their noise cannot leak into anything that predicts them); a signal model fitted on the denoised
remaining volumes predicts the held-out volumes, and is compared with them *as they were acquired*. The
same model fitted on the raw remaining volumes is the baseline: no denoising. A denoiser that removes noise
and keeps the signal predicts the raw held-out volumes better than the raw remaining volumes do; one that
distorts the signal (flattens angular contrast, blurs tissue, removes physiology) predicts them worse. The
score cannot be gamed by denoising the held-out volumes themselves, which the protocol of the Patch2Self
paper allows (there a denoiser that copies each volume's noise into its neighbours looks good).

* DWI: folds deal each shell's diffusion-weighted volumes in turn (every fold holds a share of every shell;
  the b0s are never held out). The model is an even spherical-harmonic expansion per shell (the largest
  order the remaining directions of the shell support, at most 8), fitted by least squares to each voxel's
  remaining volumes of that shell and evaluated at the held-out directions: no tensor assumption, so it
  holds at any b-value and in crossing fibres.
* BOLD: two interleaved folds (even and odd volumes); a held-out volume is predicted as the mean of its two
  neighbours in time (one at the ends). BOLD signal changes slowly against a TR, thermal noise does not: the
  neighbours' noise is what denoising removes, and their signal is what it must keep.

Scores are over the brain (an automatic mask): R² per voxel, ``1 - sum (raw - predicted)^2 / sum (raw -
mean raw)^2`` over the held-out volumes, its median; and the root mean square prediction error.

:func:`fa_change` gives, for DWI, the median change of DTI's fractional anisotropy in white matter (fitted
by weighted least squares on the b-values up to 1500, in numpy) between the raw and the denoised run.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from bids_denoise.methods.core.masking import tissue_mask
from bids_denoise.methods.core.shells import cluster_shells, even_sh_basis

#: b-values up to this are b0 volumes
B0_THRESHOLD = 50.0
#: the largest spherical-harmonic order of the DWI model
MAX_ORDER = 8
#: DTI (for the FA change) is fitted on b-values up to this
DTI_MAX_BVAL = 1500.0
#: the least share of the held-out prediction error that denoising must remove to count as helping (differences
#: below it are rounding: a method that returns its input up to rounding does not help)
MIN_GAIN = 0.005


@dataclass
class Score:
    """A run's leak-free score, with and without denoising (see the module's docstring)."""

    r2: float  # median over the brain of the per-voxel R² of the held-out volumes, denoised remaining volumes
    r2_without: float  # the same from the raw remaining volumes: no denoising
    rmse: float  # root mean square prediction error over the brain's held-out values
    rmse_without: float
    folds: int
    model: str

    @property
    def helps(self) -> bool:
        """Whether the denoised run predicts the held-out volumes better than the raw run does (by at least
        :data:`MIN_GAIN` of its error)."""
        return self.rmse < self.rmse_without * (1.0 - MIN_GAIN)

    def as_dict(self) -> dict:
        values = asdict(self)
        return {key: round(value, 6) if isinstance(value, float) else value for key, value in values.items()}


def cross_validation_folds(bvals, folds=5, seed=0) -> list[np.ndarray]:
    """The DWI volumes dealt to ``folds`` held-out sets, every shell spread over all; b0s never held out.

    The volumes of each shell are shuffled (seeded) and dealt to the folds in turn, continuing where the
    previous shell stopped, so each fold holds a share of every shell.
    """
    rng = np.random.default_rng(seed)
    shell_of_volume = cluster_shells(bvals, b0_threshold=B0_THRESHOLD)
    dealt = [[] for _ in range(folds)]
    position = 0
    for label in np.unique(shell_of_volume[shell_of_volume > 0]):
        for volume in rng.permutation(np.flatnonzero(shell_of_volume == label)):
            dealt[position % folds].append(int(volume))
            position += 1
    return [np.array(sorted(held_out), dtype=int) for held_out in dealt if held_out]


def score_job(run, inputs) -> Score:
    """The leak-free score of a method on the single run of ``inputs`` (a
    :class:`~bids_denoise.contract.MethodInputs`): ``run(part) -> image`` denoises ``part``, the run
    without a fold's volumes (its phase left out); :func:`dwi_score` where the run has b-values, else
    :func:`bold_score`."""
    from dataclasses import replace

    def denoise(data, bvals=None, bvecs=None):
        return run(replace(inputs, data=data, bvals=bvals, bvecs=bvecs, phase=None))

    if inputs.bvals is not None:
        return dwi_score(denoise, inputs.data, inputs.bvals, inputs.bvecs, seed=inputs.seed)
    return bold_score(denoise, inputs.data)


def dwi_score(denoise, data, bvals, bvecs, *, folds=5, seed=0, mask=None) -> Score:
    """The leak-free score of ``denoise(data, bvals, bvecs) -> denoised`` on a DWI run.

    Parameters
    ----------
    denoise : callable
        Denoises a series given its b-values and b-vectors (the run without a fold's volumes).
    data : ndarray, shape (X, Y, Z, V)
    bvals : ndarray, shape (V,)
    bvecs : ndarray, shape (3, V)
    folds, seed : int
        The split (:func:`cross_validation_folds`).
    mask : ndarray of bool, optional
        The voxels scored (default: an automatic b0 brain mask).
    """
    data = np.asarray(data)
    bvals = np.asarray(bvals, dtype=float).ravel()
    bvecs = np.asarray(bvecs, dtype=float)
    mask = tissue_mask(data, bvals) if mask is None else np.asarray(mask, dtype=bool)
    shells = cluster_shells(bvals, b0_threshold=B0_THRESHOLD)
    held_out_sets = cross_validation_folds(bvals, folds, seed)
    raw = data[mask].astype(np.float64)  # (N, V)
    predicted = {"denoised": np.zeros_like(raw), "raw": np.zeros_like(raw)}
    orders = set()
    for held_out in held_out_sets:
        train = np.setdiff1d(np.arange(bvals.size), held_out)
        denoised = np.asarray(denoise(data[..., train], bvals[train], bvecs[:, train]))[mask].astype(np.float64)
        for name, remaining in (("denoised", denoised), ("raw", raw[:, train])):
            for label in np.unique(shells[held_out]):
                fit_columns = np.flatnonzero(shells[train] == label)
                targets = held_out[shells[held_out] == label]
                order = _order_for(fit_columns.size)
                orders.add(order)
                basis = even_sh_basis(bvecs[:, train[fit_columns]].T, order)
                coefficients, *_ = np.linalg.lstsq(basis, remaining[:, fit_columns].T, rcond=None)
                predicted[name][:, targets] = (even_sh_basis(bvecs[:, targets].T, order) @ coefficients).T
    scored = np.concatenate(held_out_sets)
    return _score(raw[:, scored], predicted["denoised"][:, scored], predicted["raw"][:, scored], len(held_out_sets),
                  f"even spherical harmonics per shell (order {', '.join(map(str, sorted(orders)))})")


def bold_score(denoise, data, *, mask=None) -> Score:
    """The leak-free score of ``denoise(data) -> denoised`` on a BOLD run: two interleaved folds, each held-out
    volume predicted by the mean of its neighbours in time among the remaining (denoised, or raw) volumes."""
    data = np.asarray(data)
    n_volumes = data.shape[3]
    mask = tissue_mask(data, np.zeros(n_volumes)) if mask is None else np.asarray(mask, dtype=bool)
    raw = data[mask].astype(np.float64)
    predicted = {"denoised": np.zeros_like(raw), "raw": np.zeros_like(raw)}
    for parity in (0, 1):
        held_out = np.arange(parity, n_volumes, 2)
        train = np.setdiff1d(np.arange(n_volumes), held_out)
        denoised = np.asarray(denoise(data[..., train]))[mask].astype(np.float64)
        for name, remaining in (("denoised", denoised), ("raw", raw[:, train])):
            # each held-out volume's neighbours among the remaining ones (train is sorted)
            after = np.clip(np.searchsorted(train, held_out), 0, train.size - 1)
            before = np.clip(after - 1, 0, train.size - 1)
            after = np.where(train[after] < held_out, before, after)  # past the last: its one neighbour
            predicted[name][:, held_out] = 0.5 * (remaining[:, before] + remaining[:, after])
    return _score(raw, predicted["denoised"], predicted["raw"], 2, "mean of the neighbours in time")


def _order_for(directions: int) -> int:
    """The largest even order whose basis ((L + 1)(L + 2) / 2 functions) the directions fit with some to spare."""
    order = 0
    while order + 2 <= MAX_ORDER and (order + 3) * (order + 4) / 2 * 1.5 <= directions:
        order += 2
    return order


def _score(raw, denoised, baseline, folds, model) -> Score:
    def r2(prediction):
        residual = np.sum((raw - prediction) ** 2, axis=1)
        total = np.sum((raw - raw.mean(axis=1, keepdims=True)) ** 2, axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            return float(np.nanmedian(np.where(total > 0, 1.0 - residual / total, np.nan)))

    def rmse(prediction):
        return float(np.sqrt(np.mean((raw - prediction) ** 2)))

    return Score(r2(denoised), r2(baseline), rmse(denoised), rmse(baseline), folds, model)


def fa_change(raw, denoised, bvals, bvecs, *, mask=None) -> dict:
    """The median FA of white matter (raw FA above 0.3 in the brain) before and after denoising, from DTI fitted
    by weighted least squares to the b0s and the b-values up to :data:`DTI_MAX_BVAL` (numpy) or, where the run
    has fewer than six such volumes, to its lowest shell (``fa_bmax`` says which); None where it cannot."""
    bvals = np.asarray(bvals, dtype=float).ravel()
    bvecs = np.asarray(bvecs, dtype=float)
    none = {"fa_raw": None, "fa_denoised": None, "fa_change": None, "fa_bmax": None}
    weighted = bvals > B0_THRESHOLD
    used = bvals <= DTI_MAX_BVAL
    if np.count_nonzero(used & weighted) < 6 and weighted.any():
        lowest = bvals[weighted].min()
        used = ~weighted | (bvals <= lowest * 1.1 + B0_THRESHOLD)
    if np.count_nonzero(used & weighted) < 6 or not np.any(used & ~weighted):
        return none
    mask = tissue_mask(raw, bvals) if mask is None else np.asarray(mask, dtype=bool)
    fa_raw = _fa(np.asarray(raw)[mask][:, used], bvals[used], bvecs[:, used])
    fa_denoised = _fa(np.asarray(denoised)[mask][:, used], bvals[used], bvecs[:, used])
    white = fa_raw > 0.3
    if not white.any():
        return none
    before, after = float(np.median(fa_raw[white])), float(np.median(fa_denoised[white]))
    return {"fa_raw": round(before, 4), "fa_denoised": round(after, 4), "fa_change": round(after - before, 4),
            "fa_bmax": float(bvals[used].max())}


def _fa(signal, bvals, bvecs) -> np.ndarray:
    """FA of DTI fitted to each row of ``signal`` (N, V): log-linear least squares weighted by the squared
    first-pass prediction (the usual WLS), the six tensor elements and log S0."""
    g = bvecs.T
    design = np.column_stack([-bvals * g[:, 0] ** 2, -bvals * g[:, 1] ** 2, -bvals * g[:, 2] ** 2,
                              -2 * bvals * g[:, 0] * g[:, 1], -2 * bvals * g[:, 0] * g[:, 2],
                              -2 * bvals * g[:, 1] * g[:, 2], np.ones(bvals.size)])
    logs = np.log(np.clip(signal, 1e-6, None))
    first, *_ = np.linalg.lstsq(design, logs.T, rcond=None)  # (7, N)
    weights = np.exp(design @ first) ** 2  # (V, N)
    fa = np.zeros(signal.shape[0])
    for start in range(0, signal.shape[0], 4096):
        rows = slice(start, start + 4096)
        w = weights[:, rows].T[:, :, None]  # (n, V, 1)
        lhs = np.einsum("nvi,nvj->nij", w * design[None], design[None].repeat(w.shape[0], axis=0))
        rhs = np.einsum("nvi,nv->ni", w * design[None], logs[rows])
        try:
            coefficients = np.linalg.solve(lhs, rhs[..., None])[..., 0]
        except np.linalg.LinAlgError:
            coefficients = first[:, rows].T
        dxx, dyy, dzz, dxy, dxz, dyz = coefficients[:, :6].T
        tensors = np.stack([np.stack([dxx, dxy, dxz], -1), np.stack([dxy, dyy, dyz], -1),
                            np.stack([dxz, dyz, dzz], -1)], -2)
        eigenvalues = np.clip(np.linalg.eigvalsh(tensors), 0, None)
        mean = eigenvalues.mean(axis=1, keepdims=True)
        norm = np.sqrt((eigenvalues**2).sum(axis=1))
        with np.errstate(divide="ignore", invalid="ignore"):
            fa[rows] = np.where(norm > 0, np.sqrt(1.5 * ((eigenvalues - mean) ** 2).sum(axis=1)) / norm, 0.0)
    return fa
