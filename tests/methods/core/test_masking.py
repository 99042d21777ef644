"""The masks the methods and the score fit in."""

import numpy as np

from bids_denoise.methods.core.masking import b0_brain_mask, tissue_mask
from bids_denoise.testing.phantom import make_phantom


def test_a_crop_inside_the_head_is_all_tissue_while_a_head_in_air_keeps_its_mask():
    phantom = make_phantom((24, 28, 16), n_b0=3, shells=((1000.0, 12),), noise_sigma=0.05, seed=3)
    head = b0_brain_mask(phantom.noisy, phantom.bvals)
    assert np.array_equal(tissue_mask(phantom.noisy, phantom.bvals), head)  # air in the field: the b0 mask
    # a crop well inside the head: tissue (1.0) with bright CSF (2.5) in the middle, no air
    rng = np.random.default_rng(0)
    crop = np.ones((12, 12, 8, 4)) + rng.normal(0, 0.02, (12, 12, 8, 4))
    crop[4:8, 4:8, 2:6] = 2.5
    crop[0, 0, 0] = 0.0  # one dropout
    bvals = np.array([0, 1000, 1000, 1000])
    assert b0_brain_mask(crop, bvals).sum() <= 4 * 4 * 4  # Otsu takes the CSF for the head
    tissue = tissue_mask(crop, bvals)
    assert tissue.sum() == crop[..., 0].size - 1 and not tissue[0, 0, 0]
