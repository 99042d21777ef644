"""MP-PCA: parity with MRtrix3 dwidenoise 3.0.8 on its own test data, and useful on a phantom."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from bids_denoise.methods.core import _localpca_solver as _mppca_solver
from bids_denoise.methods.core.errors import UnsuitableDataError
from bids_denoise.methods.core.localpca import kernel_available
from bids_denoise.methods.core.randmat import marchenko_pastur_cutoff
from bids_denoise.methods.core.windows import default_extent
from bids_denoise.methods.mppca import mppca
from tests.conftest import rmse


def needs_compiled_solver():
    """Skip where the compiled solver cannot run (not built, or disabled by the environment)."""
    if not kernel_available():
        pytest.skip(f"MP-PCA compiled solver unavailable: {_mppca_solver.unavailable_reason()}")


def load(folder, name):
    return nib.load(str(folder / name)).get_fdata(dtype=np.float32)


def voxel_failures(ours, reference, tolerance):
    """MRtrix3's testing_diff_image -voxel: |a-b| <= tol * mean of the two per-voxel maxima."""
    threshold = tolerance * 0.5 * (np.abs(ours).max(-1) + np.abs(reference).max(-1))
    return (np.abs(ours - reference) > threshold[..., None]).any(-1)


def noise_failures(ours, reference, dwi):
    return np.abs(ours - reference) > 2e-4 * np.abs(dwi.mean(-1))


CASES = [
    # options, reference, tolerance, noise reference
    ({}, "dwidenoise_ref_denoised.nii.gz", 2.5e-4, "dwidenoise_ref_noise.nii.gz"),
    ({"mask": "mask"}, "dwidenoise_ref_masked.nii.gz", 2e-4, None),
    ({"extent": 3}, "dwidenoise_ref_extent3.nii.gz", 2e-4, "dwidenoise_ref_noise3.nii.gz"),
    ({"extent": (5, 3, 1)}, "dwidenoise_ref_extent531.nii.gz", 2e-4, None),
    ({"estimator": "Exp1"}, "dwidenoise_ref_denoised_exp1.nii.gz", 1e-3, "dwidenoise_ref_noise_exp1.nii.gz"),
]


@pytest.mark.parametrize("options, reference, tolerance, noise_reference", CASES)
def test_parity_with_dwidenoise(mrtrix_data, options, reference, tolerance, noise_reference):
    dwi = load(mrtrix_data, "dwi.nii.gz")
    options = dict(options)
    if options.get("mask") == "mask":
        options["mask"] = load(mrtrix_data, "mask.nii.gz") > 0
    result = mppca(dwi, **options)
    expected = load(mrtrix_data, reference)
    failures = voxel_failures(result.denoised, expected, tolerance)
    assert failures.sum() == 0
    if options.get("mask") is not None:
        assert np.all(result.denoised[~options["mask"]] == 0)
    if noise_reference:
        assert noise_failures(result.noise_sigma, load(mrtrix_data, noise_reference), dwi).sum() == 0


def test_parity_multishell(mrtrix_data):
    """102 volumes, 4 shells. MRtrix ran its eigensolver in float32; where the noise/signal
    decision is borderline, float32 rounding flips one component, so a few voxels (<1%)
    differ by one signal component. Everything else meets MRtrix's own tolerance."""
    dwi = load(mrtrix_data, "msmt_dwi.nii.gz")
    result = mppca(dwi)
    assert result.extent == (5, 5, 5)
    failures = voxel_failures(result.denoised, load(mrtrix_data, "msmt_dwidenoise_ref_denoised.nii.gz"), 2e-4)
    assert failures.mean() < 0.01
    noise = noise_failures(result.noise_sigma, load(mrtrix_data, "msmt_dwidenoise_ref_noise.nii.gz"), dwi)
    assert noise.mean() < 0.01


def test_default_extent_follows_dwidenoise():
    assert default_extent(68, (96, 96, 60)) == (5, 5, 5)
    assert default_extent(160, (96, 96, 60)) == (7, 7, 7)
    assert default_extent(160, (96, 96, 4)) == (7, 7, 3)


def test_pure_noise_is_all_noise():
    rng = np.random.default_rng(0)
    window = rng.normal(0, 2.0, (500, 30, 125))
    gram = window @ window.transpose(0, 2, 1)
    eigenvalues = np.linalg.eigvalsh(gram)
    n_noise, sigma2 = marchenko_pastur_cutoff(torch.from_numpy(eigenvalues), 30, 125)
    assert np.median(n_noise.numpy()) >= 29
    assert np.sqrt(np.median(sigma2.numpy())) == pytest.approx(2.0, rel=0.05)


