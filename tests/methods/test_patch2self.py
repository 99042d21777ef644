"""Patch2Self: exact against an explicit per-volume regression, deterministic, useful.

The function's defaults are DIPY's (``DIPY_OPTIONS``, passed explicitly where a test compares with
a plain regression); the app's defaults, ``LOW_BIAS_OPTIONS`` (fit mask, every volume a predictor,
blend with the input, noise-floor removal), have their own tests below, and
``tests/methods/test_harm.py`` checks that the app's default does no harm.
"""

from __future__ import annotations

import numpy as np
import pytest

from bids_denoise.methods import patch2self as patch2self_module
from bids_denoise.methods.core.errors import UnsuitableDataError
from bids_denoise.methods.patch2self import DIPY_OPTIONS, LOW_BIAS_OPTIONS, patch2self, volume_groups
from tests.conftest import rmse


def reference_patch2self(data, bvals, radius, alpha=0.0, b0_threshold=50):
    """Independent reference: one explicit least-squares fit with intercept per volume."""
    out = data.astype(float).copy()
    shape, n_vol = data.shape[:3], data.shape[3]
    padded = np.pad(data.astype(float), [(radius, radius)] * 3 + [(0, 0)])
    size = 2 * radius + 1
    shifted = [
        padded[dx : dx + shape[0], dy : dy + shape[1], dz : dz + shape[2]].reshape(-1, n_vol)
        for dx in range(size) for dy in range(size) for dz in range(size)
    ]
    features = np.stack(shifted, axis=-1)  # (voxels, volumes, k)
    for group in (np.flatnonzero(bvals <= b0_threshold), np.flatnonzero(bvals > b0_threshold)):
        if group.size < 2:
            continue
        for target in group:
            others = [v for v in group if v != target]
            design = features[:, others, :].reshape(features.shape[0], -1)
            y = data.reshape(-1, n_vol)[:, target].astype(float)
            if alpha:
                centred = design - design.mean(0)
                coef = np.linalg.solve(centred.T @ centred + alpha * np.eye(design.shape[1]),
                                       centred.T @ (y - y.mean()))
                prediction = y.mean() + centred @ coef
            else:
                design = np.hstack([design, np.ones((design.shape[0], 1))])
                prediction = design @ np.linalg.lstsq(design, y, rcond=None)[0]
            out[..., target] = prediction.reshape(shape)
    return out


@pytest.fixture
def small_series():
    rng = np.random.default_rng(7)
    shape, n_vol = (9, 8, 7), 16  # 504 voxels: more than the 324 features of radius 1
    bvals = np.array([0, 0, 0, 5] + [1000] * 12, dtype=float)
    base = rng.uniform(40, 120, shape + (3,))
    mixing = rng.uniform(0, 1, (3, n_vol))
    data = base @ mixing + rng.normal(0, 4, shape + (n_vol,))
    return data, bvals


@pytest.mark.parametrize("radius", [0, 1])
def test_matches_explicit_least_squares(small_series, radius):
    data, bvals = small_series
    ours = patch2self(data, bvals, DIPY_OPTIONS, patch_radius=radius, out_dtype=np.float64)
    expected = reference_patch2self(data, bvals, radius)
    assert np.abs(ours - expected).max() <= 1e-5 * np.abs(expected).max()


def test_ridge_matches_explicit_ridge(small_series):
    data, bvals = small_series
    ours = patch2self(data, bvals, DIPY_OPTIONS, model="ridge", alpha=50.0, out_dtype=np.float64)
    expected = reference_patch2self(data, bvals, 0, alpha=50.0)
    assert np.abs(ours - expected).max() <= 1e-5 * np.abs(expected).max()
    plain = patch2self(data, bvals, DIPY_OPTIONS, out_dtype=np.float64)
    assert not np.allclose(ours, plain)  # the penalty did something


def test_float32_input_close_to_float64(small_series):
    data, bvals = small_series
    single = patch2self(data.astype(np.float32), bvals)
    double = patch2self(data, bvals, out_dtype=np.float64)
    assert np.abs(single - double).max() <= 1e-4 * np.abs(double).max()


