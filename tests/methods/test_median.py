"""The self-calibrated median: it does no harm, and it says no when filtering would not help."""

from __future__ import annotations

import numpy as np
import pytest

from bids_denoise.methods.core.errors import UnsuitableDataError
from bids_denoise.methods.core.neighbours import neighbourhood_mean
from bids_denoise.methods.core.noise import image_noise_variance
from bids_denoise.methods.median import median_denoise, sure_blend
from bids_denoise.testing.phantom import make_phantom

SHELLS = ((1000.0, 12), (2000.0, 12))


def smooth_volume(shape=(32, 32, 20)):
    grid = np.meshgrid(*[np.linspace(0, 1, n) for n in shape], indexing="ij")
    return 100 * (np.sin(5 * grid[0]) * np.cos(3 * grid[1]) + 1.5) + 20 * grid[2]


# --- the noise estimate ------------------------------------------------------------------------


# the estimate's sampling error is about 1.2 / sqrt(number of 2x2x2 blocks): 1.2% here


@pytest.mark.parametrize("sigma", [1.0, 10.0, 30.0])
def test_noise_estimate_is_right_on_known_noise(sigma):
    signal = smooth_volume((48, 48, 32))
    noisy = signal + np.random.default_rng(0).normal(0, sigma, signal.shape)
    assert np.sqrt(image_noise_variance([noisy])) == pytest.approx(sigma, rel=0.05)


def test_noise_estimate_ignores_a_zero_filled_background():
    signal = smooth_volume((64, 64, 40))
    grid = np.stack(np.meshgrid(*[np.linspace(0, 1, n) for n in signal.shape], indexing="ij"), axis=-1)
    inside = np.linalg.norm(grid - 0.5, axis=-1) < 0.4  # about a quarter of the volume
    masked = np.where(inside, signal + np.random.default_rng(1).normal(0, 10, signal.shape), 0.0)
    assert np.sqrt(image_noise_variance([masked])) == pytest.approx(10, rel=0.05)


def test_noise_estimate_of_magnitude_data_lies_between_background_and_brain():
    phantom = make_phantom((24, 24, 14), n_b0=2, shells=((1000.0, 6),), noise_sigma=0.05, seed=2)
    estimate = np.sqrt(image_noise_variance([phantom.noisy[..., v] for v in range(8)]))
    # Rayleigh background: standard deviation 0.655 sigma; Rician brain: about sigma (50)
    assert 0.655 * 50 < estimate < 50 * 1.1


# --- it says no --------------------------------------------------------------------------------


def test_noiseless_smooth_image_is_returned_unchanged():
    image = smooth_volume().astype(np.float32)
    result = median_denoise(image)
    assert result.details["filter"] == "identity"
    assert result.details["blend_weight"] == 0.0
    assert np.array_equal(result.denoised, image)


def test_voxel_scale_structure_with_little_noise_is_returned_unchanged():
    # every median blurs sinusoids of a 4-voxel period; the noise (sigma 2) is too small to be worth it
    grid = np.meshgrid(np.arange(24), np.arange(24), np.arange(16), indexing="ij")
    signal = 500 + 100 * (np.sin(2 * np.pi * grid[0] / 4.3) + np.sin(2 * np.pi * grid[1] / 3.7)
                          + np.sin(2 * np.pi * grid[2] / 4.1))
    noisy = (signal + np.random.default_rng(3).normal(0, 2, signal.shape)).astype(np.float32)
    for form in ("median", "donut-median"):  # without the identity, a median would raise the error tenfold
        filtered = median_filter(noisy.astype(float), 1, form)
        assert np.mean((filtered - signal) ** 2) > 10 * np.mean((noisy - signal) ** 2)
    result = median_denoise(noisy)
    assert result.details["filter"] == "identity"
    assert result.details["calibration"]["gain"] < result.details["calibration"]["min_gain"]
    assert np.array_equal(result.denoised, noisy)


def test_pure_noise_around_a_constant_comes_back_close_to_the_constant():
    noisy = (100 + np.random.default_rng(4).normal(0, 10, (24, 24, 16))).astype(np.float32)
    result = median_denoise(noisy)
    assert result.details["filter"] in ("median", "donut-median")
    assert result.details["radius"] == 3  # the widest window: nothing to blur
    assert result.details["blend_weight"] > 0.8
    error = result.denoised.astype(float) - 100
    assert np.sqrt(np.mean(error**2)) < 0.3 * 10
    assert abs(error.mean()) < 0.05 * 10


# --- the weights and the risk ------------------------------------------------------------------