@pytest.mark.parametrize("aggregate", ["centre", "overcomplete"])
def test_lowers_error_and_estimates_noise(phantom, aggregate):
    result = mppca(phantom.noisy, aggregate=aggregate, stride=2 if aggregate == "overcomplete" else 1)
    brain = phantom.mask
    # deterministic: measured 0.496 (centre) and 0.457 (overcomplete, stride 2) of the noisy input's error
    bound = {"centre": 0.52, "overcomplete": 0.48}[aggregate]
    assert rmse(result.denoised, phantom.signal, brain) < bound * rmse(phantom.noisy, phantom.signal, brain)
    # the phantom's noise sigma is 40: MP-PCA measures the spread of the magnitudes, a little below the Gaussian
    # sigma where the signal is low (measured 36.0 and 34.5)
    assert 0.8 * 40.0 < np.median(result.noise_sigma[brain]) < 40.0
    assert result.rank.shape == phantom.mask.shape


def test_deterministic(phantom):
    first = mppca(phantom.noisy)
    second = mppca(phantom.noisy)
    assert np.array_equal(first.denoised, second.denoised)
    assert np.array_equal(first.noise_sigma, second.noise_sigma)


def test_bad_arguments(phantom):
    with pytest.raises(ValueError, match="odd"):
        mppca(phantom.noisy, extent=4)
    with pytest.raises(UnsuitableDataError, match="exceeds"):
        mppca(phantom.noisy, extent=(5, 5, 11))
    with pytest.raises(ValueError, match="too small"):
        mppca(phantom.noisy, extent=1)
    with pytest.raises(ValueError, match="estimator"):
        mppca(phantom.noisy, estimator="Exp3")
    with pytest.raises(ValueError, match="4D"):
        mppca(phantom.noisy[..., 0])


@pytest.mark.parametrize("aggregate", ["centre", "overcomplete"])
def test_threads_give_identical_results(phantom, aggregate):
    import torch

    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = mppca(phantom.noisy, aggregate=aggregate, demean=True)
        torch.set_num_threads(2)
        double = mppca(phantom.noisy, aggregate=aggregate, demean=True)
    finally:
        torch.set_num_threads(previous)
    assert np.array_equal(single.denoised, double.denoised)
    assert np.array_equal(single.noise_sigma, double.noise_sigma)


def test_overcomplete_mode_agrees_with_dipy(phantom):
    """Our DIPY mode (every window, demeaned, weights 1/(1+rank)) against DIPY's own mppca."""
    localpca = pytest.importorskip("dipy.denoise.localpca")
    theirs = localpca.mppca(phantom.noisy, patch_radius=2)
    ours = mppca(phantom.noisy, extent=5, aggregate="overcomplete", demean=True).denoised
    brain = phantom.mask
    noise = rmse(phantom.noisy, phantom.signal, brain)
    assert rmse(ours, theirs, brain) < 0.05 * noise
    assert rmse(ours, phantom.signal, brain) < 1.02 * rmse(theirs, phantom.signal, brain)


def test_per_axis_stride(phantom):
    full = mppca(phantom.noisy, extent=5, aggregate="overcomplete", demean=True)
    strided = mppca(phantom.noisy, extent=5, aggregate="overcomplete", demean=True, stride=(1, 1, 2))
    brain = phantom.mask
    assert np.all(strided.rank > 0)  # every voxel is covered by some window
    assert rmse(strided.denoised, phantom.signal, brain) < 1.05 * rmse(full.denoised, phantom.signal, brain)
    assert not np.array_equal(strided.denoised, full.denoised)
    with pytest.raises(ValueError, match="stride"):
        mppca(phantom.noisy, aggregate="overcomplete", stride=(1, 2))
    with pytest.raises(ValueError, match="stride"):
        mppca(phantom.noisy, aggregate="overcomplete", stride=0)


SOLVER_CASES = [
    {},
    {"aggregate": "overcomplete", "demean": True},
    {"aggregate": "overcomplete", "demean": True, "stride": (1, 2, 2)},
    {"estimator": "Exp1", "extent": 3},
    {"extent": (5, 3, 1)},  # 15 voxels < 27 volumes: the Gram matrix on the voxel side
    {"demean": True, "extent": (3, 5, 5)},
    {"demean": "time"},  # the window's average course kept beside the signal components
    {"demean": "time", "extent": (5, 3, 1)},  # ... from the spatial eigenvectors
    {"demean": "time", "aggregate": "overcomplete"},
]