def test_bit_identical_reruns(phantom):
    first = patch2self(phantom.noisy, phantom.bvals)
    second = patch2self(phantom.noisy, phantom.bvals)
    assert first.dtype == np.float32
    assert np.array_equal(first, second)


def test_lowers_error_against_known_signal(phantom):
    denoised = patch2self(phantom.noisy, phantom.bvals)
    brain = phantom.mask
    assert rmse(denoised, phantom.signal, brain) < 0.7 * rmse(phantom.noisy, phantom.signal, brain)


def test_single_b0_and_disabled_b0_pass_through(phantom):
    bvals = phantom.bvals.copy()
    b0s = np.flatnonzero(bvals <= 50)
    bvals[b0s[1:]] = 1000.0  # only one b0 left
    out, info = patch2self(phantom.noisy, bvals, return_info=True)
    assert np.array_equal(out[..., b0s[0]], phantom.noisy[..., b0s[0]])
    assert info.passed_through == [int(b0s[0])]
    out = patch2self(phantom.noisy, phantom.bvals, b0_denoising=False)
    assert np.array_equal(out[..., b0s], phantom.noisy[..., b0s])


def test_small_group_warns(phantom, caplog):
    with caplog.at_level("WARNING"):
        patch2self(phantom.noisy, phantom.bvals, grouping="b0_dwi")
    assert "fewer than 10 volumes" in caplog.text  # the 3 b0s


def test_mask_restricts_fit_but_predicts_everywhere(phantom):
    out = patch2self(phantom.noisy, phantom.bvals, mask=phantom.mask)
    full = patch2self(phantom.noisy, phantom.bvals, mask=None)
    assert not np.allclose(out, full)
    outside = ~phantom.mask
    assert np.isfinite(out).all()
    assert not np.allclose(out[outside], phantom.noisy[outside])  # predicted there too
    brain = phantom.mask
    assert rmse(out, phantom.signal, brain) <= 1.05 * rmse(full, phantom.signal, brain)


def test_shell_grouping_splits_shells():
    bvals = np.array([0, 0, 1000, 1005, 2000, 1995, 995])
    groups = volume_groups(bvals, grouping="shell")
    assert [g.tolist() for g in groups] == [[0, 1], [2, 3, 6], [4, 5]]
    groups = volume_groups(bvals)
    assert [g.tolist() for g in groups] == [[0, 1], [2, 3, 4, 5, 6]]
    assert [g.tolist() for g in volume_groups(bvals, grouping="all")] == [list(range(7))]


def test_clip_and_shift():
    rng = np.random.default_rng(0)
    data = rng.normal(0, 1, (6, 6, 6, 12))
    bvals = np.r_[0, np.full(11, 1000.0)]
    clipped = patch2self(data, bvals, clip_negative_vals=True)
    assert clipped[..., 1:].min() >= 0
    shifted = patch2self(data, bvals, shift_intensity=True)
    plain = patch2self(data, bvals)
    for volume in range(1, 12):
        assert shifted[..., volume].min() == pytest.approx(0.0, abs=1e-5)
        offset = shifted[..., volume] - plain[..., volume]
        assert np.allclose(offset, offset.flat[0], atol=1e-4)


def test_duplicated_volumes_are_regularised_not_crashing(phantom):
    data = np.concatenate([phantom.noisy, phantom.noisy[..., 5:6]], axis=3)
    bvals = np.r_[phantom.bvals, phantom.bvals[5]]
    out, info = patch2self(data, bvals, return_info=True)
    assert np.isfinite(out).all()
    assert info.regularised_groups


