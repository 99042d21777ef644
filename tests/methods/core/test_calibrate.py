"""Noise2Self calibration tools: J-invariance, and the loss picks the truly best parameter."""

from __future__ import annotations

import numpy as np
import pytest

from bids_denoise.methods.core import calibrate, noise


def test_calibrated_filters_are_j_invariant():
    rng = np.random.default_rng(0)
    image = rng.normal(size=(10, 10))
    hidden = calibrate.grid_mask(image.shape, 3, 4)
    changed = image.copy()
    changed[hidden] += 10
    smooth = lambda x: calibrate._ndimage().gaussian_filter(x, 1.0)  # noqa: E731
    assert np.allclose(calibrate.j_invariant(smooth, image)[hidden], calibrate.j_invariant(smooth, changed)[hidden])
    # the donut median never sees the voxel it writes: inside, on a face and in a corner
    volume = rng.normal(size=(7, 8, 6))
    for radius in (1, 2):
        for voxel in [(3, 4, 3), (0, 4, 3), (6, 7, 5)]:
            changed = volume.copy()
            changed[voxel] += 10
            assert calibrate.donut_median(volume, radius)[voxel] == calibrate.donut_median(changed, radius)[voxel]


def smooth_image(seed=0):
    grid = np.meshgrid(np.linspace(0, 1, 48), np.linspace(0, 1, 48), indexing="ij")
    signal = 100 * (np.sin(6 * grid[0]) * np.cos(4 * grid[1]) + 1.5)
    return signal, signal + np.random.default_rng(seed).normal(0, 20, signal.shape)


@pytest.mark.parametrize("kind", ["median", "gaussian"])
def test_self_supervised_loss_picks_the_truly_best_parameter(kind):
    signal, noisy = smooth_image()
    if kind == "median":
        thetas = [1, 2, 3, 4]
        calibration = calibrate.calibrate(lambda r: (lambda x: calibrate.donut_median(x, r)), [noisy], thetas,
                                          parameter="radius", already_j_invariant=True)
        true_error = [np.mean((calibrate.donut_median(noisy, t) - signal) ** 2) for t in thetas]
    else:
        thetas = [0.5, 1.0, 1.5, 2.5, 4.0]
        calibration = calibrate.calibrate(lambda s: (lambda x: calibrate._ndimage().gaussian_filter(x, s)), [noisy],
                                          thetas, parameter="sigma")
        true_error = [np.mean((calibrate.j_invariant(lambda x: calibrate._ndimage().gaussian_filter(x, t), noisy)
                               - signal) ** 2) for t in thetas]
    best_true = int(np.argmin(true_error))
    assert abs(thetas.index(calibration.best) - best_true) <= 1
    # loss = true error + noise variance (400), within sampling error
    assert np.allclose(np.array(calibration.losses) - np.array(true_error), 400, rtol=0.2)
    assert calibration.as_dict()["parameter"] == ("radius" if kind == "median" else "sigma")


def test_neighbour_fill_never_sees_the_voxel_at_the_border():
    image = np.random.default_rng(1).normal(size=(5, 6, 4))
    for voxel in [(0, 0, 0), (4, 3, 0), (2, 5, 3)]:
        changed = image.copy()
        changed[voxel] += 100.0
        assert calibrate.neighbour_mean(image)[voxel] == pytest.approx(calibrate.neighbour_mean(changed)[voxel])
    # J-invariant filtering stays J-invariant at the border too
    identity_like = lambda x: x  # noqa: E731 - the worst case: a filter that returns its input
    hidden = calibrate.grid_mask(image.shape, 3, 0)  # includes the corner (0, 0, 0)
    changed = image.copy()
    changed[hidden] += 10
    assert np.allclose(calibrate.j_invariant(identity_like, image)[hidden],
                       calibrate.j_invariant(identity_like, changed)[hidden])