@pytest.mark.parametrize("options", SOLVER_CASES)
def test_compiled_solver_matches_eigh(phantom, options):
    """The compiled solver (bisection for the eigenvalues the cut-off needs, noise sums from the
    trace, inverse iteration for the signal vectors, Gram matrices summed from z-planes) against a
    full torch eigh: the same cut-off in every window, the same output to rounding."""
    needs_compiled_solver()
    data = phantom.noisy.copy()
    data[:4] = 0.0  # zero windows and windows that are partly zero (rank-deficient)
    data[-3:, :, :, :] = data[-3:, :, :, :1]  # constant over volumes: rank one
    reference = mppca(data, solver="eigh", out_dtype=np.float64, **options)
    compiled = mppca(data, solver="tridiagonal", out_dtype=np.float64, **options)
    assert np.array_equal(reference.rank, compiled.rank)
    scale = np.abs(reference.denoised).max()
    assert np.abs(compiled.denoised - reference.denoised).max() < 1e-10 * scale
    assert np.allclose(compiled.noise_sigma, reference.noise_sigma, rtol=1e-9, atol=1e-9 * scale)


def test_solver_choice(phantom, monkeypatch):
    with pytest.raises(ValueError, match="solver"):
        mppca(phantom.noisy, solver="lapack")
    with pytest.raises(ValueError, match="float64"):
        mppca(phantom.noisy, solver="tridiagonal", precision="float32")
    assert mppca(phantom.noisy, precision="float32").solver == "eigh"
    needs_compiled_solver()
    assert mppca(phantom.noisy).solver == "tridiagonal"
    # where the extension was not built: "auto" falls back to eigh, "tridiagonal" says why it can't
    monkeypatch.setattr(_mppca_solver, "_load", lambda: None)
    fallback = mppca(phantom.noisy)
    assert fallback.solver == "eigh"
    assert np.abs(fallback.denoised - mppca(phantom.noisy, solver="eigh").denoised).max() == 0
    with pytest.raises(ValueError, match="not built"):
        mppca(phantom.noisy, solver="tridiagonal")


def test_environment_switch_disables_the_compiled_solver(phantom, monkeypatch):
    needs_compiled_solver()
    compiled = mppca(phantom.noisy)
    monkeypatch.setenv(_mppca_solver.DISABLE_VARIABLE, "1")
    assert not kernel_available()
    fallback = mppca(phantom.noisy)
    assert (compiled.solver, fallback.solver) == ("tridiagonal", "eigh")
    assert np.array_equal(fallback.rank, compiled.rank)
    assert np.abs(fallback.denoised - compiled.denoised).max() < 1e-4 * np.abs(compiled.denoised).max()
    with pytest.raises(ValueError, match="BIDS_DENOISE_DISABLE_KERNEL"):
        mppca(phantom.noisy, solver="tridiagonal")
    with pytest.raises(RuntimeError, match="unavailable"):
        _mppca_solver.signal_subspace(np.eye(3)[None], None, np.zeros((1, 1), np.int64), 5, 5, False)
    monkeypatch.setenv(_mppca_solver.DISABLE_VARIABLE, "0")
    assert kernel_available()


def window_parts(seed=0, n_windows=5, r=6):
    """Gram matrices of random 20-voxel windows: one part per window."""
    rows = np.random.default_rng(seed).normal(size=(n_windows, 20, r))
    return rows.transpose(0, 2, 1) @ rows, rows.sum(axis=1), np.arange(n_windows, dtype=np.int64)[:, None]


def test_solver_wrapper_matches_the_cutoff_of_eigh():
    needs_compiled_solver()
    parts, _, index = window_parts()
    vectors, n_noise, sigma2 = _mppca_solver.signal_subspace(parts, None, index, n_voxels=20, q=20, exp1=False)
    eigenvalues = torch.linalg.eigh(torch.from_numpy(parts)).eigenvalues
    expected_noise, expected_sigma2 = marchenko_pastur_cutoff(eigenvalues, 6, 20)
    assert torch.equal(n_noise, expected_noise)
    assert torch.allclose(sigma2, expected_sigma2, rtol=1e-10)
    assert vectors.shape == (5, 6, 6) and vectors.dtype == torch.float64