def test_agrees_with_dipy_version3(phantom):
    dipy = pytest.importorskip("dipy.denoise.patch2self")
    pytest.importorskip("sklearn")
    np.random.seed(0)
    theirs = dipy.patch2self(phantom.noisy, phantom.bvals, version=3, shift_intensity=False, verbose=False)
    ours = patch2self(phantom.noisy, phantom.bvals, DIPY_OPTIONS)
    brain = phantom.mask
    # DIPY v3 fits on a random 30% count sketch of the voxels, which adds noise of its own
    # (on a phantom this small, much of it): the same kind of output, ours closer to the signal
    correlation = np.corrcoef(ours[brain].ravel(), theirs[brain].ravel())[0, 1]
    assert correlation > 0.95
    assert rmse(ours, phantom.signal, brain) <= rmse(theirs, phantom.signal, brain)


def test_bad_arguments():
    data = np.zeros((4, 4, 4, 5))
    with pytest.raises(ValueError, match="b-values for 5 volumes"):
        patch2self(data, np.zeros(4))
    with pytest.raises(ValueError, match="model"):
        patch2self(data, np.zeros(5), model="lasso")
    with pytest.raises(ValueError, match="4D"):
        patch2self(np.zeros((4, 4, 4)), np.zeros(4))
    for option in ({"blend": "voxel"}, {"noise_floor": "rician"}, {"fit_mask": "brain"}, {"grouping": "pairs"}):
        with pytest.raises(ValueError, match=next(iter(option))):
            patch2self(data, np.zeros(5), **option)


def lone_volume_series(phantom):
    """The phantom with one b0 left and one volume alone at b=3000 (as a DSI series' lone b0)."""
    bvals = phantom.bvals.copy()
    b0s = np.flatnonzero(bvals <= 50)
    bvals[b0s[1:]] = 1000.0
    lone = int(np.flatnonzero(bvals > 50)[-1])
    bvals[lone] = 3000.0
    return bvals, int(b0s[0]), lone


def test_single_b0_and_lone_bvalue(phantom):
    bvals, b0, lone = lone_volume_series(phantom)
    out, info = patch2self(phantom.noisy, bvals, return_info=True)
    # b0_dwi grouping: the b0 alone passes through, the b=3000 volume is predicted with the DWIs
    assert info.passed_through == [b0]
    assert np.array_equal(out[..., b0], phantom.noisy[..., b0])
    assert lone in info.groups[0]
    brain = phantom.mask
    assert rmse(out[..., lone], phantom.signal[..., lone], brain) < rmse(
        phantom.noisy[..., lone], phantom.signal[..., lone], brain
    )
    # shell grouping: the b=3000 volume is alone in its shell and passes through too
    out, info = patch2self(phantom.noisy, bvals, grouping="shell", return_info=True)
    assert sorted(info.passed_through) == sorted([b0, lone])
    assert np.array_equal(out[..., [b0, lone]], phantom.noisy[..., [b0, lone]])
    dwi = [v for v in range(len(bvals)) if v not in (b0, lone)]
    assert rmse(out[..., dwi], phantom.signal[..., dwi], brain) < 0.8 * rmse(
        phantom.noisy[..., dwi], phantom.signal[..., dwi], brain
    )


def test_nothing_to_regress_is_refused(phantom):
    with pytest.raises(UnsuitableDataError, match="group of at least 2 volumes"):
        patch2self(phantom.noisy[..., :2], np.array([0.0, 1000.0]), grouping="b0_dwi")
    with pytest.raises(UnsuitableDataError, match="group of at least 2 volumes"):
        patch2self(phantom.noisy[..., :1], np.array([1000.0]), LOW_BIAS_OPTIONS)


@pytest.mark.parametrize("shape, radius", [((1, 1, 1), 0), ((2, 2, 2), 0), ((3, 3, 2), 1)])
def test_fewer_voxels_than_features_is_refused(shape, radius):
    rng = np.random.default_rng(0)
    data = rng.normal(1000.0, 20.0, shape + (12,)).astype(np.float32)
    bvals = np.r_[0.0, np.full(11, 1000.0)]
    with pytest.raises(UnsuitableDataError, match="more voxels than regression features") as raised:
        patch2self(data, bvals, patch_radius=radius)
    assert "\n" not in str(raised.value)
    mask = np.zeros((7, 6, 5), dtype=bool)
    mask[:2, :2, :2] = True
    with pytest.raises(UnsuitableDataError, match="the fitting mask holds 8 voxel"):
        patch2self(rng.normal(size=(7, 6, 5, 12)), bvals, mask=mask)


