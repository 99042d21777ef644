"""Noise2Noise: pairing, exact slicing and scaling round trips, training, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bids_denoise.methods.errors import UnsuitableDataError
from bids_denoise.methods.networks import IntensityScale, UNet, from_slices, neighbour_stack, to_slices
from bids_denoise.methods.noise2noise import noise2noise, pair_volumes


def test_antipodal_directions_pair_with_angle_zero():
    bvals = np.array([0, 1000, 1000, 1000, 0, 2000])
    bvecs = np.array([[0, 1, -1, 0, 0, 1], [0, 0, 0, 1, 0, 0], [0, 0, 0.01, 0, 0, 0]], dtype=float)
    pairs, single = pair_volumes(bvals, bvecs)
    by_volume = {a: (b, angle) for a, b, angle in pairs}
    assert by_volume[1][0] == 2 and by_volume[2][0] == 1  # g and -g are one direction
    assert by_volume[1][1] < 1.0
    assert by_volume[3][0] in (1, 2) and by_volume[3][1] == pytest.approx(90.0, abs=1.0)
    assert by_volume[0] == (4, 0.0) and by_volume[4] == (0, 0.0)  # b0s pair with b0s
    assert single == [5]  # alone in its shell: passed through


def test_slicing_round_trip_is_exact():
    volume = np.random.default_rng(0).normal(size=(7, 9, 5)).astype(np.float32)
    for axis in range(3):
        assert np.array_equal(from_slices(to_slices(volume, axis).copy(), axis), volume)
    stacked = neighbour_stack(to_slices(volume, 2), 1)
    assert stacked.shape == (5, 3, 7, 9)
    assert np.array_equal(stacked[:, 1], to_slices(volume, 2))
    assert np.all(stacked[0, 0] == 0)  # no repeated anatomy beyond the edge


def test_scale_round_trip():
    data = np.random.default_rng(1).uniform(0, 3000, (6, 6, 6, 4)).astype(np.float32)
    scale = IntensityScale.fit(data)
    assert np.allclose(scale.inverse(scale.forward(data)), data, rtol=1e-6)


@pytest.mark.parametrize("dims, shape", [(2, (1, 3, 13, 10)), (3, (1, 1, 9, 7, 5))])
def test_unet_keeps_any_size(dims, shape):
    model = UNet(dims=dims, in_channels=shape[1], width=4, depth=2)
    assert model(torch.zeros(shape)).shape == (shape[0], 1) + shape[2:]


def small_run(phantom, seed=0, **options):
    return noise2noise(phantom.noisy, phantom.bvals, phantom.bvecs, epochs=4, steps_per_epoch=8,
                       batch_size=8, width=8, seed=seed, **options)


def test_training_lowers_the_loss(phantom):
    result = small_run(phantom)
    losses = [epoch["train_loss"] for epoch in result.history["epochs"]]
    assert losses[-1] < losses[0]
    assert result.denoised.shape == phantom.noisy.shape
    assert len(result.pairs) == phantom.noisy.shape[3]


def test_seeded_runs_are_identical(phantom):
    first, second = small_run(phantom, seed=5), small_run(phantom, seed=5)
    assert np.array_equal(first.denoised, second.denoised)
    assert not np.array_equal(first.denoised, small_run(phantom, seed=6).denoised)


def test_reusing_weights_reproduces_the_output(phantom):
    first = small_run(phantom, context=1)
    again = small_run(phantom, context=1, state_dict=first.state_dict)
    assert np.array_equal(first.denoised, again.denoised)
    assert again.history["stopped"] == "reused trained weights"


def test_single_b0_and_lone_bvalue_are_passed_through(phantom):
    bvals = phantom.bvals.copy()
    b0s = np.flatnonzero(bvals <= 50)
    bvals[b0s[0]], bvals[b0s[1:]] = 15.0, 1000.0  # one b0 left, at b=15 as in a DSI series
    lone = int(np.flatnonzero(bvals > 50)[-1])
    bvals[lone] = 3000.0
    result = noise2noise(phantom.noisy, bvals, phantom.bvecs, epochs=1, steps_per_epoch=2, batch_size=2, width=4)
    assert result.passed_through == sorted([int(b0s[0]), lone])
    assert np.array_equal(result.denoised[..., result.passed_through], phantom.noisy[..., result.passed_through])
    paired = [a for a, _, _ in result.pairs]
    assert sorted(paired + result.passed_through) == list(range(phantom.noisy.shape[3]))
    assert not np.array_equal(result.denoised[..., paired], phantom.noisy[..., paired])


def test_no_pair_at_all_is_unsuitable(phantom):
    with pytest.raises(UnsuitableDataError, match="two volumes in one shell"):
        noise2noise(phantom.noisy[..., :2], np.array([0.0, 1000.0]), phantom.bvecs[:, :2], epochs=1)
    with pytest.raises(UnsuitableDataError, match="4D"):
        noise2noise(phantom.noisy[..., 0], np.array([0.0]), phantom.bvecs[:, :1], epochs=1)
