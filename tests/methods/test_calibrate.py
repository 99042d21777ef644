"""Noise2Self calibration tools: J-invariance, and the loss picks the truly best parameter."""

from __future__ import annotations

import numpy as np
import pytest

from bids_denoise.methods import calibrate


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
