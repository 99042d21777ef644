"""MP-PCA: parity with MRtrix3 dwidenoise 3.0.8 on its own test data, and useful on a phantom."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from bids_denoise.methods import _mppca_solver
from bids_denoise.methods.errors import UnsuitableDataError
from bids_denoise.methods.mppca import default_extent, kernel_available, marchenko_pastur_cutoff, mppca
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
    assert rmse(result.denoised, phantom.signal, brain) < 0.8 * rmse(phantom.noisy, phantom.signal, brain)
    # the phantom's noise sigma is 40; Rician magnitude noise in bright tissue is close to Gaussian
    assert np.median(result.noise_sigma[brain]) == pytest.approx(40.0, rel=0.25)
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
