"""Do no harm: checks that a denoiser leaves diffusion data no worse than it found it.

Two kinds of check, both used by the tests and the benchmarks:

* On a phantom with a known noise-free signal (:mod:`bids_denoise.testing.phantom`): the PSNR of
  every shell against the signal, and the errors of DTI's fractional anisotropy (FA) and mean
  diffusivity (MD) in white matter against the fit on the signal, each compared with the noisy
  input's (:func:`harm_report`, :func:`check_no_harm`). A denoiser that raises PSNR but flattens the
  angular contrast fails on FA; one that smooths across tissue fails on MD or on a shell's PSNR.
* On real data, where no signal is known: k-fold cross-validated prediction
  (:func:`cross_validated_prediction`), the test of the Patch2Self paper. A diffusion model fitted on
  the denoised series without some volumes predicts those volumes as they were acquired; denoising
  that keeps the signal predicts them at least as well as the raw series does.

DTI fits use DIPY's ``TensorModel`` (weighted least squares), imported when first needed.

References
----------
.. [1] Fadnavis S., Batson J., Garyfallidis E. Patch2Self: Denoising Diffusion MRI with
       Self-Supervised Learning. NeurIPS 2020 (section 4, cross-validated prediction).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bids_denoise.evaluate import cross_validation_folds
from bids_denoise.methods.core.shells import cluster_shells

#: b-values up to this are b0 volumes.
B0_THRESHOLD = 50.0
#: DTI is fitted on b-values up to this (the diffusion-tensor regime; the phantom's b=2000 shell is left out).
DTI_MAX_BVAL = 1100.0
#: White matter of the phantom: brain voxels whose noise-free FA is above this.
WHITE_MATTER_FA = 0.3


def shell_psnr(out, phantom, region=None) -> dict[float, float]:
    """PSNR of every shell of ``out`` against the phantom's noise-free signal.

    Parameters
    ----------
    out : ndarray, shape (X, Y, Z, V)
        A denoised (or the noisy) series of the phantom.
    phantom : bids_denoise.testing.phantom.Phantom
    region : ndarray of bool, shape (X, Y, Z), optional
        Voxels compared (default: the phantom's brain mask).

    Returns
    -------
    dict
        ``{b-value: PSNR in dB}``, with b the shell's mean b-value rounded to 10 (0 for the b0s).
        The peak of each shell is the signal's largest value in that shell.
    """
    region = phantom.mask if region is None else np.asarray(region, dtype=bool)
    shell_of_volume = cluster_shells(phantom.bvals, b0_threshold=B0_THRESHOLD)
    result = {}
    for label in np.unique(shell_of_volume):
        volumes = shell_of_volume == label
        truth = phantom.signal[..., volumes][region].astype(float)
        estimate = np.asarray(out)[..., volumes][region].astype(float)
        peak = float(phantom.signal[..., volumes].max())
        mse = float(np.mean((estimate - truth) ** 2))
        bvalue = 0.0 if label == 0 else float(np.round(phantom.bvals[volumes].mean(), -1))
        result[bvalue] = float("inf") if mse == 0 else 10 * np.log10(peak**2 / mse)
    return result


def tensor_fit(series, bvals, bvecs, mask, *, max_bval=DTI_MAX_BVAL):
    """DTI fit (DIPY ``TensorModel``, weighted least squares, S0 estimated) on the volumes with
    ``b <= max_bval``; returns DIPY's fit.

    Values are clipped at 1e-3 first (the log of the signal must exist).
    """
    from dipy.core.gradients import gradient_table
    from dipy.reconst.dti import TensorModel

    keep = np.asarray(bvals) <= max_bval
    table = gradient_table(np.asarray(bvals)[keep], bvecs=np.asarray(bvecs)[:, keep].T, b0_threshold=B0_THRESHOLD)
    return TensorModel(table, return_S0_hat=True).fit(np.clip(np.asarray(series, dtype=float)[..., keep], 1e-3, None), mask=mask)


@dataclass
class TensorReference:
    """The noise-free fit of a phantom: FA and MD maps, and the white matter they define."""

    fa: np.ndarray
    md: np.ndarray
    white_matter: np.ndarray


def tensor_reference(phantom) -> TensorReference:
    """Fit DTI on the phantom's noise-free signal; white matter = brain with FA above 0.3."""
    fit = tensor_fit(phantom.signal, phantom.bvals, phantom.bvecs, phantom.mask)
    return TensorReference(fit.fa, fit.md, phantom.mask & (fit.fa > WHITE_MATTER_FA))


def tensor_errors(out, phantom, reference=None) -> dict[str, float]:
    """Mean absolute FA and MD errors of ``out`` in white matter.

    Parameters
    ----------
    out : ndarray, shape (X, Y, Z, V)
    phantom : bids_denoise.testing.phantom.Phantom
    reference : TensorReference, optional
        The noise-free fit (:func:`tensor_reference`), to fit it once for several series.

    Returns
    -------
    dict
        ``{"fa": mean |FA - FA_true|, "md": mean |MD - MD_true|}`` over white matter (MD in
        mm²/s), DTI on b <= 1100.
    """
    reference = tensor_reference(phantom) if reference is None else reference
    fit = tensor_fit(out, phantom.bvals, phantom.bvecs, phantom.mask)
    white = reference.white_matter
    return {"fa": float(np.mean(np.abs(fit.fa - reference.fa)[white])),
            "md": float(np.mean(np.abs(fit.md - reference.md)[white]))}


def harm_report(out, phantom, reference=None) -> dict[str, dict]:
    """PSNR per shell and white-matter tensor errors, of the noisy input and of ``out``.

    Returns
    -------
    dict
        ``{"noisy": {"psnr": {b: dB}, "fa": .., "md": ..}, "output": {...}}``.
    """
    reference = tensor_reference(phantom) if reference is None else reference
    report = {}
    for name, series in (("noisy", phantom.noisy), ("output", out)):
        report[name] = {"psnr": shell_psnr(series, phantom), **tensor_errors(series, phantom, reference)}
    return report


def check_no_harm(out, phantom, report=None) -> list[str]:
    """What ``out`` made worse than the noisy input; an empty list means no harm.

    No harm: every shell's PSNR (brain) above the noisy input's, and FA and MD errors in white
    matter at or below the noisy input's.

    Parameters
    ----------
    out : ndarray, shape (X, Y, Z, V)
    phantom : bids_denoise.testing.phantom.Phantom
    report : dict, optional
        :func:`harm_report` of ``out``, if already computed.

    Returns
    -------
    list of str
        One line per failure, with the numbers.
    """
    report = harm_report(out, phantom) if report is None else report
    noisy, output = report["noisy"], report["output"]
    failures = [
        f"b={bvalue:g} shell: PSNR {output['psnr'][bvalue]:.2f} dB, not above the noisy input's {before:.2f} dB"
        for bvalue, before in noisy["psnr"].items() if not output["psnr"][bvalue] > before
    ]
    for metric in ("fa", "md"):
        if not output[metric] <= noisy[metric]:
            failures.append(f"{metric.upper()} error in white matter {output[metric]:.4g}, above the noisy "
                            f"input's {noisy[metric]:.4g}")
    return failures


@dataclass
class CrossValidation:
    """Cross-validated prediction of the raw held-out volumes.

    ``r2_denoised`` and ``r2_raw`` are the medians over the mask of each voxel's R² (over all
    diffusion-weighted volumes, each predicted by the fold that held it out), with and without
    denoising; the maps hold the per-voxel values (NaN outside the mask).
    """

    r2_denoised: float
    r2_raw: float
    r2_map_denoised: np.ndarray
    r2_map_raw: np.ndarray
    folds: list[list[int]]


def cross_validated_prediction(denoise, data, bvals, bvecs, mask, folds=5, seed=0, *,
                               max_bval=np.inf) -> CrossValidation:
    """K-fold cross-validated DTI prediction of the raw held-out volumes, with and without denoising.

    For each fold, the series without its held-out volumes is denoised (so the denoiser never sees
    them: their noise cannot leak into the prediction), DTI is fitted on it and predicts the
    held-out volumes; the same fit on the raw series without them is the comparison. Each voxel's
    R² is ``1 - sum (raw - predicted)² / sum (raw - mean raw)²`` over all held-out volumes (every
    diffusion-weighted volume once). The noise of the raw volumes bounds R² below 1 for every
    method; a denoiser that removes noise and keeps signal raises it, one that distorts the signal
    lowers it (Fadnavis et al. 2020).

    Parameters
    ----------
    denoise : callable
        ``denoise(data, bvals, bvecs) -> denoised`` (same shape as ``data``).
    data : ndarray, shape (X, Y, Z, V)
    bvals : ndarray, shape (V,)
    bvecs : ndarray, shape (3, V)
    mask : ndarray of bool, shape (X, Y, Z)
        Voxels fitted and scored.
    folds : int, optional
        Number of folds (default 5).
    seed : int, optional
        Seed of the split (default 0).
    max_bval : float, optional
        DTI is fitted on, and predicts, volumes with ``b <= max_bval`` (default: all); the denoiser
        sees every volume outside the held-out fold.

    Returns
    -------
    CrossValidation
    """
    data = np.asarray(data, dtype=float)
    bvals = np.asarray(bvals, dtype=float).ravel()
    bvecs = np.asarray(bvecs, dtype=float)
    mask = np.asarray(mask, dtype=bool)
    scored = bvals <= max_bval
    held_out_sets = [held_out[scored[held_out]] for held_out in cross_validation_folds(bvals, folds, seed)]
    predictions = {"denoised": np.zeros(data.shape), "raw": np.zeros(data.shape)}
    for held_out in held_out_sets:
        train = np.setdiff1d(np.arange(bvals.size), held_out)
        denoised = np.asarray(denoise(data[..., train], bvals[train], bvecs[:, train]), dtype=float)
        for name, series in (("denoised", denoised), ("raw", data[..., train])):
            fit = tensor_fit(series, bvals[train], bvecs[:, train], mask, max_bval=max_bval)
            predictions[name][..., held_out] = _predict(fit, bvals[held_out], bvecs[:, held_out])
    predicted = np.flatnonzero(scored & (bvals > B0_THRESHOLD))
    raw = data[mask][:, predicted]
    total = np.sum((raw - raw.mean(axis=1, keepdims=True)) ** 2, axis=1)
    maps = {}
    for name, prediction in predictions.items():
        residual = np.sum((raw - prediction[mask][:, predicted]) ** 2, axis=1)
        maps[name] = np.full(mask.shape, np.nan)
        with np.errstate(divide="ignore", invalid="ignore"):
            maps[name][mask] = 1.0 - residual / total
    return CrossValidation(float(np.nanmedian(maps["denoised"][mask])), float(np.nanmedian(maps["raw"][mask])),
                           maps["denoised"], maps["raw"], [held_out.tolist() for held_out in held_out_sets])


def _predict(fit, bvals, bvecs) -> np.ndarray:
    """The tensor fit's signal for new gradient directions: S0 exp(-b g^T D g)."""
    tensors = fit.quadratic_form  # (X, Y, Z, 3, 3)
    attenuation = np.einsum("iv,...ij,jv->...v", bvecs, tensors, bvecs)
    s0 = np.nan_to_num(np.asarray(fit.S0_hat, dtype=float))
    return s0[..., None] * np.exp(-bvals * attenuation)
