"""Noise2Noise: pairing (repeats, antipodal, none: says no), slicing and scaling round trips, training,
determinism, and no harm on a phantom with repeated measurements."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bids_denoise.methods.core.errors import UnsuitableDataError
from bids_denoise.methods.core.networks import UNet, from_slices, neighbour_stack, to_slices
from bids_denoise.methods.core.scaling import IntensityScale
from bids_denoise.methods.noise2noise import noise2noise, pair_blend_weight, pair_volumes
from bids_denoise.testing.harm import check_no_harm
from bids_denoise.testing.phantom import Phantom, make_phantom


def test_repeated_directions_are_found_antipodal_ones_too():
    bvals = np.array([0, 1000, 1000, 1000, 1000, 0, 1000, 2000, 2000])
    bvecs = np.array([[0, 1, 0, -1, 0, 0, 0.999, 0, 0],
                      [0, 0, 1, 0, 0, 0, 0.04, 1, 0],
                      [0, 0, 0, 0, 1, 0, 0, 0, 1]], dtype=float)
    pairs, single = pair_volumes(bvals, bvecs, max_angle=5.0)
    by_volume = {a: (b, angle) for a, b, angle in pairs}
    # 1, 3 (antipodal) and 6 (2.3 degrees away) are one direction measured three times
    assert {by_volume[1][0], by_volume[3][0], by_volume[6][0]} == {1, 3, 6}
    assert all(by_volume[v][0] != v for v in (1, 3, 6))
    assert by_volume[1][1] < 5.0 and by_volume[3][1] < 5.0
    assert by_volume[0] == (5, 0.0) and by_volume[5] == (0, 0.0)  # b0s are repeats of each other
    assert single == [2, 4, 7, 8]  # measured once: passed through (90 degrees apart is not a repeat)
    tight, tight_single = pair_volumes(bvals, bvecs, max_angle=1.0)
    assert 6 in tight_single and {a for a, _, _ in tight} == {0, 1, 3, 5}


def test_no_repeated_measurement_says_no(phantom):
    one_b0 = phantom.bvals.copy()
    b0s = np.flatnonzero(one_b0 <= 50)
    keep = np.r_[b0s[:1], np.flatnonzero(one_b0 > 50)]
    data, bvals, bvecs = phantom.noisy[..., keep], one_b0[keep], phantom.bvecs[:, keep]
    assert pair_volumes(bvals, bvecs) == ([], list(range(len(keep))))
    result = noise2noise(data, bvals, bvecs, epochs=1, steps_per_epoch=2, batch_size=2, width=4)
    assert np.array_equal(result.denoised, data)
    assert result.warnings and "unchanged" in result.warnings[0]
    assert result.state_dict is None and result.history == {}


def test_nearest_pairing_is_an_option():
    bvals = np.array([0, 1000, 1000, 1000, 0, 2000])
    bvecs = np.array([[0, 1, -1, 0, 0, 1], [0, 0, 0, 1, 0, 0], [0, 0, 0.01, 0, 0, 0]], dtype=float)
    pairs, single = pair_volumes(bvals, bvecs, pairing="nearest")
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
    options.setdefault("pairing", "nearest")  # every volume of the fixture paired: training on all of them
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
    result = noise2noise(phantom.noisy, bvals, phantom.bvecs, pairing="nearest", blend=False, epochs=1,
                         steps_per_epoch=2, batch_size=2, width=4)
    assert result.passed_through == sorted([int(b0s[0]), lone])
    assert np.array_equal(result.denoised[..., result.passed_through], phantom.noisy[..., result.passed_through])
    paired = [a for a, _, _ in result.pairs]
    assert sorted(paired + result.passed_through) == list(range(phantom.noisy.shape[3]))
    assert not np.array_equal(result.denoised[..., paired], phantom.noisy[..., paired])


def test_not_a_series_is_unsuitable(phantom):
    with pytest.raises(UnsuitableDataError, match="4D"):
        noise2noise(phantom.noisy[..., 0], np.array([0.0]), phantom.bvecs[:, :1], epochs=1)
    with pytest.raises(UnsuitableDataError, match="repeated series"):
        noise2noise(phantom.noisy, phantom.bvals, phantom.bvecs, repeat=phantom.noisy[..., :-1], epochs=1)


def test_pair_blend_weight_keeps_the_input_when_the_output_does_not_help():
    rng = np.random.default_rng(0)
    signal = np.linspace(0, 10, 5000)
    data, partner = signal + rng.normal(size=signal.size), signal + rng.normal(size=signal.size)
    assert pair_blend_weight(signal, data, partner) > 0.9  # the signal itself: (nearly) all of it
    assert pair_blend_weight(data + 5.0, data, partner) < 0.05  # an offset helps nothing: (nearly) none
    assert pair_blend_weight(data, data, partner) == 0.0


def twice_measured(shape=(16, 16, 10)):
    """A run that measures every direction twice (two noise draws of one gradient table, concatenated)."""
    first = make_phantom(shape, n_b0=2, shells=((1000.0, 12),), noise_sigma=0.1, seed=1, gradient_seed=4)
    second = make_phantom(shape, n_b0=2, shells=((1000.0, 12),), noise_sigma=0.1, seed=2, gradient_seed=4)
    join = lambda a, b: np.concatenate([a, b], axis=-1)  # noqa: E731
    return first, second, Phantom(join(first.signal, second.signal), join(first.noisy, second.noisy),
                                  np.r_[first.bvals, second.bvals], join(first.bvecs, second.bvecs),
                                  first.affine, first.mask)


def test_repeats_within_a_run_do_no_harm():
    _, _, run = twice_measured()
    result = noise2noise(run.noisy, run.bvals, run.bvecs, epochs=15, steps_per_epoch=20, batch_size=8, width=8)
    assert not result.passed_through and all(angle < 1e-6 for _, _, angle in result.pairs)
    assert check_no_harm(result.denoised, run) == []


def test_a_second_run_as_the_pair_source_does_no_harm():
    first, second, _ = twice_measured()
    result = noise2noise(first.noisy, first.bvals, first.bvecs, repeat=second.noisy, epochs=15, steps_per_epoch=20,
                         batch_size=8, width=8)
    n_volumes = first.noisy.shape[3]
    assert result.pairs == [(v, n_volumes + v, 0.0) for v in range(n_volumes)]
    assert check_no_harm(result.denoised, first) == []