def test_just_enough_voxels_denoise():
    """A 3x3x2 image (18 voxels) with 12 volumes: 11 features in the DWI group, a real fit."""
    rng = np.random.default_rng(4)
    signal = rng.uniform(500, 1500, (3, 3, 2, 1)) * rng.uniform(0.3, 1.0, (1, 1, 1, 12))
    noisy = (signal + rng.normal(0, 30, signal.shape)).astype(np.float32)
    bvals = np.r_[0.0, np.full(11, 1000.0)]
    out = patch2self(noisy, bvals)
    assert np.isfinite(out).all()
    assert not np.array_equal(out[..., 1:], noisy[..., 1:])


# --- the app's defaults against the bias: fit mask, all volumes as predictors, blend, noise floor ---


@pytest.fixture(scope="module")
def snr10_phantom():
    from bids_denoise.testing.phantom import make_phantom

    # S0 = 1000 in white matter: noise sigma 100 gives SNR 10 there
    return make_phantom((24, 24, 14), n_b0=3, shells=((1000.0, 12), (2000.0, 12)), noise_sigma=0.1, seed=2)


def test_default_records_its_steps_and_is_deterministic(snr10_phantom):
    phantom = snr10_phantom
    out, info = patch2self(phantom.noisy, phantom.bvals, LOW_BIAS_OPTIONS, return_info=True)
    assert np.array_equal(out, patch2self(phantom.noisy, phantom.bvals, LOW_BIAS_OPTIONS))
    assert info.groups == [list(range(phantom.bvals.size))]  # one group: every volume predicts every other
    assert info.fit_mask == "auto"
    brain = patch2self_module.b0_brain_mask(phantom.noisy, phantom.bvals)
    assert info.fit_voxels == brain.sum() and abs(brain.sum() - phantom.mask.sum()) < 0.05 * phantom.mask.sum()
    # the Marchenko-Pastur noise level of the brain: the spread of the magnitudes, at most the Gaussian sigma
    assert 0.8 * 100 < info.noise_sigma < 1.02 * 100
    assert len(info.blend_weights) == phantom.bvals.size and all(0.5 < w <= 1 for w in info.blend_weights)
    assert out.min() >= 0  # the noise floor removal maps values below the floor to zero


def test_blend_is_the_formula_and_near_the_oracle_weight(snr10_phantom):
    phantom = snr10_phantom
    options = LOW_BIAS_OPTIONS.replace(noise_floor="none")
    prediction = patch2self(phantom.noisy, phantom.bvals, options, mask=phantom.mask, out_dtype=np.float64,
                            blend="none")
    out, info = patch2self(phantom.noisy, phantom.bvals, options, mask=phantom.mask, out_dtype=np.float64,
                           return_info=True)
    noisy, brain = phantom.noisy.astype(float), phantom.mask
    variance = info.noise_sigma**2
    for volume, weight in enumerate(info.blend_weights):
        residual = (prediction[..., volume] - noisy[..., volume])[brain]
        expected = variance / (max(np.mean(residual**2) - variance, 0) + variance)
        assert weight == pytest.approx(expected, rel=1e-6)
        assert np.allclose(out[..., volume][brain], (weight * prediction[..., volume] + (1 - weight) * noisy[..., volume])[brain])
        # outside the fit (background here) the prediction extrapolates: its own weight, mostly the input
        outside = info.outside_blend_weights[volume]
        assert np.allclose(out[..., volume][~brain],
                           (outside * prediction[..., volume] + (1 - outside) * noisy[..., volume])[~brain])
        # the weight that minimises the error against the true signal, in the brain
        truth = (phantom.signal[..., volume] - noisy[..., volume])[brain]
        oracle = np.clip(np.sum(residual * truth) / np.sum(residual**2), 0, 1)
        assert abs(weight - oracle) < 0.2
    assert rmse(out, phantom.signal, brain) < rmse(prediction, phantom.signal, brain)
    assert np.mean(info.outside_blend_weights) < 0.5
    # the background's magnitude has mean sigma sqrt(pi / 2) (Rayleigh), what the blend estimates there
    floor = np.full(noisy.shape, 100 * np.sqrt(np.pi / 2))
    assert rmse(out, floor, ~brain) < min(rmse(prediction, floor, ~brain), rmse(noisy, floor, ~brain))


