"""Phase images: units, demodulation, and complex MP-PCA (the noise floor removed at its source)."""

from __future__ import annotations

import numpy as np
import pytest

from bids_denoise.methods.core.errors import UnsuitableDataError
from bids_denoise.methods.core.phase import SCANNER_RANGE, demodulate, phase_units
from bids_denoise.methods.mppca import mppca
from bids_denoise.testing.phantom import make_phantom


def test_units_are_found_from_the_values_and_refused_when_none_fits():
    rng = np.random.default_rng(0)
    radians = rng.uniform(-np.pi, np.pi, (6, 6, 4, 3))
    assert phase_units(radians) == "radians"
    assert phase_units(radians + np.pi) == "radians"  # 0..2 pi
    assert phase_units(radians * 180 / np.pi) == "degrees"
    assert phase_units(radians * 180 / np.pi + 180) == "degrees"  # 0..360
    assert phase_units(radians * SCANNER_RANGE / np.pi) == "scanner"
    assert phase_units((radians + np.pi) * SCANNER_RANGE / (2 * np.pi)) == "scanner-unsigned"  # 0..4095
    with pytest.raises(UnsuitableDataError, match="from -9.*to 9.*no units known here"):
        phase_units(radians * 3000)
    assert phase_units(radians * 3000, "radians") == "radians"  # what the user says wins


@pytest.mark.parametrize("units", ["degrees", "scanner", "scanner-unsigned"])
def test_every_unit_gives_the_radians_result(units):
    """The same phase stored in each unit demodulates to the same complex series as in radians."""
    grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in (20, 20, 4)], indexing="ij")
    magnitude = np.repeat((100 + 20 * grid[0])[..., None], 3, axis=3)
    wrapped = np.angle(np.exp(1j * ((2.5 * grid[0] + grid[1] ** 2)[..., None] + np.array([0.0, 1.0, -2.0]))))
    stored = {"degrees": np.degrees(wrapped), "scanner": wrapped * SCANNER_RANGE / np.pi,
              "scanner-unsigned": np.mod(wrapped, 2 * np.pi) * SCANNER_RANGE / (2 * np.pi)}[units]
    reference, _, _ = demodulate(magnitude, wrapped)
    values, _, found = demodulate(magnitude, stored)
    assert found == units
    assert np.allclose(values, reference, atol=1e-6 * magnitude.max())


def test_a_slowly_varying_phase_is_removed_and_the_signal_becomes_real():
    grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in (24, 24, 4)], indexing="ij")
    magnitude = np.repeat((100 + 20 * grid[0])[..., None], 3, axis=3)
    slow = (0.8 * grid[0] + 0.5 * grid[1] ** 2)[..., None] + np.array([0.0, 1.0, -2.0])
    values, estimate, units = demodulate(magnitude, np.angle(np.exp(1j * slow)))
    assert units == "radians"
    inside = (slice(4, -4), slice(4, -4))  # the k-space window wraps at the in-plane edges
    assert np.abs(values.imag[inside]).max() < 0.05 * magnitude.max()
    assert np.allclose(values.real[inside], magnitude[inside], rtol=2e-3)
    scanner, _, units = demodulate(magnitude, np.angle(np.exp(1j * slow)) * SCANNER_RANGE / np.pi)
    assert units == "scanner" and np.allclose(scanner, values)


def test_a_phase_that_does_not_match_is_refused():
    with pytest.raises(UnsuitableDataError, match="does not match"):
        demodulate(np.ones((4, 4, 4, 5)), np.zeros((4, 4, 4, 4)))
    phase = np.zeros((4, 4, 4, 5))
    phase[0, 0, 0, 0] = np.nan
    with pytest.raises(UnsuitableDataError, match="NaN"):
        demodulate(np.ones((4, 4, 4, 5)), phase)


@pytest.fixture(scope="module")
def complex_phantom():
    return make_phantom((20, 20, 12), n_b0=2, shells=((1000.0, 12), (3000.0, 12)), noise_sigma=0.1, seed=5,
                        complex_phase=True)


def test_complex_mppca_removes_the_noise_floor_that_magnitude_mppca_leaves(complex_phantom):
    phantom = complex_phantom
    options = {"aggregate": "overcomplete", "demean": True, "shrinkage": "frobenius"}
    complex_result = mppca(phantom.noisy, phase=phantom.phase, **options)
    floor_removed = mppca(phantom.noisy, noise_floor="koay", **options).denoised
    magnitude = mppca(phantom.noisy, **options).denoised
    low = phantom.mask[..., None] & (phantom.signal < 200) & (np.abs(phantom.bvals - 3000) < 100)
    assert low.sum() > 1000

    def bias(image):
        return float(np.mean(image[low] - phantom.signal[low]))

    assert bias(complex_result.denoised) < 0.6 * bias(floor_removed) < 0.6 * bias(magnitude)
    assert complex_result.parameters["complex"] and complex_result.parameters["noise_floor"] == "none"
    # the noise map is the receiver's Gaussian sigma (100 here), not the magnitude's spread
    assert np.median(complex_result.noise_sigma[phantom.mask]) == pytest.approx(100, rel=0.08)
    with pytest.raises(ValueError, match="no noise floor"):
        mppca(phantom.noisy, phase=phantom.phase, noise_floor="koay")


def test_complex_mppca_is_the_same_in_scanner_units_and_deterministic(complex_phantom):
    phantom = complex_phantom
    first = mppca(phantom.noisy, phase=phantom.phase)
    scanner = mppca(phantom.noisy, phase=phantom.phase * SCANNER_RANGE / np.pi)
    assert scanner.parameters["phase_units"] == "scanner"
    assert np.allclose(first.denoised, scanner.denoised, rtol=1e-4, atol=1e-2)
    assert np.array_equal(first.denoised, mppca(phantom.noisy, phase=phantom.phase).denoised)


def test_the_noise_level_measured_in_the_imaginary_channel():
    """On a BOLD phantom whose phase background drifts over the run, the imaginary channel of the
    demodulated series gives the receiver's sigma to a few percent; a phase in scanner units the same."""
    from bids_denoise.methods.core.phase import noise_level
    from bids_denoise.testing.bold_phantom import make_bold_phantom

    for snr in (15.0, 40.0):
        phantom = make_bold_phantom(snr=snr, seed=7)
        sigma = noise_level(phantom.magnitude[0], phantom.phase[0])
        assert sigma.shape == phantom.mask.shape
        assert np.median(sigma[phantom.mask]) == pytest.approx(phantom.noise_sigma, rel=0.06)
        scanner = noise_level(phantom.magnitude[0], phantom.phase[0] / np.pi * SCANNER_RANGE)
        assert np.allclose(scanner, sigma, rtol=1e-3)
    with pytest.raises(UnsuitableDataError, match="2 volumes"):
        noise_level(phantom.magnitude[0][..., :1], phantom.phase[0][..., :1])
