"""BOLD denoising judged as users judge it: a first-level GLM, and false positives by distance from activation.

A :class:`Case` is one BOLD run of a phantom with everything needed to judge a denoiser's output: per echo
the noisy magnitude (and the phase of a complex run), the brain, grey matter and active masks, each
voxel's distance from the active region, the events a user's GLM reads and the task regressor. Cases
come from two generators (:func:`make_case`): ``small`` (25x30x20, 200 volumes, where a default MP-PCA
window covers a large part of the brain) and ``large`` (40x48x30, 150 volumes) from
:mod:`bids_denoise.testing.bold_phantom`; ``folded`` (36x42x26, 160 volumes, TR 1.5 s) from
:mod:`bids_denoise.testing.folded_bold_phantom`. A null run has the same geometry, physiology and noise
with no task: every positive is false.

Scoring (:func:`score`): nilearn's ``FirstLevelModel`` as a user fits it (AR(1) noise model, cosine drift
at 0.01 Hz, SPM's response, the run's events, no smoothing) and the naive OLS t of the phantom's
regressor with an intercept; |t| > 3.1. Metrics: ROI mean t (the active region), TPR, and the
false-positive rate in grey matter 0-2, 2-5 and beyond 5 voxels from the active region (Euclidean
distance), per 1-voxel distance bin up to 12, and over all grey matter on a null run.

nilearn is needed here only (``pip install nilearn``; a benchmark and test dependency, not the app's).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

THRESHOLD = 3.1
BANDS = {"0-2": (0.0, 2.0), "2-5": (2.0, 5.0), ">5": (5.0, np.inf)}
#: The Gaussian smoothing of the reference row: FWHM 1.5 voxels, in space only
GAUSSIAN_FWHM = 1.5


@dataclass
class Case:
    geometry: str
    kind: str  # magnitude, complex, echoes
    null: bool
    snr: float
    seed: int
    tr: float
    magnitude: list  # per echo, (X, Y, Z, T) float32
    phase: list | None  # per echo, radians, for complex runs
    clean: list
    mask: np.ndarray
    grey: np.ndarray
    active: np.ndarray  # empty on a null run
    region: np.ndarray  # the active region of the task run (distances are from it, null runs too)
    regressor: np.ndarray
    events: list  # (onset, duration) seconds
    affine: np.ndarray
    echo_times: np.ndarray
    distance: np.ndarray = field(init=False)

    def __post_init__(self):
        self.distance = ndimage.distance_transform_edt(~self.region)

    @property
    def n_volumes(self) -> int:
        return self.magnitude[0].shape[3]

    def tsnr(self, echo=0) -> float:
        values = self.magnitude[echo][self.mask].astype(np.float64)
        return float(np.median(values.mean(axis=1) / np.maximum(values.std(axis=1), 1e-30)))


def _blocks(n_volumes, tr, block=20.0) -> list:
    """The design of :func:`bids_denoise.testing.bold_phantom.block_regressor`: off/on blocks, first on at
    ``block`` seconds."""
    return [(float(onset), float(min(block, n_volumes * tr - onset)))
            for onset in np.arange(block, n_volumes * tr, 2 * block)]


def _ellipsoid_case(geometry, shape, n_volumes, tr, bold_change, snr, seed, kind, null):
    from bids_denoise.testing.bold_phantom import make_bold_phantom
    from bids_denoise.testing.phantom import head_coordinates

    echoes = 3 if kind == "echoes" else 1
    phantom = make_bold_phantom(shape, n_volumes, tr, snr=snr, n_echoes=echoes, complex_data=True,
                                bold_change=0.0 if null else bold_change, seed=seed)
    region = make_bold_phantom(shape, 30, tr, snr=snr, seed=seed).active if null else phantom.active
    grey = phantom.mask & (head_coordinates(shape)[1] >= 0.65)  # the generator's grey-matter rim
    return Case(geometry, kind, null, snr, seed, tr, phantom.magnitude,
                phantom.phase if kind == "complex" else None, phantom.clean, phantom.mask, grey,
                np.zeros_like(phantom.mask) if null else phantom.active, region, phantom.regressor,
                _blocks(n_volumes, tr), phantom.affine, phantom.echo_times)


def _folded_case(geometry, shape, n_volumes, tr, bold_change, snr, seed, kind, null):
    from bids_denoise.testing.folded_bold_phantom import make_folded_phantom

    echoes = 3 if kind == "echoes" else 1
    phantom = make_folded_phantom(shape, n_volumes, tr, snr=snr, n_echoes=echoes, seed=seed,
                                  bold_change=0.0 if null else bold_change)
    return Case(geometry, kind, null, snr, seed, tr, phantom.magnitude,
                phantom.phase if kind == "complex" else None, phantom.clean, phantom.mask, phantom.grey,
                np.zeros_like(phantom.mask) if null else phantom.active, phantom.active, phantom.regressor,
                phantom.events, phantom.affine, phantom.echo_times)


#: name -> (generator, shape, volumes, TR, peak BOLD change at TE 30 ms)
GEOMETRIES = {
    "small": (_ellipsoid_case, (25, 30, 20), 200, 2.0, 0.08),
    "large": (_ellipsoid_case, (40, 48, 30), 150, 2.0, 0.05),
    "folded": (_folded_case, (36, 42, 26), 160, 1.5, 0.04),
}


def make_case(geometry, snr, seed, kind="magnitude", null=False, *, shape=None, n_volumes=None) -> Case:
    """A run of ``geometry`` (:data:`GEOMETRIES`; ``shape``/``n_volumes`` override its size) at tSNR about
    ``snr``; ``kind`` magnitude, complex (with its phase) or echoes (three echoes, 14/35/56 ms)."""
    generator, default_shape, default_volumes, tr, bold_change = GEOMETRIES[geometry]
    return generator(geometry, tuple(shape or default_shape), int(n_volumes or default_volumes), tr, bold_change,
                     snr, seed, kind, null)


def registered(case: Case, method: str, **changes) -> list:
    """Each echo of ``case`` through ``method``'s registration, as the app runs it (with the phase of a complex
    run), its parameters the defaults with ``changes``."""
    from bids_denoise.contract import MethodInputs
    from bids_denoise.registry import load_all

    spec = load_all()[method]
    parameters = spec.parse(changes)
    phases = case.phase if case.phase is not None else [None] * len(case.magnitude)
    return [spec.run(MethodInputs(data=series, affine=case.affine, phase=phase), parameters).image
            for series, phase in zip(case.magnitude, phases)]


def gaussian(case: Case, fwhm=GAUSSIAN_FWHM) -> list:
    """The reference row: each echo smoothed in space by a Gaussian of ``fwhm`` voxels."""
    sigma = fwhm / (2.0 * np.sqrt(2.0 * np.log(2.0)))
    return [ndimage.gaussian_filter(series, (sigma, sigma, sigma, 0.0)).astype(np.float32)
            for series in case.magnitude]


def nilearn_t(series, case: Case) -> np.ndarray:
    """The task's t map from nilearn's ``FirstLevelModel`` fitted as a user fits it (0 outside the brain)."""
    import nibabel as nib
    import pandas as pd
    from nilearn.glm.first_level import FirstLevelModel

    image = nib.Nifti1Image(np.asarray(series, dtype=np.float32), case.affine)
    mask = nib.Nifti1Image(case.mask.astype(np.uint8), case.affine)
    events = pd.DataFrame({"onset": [onset for onset, _ in case.events],
                           "duration": [duration for _, duration in case.events], "trial_type": "task"})
    model = FirstLevelModel(t_r=case.tr, noise_model="ar1", drift_model="cosine", high_pass=0.01, hrf_model="spm",
                            mask_img=mask, smoothing_fwhm=None, minimize_memory=True, signal_scaling=0, n_jobs=1,
                            verbose=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(image, events=events)
        t = model.compute_contrast("task", stat_type="t", output_type="stat").get_fdata()
    return np.where(case.mask, t, 0.0)


def ols_t(series, case: Case) -> np.ndarray:
    """The naive t: the phantom's regressor and an intercept, ordinary least squares, white noise assumed."""
    design = np.stack([case.regressor, np.ones_like(case.regressor)], axis=1)
    values = np.asarray(series)[case.mask].T.astype(np.float64)
    beta, *_ = np.linalg.lstsq(design, values, rcond=None)
    residual = values - design @ beta
    variance = np.maximum((residual**2).sum(axis=0) / (len(case.regressor) - 2), 1e-30)
    t = np.zeros(case.mask.shape)
    t[case.mask] = beta[0] / np.sqrt(variance * np.linalg.inv(design.T @ design)[0, 0])
    return t