def test_noise_floor_removal_is_koay_with_the_estimated_sigma(snr10_phantom):
    from bids_denoise.methods.core.noise_floor import remove_noise_floor

    phantom = snr10_phantom
    blended, info = patch2self(phantom.noisy, phantom.bvals, LOW_BIAS_OPTIONS, out_dtype=np.float64,
                               return_info=True, noise_floor="none")
    out = patch2self(phantom.noisy, phantom.bvals, LOW_BIAS_OPTIONS, out_dtype=np.float64)
    assert np.allclose(out, remove_noise_floor(blended, info.noise_sigma), rtol=1e-6, atol=1e-6 * out.max())
    # the floor lifts the weakest signal (b=2000 in white matter): its removal lowers the error there
    high = phantom.bvals > 1500
    white = phantom.mask & (phantom.signal[..., high].mean(axis=3) < 300)
    assert white.sum() > 100
    assert rmse(out[..., high], phantom.signal[..., high], white) < rmse(blended[..., high], phantom.signal[..., high], white)


def test_auto_mask_fits_everywhere_when_the_image_is_all_brain(snr10_phantom):
    phantom = snr10_phantom
    crop = phantom.noisy[6:18, 6:18, 4:10]  # inside the brain: no background
    out, info = patch2self(crop, phantom.bvals, LOW_BIAS_OPTIONS, return_info=True)
    assert info.fit_mask.startswith("all")
    assert info.fit_voxels == crop[..., 0].size
    assert rmse(out, phantom.signal[6:18, 6:18, 4:10]) < 0.7 * rmse(crop, phantom.signal[6:18, 6:18, 4:10])
    # a zero-filled background (a skull-stripped series) is background: the mask is used
    stripped = np.where(phantom.mask[..., None], phantom.noisy, 0).astype(np.float32)
    _, info = patch2self(stripped, phantom.bvals, LOW_BIAS_OPTIONS, return_info=True)
    assert info.fit_mask == "auto"


def test_lone_b0_predicts_but_passes_through_in_the_all_group(phantom):
    bvals = phantom.bvals.copy()
    b0s = np.flatnonzero(bvals <= 50)
    bvals[b0s[1:]] = 1000.0
    out, info = patch2self(phantom.noisy, bvals, LOW_BIAS_OPTIONS, return_info=True)
    assert info.passed_through == [int(b0s[0])] and info.groups == [list(range(bvals.size))]
    assert np.array_equal(out[..., b0s[0]], phantom.noisy[..., b0s[0]])
    assert info.blend_weights[b0s[0]] == 1.0
    _, info = patch2self(phantom.noisy, phantom.bvals, LOW_BIAS_OPTIONS, b0_denoising=False, return_info=True)
    assert sorted(info.passed_through) == b0s.tolist()


def test_no_noise_estimate_means_no_blend_and_no_floor_removal(caplog):
    """18 voxels and 12 volumes: too few voxels for a Marchenko-Pastur estimate; the prediction is returned."""
    rng = np.random.default_rng(4)
    signal = rng.uniform(500, 1500, (3, 3, 2, 1)) * rng.uniform(0.3, 1.0, (1, 1, 1, 12))
    noisy = (signal + rng.normal(0, 30, signal.shape)).astype(np.float32)
    bvals = np.r_[0.0, np.full(11, 1000.0)]
    with caplog.at_level("WARNING"):
        out, info = patch2self(noisy, bvals, LOW_BIAS_OPTIONS, return_info=True)
    if info.noise_sigma == 0:
        assert "no noise component" in caplog.text and info.blend_weights is None
        assert np.array_equal(out, patch2self(noisy, bvals, LOW_BIAS_OPTIONS, blend="none", noise_floor="none"))
    else:
        assert all(0 <= w <= 1 for w in info.blend_weights)
    assert not np.array_equal(out[..., 1:], noisy[..., 1:])


