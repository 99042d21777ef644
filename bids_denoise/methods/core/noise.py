"""The noise level of the data at hand, estimated without ground truth.

* :func:`image_noise_variance`: one image (or images of one noise level), from the finest Haar
  wavelet detail (Donoho & Johnstone 1994); smooth anatomy gives exactly zero there.
* :func:`estimate_series_noise`: a series, from MP-PCA's noise map (local PCA across the volumes,
  :mod:`bids_denoise.methods.core.localpca`), which tells noise from fine anatomy better than the
  Haar detail; the Haar estimate where MP-PCA cannot run (too few volumes, an image smaller than its
  window) or finds no noise.
* :func:`gaussian_noise_sigma`: the Gaussian sigma behind a magnitude series (MP-PCA's map, which
  measures the spread of the magnitudes, corrected for the Rician / noncentral-chi floor by Koay &
  Basser's factor).

References
----------
.. [1] Donoho D.L., Johnstone I.M. Ideal spatial adaptation by wavelet shrinkage. Biometrika 81(3)
       (1994) 425-455.
.. [2] Veraart J., Novikov D.S., Christiaens D., Ades-aron B., Sijbers J., Fieremans E. Denoising of
       diffusion MRI using random matrix theory. NeuroImage 142 (2016) 394-406.
.. [3] Koay C.G., Basser P.J. Analytically exact correction scheme for signal extraction from noisy
       magnitude MR signals. J Magn Reson 179 (2006) 317-322.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bids_denoise.methods.core.errors import UnsuitableDataError
from bids_denoise.methods.core.localpca import local_pca
from bids_denoise.methods.core.noise_floor import gaussian_noise_level
from bids_denoise.methods.core.randmat import MIN_EIGENVALUES


def image_noise_variance(images) -> float:
    """Noise variance of images from the finest Haar detail coefficients (Donoho & Johnstone 1994).

    ``(median |c| / 0.6745)^2`` over each disjoint 2x2x2 block's orthonormal high-pass along
    every axis (zero for anything constant along an axis), pooled over ``images`` (an image, or a
    sequence of images with the same noise). Blocks holding an exact zero (a zero-filled
    background) are skipped.
    """
    images = [images] if isinstance(images, np.ndarray) and images.ndim <= 3 else list(images)
    coefficients = []
    for image in images:
        detail = np.asarray(image, dtype=np.float64)
        complete = detail != 0
        for axis in range(detail.ndim):
            if detail.shape[axis] < 2:
                continue
            even = 2 * (detail.shape[axis] // 2)
            first, second = [slice(None)] * detail.ndim, [slice(None)] * detail.ndim
            first[axis], second[axis] = slice(0, even, 2), slice(1, even, 2)
            detail = (detail[tuple(second)] - detail[tuple(first)]) / np.sqrt(2.0)
            complete = complete[tuple(first)] & complete[tuple(second)]
        coefficients.append(detail[complete].ravel())
    values = np.concatenate(coefficients) if coefficients else np.zeros(0)
    return float((np.median(np.abs(values)) / 0.6744897501960817) ** 2) if values.size else 0.0


@dataclass
class SeriesNoise:
    """A series' noise variance per voxel (X, Y, Z), float64, and where it came from: ``"mppca"`` (MP-PCA's
    noise map squared) or ``"haar"`` (:func:`image_noise_variance`, one value for every voxel)."""

    variance: np.ndarray
    source: str


def estimate_series_noise(series, volumes=None) -> SeriesNoise:
    """The noise variance of a magnitude series: MP-PCA's estimate, squared.

    MP-PCA measures the spread of the values about their mean, which is the variance a blend with
    the input needs (in magnitude data it is below the Gaussian sigma^2 where the signal is low).
    Where MP-PCA cannot run (fewer than 4 volumes, an image smaller than its window) or finds no
    noise component anywhere, the Haar estimate pooled over the ``volumes`` (indices; default all).
    """
    series = np.asarray(series, dtype=np.float32)
    sigma = None
    if series.ndim == 4 and series.shape[3] >= MIN_EIGENVALUES:
        try:
            sigma = local_pca(series).noise_sigma
        except (UnsuitableDataError, ValueError):  # an image too small for MP-PCA's window
            sigma = None
    if sigma is not None and np.any(sigma > 0):
        return SeriesNoise(np.square(sigma.astype(np.float64)), "mppca")
    stacked = series.reshape(series.shape[:3] + (-1,))
    picks = range(stacked.shape[3]) if volumes is None else volumes
    variance = image_noise_variance([stacked[..., v] for v in picks])
    return SeriesNoise(np.full(series.shape[:3], variance, np.float64), "haar")


def series_noise_variance(series, volumes=None) -> np.ndarray:
    """The noise variance map of :func:`estimate_series_noise`."""
    return estimate_series_noise(series, volumes).variance


def gaussian_noise_sigma(series, n_coils=1) -> np.ndarray:
    """The Gaussian noise sigma (X, Y, Z) behind a magnitude series: MP-PCA's noise map corrected by
    Koay & Basser's factor (:func:`bids_denoise.methods.core.noise_floor.gaussian_noise_level`), as
    MP-PCA's ``noise_floor="koay"`` uses it."""
    result = local_pca(series)
    return gaussian_noise_level(result.denoised, result.noise_sigma, result.extent, n_coils)
