"""Do no harm: every DWI denoising method of the app, at its app defaults, leaves the data no worse.

On the phantom (known signal): every shell's PSNR rises, and DTI's FA and MD errors in white matter
are no worse than the noisy input's (``bids_denoise.testing.harm.check_no_harm``), at SNR 10 and 20.
On real multi-shell data (MRtrix3's test series; no known signal): a DTI fit on the denoised series
predicts held-out raw volumes at least as well as the fit on the raw series (5-fold
cross-validation, the Patch2Self paper's test). Noise2Noise and Noise2Self have their harm tests in
their own test files.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest

from bids_denoise.contract import MethodInputs
from bids_denoise.registry import load_all
from bids_denoise.testing import harm
from bids_denoise.testing.phantom import make_phantom

SHELLS = ((1000.0, 12), (2000.0, 12))

METHODS = ["mppca", "patch2self", "median"]


def run_at_app_defaults(name, data, bvals, bvecs):
    """The method as the app runs it: its registry ``run`` with its registry defaults."""
    spec = load_all()[name]
    inputs = MethodInputs(data=np.asarray(data, dtype=np.float32), affine=np.eye(4), bvals=bvals, bvecs=bvecs)
    return spec.run(inputs, spec.defaults()).image


@pytest.fixture(scope="module", params=[0.1, 0.05], ids=["snr10", "snr20"])
def phantom_case(request):
    # S0 = 1000 in white matter: noise sigma 100 and 50 give SNR 10 and 20 there
    phantom = make_phantom((24, 24, 14), n_b0=3, shells=SHELLS, noise_sigma=request.param, seed=1)
    return phantom, harm.tensor_reference(phantom)


@pytest.mark.parametrize("name", METHODS)
def test_no_harm_on_the_phantom(phantom_case, name):
    phantom, reference = phantom_case
    out = run_at_app_defaults(name, phantom.noisy, phantom.bvals, phantom.bvecs)
    report = harm.harm_report(out, phantom, reference)
    assert harm.check_no_harm(out, phantom, report) == [], report


# --- the checks themselves ---------------------------------------------------------------------


def test_the_check_sees_harm(phantom_case):
    phantom, reference = phantom_case
    assert harm.check_no_harm(phantom.signal, phantom, harm.harm_report(phantom.signal, phantom, reference)) == []
    assert harm.tensor_errors(phantom.signal, phantom, reference) == {"fa": 0.0, "md": 0.0}
    # the noisy input itself is no improvement: every shell's PSNR fails (equal, not above)
    failures = harm.check_no_harm(phantom.noisy, phantom, harm.harm_report(phantom.noisy, phantom, reference))
    assert len(failures) == 3 and all("PSNR" in line for line in failures)
    # pulling each voxel's DWIs towards their mean flattens FA and nothing else in a shell's PSNR much
    flattened = phantom.signal.astype(float).copy()
    for shell in (np.abs(phantom.bvals - b) < 50 for b, _ in SHELLS):
        mean = flattened[..., shell].mean(axis=3, keepdims=True)
        flattened[..., shell] = mean + 0.5 * (flattened[..., shell] - mean)
    failures = harm.check_no_harm(flattened, phantom, harm.harm_report(flattened, phantom, reference))
    assert any(line.startswith("FA error") for line in failures)


def test_shell_psnr_counts_each_shell(phantom_case):
    phantom, _ = phantom_case
    psnr = harm.shell_psnr(phantom.noisy, phantom)
    assert sorted(psnr) == [0.0, 1000.0, 2000.0]
    shifted = phantom.noisy.astype(float)
    shifted[..., phantom.bvals > 1500] = phantom.signal[..., phantom.bvals > 1500]  # one shell made perfect
    after = harm.shell_psnr(shifted, phantom)
    assert after[2000.0] == np.inf and after[1000.0] == psnr[1000.0] and after[0.0] == psnr[0.0]


# --- cross-validated prediction on real data -----------------------------------------------------


@pytest.fixture(scope="module")
def real_series():
    import nibabel as nib

    from tests.conftest import SHARED_DATA

    folder = SHARED_DATA / "mrtrix3"
    if not (folder / "msmt_dwi.nii.gz").exists():
        pytest.skip("../shared/data/mrtrix3 is not present (a user's clone)")
    data = nib.load(folder / "msmt_dwi.nii.gz").get_fdata(dtype=np.float32)
    bvals = np.loadtxt(folder / "msmt_dwi.bval")
    bvecs = np.loadtxt(folder / "msmt_dwi.bvec")
    mask = nib.load(folder / "msmt_mask.nii.gz").get_fdata() > 0
    crop = (slice(None), slice(None), slice(3, 9))  # 15x15x6 of 15x15x11: keeps the test fast
    return data[crop], bvals, bvecs, mask[crop]


def test_cross_validation_folds_split_every_shell():
    bvals = np.array([0, 0] + [700] * 10 + [1200] * 15 + [2800] * 20, dtype=float)
    folds = harm.cross_validation_folds(bvals, folds=5, seed=0)
    held = np.concatenate(folds)
    assert sorted(held.tolist()) == list(range(2, bvals.size))  # every DWI once, no b0
    for fold in folds:
        assert {700.0, 1200.0, 2800.0} <= set(bvals[fold].tolist())
    assert [f.tolist() for f in folds] == [f.tolist() for f in harm.cross_validation_folds(bvals, 5, 0)]


def test_cross_validation_punishes_a_denoiser_that_distorts(real_series):
    data, bvals, bvecs, mask = real_series

    def identity(series, *_):
        return series

    def flatten(series, fold_bvals, _):
        out = series.astype(float).copy()
        dwi = fold_bvals > 50
        mean = out[..., dwi].mean(axis=3, keepdims=True)
        out[..., dwi] = mean + 0.3 * (out[..., dwi] - mean)  # angular and shell contrast mostly gone
        return out

    same = harm.cross_validated_prediction(identity, data, bvals, bvecs, mask, max_bval=1300)
    assert same.r2_denoised == same.r2_raw and 0.5 < same.r2_raw < 1
    flattened = harm.cross_validated_prediction(flatten, data, bvals, bvecs, mask, max_bval=1300)
    assert flattened.r2_denoised < flattened.r2_raw - 0.1
    assert len(flattened.folds) == 5 and all(bvals[i] < 1300 for fold in flattened.folds for i in fold)


@pytest.mark.parametrize("name", METHODS)
def test_cross_validated_prediction_is_not_lowered(real_series, name, caplog):
    data, bvals, bvecs, mask = real_series
    caplog.set_level(logging.ERROR)
    # DTI on b <= 1300 (b = 0, 700, 1200); the denoiser sees every shell, b = 2800 too
    result = harm.cross_validated_prediction(
        lambda series, fold_bvals, fold_bvecs: run_at_app_defaults(name, series, fold_bvals, fold_bvecs),
        data, bvals, bvecs, mask, max_bval=1300)
    assert result.r2_denoised >= result.r2_raw, (result.r2_denoised, result.r2_raw)