def test_blend_weight_is_the_risk_minimiser_and_can_say_no():
    signal, noisy = smooth_image(3)
    variance = 400.0
    smoothed = calibrate.j_invariant(lambda x: calibrate._ndimage().gaussian_filter(x, 1.5), noisy)
    blend = calibrate.blend_weight(smoothed, noisy, variance)
    assert 0 < blend.weight < 1
    true_risks = {a: np.mean((a * smoothed + (1 - a) * noisy - signal) ** 2) for a in np.linspace(0, 1, 21)}
    best = min(true_risks, key=true_risks.get)
    assert abs(blend.weight - best) < 0.1
    assert blend.risk == pytest.approx(true_risks[best], rel=0.2)
    assert blend.risk < min(variance, np.mean((smoothed - signal) ** 2))
    # an output that is the input plus more noise (divergence 1) does not help: the identity is chosen
    worse = noisy + np.random.default_rng(4).normal(0, 40, noisy.shape)
    choice, blends = calibrate.choose_blend({"noise": (worse, 1.0)}, noisy, variance)
    assert choice == "identity" and blends["noise"].weight == 0.0
    choice, _ = calibrate.choose_blend({"noise": (worse, 1.0), "smooth": (smoothed, 0.0)}, noisy, variance)
    assert choice == "smooth"


def test_monte_carlo_divergence():
    image = np.random.default_rng(2).normal(size=(40, 40))
    assert calibrate.monte_carlo_divergence(lambda x: x, image, 1e-2) == pytest.approx(1.0, abs=0.1)
    box = lambda x: calibrate._ndimage().uniform_filter(x, 3, mode="wrap")  # noqa: E731
    assert calibrate.monte_carlo_divergence(box, image, 1e-2) == pytest.approx(1 / 9, abs=0.02)
    assert calibrate.monte_carlo_divergence(lambda x: 2 * x, image[..., None], 1e-2, axis=-1) == pytest.approx([2.0], abs=0.2)


def test_noise_variance_estimates():
    rng = np.random.default_rng(5)
    grid = np.meshgrid(*[np.linspace(0, 1, 20)] * 3, indexing="ij")
    signal = 100 * (1.5 + np.sin(4 * grid[0]) * np.cos(3 * grid[1]))
    noisy = signal + rng.normal(0, 5, signal.shape)
    assert noise.image_noise_variance(noisy) == pytest.approx(25, rel=0.15)
    series = np.stack([signal * (1 + 0.1 * k) + rng.normal(0, 5, signal.shape) for k in range(8)], axis=-1)
    assert np.median(noise.series_noise_variance(series)) == pytest.approx(25, rel=0.25)


def test_angular_contrast_and_the_cap():
    from bids_denoise.testing.phantom import make_phantom

    phantom = make_phantom((14, 14, 8), n_b0=2, shells=((1000.0, 20),), noise_sigma=0.05, seed=1)
    from bids_denoise.methods.core.shells import cluster_shells

    shells = cluster_shells(phantom.bvals)
    variance = (0.05 * 1000) ** 2
    kept = calibrate.angular_contrast(phantom.signal, phantom.noisy, shells, variance, phantom.mask)
    dwi = shells == 1
    flat = phantom.signal.copy()
    flat[..., dwi] = phantom.signal[..., dwi].mean(axis=-1, keepdims=True)
    flattened = calibrate.angular_contrast(flat, phantom.noisy, shells, variance, phantom.mask)
    assert kept[1] == pytest.approx(1.0, abs=0.1) and abs(flattened[1]) < 0.05
    gains = {1: [(1.0, 1.0, 0.2)] * 4}  # weight 1, J-invariant, error 0.2 of the noise variance after blending
    assert calibrate.contrast_cap(kept, gains, snr=10) > calibrate.contrast_cap(flattened, gains, snr=10)
    # a flattened output: only the tolerated loss of 0.5% of the contrast
    assert calibrate.contrast_cap(flattened, gains, snr=10) == pytest.approx(0.005 / (1 - flattened[1]), rel=1e-6)
    # the noise removed pays for a loss of contrast, more at a lower SNR
    slight = {1: 0.97}
    assert calibrate.contrast_cap(slight, gains, snr=5) == 1.0
    assert calibrate.contrast_cap(slight, gains, snr=80) < calibrate.contrast_cap(slight, gains, snr=40) == 1.0
    assert calibrate.contrast_cap(slight, gains, snr=80) == pytest.approx(0.005 / 0.03)
    assert calibrate.contrast_cap({1: 1.0}, gains, snr=1000) == 1.0