@pytest.mark.parametrize("broken, message", [
    (lambda p, s, i: (p.astype(np.float32), s, i), "parts must be float64"),
    (lambda p, s, i: (np.asfortranarray(p.transpose(1, 2, 0)).transpose(2, 0, 1), s, i), "C-contiguous"),
    (lambda p, s, i: (np.ascontiguousarray(p[:, :, :5]), s, i), "square"),
    (lambda p, s, i: (p, np.ascontiguousarray(s[:, :5]), i), "part_sums must have shape"),
    (lambda p, s, i: (p, s.astype(np.float32), i), "part_sums must be float64"),
    (lambda p, s, i: (p, s, i.astype(np.int32)), "part_index must be int64"),
    (lambda p, s, i: (p, s, i + 1), r"part_index values must lie in \[0, 5\)"),
    (lambda p, s, i: (p, s, i[:, 0]), "part_index must have 2 dimensions"),
    (lambda p, s, i: (p, s, np.asfortranarray(np.hstack([i, i]))), "part_index must be C-contiguous"),
])
def test_solver_wrapper_checks_every_array(broken, message):
    needs_compiled_solver()
    parts, sums, index = broken(*window_parts())
    with pytest.raises(ValueError, match=message):
        _mppca_solver.signal_subspace(parts, sums, index, n_voxels=20, q=20, exp1=False)


@pytest.mark.parametrize("shape", [(1, 1, 1, 30), (2, 2, 2, 30)])
def test_too_small_an_image_is_refused_not_zeroed(shape):
    data = np.random.default_rng(0).normal(1000.0, 30.0, shape).astype(np.float32)
    with pytest.raises(UnsuitableDataError, match="smaller than the MP-PCA window") as raised:
        mppca(data)
    assert "\n" not in str(raised.value)


def test_smallest_accepted_image_is_denoised():
    """A 3x3x3 image holds one 27-voxel window: a real estimate, no zeros."""
    rng = np.random.default_rng(1)
    signal = 1000.0 * (1.0 + rng.uniform(size=(3, 3, 3, 1)) * rng.uniform(size=(1, 1, 1, 30)))
    noisy = (signal + rng.normal(0.0, 20.0, signal.shape)).astype(np.float32)
    result = mppca(noisy)
    assert result.extent == (3, 3, 3)
    assert np.all(result.rank >= 1)
    assert rmse(result.denoised, signal) < 0.8 * rmse(noisy, signal)


def test_too_few_volumes_are_refused(phantom):
    with pytest.raises(UnsuitableDataError, match="at least 4 volumes"):
        mppca(phantom.noisy[..., :3])


# ---- options beyond the peers: optimal shrinkage, Gaussian aggregation, a given noise level, the
# ---- noise floor, per-shell demeaning (each off by default)


@pytest.fixture(scope="module")
def multishell():
    """Two shells and b0s, Rician noise, SNR 10 in white matter (sigma 100 for S0 1000)."""
    from bids_denoise.testing.phantom import make_phantom

    return make_phantom((16, 16, 12), n_b0=4, shells=((1000.0, 18), (2000.0, 18)), noise_sigma=0.1, seed=11)


def rician_mean(phantom, sigma):
    """E[M] of the phantom's magnitudes: the target of denoising alone (before the noise floor)."""
    from bids_denoise.methods.core.noise_floor import magnitude_mean

    return sigma * magnitude_mean(phantom.signal / sigma)


def test_explicit_defaults_are_the_defaults(phantom):
    plain = mppca(phantom.noisy)
    explicit = mppca(phantom.noisy, shrinkage="hard", aggregate="centre", demean=False, noise_sigma=None,
                     noise_floor="none", n_coils=1, bvals=None, rank_weighting=True, gaussian_width=0.3)
    for name in ("denoised", "noise_sigma", "rank"):
        assert np.array_equal(getattr(plain, name), getattr(explicit, name))
    assert plain.parameters == {
        "estimator": "Exp2", "aggregate": "centre", "stride": None, "demean": False, "shrinkage": "hard",
        "gaussian_width": None, "rank_weighting": None, "noise_source": "estimated", "noise_floor": "none",
        "n_coils": None, "shells": None, "precision": "float64", "solver": plain.solver, "complex": False,
    }


def test_frobenius_weights_follow_gavish_donoho():
    from bids_denoise.methods.core.randmat import frobenius_shrinkage

    q, r, sigma2 = 125, 36, 4.0
    beta = r / q
    y = np.array([0.5, 1.0 + beta**0.5 - 1e-9, 1.0 + beta**0.5 + 1e-3, 2.0, 5.0, 1e3])  # singular value / (sigma sqrt q)
    eigenvalues = torch.from_numpy((y * np.sqrt(sigma2 * q)) ** 2)[None]
    weights = frobenius_shrinkage(eigenvalues, torch.tensor([sigma2]), q, r)[0].numpy()
    eta = np.sqrt(np.clip((y**2 - beta - 1) ** 2 - 4 * beta, 0, None)) / y
    expected = np.where(y > 1 + beta**0.5, eta / y, 0.0)
    assert np.allclose(weights, expected, rtol=1e-12, atol=1e-12)
    assert weights[0] == weights[1] == 0.0 and 0 < weights[2] < 0.1 and weights[-1] > 0.999
    assert np.all(np.diff(weights) >= 0)
    # no noise found (sigma2 = 0): every component kept whole
    assert torch.equal(frobenius_shrinkage(eigenvalues, torch.tensor([0.0]), q, r), torch.ones(1, 6, dtype=torch.float64))


