"""Patch PCA on 3D anatomical images: a small version of the anatomical regime (benchmarks/anatomical.py),
on phantoms from both generators, against DIPY's non-local means given the true noise level."""

from __future__ import annotations

import numpy as np
import pytest

from bids_denoise.methods.core.errors import UnsuitableDataError
from bids_denoise.methods.patchpca import fold_patches, patch_pca, patch_stack
from bids_denoise.testing.anat_phantom import anatomical_scores, make_anatomical_phantom

SHAPE = (48, 56, 24)


@pytest.fixture(scope="module", params=[("mni", "T1w"), ("synthetic", "FLAIR")], ids=lambda p: "-".join(p))
def case(request):
    generator, contrast = request.param
    phantom = make_anatomical_phantom(generator, contrast, shape=SHAPE, snr=10.0, seed=3)
    return phantom, patch_pca(phantom.noisy)


def test_it_beats_non_local_means_and_keeps_the_lesion_and_the_edges(case):
    nlmeans = pytest.importorskip("dipy.denoise.nlmeans").nlmeans
    phantom, result = case
    ours = anatomical_scores(result.denoised, phantom)
    noisy = anatomical_scores(phantom.noisy, phantom)
    peer = anatomical_scores(nlmeans(phantom.noisy.astype(np.float64), sigma=phantom.sigma, rician=True), phantom)
    assert ours["psnr"] > noisy["psnr"] + 5
    assert ours["psnr"] > peer["psnr"] + 1, (ours, peer)
    assert ours["ssim"] > peer["ssim"]
    assert ours["lesion"] >= min(0.85, peer["lesion"]), (ours, peer)
    assert ours["edge"] >= 0.85


def test_the_noise_map_is_the_noise_level(case):
    phantom, result = case
    assert float(np.median(result.noise_sigma[phantom.brain])) == pytest.approx(phantom.sigma, rel=0.1)
    assert 0 < float(np.median(result.rank[phantom.brain])) < 27


def test_folding_a_stack_of_patches_gives_the_image_back():
    image = np.random.default_rng(0).normal(size=(7, 8, 9)).astype(np.float32)
    for radius in (1, 2):
        assert np.allclose(fold_patches(patch_stack(image, radius), radius), image, atol=1e-6)


def test_it_is_deterministic_and_keeps_the_shape_of_a_single_volume_series():
    phantom = make_anatomical_phantom("synthetic", "T1w", shape=(24, 24, 12), snr=10.0, seed=1)
    first = patch_pca(phantom.noisy[..., None]).denoised
    assert first.shape == (24, 24, 12)
    assert np.array_equal(first, patch_pca(phantom.noisy).denoised)


@pytest.mark.parametrize("shape", [(20, 20), (20, 20, 10, 3), (20, 20, 4)])
def test_what_is_not_a_3d_image_larger_than_the_window_is_refused(shape):
    with pytest.raises(UnsuitableDataError, match="3D image|window"):
        patch_pca(np.ones(shape, dtype=np.float32))
