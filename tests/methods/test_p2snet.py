"""P2S-Net: J-invariance over volumes, angular predictions, determinism, and no harm on a small phantom."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bids_denoise.methods.core.errors import UnsuitableDataError
from bids_denoise.methods.core.noise import series_noise_variance
from bids_denoise.methods.core.shells import even_sh_basis
from bids_denoise.methods.p2snet import (
    AngularCNN,
    angular_weights,
    conditions,
    local_subspace_predictions,
    p2snet,
)
from bids_denoise.testing.harm import check_no_harm
from bids_denoise.testing.phantom import make_phantom


def test_no_volume_is_predicted_from_itself(phantom):
    weights = angular_weights(phantom.bvals, phantom.bvecs)
    assert weights.shape == (phantom.bvals.size, 6, phantom.bvals.size)
    for volume in range(phantom.bvals.size):
        assert np.all(weights[volume, :, volume] == 0)


def test_angular_predictions_reproduce_a_quadratic_profile_and_ignore_the_sign_of_g():
    rng = np.random.default_rng(0)
    directions = rng.normal(size=(3, 30))
    directions /= np.linalg.norm(directions, axis=0)
    bvals = np.r_[0.0, 0.0, np.full(30, 1000.0)]
    bvecs = np.c_[np.zeros((3, 2)), directions]
    tensor = np.diag([3.0, 1.0, 0.5])
    profile = np.r_[5.0, 5.0, np.einsum("iv,ij,jv->v", directions, tensor, directions)]
    weights = angular_weights(bvals, bvecs)
    # orders 2 and 4 hold a quadratic form exactly (up to the small ridge); order 0 does not
    assert np.allclose(profile @ weights[:, 1, :], profile, rtol=1e-2)
    assert np.allclose(profile @ weights[:, 2, :], profile, atol=2e-2)
    assert not np.allclose(profile @ weights[:, 0, :], profile, atol=0.5)
    flipped = bvecs.copy()
    flipped[:, 5] *= -1
    assert np.allclose(angular_weights(bvals, flipped), weights, atol=1e-6)
    assert np.allclose(even_sh_basis(-directions.T, 4), even_sh_basis(directions.T, 4))
    assert np.allclose(conditions(bvals, flipped), conditions(bvals, bvecs))


def test_local_subspace_prediction_never_sees_the_voxel_it_predicts(phantom):
    variance = series_noise_variance(phantom.noisy)
    base = local_subspace_predictions(phantom.noisy, variance)
    # inside, on a face and in a corner (windows shifted inside the image there)
    for voxel in [(8, 8, 5), (0, 7, 4), (15, 15, 9)]:
        for volume in (0, 7):
            changed = phantom.noisy.copy()
            changed[voxel + (volume,)] += 500.0
            assert local_subspace_predictions(changed, variance)[voxel + (volume,)] == pytest.approx(
                base[voxel + (volume,)], abs=1e-3)
    # it denoises: closer to the signal than the noisy input in the brain
    brain = phantom.mask
    assert np.mean((base[brain] - phantom.signal[brain]) ** 2) < 0.5 * np.mean(
        (phantom.noisy[brain] - phantom.signal[brain]) ** 2)


def test_network_output_at_a_voxel_never_depends_on_that_voxel_of_the_volume(phantom):
    torch.manual_seed(0)
    model = AngularCNN(width=4, layers=2).eval()
    torch.nn.init.normal_(model.head[-1].weight)  # a head at zero would hide any dependence
    weights = torch.from_numpy(angular_weights(phantom.bvals, phantom.bvecs))
    condition = torch.from_numpy(conditions(phantom.bvals, phantom.bvecs))
    variance = series_noise_variance(phantom.noisy)
    volume = 5

    def predict(data):
        local = torch.from_numpy(local_subspace_predictions(data, variance))[..., [volume]].permute(3, 0, 1, 2)
        linear = torch.einsum("xyzv,vcn->ncxyz", torch.from_numpy(data), weights[:, :, [volume]])
        with torch.no_grad():
            return model(torch.cat([linear, local[:, None]], dim=1), condition[volume : volume + 1])[0, 0]

    base = predict(phantom.noisy)
    for voxel in [(8, 8, 5), (0, 3, 9)]:
        changed = phantom.noisy.copy()
        changed[voxel + (volume,)] += 300.0
        assert float(predict(changed)[voxel]) == pytest.approx(float(base[voxel]), abs=1e-3)
        changed[voxel + (volume + 1,)] += 300.0
        assert float(predict(changed)[voxel]) != pytest.approx(float(base[voxel]), abs=1e-3)  # the others count


def small_run(phantom, **options):
    options.setdefault("seed", 0)
    return p2snet(phantom.noisy, phantom.bvals, phantom.bvecs, epochs=3, steps_per_epoch=4, batch_size=2, width=6,
                  layers=2, crop=8, **options)


def test_seeded_runs_are_identical_and_weights_reproduce_them(phantom):
    first, second = small_run(phantom), small_run(phantom)
    assert np.array_equal(first.denoised, second.denoised)
    assert not np.array_equal(first.denoised, small_run(phantom, seed=1, blend=False).denoised)
    again = small_run(phantom, state_dict=first.state_dict)
    assert np.array_equal(again.denoised, first.denoised)
    assert again.history["stopped"] == "reused trained weights"


def test_unsuitable_input(phantom):
    with pytest.raises(UnsuitableDataError, match="4D"):
        p2snet(phantom.noisy[..., 0], phantom.bvals[:1], phantom.bvecs[:, :1])
    with pytest.raises(ValueError, match="noise_floor"):
        small_run(phantom, noise_floor="rician")


def test_does_no_harm_on_a_small_phantom():
    phantom = make_phantom((16, 16, 10), n_b0=3, shells=((1000.0, 24),), noise_sigma=0.1, seed=3)
    result = p2snet(phantom.noisy, phantom.bvals, phantom.bvecs, epochs=15, steps_per_epoch=10, batch_size=4,
                    width=12, layers=3, crop=12, seed=0)
    assert check_no_harm(result.denoised, phantom) == []
    assert 0 < max(result.blend_weights) <= 1