@pytest.mark.parametrize("aggregate", ["centre", "overcomplete"])
def test_frobenius_shrinkage_is_closer_to_the_truth_than_the_hard_cut(multishell, aggregate):
    target = rician_mean(multishell, 100.0)
    options = {"aggregate": aggregate, "demean": aggregate == "overcomplete", "extent": 5}
    hard = mppca(multishell.noisy, **options)
    shrunk = mppca(multishell.noisy, shrinkage="frobenius", **options)
    brain = multishell.mask
    assert rmse(shrunk.denoised, target, brain) < 0.95 * rmse(hard.denoised, target, brain)
    assert rmse(shrunk.denoised, multishell.signal, brain) < rmse(hard.denoised, multishell.signal, brain)
    assert np.all(shrunk.rank <= hard.rank + 1e-6)  # shrinkage only drops components
    assert shrunk.parameters["shrinkage"] == "frobenius"


def test_frobenius_on_the_compiled_solver_matches_eigh(multishell):
    needs_compiled_solver()
    for options in ({"aggregate": "overcomplete", "demean": True}, {"extent": (5, 3, 1)}):
        reference = mppca(multishell.noisy, shrinkage="frobenius", solver="eigh", out_dtype=np.float64, **options)
        compiled = mppca(multishell.noisy, shrinkage="frobenius", solver="tridiagonal", out_dtype=np.float64, **options)
        assert compiled.solver == "tridiagonal"
        scale = np.abs(reference.denoised).max()
        assert np.abs(compiled.denoised - reference.denoised).max() < 1e-6 * scale
        assert np.mean(compiled.rank != reference.rank) < 0.01


def test_gaussian_aggregation_covers_every_voxel(multishell):
    from bids_denoise.methods.core.windows import gaussian_weights

    weights = gaussian_weights((5, 5, 3), 0.25).reshape(5, 5, 3)
    assert weights[2, 2, 1] == 1.0 and weights.min() > 0
    assert np.allclose(weights, weights[::-1, ::-1, ::-1])
    brain = multishell.mask
    noisy_error = rmse(multishell.noisy, multishell.signal, brain)
    for stride in (1, 2, (1, 3, 2)):
        result = mppca(multishell.noisy, extent=5, aggregate="gaussian", demean=True, stride=stride)
        assert np.all(np.isfinite(result.denoised))
        assert np.all(result.rank > 0) and np.all(result.noise_sigma > 0)  # every voxel has a window
        assert rmse(result.denoised, multishell.signal, brain) < 0.8 * noisy_error
    assert result.parameters["gaussian_width"] == 0.25 and result.parameters["rank_weighting"] is True
    # very wide Gaussian weights are the uniform (overcomplete) average
    wide = mppca(multishell.noisy, extent=5, aggregate="gaussian", demean=True, gaussian_width=1e4)
    uniform = mppca(multishell.noisy, extent=5, aggregate="overcomplete", demean=True)
    assert np.abs(wide.denoised - uniform.denoised).max() < 1e-3 * np.abs(uniform.denoised).max()
    with pytest.raises(ValueError, match="gaussian_width"):
        mppca(multishell.noisy, aggregate="gaussian", gaussian_width=0)


def test_known_sigma_cutoff_on_pure_noise_and_a_low_rank_signal():
    from bids_denoise.methods.core.randmat import known_sigma_cutoff

    rng = np.random.default_rng(2)
    q, r, sigma = 125, 30, 3.0
    noise = rng.normal(0, sigma, (200, q, r))
    signal = 40.0 * rng.normal(size=(200, q, 2)) @ rng.normal(size=(200, 2, r))
    for window, expected_rank in ((noise, 0), (noise + signal, 2)):
        eigenvalues = torch.linalg.eigvalsh(torch.from_numpy(window.transpose(0, 2, 1) @ window))
        n_noise = known_sigma_cutoff(eigenvalues, torch.full((200,), sigma**2), q, r)
        # the largest noise eigenvalue fluctuates about the edge (Tracy-Widom): now and then one is above
        assert np.mean((r - n_noise.numpy()) == expected_rank) > 0.8
        assert np.all(np.abs(r - n_noise.numpy() - expected_rank) <= 2)


