"""The noise floor of magnitude data: the noncentral-chi mean, its inverse, and the correction on known data."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bids_denoise.methods.core.noise_floor import (
    TABLE_THETA,
    floor_factor,
    magnitude_mean,
    remove_noise_floor,
    signal_from_mean,
    variance_factor,
)


def magnitudes(signal, sigma, n_coils, size, seed=0):
    """Root-sum-of-squares magnitudes of N coils carrying ``signal`` in total, Gaussian noise ``sigma``
    per real channel: noncentral chi with 2N degrees of freedom (Rician for N = 1)."""
    rng = np.random.default_rng(seed)
    channels = rng.normal(0.0, sigma, (size, 2 * n_coils))
    channels[:, 0] += signal
    return np.sqrt((channels**2).sum(axis=1))


def test_floor_factor():
    assert floor_factor(1) == pytest.approx(math.sqrt(math.pi / 2), rel=1e-12)
    # N = 2: sqrt(2) Gamma(5/2) / Gamma(2) = 3 sqrt(pi) / (2 sqrt(2))
    assert floor_factor(2) == pytest.approx(3 * math.sqrt(math.pi) / (2 * math.sqrt(2)), rel=1e-12)
    with pytest.raises(ValueError, match="n_coils"):
        floor_factor(0)
    with pytest.raises(ValueError, match="n_coils"):
        magnitude_mean(1.0, 1.5)


def test_rician_mean_has_its_closed_form():
    """N = 1: E[M]/sigma = sqrt(pi/2) L_{1/2}(-theta^2/2), with the Laguerre function in Bessel functions."""
    special = pytest.importorskip("scipy.special")
    theta = np.linspace(0.0, 45.0, 91)
    x = theta**2 / 4
    laguerre = (1 + theta**2 / 2) * special.i0e(x) + theta**2 / 2 * special.i1e(x)
    expected = math.sqrt(math.pi / 2) * laguerre
    assert np.abs(magnitude_mean(theta, exact=True) - expected).max() < 1e-10 * 45 * 2
    assert np.abs(magnitude_mean(theta) - expected).max() < 5e-6


@pytest.mark.parametrize("n_coils", [1, 2, 4])
@pytest.mark.parametrize("theta", [0.0, 0.7, 2.0, 6.0])
def test_mean_and_variance_match_samples(n_coils, theta):
    samples = magnitudes(theta, 1.0, n_coils, 400_000, seed=n_coils)
    assert magnitude_mean(theta, n_coils) == pytest.approx(samples.mean(), abs=0.006)
    assert variance_factor(theta, n_coils) == pytest.approx(samples.var(), rel=0.01)


def test_large_snr_expansion_joins_the_series():
    for n_coils in (1, 3):
        edge = np.array([TABLE_THETA - 1e-9, TABLE_THETA + 1e-9])
        assert abs(np.diff(magnitude_mean(edge, n_coils))[0]) < 1e-7
        c1, c3 = (2 * n_coils - 1) / 2, (2 * n_coils - 1) * (2 * n_coils - 3) / 8
        assert magnitude_mean(200.0, n_coils) == pytest.approx(200.0 + c1 / 200.0 - c3 / 200.0**3, rel=1e-14)


@pytest.mark.parametrize("n_coils", [1, 2])
def test_inverse(n_coils):
    theta = np.concatenate([np.linspace(0.0, 60.0, 1201), [1e4]])
    assert np.abs(signal_from_mean(magnitude_mean(theta, n_coils), n_coils) - theta)[theta > 1].max() < 1e-5
    assert np.abs(signal_from_mean(magnitude_mean(theta, n_coils), n_coils) - theta).max() < 2e-3
    below = signal_from_mean([0.0, 0.5 * floor_factor(n_coils), floor_factor(n_coils)], n_coils)
    assert np.all(below == 0.0)
    assert np.all(np.diff(signal_from_mean(np.linspace(0, 80, 4001), n_coils)) >= 0)


@pytest.mark.parametrize("n_coils", [1, 4])
@pytest.mark.parametrize("snr", [0.8, 1.5, 3.0, 10.0])
def test_corrected_mean_of_known_signal(n_coils, snr):
    """The mean of noncentral-chi samples of a known signal, corrected, is close to the signal; the
    naive mean is biased, strongly at low SNR."""
    sigma = 20.0
    signal = snr * sigma
    samples = magnitudes(signal, sigma, n_coils, 200_000, seed=int(10 * snr) + n_coils)
    naive = samples.mean()
    corrected = float(remove_noise_floor(naive, sigma, n_coils))
    assert abs(corrected - signal) < 0.02 * sigma
    assert abs(corrected - signal) < 0.2 * abs(naive - signal)
    if snr <= 1.5:  # where the floor dominates, the naive mean is off by more than a third of sigma
        assert naive - signal > 0.35 * sigma


def test_pure_noise_maps_to_zero():
    samples = magnitudes(0.0, 5.0, 1, 100_000, seed=7)
    assert float(remove_noise_floor(samples.mean(), 5.0)) < 0.25 * 5.0  # was 1.25 sigma
    assert np.all(remove_noise_floor(np.array([-3.0, 0.0, 6.0]), 5.0) == 0.0)


def test_maps_broadcast_and_zero_sigma_passes_through():
    values = np.full((2, 3, 4, 5), 30.0, dtype=np.float32)
    sigma = np.full((2, 3, 4), 10.0)
    sigma[0, 0, 0] = 0.0
    out = remove_noise_floor(values, sigma)
    assert out.dtype == np.float32 and out.shape == values.shape
    assert np.all(out[0, 0, 0] == 30.0)
    expected = 10.0 * signal_from_mean(3.0)
    assert np.allclose(out[1, 2, 3], expected, rtol=1e-6)
    assert np.allclose(remove_noise_floor(values, 10.0), expected, rtol=1e-6)
