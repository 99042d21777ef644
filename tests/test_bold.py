"""BOLD runs through the app: selection, MP-PCA on the time series, maps, report, raw layout."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from bids_denoise.bids import find_validator, validate_dataset
from bids_denoise.cli import main
from bids_denoise.testing.phantom import add_bold_run
from tests.conftest import rmse, tree_digest

SELECT = ("--participant-label", "01", "--session-label", "post", "--skip-bids-validation", "--methods", "mppca")


def run_app(raw, tmp_path, *args, out="out"):
    return main([str(raw), str(tmp_path / out), "participant", "-w", str(tmp_path / f"work_{out}"),
                 *SELECT, *map(str, args)])


@pytest.fixture
def bold_dataset(dataset):
    raw, _ = dataset
    relpath, truth, active = add_bold_run(raw, "01", "post", seed=4)
    return raw, relpath, truth, active


def test_a_bold_run_is_denoised_with_its_maps_metadata_and_report(bold_dataset, tmp_path, capsys):
    raw, relpath, truth, active = bold_dataset
    before = tree_digest(raw)
    assert run_app(raw, tmp_path) == 0, capsys.readouterr().err
    assert tree_digest(raw) == before
    out = tmp_path / "out"
    stem = relpath.replace("_bold.nii.gz", "")
    denoised = out / f"{stem}_desc-mppca_bold.nii.gz"
    source = nib.load(raw / relpath)
    assert nib.load(denoised).shape == source.shape
    signal = nib.load(truth).get_fdata()
    brain = signal[..., 0] > 0
    assert rmse(nib.load(denoised).get_fdata(), signal, brain) < rmse(source.get_fdata(), signal, brain)
    sidecar = json.loads((out / f"{stem}_desc-mppca_bold.json").read_text())
    assert sidecar["RepetitionTime"] == 2.0 and sidecar["TaskName"] == "rest" and len(sidecar["SliceTiming"]) == 8
    assert sidecar["QC"]["TSNRMedianAfter"] > sidecar["QC"]["TSNRMedianBefore"]
    for name in ("noise", "rank"):
        assert nib.load(out / f"{stem}_desc-mppca_stat-{name}_boldmap.nii.gz").shape == source.shape[:3]
    figures = out / "sub-01" / "figures"
    name = (raw / relpath).name.replace("_bold.nii.gz", "")
    for kind in ("tsnr", "carpet", "noisemap", "mosaic"):
        assert (figures / f"{name}_desc-mppca_{kind}.png").exists(), kind
    assert "Carpet plots" in (out / "sub-01.html").read_text()
    if find_validator():
        n_errors, errors = validate_dataset(out)
        assert n_errors == 0, errors


def test_phase_images_are_not_runs_and_a_3d_bold_is_refused(bold_dataset, tmp_path, capsys):
    raw, relpath, _, _ = bold_dataset
    magnitude = raw / relpath.replace("_bold", "_part-mag_bold")
    (raw / relpath).rename(magnitude)
    (raw / relpath.replace(".nii.gz", ".json")).rename(magnitude.with_name(magnitude.name.replace(".nii.gz",
                                                                                                  ".json")))
    image = nib.load(magnitude)
    nib.save(nib.Nifti1Image(np.zeros(image.shape, np.float32), image.affine),
             raw / relpath.replace("_bold", "_part-phase_bold"))
    assert run_app(raw, tmp_path) == 0, capsys.readouterr().err
    written = sorted(p.name for p in (tmp_path / "out").rglob("*_desc-mppca_bold.nii.gz"))
    assert written == [magnitude.name.replace("_bold.nii.gz", "_desc-mppca_bold.nii.gz")]

    nib.save(nib.Nifti1Image(image.get_fdata()[..., 0].astype(np.float32), image.affine), magnitude)
    code = run_app(raw, tmp_path, out="out3d")
    err = capsys.readouterr().err
    assert code == 65 and "expected a 4D series" in err and magnitude.name in err


def test_raw_layout_gives_fmriprep_the_denoised_bold(bold_dataset, tmp_path, capsys):
    collect_data = pytest.importorskip("niworkflows.utils.bids").collect_data
    raw, relpath, _, _ = bold_dataset
    assert run_app(raw, tmp_path, "--output-layout", "bids") == 0, capsys.readouterr().err
    out = tmp_path / "out"
    data, _ = collect_data(str(out), "01", session_id="post", bids_validate=False)
    assert data["bold"] == [str(out / relpath)]
    assert not np.array_equal(nib.load(out / relpath).get_fdata(), nib.load(raw / relpath).get_fdata())
    metadata = json.loads((out / relpath.replace(".nii.gz", ".json")).read_text())
    assert metadata["RepetitionTime"] == 2.0 and metadata["Denoising"]["Method"] == "mppca"


def test_nordic_with_noise_scans(bold_dataset, tmp_path, capsys):
    raw, relpath, truth, _ = bold_dataset
    code = main([str(raw), str(tmp_path / "out"), "participant", "-w", str(tmp_path / "work"),
                 "--participant-label", "01", "--session-label", "post", "--skip-bids-validation",
                 "--methods", "nordic", "--nordic-noise-volumes", "4"])
    assert code == 0, capsys.readouterr().err
    stem = relpath.replace("_bold.nii.gz", "")
    out = tmp_path / "out"
    denoised = nib.load(out / f"{stem}_desc-nordic_bold.nii.gz")
    assert denoised.shape[3] == nib.load(raw / relpath).shape[3] - 4
    sidecar = json.loads((out / f"{stem}_desc-nordic_bold.json").read_text())
    assert sidecar["NoiseScansRemoved"] == 4 and any("noise scans" in w for w in sidecar["Warnings"])
    assert sidecar["Provenance"]["Details"]["threshold_source"] == "noise volumes"
    assert (out / f"{stem}_desc-nordic_stat-noise_boldmap.nii.gz").exists()
    assert "[moeller2021]" in (out / "logs" / "CITATION.md").read_text()
