"""Noise2Self: masker coverage, J-invariance, training, the calibration that can say no, no harm on a phantom
(the calibration tools: test_calibrate.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bids_denoise.methods.core.networks import UNet
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
    bvals = options.pop("bvals", phantom.bvals)
    return noise2self(phantom.noisy, bvals, epochs=3, steps_per_epoch=6, batch_size=8, net_width=8,
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


@pytest.mark.parametrize("size", [1, 2, 7])
def test_interpolated_fill_never_sees_the_hidden_voxel(size):
    """J-invariance at the border and on images narrower than the mask: a hidden voxel's fill
    comes from visible neighbours only (padding by replication would copy the voxel itself in)."""
    masker = Masker(3, "interpolate", dims=2)
    image = torch.rand(2, 1, size, size, generator=torch.Generator().manual_seed(size))
    for phase in masker.phases_hiding((size, size)):
        hidden = masker.mask((size, size), phase)
        changed = image.clone()
        changed[:, :, hidden] += 100.0
        filled, _ = masker.apply(image, phase)
        filled_changed, _ = masker.apply(changed, phase)
        assert torch.equal(filled[:, :, hidden], filled_changed[:, :, hidden])


def test_phases_hiding_skip_empty_phases():
    masker = Masker(3, dims=2)
    assert masker.phases_hiding((12, 12)) == list(range(9))
    assert masker.phases_hiding((2, 1)) == [0, 3]
    assert masker.phases_hiding((1, 1)) == [0]


def lone_volume_bvals(phantom):
    """One b0 left, at b=15 (as a DSI series), and one volume alone at b=3000."""
    bvals = phantom.bvals.copy()
    b0s = np.flatnonzero(bvals <= 50)
    bvals[b0s[0]], bvals[b0s[1:]] = 15.0, 1000.0
    lone = int(np.flatnonzero(bvals > 50)[-1])
    bvals[lone] = 3000.0
    return bvals, int(b0s[0]), lone


def test_volumes_alone_in_their_shell_fall_back_to_the_volume_context(phantom):
    bvals, b0, lone = lone_volume_bvals(phantom)
    result = small_run(phantom, context="series", bvals=bvals)
    assert result.context == "series"
    assert result.volume_context_volumes == [b0, lone]
    assert result.volume_context_history["epochs"]
    assert result.volume_context_state_dict["down.0.body.0.weight"].shape[1] == 1  # the target alone
    assert result.state_dict["down.0.body.0.weight"].shape[1] == 5  # target + 4 partners
    assert result.denoised.shape == phantom.noisy.shape
    assert np.isfinite(result.denoised).all()
    assert not np.array_equal(result.denoised[..., b0], phantom.noisy[..., b0])
    # reusing both networks' weights reproduces the output without training
    again = small_run(phantom, context="series", bvals=bvals, state_dict=result.state_dict,
                      volume_context_state_dict=result.volume_context_state_dict)
    assert np.array_equal(again.denoised, result.denoised)
    assert again.volume_context_history["stopped"] == "reused trained weights"


def test_series_context_with_no_partner_at_all_is_the_volume_context(phantom):
    data = phantom.noisy[..., :2]
    result = noise2self(data, np.array([0.0, 1000.0]), context="series", epochs=1, steps_per_epoch=2,
                        batch_size=4, net_width=4)
    assert result.context == "volume"
    assert result.volume_context_volumes == [0, 1]
    assert result.volume_context_state_dict is None
    assert result.state_dict["down.0.body.0.weight"].shape[1] == 1


def test_calibration_records_a_choice_per_volume_and_keeps_unchosen_volumes_to_the_bit(phantom):
    result = small_run(phantom, context="volume", bvecs=phantom.bvecs)
    n_volumes = phantom.noisy.shape[3]
    assert len(result.choices) == len(result.blend_weights) == len(result.blends) == n_volumes
    assert set(result.choices) <= {"identity", "j-invariant", "single pass"}
    assert all(0.0 <= weight <= 1.0 for weight in result.blend_weights)
    for volume, weight in enumerate(result.blend_weights):
        if weight == 0.0:
            assert np.array_equal(result.denoised[..., volume], phantom.noisy[..., volume])
    assert {"scale", "angular_contrast"} <= set(result.guard)


def test_uncalibrated_output_is_the_network_as_asked(phantom):
    masked = small_run(phantom, context="volume", calibrate=False)
    assert masked.choices == [] and masked.guard == {}
    assert not np.array_equal(masked.denoised, phantom.noisy)


@pytest.mark.parametrize("context", ["volume", "series"])
def test_does_no_harm_on_a_small_phantom(context):
    from bids_denoise.testing.harm import check_no_harm
    from bids_denoise.testing.phantom import make_phantom

    phantom = make_phantom((16, 16, 10), n_b0=3, shells=((1000.0, 24),), noise_sigma=0.1, seed=3)
    result = noise2self(phantom.noisy, phantom.bvals, phantom.bvecs, context=context, epochs=20, steps_per_epoch=20,
                        batch_size=8, net_width=8, seed=0)
    assert check_no_harm(result.denoised, phantom) == []