def metrics(t, case: Case, threshold=THRESHOLD) -> dict:
    """ROI mean t and TPR (task runs), grey-matter false-positive rates by distance band, per 1-voxel bin
    (``fp_profile``) and over all grey matter (``fp_all``: a null run's every positive)."""
    hit = np.abs(t) > threshold
    out = {}
    if not case.null:
        out["roi_t"] = float(t[case.active].mean())
        out["tpr"] = float(hit[case.active].mean())
    for band, (low, high) in BANDS.items():
        selected = case.grey & ~case.active & (case.distance > low) & (case.distance <= high)
        out[f"fp_{band}"] = float(hit[selected].mean()) if selected.any() else float("nan")
    out["fp_all"] = float(hit[case.grey & ~case.active].mean())
    out["fp_profile"] = [float(hit[case.grey & (case.distance > low) & (case.distance <= low + 1)].mean())
                         if (case.grey & (case.distance > low) & (case.distance <= low + 1)).any() else float("nan")
                         for low in range(12)]
    return out


def score(outputs, case: Case, scorers=("nilearn", "ols")) -> dict:
    """{scorer: metrics averaged over the echoes} of per-echo output series."""
    result = {}
    for scorer in scorers:
        function = nilearn_t if scorer == "nilearn" else ols_t
        per_echo = [metrics(function(series, case), case) for series in outputs]
        result[scorer] = {key: (np.mean([m[key] for m in per_echo], axis=0).tolist() if key == "fp_profile"
                                else float(np.mean([m[key] for m in per_echo])))
                          for key in per_echo[0]}
    return result