def test_blend_weights_are_near_the_true_optimum_and_the_risk_estimate_is_right():
    phantom = make_phantom((24, 24, 14), n_b0=1, shells=((1000.0, 3),), noise_sigma=0.05, seed=1)
    rng = np.random.default_rng(5)
    for signal in (phantom.signal[..., 0].astype(float), phantom.signal[..., 2].astype(float)):
        noisy = signal + rng.normal(0, 50, signal.shape)
        result = median_denoise(noisy)
        assert result.details["filter"] != "identity"
        form, radius = result.details["filter"], result.details["radius"]
        filtered = median_filter(noisy, radius, form)
        residual = filtered - noisy
        # the true optimum in each 3x3x3 neighbourhood: least squares against the noise-free signal
        with np.errstate(invalid="ignore", divide="ignore"):
            oracle = np.clip(neighbourhood_mean(residual * (signal - noisy))
                             / neighbourhood_mean(residual**2), 0, 1)
        oracle = np.nan_to_num(oracle)
        # the output is x + w (g - x): the local weights, read back where the filter changes the voxel
        moved = np.abs(residual) > 1.0
        weights = (result.denoised.astype(float) - noisy)[moved] / residual[moved]
        assert weights.min() > -1e-3 and weights.max() < 1 + 1e-3
        assert abs(weights.mean() - oracle[moved].mean()) < 0.1
        assert np.mean(np.abs(weights - oracle[moved])) < 0.15

        def error(output):
            return np.mean((output - signal) ** 2)

        written = error(result.denoised.astype(float))
        assert written < 1.25 * error(noisy + oracle * residual)
        assert written < 0.5 * error(noisy)
        # with the true noise variance, SURE is the true error of the blend to sampling accuracy
        fit = sure_blend(noisy, filtered, 50.0**2, donut=form == "donut-median")
        assert fit.risk == pytest.approx(error(noisy + fit.weights * residual), rel=0.08)


def median_filter(image, radius, form):
    """The median over the (2r+1)^3 cube, with or without its centre (edges replicated)."""
    from scipy import ndimage

    footprint = np.ones((2 * radius + 1,) * image.ndim, dtype=bool)
    if form == "donut-median":
        footprint[(radius,) * image.ndim] = False
    return ndimage.median_filter(image, footprint=footprint, mode="nearest")


# --- do no harm --------------------------------------------------------------------------------


def tensor_fit(series, phantom, keep):
    from dipy.core.gradients import gradient_table
    from dipy.reconst.dti import TensorModel

    table = gradient_table(phantom.bvals[keep], bvecs=phantom.bvecs[:, keep].T, b0_threshold=50)
    fit = TensorModel(table).fit(np.clip(series[..., keep], 1e-3, None), mask=phantom.mask)
    return fit.fa, fit.md


@pytest.fixture(scope="module", params=[0.1, 0.05], ids=["snr10", "snr20"])
def denoised_phantom(request):
    # S0 = 1000 in white matter: noise sigma 100 and 50 give SNR 10 and 20 there
    phantom = make_phantom((24, 24, 14), n_b0=3, shells=SHELLS, noise_sigma=request.param, seed=1)
    return phantom, median_denoise(phantom.noisy)


def test_psnr_of_every_shell_rises(denoised_phantom):
    phantom, result = denoised_phantom
    assert result.denoised.shape == phantom.noisy.shape and result.denoised.dtype == np.float32
    assert result.details["filter"] != "identity"
    assert result.details["noise_sigma"] > 0
    shells = [phantom.bvals < 50] + [np.abs(phantom.bvals - b) < 50 for b, _ in SHELLS]
    for shell in shells:
        peak = float(phantom.signal[..., shell].max())
        for region in (phantom.mask, np.ones(phantom.mask.shape, dtype=bool)):
            truth = phantom.signal[region][:, shell].astype(float)

            def psnr(image):
                return 10 * np.log10(peak**2 / np.mean((image[region][:, shell] - truth) ** 2))

            assert psnr(result.denoised) >= psnr(phantom.noisy) + 0.5


def test_tensor_metrics_in_white_matter_are_no_worse(denoised_phantom):
    """FA and MD errors against the noise-free fit (DTI on b <= 1000, as usual), in all white matter:
    the profile guide keeps the median from mixing tissues at their borders (without it the FA error
    rose above the noisy input's there: ``test_without_the_guide_the_median_mixes_tissue``)."""
    phantom, result = denoised_phantom
    keep = phantom.bvals < 1100
    fa_true, md_true = tensor_fit(phantom.signal, phantom, keep)
    white = phantom.mask & (fa_true > 0.3)  # the anisotropic tissue: white matter in the phantom
    fa_noisy, md_noisy = tensor_fit(phantom.noisy, phantom, keep)
    fa_out, md_out = tensor_fit(result.denoised, phantom, keep)

    def error(values, truth):
        return np.mean(np.abs(values - truth)[white])

    assert error(md_out, md_true) <= error(md_noisy, md_true)
    assert error(fa_out, fa_true) <= 0.8 * error(fa_noisy, fa_true)