def test_given_noise_level_fixes_the_threshold(multishell):
    brain = multishell.mask
    target = rician_mean(multishell, 100.0)
    options = {"extent": 5, "aggregate": "overcomplete", "demean": True}
    estimated = mppca(multishell.noisy, **options)
    given = mppca(multishell.noisy, noise_sigma=100.0, **options)
    assert given.parameters["noise_source"] == "given" and given.parameters["estimator"] is None
    assert np.all(given.noise_sigma == 100.0)  # the map returned is the given one
    assert np.median(np.abs(given.rank - estimated.rank)[brain]) <= 1.0
    assert rmse(given.denoised, target, brain) <= 1.02 * rmse(estimated.denoised, target, brain)
    # a map, zero outside a mask
    sigma_map = np.full(brain.shape, 100.0)
    masked = mppca(multishell.noisy, noise_sigma=sigma_map, mask=brain, extent=5)
    assert np.all(masked.noise_sigma[brain] == 100.0) and np.all(masked.noise_sigma[~brain] == 0)
    # scale invariance holds with the noise level scaled too
    scaled = mppca(multishell.noisy * 1e-8, noise_sigma=100.0 * 1e-8, **options)
    assert np.allclose(scaled.denoised, 1e-8 * given.denoised, rtol=1e-5, atol=1e-12)
    with pytest.raises(ValueError, match="noise_sigma"):
        mppca(multishell.noisy, noise_sigma=np.ones((3, 3, 3)))
    with pytest.raises(ValueError, match="noise_sigma"):
        mppca(multishell.noisy, noise_sigma=-1.0)


def test_given_noise_level_on_the_compiled_solver_matches_eigh(multishell):
    needs_compiled_solver()
    if not _mppca_solver.known_available():
        pytest.skip("compiled solver built before mppca_signal_subspace_known")
    sigma_map = np.full(multishell.mask.shape, 100.0)
    sigma_map[:, :6] = 70.0
    for options in ({}, {"aggregate": "overcomplete", "demean": True}, {"extent": (5, 3, 1), "demean": True}):
        reference = mppca(multishell.noisy, noise_sigma=sigma_map, solver="eigh", out_dtype=np.float64, **options)
        compiled = mppca(multishell.noisy, noise_sigma=sigma_map, solver="tridiagonal", out_dtype=np.float64,
                         **options)
        assert compiled.solver == "tridiagonal"
        assert np.array_equal(reference.rank, compiled.rank)
        scale = np.abs(reference.denoised).max()
        assert np.abs(compiled.denoised - reference.denoised).max() < 1e-6 * scale


def low_signal_bias(result, phantom, sigma):
    """Mean error of the b=2000 values whose true signal is below sigma, in the brain."""
    low = phantom.mask[..., None] & (phantom.bvals > 1500)[None, None, None] & (phantom.signal < sigma)
    return float(np.mean(result.denoised[low] - phantom.signal[low]))


def test_noise_floor_removal_reduces_the_low_signal_bias(multishell):
    brain = multishell.mask
    options = {"extent": 5, "aggregate": "overcomplete", "demean": True}
    plain = mppca(multishell.noisy, **options)
    floor = mppca(multishell.noisy, noise_floor="koay", **options)
    assert low_signal_bias(plain, multishell, 100.0) > 60.0  # the Rician floor: about 0.8 sigma here
    assert abs(low_signal_bias(floor, multishell, 100.0)) < 0.4 * low_signal_bias(plain, multishell, 100.0)
    assert rmse(floor.denoised, multishell.signal, brain) < 0.9 * rmse(plain.denoised, multishell.signal, brain)
    # the noise map is then the Gaussian sigma (Koay & Basser's factor): closer to the true 100
    assert abs(np.median(floor.noise_sigma[brain]) - 100.0) < abs(np.median(plain.noise_sigma[brain]) - 100.0)
    assert floor.parameters["noise_floor"] == "koay" and floor.parameters["n_coils"] == 1
    given = mppca(multishell.noisy, noise_floor="koay", noise_sigma=100.0, **options)
    assert np.all(given.noise_sigma == 100.0)
    assert abs(low_signal_bias(given, multishell, 100.0)) < 0.4 * low_signal_bias(plain, multishell, 100.0)
    with pytest.raises(ValueError, match="noise_floor"):
        mppca(multishell.noisy, noise_floor="rician")
    with pytest.raises(ValueError, match="n_coils"):
        mppca(multishell.noisy, noise_floor="koay", n_coils=0)


