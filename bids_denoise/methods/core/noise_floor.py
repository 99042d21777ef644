"""The noise floor of magnitude images: Rician and noncentral-chi bias, and its removal.

A magnitude image reconstructed from ``N`` receiver coils by root-sum-of-squares
follows a noncentral chi distribution with ``2N`` degrees of freedom (Rician for
``N = 1``): with underlying signal ``A`` and Gaussian noise ``sigma`` per real
channel, its mean is

.. math::

    E[M] = \\sigma \\, \\beta_N \\, {}_1F_1\\left(-\\tfrac12; N; -\\tfrac{\\theta^2}{2}\\right),
    \\qquad \\beta_N = \\sqrt{2}\\,\\frac{\\Gamma(N + 1/2)}{\\Gamma(N)}, \\qquad \\theta = A / \\sigma

(Koay & Basser 2006, eq. 5; Constantinides et al. 1997). Where the signal is
low, ``E[M]`` stays near the floor ``sigma * beta_N`` (1.2533 sigma for one
coil) instead of going to zero: strongly attenuated diffusion-weighted signal
is overestimated, and diffusivities and FA with it.

A denoised image estimates ``E[M]`` (PCA denoising averages the noise, not the
floor). :func:`remove_noise_floor` inverts the mean above for ``A`` at every
value, given ``sigma`` (a scalar or a map): the first-moment inversion of Koay &
Basser's noncentral-chi model with the noise level known, so no fixed-point
iteration over the second moment is needed. Values at or below the floor map to
zero. numpy only; the mean is tabulated once per ``N`` (a log-space series of
Kummer's function, with its asymptotic expansion for large ``theta``) and
inverted through a uniform table of ``theta^2`` against the mean (a lookup, no
search), so the correction is fast and exactly reproducible.

References
----------
.. [1] Koay C.G., Basser P.J. Analytically exact correction scheme for signal
       extraction from noisy magnitude MR signals. J Magn Reson 179 (2006)
       317-322.
.. [2] Constantinides C.D., Atalar E., McVeigh E.R. Signal-to-noise measurements
       in magnitude images from NMR phased arrays. Magn Reson Med 38 (1997)
       852-857.
.. [3] Gudbjartsson H., Patz S. The Rician distribution of noisy MRI data. Magn
       Reson Med 34 (1995) 910-914.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

from bids_denoise.methods.core.windows import centred_window_means, slabs

#: Largest SNR (theta = A / sigma) tabulated; above it the asymptotic expansion of the mean is used
#: (its first omitted term is below 1e-7 sigma there).
TABLE_THETA = 40.0

#: Points of the table (uniform in theta). With the inverse table (``INVERSE_STEP``) the inverse is
#: accurate to 1e-6 sigma above theta = 1 and to 1e-5 sigma below, far below any denoised image's error.
TABLE_POINTS = 8001

#: Fixed-point iterations of Koay & Basser's correction of an estimated noise map
#: (``noise_floor="koay"``): two or three bring the brain's sigma to its limit on the phantom.
KOAY_ITERATIONS = 3


def floor_factor(n_coils: int = 1) -> float:
    """``beta_N = sqrt(2) Gamma(N + 1/2) / Gamma(N)``: the mean magnitude of pure noise, in units of sigma
    (sqrt(pi/2) = 1.2533 for one coil)."""
    n_coils = _check_coils(n_coils)
    return math.sqrt(2.0) * math.exp(math.lgamma(n_coils + 0.5) - math.lgamma(n_coils))


def magnitude_mean(theta, n_coils: int = 1, exact: bool = False) -> np.ndarray:
    """Mean magnitude, in units of sigma, of a noncentral chi variable with SNR ``theta`` (``A / sigma``).

    Parameters
    ----------
    theta : array-like
        Underlying signal over noise level, >= 0.
    n_coils : int, optional
        ``N``: 2N degrees of freedom (1, the default, is Rician).
    exact : bool, optional
        Sum the series at every value (slow: about 10 s per million values) instead of interpolating
        the table (default; within 2e-6 of the series).

    Returns
    -------
    ndarray of float64
        ``E[M] / sigma``; ``floor_factor(N)`` at ``theta = 0``, ``theta + (2N-1)/(2 theta) + ...`` for
        large ``theta``.
    """
    n_coils = _check_coils(n_coils)
    theta = np.abs(np.asarray(theta, dtype=np.float64))
    out = np.empty_like(theta)
    small = theta <= TABLE_THETA
    if exact:
        out[small] = _mean_by_series(theta[small], n_coils)
    else:
        theta_table, mean_table = _table(n_coils)
        out[small] = np.interp(theta[small], theta_table, mean_table)
    out[~small] = _mean_asymptotic(theta[~small], n_coils)
    return out


def _mean_by_series(theta, n_coils, block_elements=2**22):
    """``beta_N 1F1(-1/2; N; -x)``, x = theta^2 / 2, through Kummer's transformation
    ``1F1(a; b; -x) = exp(-x) 1F1(b - a; b; x)``: a series of positive terms, summed in log space,
    over blocks of values (sorted, so each block sums only the terms its largest value needs) so that
    the work array stays near ``block_elements`` float64s."""
    theta = np.asarray(theta, dtype=np.float64)
    flat = theta.ravel()
    out = np.empty_like(flat)
    order = np.argsort(flat, kind="stable")
    start = 0
    while start < flat.size:
        largest = 0.5 * flat[order[min(start + 256, flat.size) - 1]] ** 2
        terms = int(largest + 12.0 * np.sqrt(largest) + 60.0)
        # the block's largest value sets its terms: grow the block while it fits the budget
        stop = min(flat.size, start + max(256, block_elements // terms))
        largest = 0.5 * flat[order[stop - 1]] ** 2
        while stop - start > 256 and (stop - start) * int(largest + 12.0 * np.sqrt(largest) + 60.0) > 2 * block_elements:
            stop = start + (stop - start) // 2
            largest = 0.5 * flat[order[stop - 1]] ** 2
        index = order[start:stop]
        out[index] = _series_block(flat[index], n_coils)
        start = stop
    return out.reshape(theta.shape)


def _series_block(theta, n_coils):
    x = 0.5 * theta**2
    if x.size == 0:
        return x.copy()
    a, b = n_coils + 0.5, float(n_coils)  # b - a' with a' = -1/2
    terms = int(np.max(x) + 12.0 * np.sqrt(np.max(x)) + 60.0)
    k = np.arange(terms, dtype=np.float64)
    # log of (a)_k / (b)_k / k!, cumulatively
    log_coefficient = np.concatenate([[0.0], np.cumsum(np.log((a + k[:-1]) / ((b + k[:-1]) * (k[:-1] + 1.0))))])
    log_x = np.log(np.where(x > 0.0, x, 1.0))  # x = 0: only the first term, set below
    log_terms = log_coefficient[None, :] + k[None, :] * log_x[:, None]
    log_terms[x == 0.0, 1:] = -np.inf
    largest = log_terms.max(axis=1, keepdims=True)
    log_sum = largest[:, 0] + np.log(np.exp(log_terms - largest).sum(axis=1))
    return floor_factor(n_coils) * np.exp(log_sum - x)


def _mean_asymptotic(theta, n_coils):
    """``theta + (2N-1)/(2 theta) - (2N-1)(2N-3)/(8 theta^3)``: the large-argument expansion of Kummer's
    function (Abramowitz & Stegun 13.5.1), accurate to O(theta^-5)."""
    theta = np.asarray(theta, dtype=np.float64)
    c1 = (2.0 * n_coils - 1.0) / 2.0
    c3 = (2.0 * n_coils - 1.0) * (2.0 * n_coils - 3.0) / 8.0
    return theta + c1 / theta - c3 / theta**3


@lru_cache(maxsize=8)
def _table(n_coils):
    theta = np.linspace(0.0, TABLE_THETA, TABLE_POINTS)
    mean = _mean_by_series(theta, n_coils)
    mean.setflags(write=False)
    theta.setflags(write=False)
    return theta, mean


#: Step of the inverse table, uniform in ``E[M] / sigma`` (it holds ``theta^2``, a smooth function of the
#: mean, so that a lookup is an index computation instead of a search).
INVERSE_STEP = 0.002


@lru_cache(maxsize=8)
def _inverse_table(n_coils):
    """``theta^2`` on a uniform grid of mean ratios from the floor to the table's end, as (first ratio,
    1 / step, value at each grid point, slope to the next, last ratio). ``theta^2`` is smooth in the
    mean, also at the floor, where ``theta`` itself grows like a square root."""
    theta_table, mean_table = _table(n_coils)
    start, top = float(mean_table[0]), float(mean_table[-1])
    count = int(np.ceil((top - start) / INVERSE_STEP)) + 1
    grid = np.linspace(start, top, count)
    values = np.interp(grid, mean_table, theta_table**2)
    slopes = np.diff(values)
    for array in (values, slopes):
        array.setflags(write=False)
    return start, (count - 1) / (top - start), values[:-1], slopes, top


def _theta_squared(ratio, n_coils):
    """``theta^2`` with ``E[M | theta] / sigma = ratio`` (0 at and below the floor), float64."""
    start, scale, values, slopes, top = _inverse_table(n_coils)
    ratio = np.asarray(ratio, dtype=np.float64)
    shape = ratio.shape
    ratio = ratio.reshape(-1)
    position = np.subtract(ratio, start)
    position *= scale
    np.clip(position, 0.0, float(values.size), out=position)
    index = position.astype(np.intp)
    np.minimum(index, values.size - 1, out=index)
    position -= index
    position *= slopes[index]
    position += values[index]
    high = ratio > top
    if np.any(high):
        # theta + c1/theta - c3/theta^3 = y: Newton from the two-term root (monotone there)
        y = ratio[high]
        c1 = (2.0 * n_coils - 1.0) / 2.0
        c3 = (2.0 * n_coils - 1.0) * (2.0 * n_coils - 3.0) / 8.0
        theta = 0.5 * (y + np.sqrt(np.maximum(y * y - 4.0 * c1, 0.0)))
        for _ in range(3):
            value = theta + c1 / theta - c3 / theta**3 - y
            slope = 1.0 - c1 / theta**2 + 3.0 * c3 / theta**4
            theta = theta - value / slope
        position[high] = theta**2
    return position.reshape(shape)


def signal_from_mean(ratio, n_coils: int = 1) -> np.ndarray:
    """Invert :func:`magnitude_mean`: the SNR ``theta`` whose mean magnitude is ``ratio`` (``E[M] / sigma``).

    Ratios at or below the floor (``floor_factor(N)``) give 0; the inverse is monotone. A lookup in a
    uniform table of ``theta^2`` (see ``INVERSE_STEP``) above the floor, the asymptotic expansion
    beyond ``TABLE_THETA``.
    """
    return np.sqrt(_theta_squared(ratio, _check_coils(n_coils)))


def variance_factor_of_mean(ratio, n_coils: int = 1) -> np.ndarray:
    """:func:`variance_factor` at the SNR whose mean magnitude is ``ratio`` (``E[M] / sigma``).

    ``xi = 2N + theta^2 - max(ratio, beta_N)^2``: the mean is known, so only the one lookup of
    ``theta^2`` is needed. Ratios below the floor give ``xi(0)``.
    """
    n_coils = _check_coils(n_coils)
    ratio = np.asarray(ratio, dtype=np.float64)
    floor = floor_factor(n_coils)
    xi = 2.0 * n_coils + _theta_squared(ratio, n_coils) - np.maximum(ratio, floor) ** 2
    return np.clip(xi, 2.0 * n_coils - floor**2, 1.0)


def variance_factor(theta, n_coils: int = 1) -> np.ndarray:
    """Koay & Basser's correction factor ``xi(theta) = 2N + theta^2 - (E[M] / sigma)^2``: the variance of
    the magnitude in units of ``sigma^2`` (eq. 11 of Koay & Basser 2006).

    ``xi`` rises from ``2N - beta_N^2`` at ``theta = 0`` (0.4292 for one coil: the Rayleigh variance) to 1
    for large ``theta``. A noise level measured on magnitude data (such as MP-PCA's, from the spread
    of the values) is ``sigma * sqrt(xi)``, not ``sigma``, where the signal is low.
    """
    theta = np.abs(np.asarray(theta, dtype=np.float64))
    mean = magnitude_mean(theta, n_coils)
    return np.maximum(2.0 * _check_coils(n_coils) + theta**2 - mean**2, 0.0)


def remove_noise_floor(values, sigma, n_coils: int = 1, out_dtype=None) -> np.ndarray:
    """The underlying signal ``A`` whose noncentral-chi mean magnitude is ``values``, given the noise level.

    Parameters
    ----------
    values : ndarray, shape (..., V) or any shape broadcastable with ``sigma``
        Mean-magnitude estimates (a denoised series).
    sigma : float or ndarray
        Noise standard deviation per real channel: a scalar, or a map that broadcasts against
        ``values`` (a (X, Y, Z) map against (X, Y, Z, V) values is expanded along the last axis).
        Where sigma is 0 (or not finite) the values are returned unchanged.
    n_coils : int, optional
        Coils combined by root-sum-of-squares (1, the default: Rician).
    out_dtype : dtype, optional
        Output dtype (default: that of ``values`` if floating, else float64).

    Returns
    -------
    ndarray
        ``sigma * theta`` with ``E[M | theta] = values``: 0 at or below the floor ``sigma * beta_N``,
        about ``sqrt(values^2 - (2N - 1) sigma^2)`` well above it. Values <= 0 give 0.

    References
    ----------
    Koay C.G., Basser P.J., J Magn Reson 179 (2006) 317-322 (mean of the noncentral chi distribution).
    """
    values = np.asarray(values)
    if out_dtype is None:
        out_dtype = values.dtype if np.issubdtype(values.dtype, np.floating) else np.float64
    sigma = np.asarray(sigma, dtype=np.float64)
    if sigma.ndim and sigma.ndim == values.ndim - 1 and sigma.shape == values.shape[:-1]:
        sigma = sigma[..., None]
    sigma = np.broadcast_to(sigma, values.shape) if sigma.ndim else sigma
    valid = np.isfinite(sigma) & (sigma > 0)
    safe = np.where(valid, sigma, 1.0)
    corrected = safe * signal_from_mean(np.asarray(values, dtype=np.float64) / safe, n_coils)
    return np.where(valid, corrected, values).astype(out_dtype, copy=False)


def _check_coils(n_coils) -> int:
    if isinstance(n_coils, bool) or int(n_coils) != n_coils or n_coils < 1:
        raise ValueError(f"n_coils must be an integer >= 1, got {n_coils!r}")
    return int(n_coils)


def remove_floor_in_place(denoised, sigma, n_coils):
    """:func:`remove_noise_floor` over slabs along x (its float64 temporaries stay small)."""
    for part in slabs(denoised.shape, denoised.nbytes):
        denoised[part] = remove_noise_floor(denoised[part], sigma[part], n_coils, out_dtype=denoised.dtype)


def gaussian_noise_level(denoised, magnitude_sigma, extent, n_coils, iterations=KOAY_ITERATIONS):
    """The Gaussian noise level behind a noise map measured on magnitude data.

    MP-PCA's estimate is the spread of the magnitudes in the window, ``sigma^2 * mean(xi(theta))``
    with ``xi`` Koay & Basser's correction factor (:func:`variance_factor`; below 1 where
    the signal is low: 0.43 for pure Rician noise). Fixed-point iteration from ``sigma =
    magnitude_sigma``: the signal ``A`` of every value given ``sigma`` (floor removed), ``xi`` of
    ``A / sigma`` averaged over each voxel's volumes and then over the (border-shifted) window
    centred on it, ``sigma = magnitude_sigma / sqrt(mean xi)``. Voxels whose map is 0 stay 0 (and are
    left out of the window averages).
    """
    measured = np.asarray(magnitude_sigma, dtype=np.float64)
    valid = measured > 0
    count = centred_window_means(valid.astype(np.float64), extent)
    sigma = measured.copy()
    parts = slabs(denoised.shape, denoised.nbytes)
    for _ in range(iterations):
        xi = np.ones(measured.shape)
        for part in parts:
            safe = np.where(valid[part], sigma[part], 1.0)[..., None]
            xi[part] = variance_factor_of_mean(denoised[part] / safe, n_coils).mean(axis=-1)
        average = centred_window_means(np.where(valid, xi, 0.0), extent) / np.maximum(count, 1e-12)
        sigma = np.where(valid, measured / np.sqrt(np.clip(average, 1e-3, 1.0)), 0.0)
    return sigma.astype(np.float32)