def test_tiles_cover_the_image_overlapping_by_half():
    corners = patch2self_module.tile_corners((24, 24, 14), (8, 8, 7))
    assert sorted({c[0] for c in corners}) == [0, 4, 8, 12, 16] and sorted({c[2] for c in corners}) == [0, 3, 6, 7]
    covered = np.zeros((24, 24, 14), dtype=int)
    for i, j, k in corners:
        covered[i : i + 8, j : j + 8, k : k + 7] += 1
    assert covered.min() >= 1
    assert patch2self_module.tile_edge("auto", (24, 24, 14, 27), (0, 0, 0)) == (6, 6, 6)  # 5 x 27 = 135 <= 216
    assert patch2self_module.tile_edge("auto", (4, 30, 30, 100), (0, 0, 0)) == (4, 8, 8)  # capped at the image
    with pytest.raises(ValueError, match="patch_radius 0"):
        patch2self(np.ones((6, 6, 6, 12)), np.r_[0.0, np.full(11, 1000.0)], tile=4, patch_radius=1)


def test_tiled_prediction_is_the_mean_of_the_tiles_fits(snr10_phantom):
    phantom = snr10_phantom
    options = LOW_BIAS_OPTIONS.replace(blend="none", noise_floor="none")
    out, info = patch2self(phantom.noisy, phantom.bvals, options, mask=phantom.mask, out_dtype=np.float64,
                           return_info=True, tile=8)
    whole = patch2self(phantom.noisy, phantom.bvals, options, mask=phantom.mask, out_dtype=np.float64, tile=None)
    total, count = np.zeros(out.shape), np.zeros(out.shape[:3])
    features = phantom.bvals.size
    for corner in patch2self_module.tile_corners(out.shape[:3], (8, 8, 8)):
        region = tuple(slice(c, c + 8) for c in corner)
        inside = phantom.mask[region]
        if inside.sum() <= patch2self_module.TILE_MIN_FIT_RATIO * features:
            continue
        local = patch2self(phantom.noisy[region], phantom.bvals, options, mask=inside, out_dtype=np.float64,
                           tile=None)
        total[region] += np.where(inside[..., None], local, 0)
        count[region] += inside
    assert info.tiles > 0 and info.tile == [8, 8, 8]
    expected = np.where(count[..., None] > 0, total / np.maximum(count, 1)[..., None], whole)
    assert np.abs(out - expected).max() <= 1e-6 * np.abs(expected).max()
    assert (count > 0).sum() > 0.5 * phantom.mask.sum()


def test_tiles_keep_the_angular_contrast_a_single_shell_loses():
    """One shell: the whole-image fit flattens FA below the noisy input's error; local fits keep it."""
    from bids_denoise.testing import harm
    from bids_denoise.testing.phantom import make_phantom

    phantom = make_phantom((32, 32, 20), n_b0=5, shells=((1000.0, 30),), noise_sigma=0.1, seed=0)
    reference = harm.tensor_reference(phantom)
    noisy_fa = harm.tensor_errors(phantom.noisy, phantom, reference)["fa"]
    whole = patch2self(phantom.noisy, phantom.bvals, LOW_BIAS_OPTIONS, tile=None)
    tiled = patch2self(phantom.noisy, phantom.bvals, LOW_BIAS_OPTIONS)
    assert harm.tensor_errors(whole, phantom, reference)["fa"] > noisy_fa
    assert harm.tensor_errors(tiled, phantom, reference)["fa"] < 0.95 * noisy_fa