def test_shell_basis_is_orthonormal_and_orthogonal_to_the_shell_means():
    from bids_denoise.methods.core.localpca import VolumeBasis

    bvals = np.array([0, 1000, 2000, 5, 1005, 2000, 995, 3000, 0, 2010])
    basis = VolumeBasis.from_bvals(bvals, bvals.size)
    assert basis.n_shells == 4 and basis.basis.shape == (10, 6)
    assert np.allclose(basis.basis.T @ basis.basis, np.eye(6), atol=1e-14)
    from bids_denoise.methods.core.shells import cluster_shells

    labels = cluster_shells(bvals)
    for label in np.unique(labels):
        assert np.allclose((labels == label) @ basis.basis, 0.0, atol=1e-14)
    series = np.random.default_rng(0).normal(size=(2, 3, 1, 10))
    means = basis.shell_means(series)
    assert np.allclose(basis.restore(basis.residual(series), means, np.float64), series, atol=1e-12)


def test_per_shell_demeaning_helps_on_multishell_data(multishell):
    brain = multishell.mask
    target = rician_mean(multishell, 100.0)
    options = {"extent": 5, "aggregate": "overcomplete"}
    window = mppca(multishell.noisy, demean=True, **options)
    shell = mppca(multishell.noisy, demean="shell", bvals=multishell.bvals, **options)
    assert rmse(shell.denoised, target, brain) < 0.97 * rmse(window.denoised, target, brain)
    assert shell.parameters["demean"] == "shell" and shell.parameters["shells"] == 3
    masked = mppca(multishell.noisy, demean="shell", bvals=multishell.bvals, mask=brain, extent=5)
    assert np.all(masked.denoised[~brain] == 0)
    with pytest.raises(ValueError, match="bvals"):
        mppca(multishell.noisy, demean="shell")
    with pytest.raises(ValueError, match="bvals"):
        mppca(multishell.noisy, demean="shell", bvals=multishell.bvals[:-1])
    with pytest.raises(ValueError, match="demean"):
        mppca(multishell.noisy, demean="volume")
    with pytest.raises(UnsuitableDataError, match="shell"):  # 5 volumes in 2 shells leave 3 dimensions
        mppca(multishell.noisy[..., :5], demean="shell", bvals=np.array([0, 0, 1000, 1000, 1000]))


def test_new_options_are_deterministic_on_any_thread_count(multishell):
    options = {"extent": 5, "aggregate": "gaussian", "shrinkage": "frobenius", "noise_floor": "koay",
               "demean": "shell", "bvals": multishell.bvals, "stride": (1, 1, 2)}
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = mppca(multishell.noisy, **options)
        torch.set_num_threads(2)
        double = mppca(multishell.noisy, **options)
    finally:
        torch.set_num_threads(previous)
    assert np.array_equal(single.denoised, double.denoised)
    assert np.array_equal(single.noise_sigma, double.noise_sigma)
    assert np.array_equal(single.rank, double.rank)


def test_given_noise_level_with_an_older_extension_falls_back_to_eigh(multishell, monkeypatch):
    needs_compiled_solver()
    monkeypatch.setattr(_mppca_solver, "_load_known", lambda: None)
    assert not _mppca_solver.known_available()
    assert mppca(multishell.noisy, noise_sigma=100.0).solver == "eigh"
    assert mppca(multishell.noisy).solver == "tridiagonal"
    with pytest.raises(ValueError, match="mppca_signal_subspace_known"):
        mppca(multishell.noisy, noise_sigma=100.0, solver="tridiagonal")


# ---- BOLD: each voxel's temporal mean removed, the window's average course kept (demean="time")


@pytest.fixture(scope="module", params=[15.0, 40.0], ids=["snr15", "snr40"])
def bold(request):
    from bids_denoise.testing.bold_phantom import make_bold_phantom

    phantom = make_bold_phantom(snr=request.param, seed=3)
    return phantom, mppca(phantom.magnitude[0]), mppca(phantom.magnitude[0], demean="time")


def test_temporal_demeaning_spreads_less_noise_and_keeps_more_physiology_than_dwidenoise(bold):
    """dwidenoise's mode spreads each voxel's noise over its window through the mean image's component;
    with the temporal means out and the window's average course fitted voxel by voxel, less of a voxel's
    noise reaches its neighbours and more of the slow physiology (signal below the noise edge of a
    window) is kept, with task t-values above the noisy series' and no more false positives."""
    from scipy.ndimage import binary_dilation

    from bids_denoise.testing.bold_phantom import neighbour_leak, physiology_kept, task_t

    phantom, as_dwidenoise, timed = bold
    assert neighbour_leak(timed.denoised, phantom) < 0.9 * neighbour_leak(as_dwidenoise.denoised, phantom)
    assert physiology_kept(timed.denoised, phantom) > physiology_kept(as_dwidenoise.denoised, phantom) + 0.03
    assert physiology_kept(timed.denoised, phantom) > 0.85
    noisy = phantom.magnitude[0]
    assert np.median(task_t(timed.denoised, phantom)) > 2.0 * np.median(task_t(noisy, phantom))
    far = phantom.mask & ~binary_dilation(phantom.active, iterations=2)

    def false_positives(series):
        return np.mean(np.abs(task_t(series, phantom, far)) > 3.1)

    assert false_positives(timed.denoised) <= false_positives(as_dwidenoise.denoised) + 0.005
    brain = phantom.mask
    error = np.sqrt(np.mean((timed.denoised[brain] - phantom.clean[0][brain]) ** 2))
    assert error < 0.4 * np.sqrt(np.mean((noisy[brain] - phantom.clean[0][brain]) ** 2))