def test_details_record_the_calibration(denoised_phantom):
    phantom, result = denoised_phantom
    details = result.details
    calibration = details["calibration"]
    assert details["guide"] == calibration["guide"] == "profile" and calibration["noise_estimate"] == "mppca"
    assert calibration["parameter"] == "radius" and calibration["thetas"] == [1, 2]
    assert calibration["best"] == details["radius"] == calibration["thetas"][int(np.argmin(calibration["losses"]))]
    assert calibration["filter"] == details["filter"] == "guided-donut-median"
    assert min(calibration["losses"]) < calibration["identity_risk"] == pytest.approx(details["noise_sigma"] ** 2)
    assert calibration["gain"] == pytest.approx(1 - min(calibration["losses"]) / calibration["identity_risk"])
    # a J-invariant filter on independent noise changes each voxel by at least the noise: E / s >= 1
    assert calibration["noise_independent"] and calibration["energy_ratio"] > 1
    volumes = calibration["volumes"]
    assert len(volumes) == 8 and volumes[0] == 0 and volumes[-1] == phantom.noisy.shape[3] - 1
    assert len(details["blend_weights"]) == phantom.noisy.shape[3]
    assert 0 < details["blend_weight"] < 1
    import json

    assert json.loads(json.dumps(details)) == details


def test_without_the_guide_the_median_mixes_tissue():
    """``guide="none"`` filters volume by volume (the median of 3D images): PSNR rises, but at tissue
    borders the median mixes white matter with its neighbours and FA error rises above the noisy
    input's. The guided median, on the same series, has both a higher PSNR and a lower FA error."""
    from bids_denoise.testing import harm

    phantom = make_phantom((24, 24, 14), n_b0=3, shells=SHELLS, noise_sigma=0.1, seed=1)
    reference = harm.tensor_reference(phantom)
    plain = median_denoise(phantom.noisy, guide="none")
    calibration = plain.details["calibration"]
    assert "guide" not in plain.details and calibration["thetas"] == [1, 2, 3]
    assert calibration["losses"] == [min(a, b) for a, b in zip(*calibration["risks"].values())]
    guided = median_denoise(phantom.noisy)
    plain_report = harm.harm_report(plain.denoised, phantom, reference)
    guided_report = harm.harm_report(guided.denoised, phantom, reference)
    assert plain_report["output"]["fa"] > plain_report["noisy"]["fa"] > guided_report["output"]["fa"]
    for b, value in plain_report["output"]["psnr"].items():
        assert plain_report["noisy"]["psnr"][b] < value < guided_report["output"]["psnr"][b]


def test_noise_shared_by_neighbours_is_not_filtered():
    """Interpolated or smoothed data: neighbouring voxels share their noise, the filter's risk estimate
    (exact for independent noise) is void, and the guided median returns the input unchanged."""
    from scipy.ndimage import gaussian_filter

    phantom = make_phantom((24, 24, 14), n_b0=3, shells=SHELLS, noise_sigma=0.0, seed=1)
    rng = np.random.default_rng(3)
    noise = gaussian_filter(rng.normal(0, 1, phantom.signal.shape), (1.0, 1.0, 1.0, 0))
    series = (phantom.signal + 0.1 * phantom.signal.max() * noise / noise.std()).astype(np.float32)
    result = median_denoise(series)
    assert result.details["filter"] == "identity"
    assert not result.details["calibration"]["noise_independent"]
    assert result.details["calibration"]["energy_ratio"] < 0.8  # MIN_ENERGY_RATIO: the premise fails
    assert np.array_equal(result.denoised, series)


# --- the contract ------------------------------------------------------------------------------


def small_noisy_volume(seed=6):
    phantom = make_phantom((16, 16, 10), n_b0=1, shells=((1000.0, 2),), noise_sigma=0.05, seed=seed)
    return phantom.noisy[..., 0]


def test_runs_are_deterministic():
    image = small_noisy_volume()
    first, second = median_denoise(image), median_denoise(image)
    assert np.array_equal(first.denoised, second.denoised)
    assert first.details == second.details


@pytest.mark.parametrize("factor", [1e-30, 1e30])
def test_scale_invariance(factor):
    image = small_noisy_volume()
    reference = median_denoise(image)
    scaled = median_denoise((image * np.float32(factor)).astype(np.float32))
    assert scaled.denoised.dtype == np.float32
    assert np.all(np.isfinite(scaled.denoised))
    assert np.allclose(scaled.denoised, reference.denoised.astype(float) * factor, rtol=1e-4, atol=0)
    assert scaled.details["filter"] == reference.details["filter"] != "identity"
    assert scaled.details["radius"] == reference.details["radius"]
    assert scaled.details["noise_sigma"] == pytest.approx(reference.details["noise_sigma"] * factor, rel=1e-4)


def test_fixed_radius_still_chooses_the_form_and_the_weights():
    image = small_noisy_volume()
    result = median_denoise(image, radius=2)
    assert result.details["radius"] == 2 and result.details["calibration"]["thetas"] == [2]
    assert result.details["filter"] in ("median", "donut-median")
    assert 0 < result.details["blend_weight"] < 1
    assert not np.array_equal(result.denoised, median_denoise(image, radius=1).denoised)


def test_unsuitable_data_is_refused():
    with pytest.raises(UnsuitableDataError):
        median_denoise(np.ones((8, 8)))
    image = small_noisy_volume()
    image[0, 0, 0] = np.nan
    with pytest.raises(UnsuitableDataError):
        median_denoise(image)
    with pytest.raises(ValueError):
        median_denoise(small_noisy_volume(), radius=0)
