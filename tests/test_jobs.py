"""Runs read together: the DWI runs of a session under one noise estimate, and complex DWI
(part-mag with part-phase) through the app."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from bids_denoise.cli import main
from bids_denoise.testing.phantom import make_phantom
from tests.conftest import rmse, tree_digest

RUNS = [f"sub-01/ses-pre/dwi/sub-01_ses-pre_acq-multiband_run-{run}" for run in (1, 2)]


def run_app(raw, tmp_path, *args, out="out"):
    return main([str(raw), str(tmp_path / out), "participant", "-w", str(tmp_path / f"work_{out}"),
                 "--participant-label", "01", "--session-label", "pre", "--skip-bids-validation",
                 "--methods", "mppca", *map(str, args)])


def test_a_session_mode_estimates_the_noise_once_and_denoises_each_run_with_it(dataset, tmp_path, capsys):
    raw, truths = dataset
    before = tree_digest(raw)
    assert run_app(raw, tmp_path, "--mppca-noise-scope", "session", out="session") == 0, capsys.readouterr().err
    assert run_app(raw, tmp_path, out="runs") == 0, capsys.readouterr().err
    assert tree_digest(raw) == before
    maps = {scope: [nib.load(tmp_path / scope / f"{run}_desc-mppca_stat-noise_dwimap.nii.gz").get_fdata()
                    for run in RUNS] for scope in ("session", "runs")}
    assert np.array_equal(*maps["session"])  # one estimate for both runs
    assert not np.array_equal(*maps["runs"])
    for run in RUNS:
        signal = nib.load(truths[f"{run}_dwi.nii.gz"]).get_fdata()
        brain = signal[..., 0] > 0
        noisy = nib.load(raw / f"{run}_dwi.nii.gz").get_fdata()
        denoised = nib.load(tmp_path / "session" / f"{run}_desc-mppca_dwi.nii.gz").get_fdata()
        assert denoised.shape == noisy.shape
        assert rmse(denoised, signal, brain) < 0.6 * rmse(noisy, signal, brain)
        sidecar = json.loads((tmp_path / "session" / f"{run}_desc-mppca_dwi.json").read_text())
        details = sidecar["Provenance"]["Details"]
        assert details["job"]["kind"] == "session" and details["job"]["volumes"] == [18, 18]
        assert details["noise_scope"].startswith("session")
        assert sidecar["Provenance"]["Parameters"]["noise_scope"] == "session"
        removed = nib.load(tmp_path / "session" / f"{run}_desc-mppca_stat-removed_dwimap.nii.gz").get_fdata()
        assert np.allclose(removed, np.mean((noisy - denoised) ** 2, axis=3), rtol=1e-3, atol=1e-2)
    assert "once over all DWI runs of a session" in (tmp_path / "session" / "logs" / "CITATION.md").read_text()


def test_a_joint_session_denoises_the_repeated_runs_in_one_decomposition(dataset, tmp_path, capsys):
    """--mppca-noise-scope joint: the session's two runs (one protocol) are decomposed together, which removes more
    noise from each than a decomposition of the run alone (benchmarks/repeated_runs.py measures it at size)."""
    raw, truths = dataset
    assert run_app(raw, tmp_path, "--mppca-noise-scope", "joint", out="joint") == 0, capsys.readouterr().err
    assert run_app(raw, tmp_path, out="runs") == 0, capsys.readouterr().err
    for run in RUNS:
        signal = nib.load(truths[f"{run}_dwi.nii.gz"]).get_fdata()
        brain = signal[..., 0] > 0
        noisy = nib.load(raw / f"{run}_dwi.nii.gz").get_fdata()
        joint, alone = (nib.load(tmp_path / out / f"{run}_desc-mppca_dwi.nii.gz").get_fdata() for out in ("joint", "runs"))
        assert joint.shape == noisy.shape
        assert rmse(joint, signal, brain) < rmse(alone, signal, brain) < rmse(noisy, signal, brain)
        details = json.loads((tmp_path / "joint" / f"{run}_desc-mppca_dwi.json").read_text())["Provenance"]["Details"]
        assert details["job"]["kind"] == "session" and details["noise_scope"].startswith("joint")
    assert "one decomposition over their stacked volumes" in (tmp_path / "joint" / "logs" / "CITATION.md").read_text()


def test_noise2noise_trains_on_a_sessions_repeated_runs_together(dataset, tmp_path, capsys):
    """The two runs share their gradient table: with --noise2noise-scope session each volume's repeat in the
    other run is its training partner (true Noise2Noise pairs), and each run is written as its own."""
    raw, truths = dataset
    before = tree_digest(raw)
    code = run_app(raw, tmp_path, "--methods", "mppca", "noise2noise", "--noise2noise-scope", "session",
                   "--noise2noise-epochs", "2", "--noise2noise-steps-per-epoch", "3", "--noise2noise-batch-size", "4")
    assert code == 0, capsys.readouterr().err
    assert tree_digest(raw) == before
    # the session job Noise2Noise asked for leaves mppca (run scope) denoising each run alone: its own noise map
    noise = [nib.load(tmp_path / "out" / f"{run}_desc-mppca_stat-noise_dwimap.nii.gz").get_fdata() for run in RUNS]
    assert not np.array_equal(*noise)
    for run in RUNS:
        details = json.loads((tmp_path / "out" / f"{run}_desc-mppca_dwi.json").read_text())["Provenance"]["Details"]
        assert "noise_scope" not in details
    for run in RUNS:
        sidecar = json.loads((tmp_path / "out" / f"{run}_desc-noise2noise_dwi.json").read_text())
        details = sidecar["Provenance"]["Details"]
        assert details["job"]["kind"] == "session" and details["job"]["volumes"] == [18, 18]
        assert details["session_runs"] == 2
        # every diffusion-weighted volume of either run has its repeat in the other run
        weighted = int((np.loadtxt(raw / "dwi.bval") > 50).sum())
        assert details["pairs_across_runs"] >= 2 * weighted
        signal = nib.load(truths[f"{run}_dwi.nii.gz"]).get_fdata()
        brain = signal[..., 0] > 0
        noisy = nib.load(raw / f"{run}_dwi.nii.gz").get_fdata()
        denoised = nib.load(tmp_path / "out" / f"{run}_desc-noise2noise_dwi.nii.gz").get_fdata()
        assert denoised.shape == noisy.shape
        assert rmse(denoised, signal, brain) <= rmse(noisy, signal, brain)  # blended: never worse


def _write_complex_run(raw, phantom, name):
    folder = raw / "sub-01" / "ses-pre" / "dwi"
    for part, array in (("mag", phantom.noisy), ("phase", phantom.phase)):
        image = nib.Nifti1Image(array.astype(np.float32), phantom.affine)
        nib.save(image, folder / f"{name}_part-{part}_dwi.nii.gz")
    np.savetxt(folder / f"{name}_dwi.bval", np.round(phantom.bvals)[None, :], fmt="%d")
    np.savetxt(folder / f"{name}_dwi.bvec", phantom.bvecs, fmt="%.6f")
    return folder / f"{name}_part-mag_dwi.nii.gz"


def test_a_complex_dwi_run_is_denoised_with_its_phase(dataset, tmp_path, capsys):
    """part-mag with part-phase: the phase-demodulated complex series is denoised; the magnitude is
    written under the part-mag name, with less noise-floor bias where the signal is low."""
    raw, _ = dataset
    phantom = make_phantom((16, 16, 10), n_b0=2, shells=((1000.0, 12), (3000.0, 12)), noise_sigma=0.1, seed=3,
                           complex_phase=True)
    magnitude = _write_complex_run(raw, phantom, "sub-01_ses-pre_acq-complex")
    filters = tmp_path / "filters.json"
    filters.write_text(json.dumps({"dwi": {"acquisition": "complex"}}))
    assert run_app(raw, tmp_path, "--bids-filter-file", filters, out="complex") == 0, capsys.readouterr().err
    assert run_app(raw, tmp_path, "--bids-filter-file", filters, "--mppca-phase", "ignore",
                   out="magnitude") == 0, capsys.readouterr().err
    relpath = magnitude.relative_to(raw).as_posix().replace("_dwi.nii.gz", "_desc-mppca_dwi.nii.gz")
    outputs = {kind: nib.load(tmp_path / kind / relpath).get_fdata() for kind in ("complex", "magnitude")}
    assert not list((tmp_path / "complex").rglob("*part-phase_desc-*"))
    brain = phantom.mask
    high = np.abs(phantom.bvals - 3000) < 100
    low_signal = brain[..., None] & (phantom.signal < 200) & high  # where the Rician floor lies
    bias = {kind: float(np.mean(output[low_signal] - phantom.signal[low_signal])) for kind, output in outputs.items()}
    noisy_bias = float(np.mean(phantom.noisy[low_signal] - phantom.signal[low_signal]))
    assert low_signal.sum() > 500
    # measured: 11 (complex), 26 (magnitude with the Koay correction), 62 (noisy)
    assert abs(bias["complex"]) < 0.25 * noisy_bias and abs(bias["complex"]) < 0.6 * abs(bias["magnitude"])
    assert rmse(outputs["complex"], phantom.signal, brain) < 0.5 * rmse(phantom.noisy, phantom.signal, brain)
    sidecar = json.loads((tmp_path / "complex" / relpath.replace(".nii.gz", ".json")).read_text())
    configuration = sidecar["Provenance"]["Details"]["configuration"]
    assert configuration["complex"] and configuration["phase_units"] == "radians"
    assert "phase-demodulated" in sidecar["Description"]
    assert set(sidecar["Provenance"]["InputDigests"]) >= {magnitude.name,
                                                          magnitude.name.replace("part-mag", "part-phase")}
    ignored = json.loads((tmp_path / "magnitude" / relpath.replace(".nii.gz", ".json")).read_text())
    assert not ignored["Provenance"]["Details"]["configuration"]["complex"]
    assert any("phase image was not used" in warning for warning in ignored["Warnings"])


@pytest.mark.parametrize("scope", ["session"])
def test_methods_without_joint_runs_take_a_sessions_runs_one_by_one(dataset, tmp_path, capsys, scope):
    """Patch2Self beside a session-mode MP-PCA: it gets the session's runs one at a time, each its own fit."""
    raw, _ = dataset
    code = run_app(raw, tmp_path, "--mppca-noise-scope", scope, "--methods", "mppca", "patch2self")
    assert code == 0, capsys.readouterr().err
    for run in RUNS:
        sidecar = json.loads((tmp_path / "out" / f"{run}_desc-patch2self_dwi.json").read_text())
        job = sidecar["Provenance"]["Details"]["job"]
        assert job["kind"] == "session" and not job["together"]
        assert len(sidecar["Provenance"]["Details"]["runs"]) == 2