def test_temporal_demeaning_keeps_each_voxels_mean_and_counts_the_course(bold):
    phantom, as_dwidenoise, timed = bold
    noisy = phantom.magnitude[0].astype(np.float64)
    # the measured temporal mean goes back as it was: what is removed has no mean
    assert np.allclose(timed.denoised.mean(axis=3), noisy.mean(axis=3), rtol=1e-5, atol=1e-3)
    assert timed.parameters["demean"] == "time" and timed.parameters["shells"] is None
    # the course is one component more than the signal components found above the edge
    assert timed.rank.min() >= 1
    # the noise level of the V - 1 demeaned dimensions: that of the series
    brain = phantom.mask
    assert np.median(timed.noise_sigma[brain]) == pytest.approx(np.median(as_dwidenoise.noise_sigma[brain]),
                                                                rel=0.05)


def test_temporal_demeaning_of_a_complex_series_separates_real_and_imaginary_means():
    from bids_denoise.testing.bold_phantom import make_bold_phantom

    phantom = make_bold_phantom(snr=40.0, seed=6)
    result = mppca(phantom.magnitude[0], phase=phantom.phase[0], demean="time")
    assert result.parameters["complex"] and result.parameters["demean"] == "time"
    brain = phantom.mask
    noisy = np.sqrt(np.mean((phantom.magnitude[0][brain] - phantom.clean[0][brain]) ** 2))
    assert np.sqrt(np.mean((result.denoised[brain] - phantom.clean[0][brain]) ** 2)) < 0.4 * noisy


def test_a_complex_bold_run_gains_from_the_noise_level_of_its_phase():
    """BOLD's default for complex runs: the magnitude denoised at the noise level the phase's imaginary
    channel measures. At tSNR 15 it raises the task t-values and lowers the error against the
    magnitude alone (whose Marchenko-Pastur estimate is low by several percent), keeping the physiology."""
    from bids_denoise.methods.core.phase import noise_level
    from bids_denoise.testing.bold_phantom import make_bold_phantom, physiology_kept, task_t

    phantom = make_bold_phantom(snr=15.0, seed=8)
    magnitude = mppca(phantom.magnitude[0], demean="time")
    measured = mppca(phantom.magnitude[0], demean="time",
                     noise_sigma=noise_level(phantom.magnitude[0], phantom.phase[0]))
    brain = phantom.mask

    def error(result):
        return np.sqrt(np.mean((result.denoised[brain] - phantom.clean[0][brain]) ** 2))

    assert error(measured) < 0.9 * error(magnitude)
    assert np.median(task_t(measured.denoised, phantom)) > 1.05 * np.median(task_t(magnitude.denoised, phantom))
    assert physiology_kept(measured.denoised, phantom) > physiology_kept(magnitude.denoised, phantom) - 0.03


@pytest.mark.parametrize("aggregate", ["centre", "overcomplete"])
def test_more_volumes_than_window_voxels_with_window_demeaning(aggregate):
    """1000 volumes of a 4x4x4 image (a 3x3x3 window of 27 voxels): removing each window's mean leaves a zero
    eigenvalue that is no noise. It used to stop the Marchenko-Pastur scan: no noise found anywhere, the input
    returned as it was, a zero noise map."""
    rng = np.random.default_rng(0)
    signal = np.linspace(80, 120, 64).reshape(4, 4, 4)[..., None] * (1 + 0.1 * np.sin(np.arange(1000) / 50))
    noisy = (signal + rng.normal(0, 5, signal.shape)).astype(np.float32)
    result = mppca(noisy, aggregate=aggregate, demean=True)
    assert result.solver == "eigh" and result.parameters["solver"] == "eigh"
    assert np.median(result.noise_sigma) == pytest.approx(5.0, rel=0.05)
    assert rmse(result.denoised, signal) < 0.4 * rmse(noisy, signal)
