"""Noise2Self: masker coverage, J-invariance, training (the calibration tools: test_calibrate.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

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
