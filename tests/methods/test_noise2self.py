"""Noise2Self: masker coverage, J-invariance, calibration picks the truly best parameter."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bids_denoise.methods import calibrate
from bids_denoise.methods.networks import UNet
from bids_denoise.methods.noise2self import Masker, j_invariant_predict, noise2self


@pytest.mark.parametrize("dims, width", [(2, 3), (3, 2), (2, 4)])
def test_phases_cover_every_voxel_once(dims, width):
    masker = Masker(width, dims=dims)
    shape = (7, 8, 5)[:dims]
    coverage = sum(masker.mask(shape, p).int() for p in range(masker.n_phases))
    assert torch.all(coverage == 1)


@pytest.mark.parametrize("mode", ["zero", "interpolate"])
def test_network_inference_is_j_invariant(mode):
    torch.manual_seed(0)
    model = UNet(dims=2, in_channels=1, width=4).eval()
    masker = Masker(3, mode, dims=2)
    image = torch.rand(1, 1, 12, 12)
    baseline = j_invariant_predict(model, masker, image)
    hidden = masker.mask((12, 12), 4)
    changed = image.clone()
    changed[:, :, hidden] += 5.0
    # each output voxel of J came from the pass that hid J: changing x on J leaves the output on J
    assert torch.allclose(j_invariant_predict(model, masker, changed)[:, :, hidden], baseline[:, :, hidden])


def test_calibrated_filters_are_j_invariant():
    rng = np.random.default_rng(0)
    image = rng.normal(size=(10, 10))
    hidden = calibrate.grid_mask(image.shape, 3, 4)
    changed = image.copy()
    changed[hidden] += 10
    smooth = lambda x: calibrate._ndimage().gaussian_filter(x, 1.0)  # noqa: E731
    assert np.allclose(calibrate.j_invariant(smooth, image)[hidden], calibrate.j_invariant(smooth, changed)[hidden])
    centre = (5, 5)
    changed = image.copy()
    changed[centre] += 10
    assert calibrate.donut_median(image, 1)[centre] == calibrate.donut_median(changed, 1)[centre]


def smooth_image(seed=0):
    grid = np.meshgrid(np.linspace(0, 1, 48), np.linspace(0, 1, 48), indexing="ij")
    signal = 100 * (np.sin(6 * grid[0]) * np.cos(4 * grid[1]) + 1.5)
    return signal, signal + np.random.default_rng(seed).normal(0, 20, signal.shape)


@pytest.mark.parametrize("kind", ["median", "gaussian"])
def test_self_supervised_loss_picks_the_truly_best_parameter(kind):
    signal, noisy = smooth_image()
    if kind == "median":
        thetas = [1, 2, 3, 4]
        calibration = calibrate.calibrated_median([noisy], thetas)
        true_error = [np.mean((calibrate.donut_median(noisy, t) - signal) ** 2) for t in thetas]
    else:
        thetas = [0.5, 1.0, 1.5, 2.5, 4.0]
        calibration = calibrate.calibrated_gaussian([noisy], thetas)
        true_error = [np.mean((calibrate.j_invariant(lambda x: calibrate._ndimage().gaussian_filter(x, t), noisy)
                               - signal) ** 2) for t in thetas]
    best_true = int(np.argmin(true_error))
    assert abs(thetas.index(calibration.best) - best_true) <= 1
    # loss = true error + noise variance (400), within sampling error
    assert np.allclose(np.array(calibration.losses) - np.array(true_error), 400, rtol=0.2)


def small_run(phantom, **options):
    options.setdefault("seed", 0)
    return noise2self(phantom.noisy, phantom.bvals, epochs=3, steps_per_epoch=6, batch_size=8, net_width=8,
                      **options)


@pytest.mark.parametrize("context", ["volume", "series"])
def test_training_lowers_the_loss(phantom, context):
    result = small_run(phantom, context=context)
    losses = [epoch["train_loss"] for epoch in result.history["epochs"]]
    assert losses[-1] < losses[0]
    assert result.denoised.shape == phantom.noisy.shape


def test_seeded_runs_are_identical(phantom):
    assert np.array_equal(small_run(phantom, context="series").denoised, small_run(phantom, context="series").denoised)


def test_three_dimensional_image():
    image = np.random.default_rng(0).uniform(0, 100, (12, 12, 6)).astype(np.float32)
    result = noise2self(image, epochs=1, steps_per_epoch=2, batch_size=4, net_width=4)
    assert result.denoised.shape == image.shape


def test_nlmeans_strength_is_calibrated_near_the_true_best():
    pytest.importorskip("dipy.denoise.nlmeans")
    grid = np.meshgrid(*[np.linspace(0, 1, n) for n in (20, 20, 10)], indexing="ij")
    signal = 100 * (np.sin(5 * grid[0]) * np.cos(3 * grid[1]) + 1.5) + 20 * grid[2]
    noisy = signal + np.random.default_rng(1).normal(0, 15, signal.shape)
    strengths = [0.25, 0.5, 1.0, 2.0, 4.0]
    calibration, sigma = calibrate.calibrated_nlmeans([noisy], strengths, noise_sigma=15.0)
    from dipy.denoise.nlmeans import nlmeans

    true_error = [np.mean((calibrate.j_invariant(
        lambda x, h=h: nlmeans(x, sigma=h * sigma, patch_radius=1, block_radius=2, rician=False), noisy)
        - signal) ** 2) for h in strengths]
    assert abs(strengths.index(calibration.best) - int(np.argmin(true_error))) <= 1
