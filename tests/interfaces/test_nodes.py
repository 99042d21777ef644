"""The graph's nodes on a real phantom run: load once, run any method, write derivatives, report."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bids_denoise.interfaces.bids import DerivativesSink, LoadRun, ReportSink
from bids_denoise.interfaces.failures import read_failures
from bids_denoise.interfaces.method import RunMethod
from bids_denoise.interfaces.reports import RunReport
from bids_denoise.io import InputDataError
from tests.conftest import assert_figure


@pytest.fixture
def run_files(tmp_path, phantom):
    affine = np.diag([2.0, 2.0, 2.5, 1.0])
    image = tmp_path / "sub-01_dwi.nii.gz"
    nib.save(nib.Nifti1Image(phantom.noisy.astype(np.float32), affine), image)
    bval, bvec = tmp_path / "sub-01_dwi.bval", tmp_path / "sub-01_dwi.bvec"
    np.savetxt(bval, phantom.bvals[None], fmt="%g")
    np.savetxt(bvec, phantom.bvecs, fmt="%.6f")
    return image, bval, bvec


def _in(folder: Path, name: str) -> Path:
    folder = folder / name
    folder.mkdir()
    return folder


def test_one_load_feeds_any_method_and_the_sinks(tmp_path, run_files, phantom):
    image, bval, bvec = run_files
    load = LoadRun(in_files=str(image), bval_files=str(bval), bvec_files=str(bvec)).run(cwd=str(_in(tmp_path, "load")))
    data = np.load(load.outputs.data_file)
    assert data.dtype == np.float32 and np.array_equal(data, nib.load(image).get_fdata(dtype=np.float32))
    assert set(load.outputs.digests) == {image.name, bval.name, bvec.name}

    method = RunMethod(method="mppca", parameters={"extent": 3}, data_file=load.outputs.data_file,
                       gradients_file=load.outputs.gradients_file, reference_files=str(image), seed=5)
    result = method.run(cwd=str(_in(tmp_path, "method"))).outputs
    kinds = {(item["kind"], item["name"]) for item in result.derivatives}
    assert kinds == {("image", "image"), ("map", "noise"), ("map", "rank"), ("map", "removed")}
    assert result.provenance["Parameters"]["extent"] == 3 and result.provenance["Parameters"]["estimator"] == "Exp2"
    assert result.provenance["Seed"] == 5
    denoised = nib.load(result.derivatives[0]["path"])
    assert np.allclose(denoised.affine, nib.load(image).affine)
    brain = phantom.signal[..., 0] > 0
    noisy_error = np.sqrt(np.mean((phantom.noisy - phantom.signal)[brain] ** 2))
    assert np.sqrt(np.mean((denoised.get_fdata() - phantom.signal)[brain] ** 2)) < 0.8 * noisy_error

    out = tmp_path / "out"
    relpath = "sub-01/dwi/sub-01_dwi.nii.gz"
    sink = DerivativesSink(output_dir=str(out.parent), source_relpath=relpath, method="mppca",
                           derivatives=result.derivatives, provenance=result.provenance,
                           input_digests=load.outputs.digests, bval_file=str(bval), bvec_file=str(bvec),
                           source_metadata={"PhaseEncodingDirection": "j-"})
    sink.inputs.output_dir = str(out)
    written = sink.run(cwd=str(_in(tmp_path, "sink"))).outputs.out_files
    names = sorted(Path(p).name for p in written)
    assert "sub-01_desc-mppca_dwi.nii.gz" in names and "sub-01_desc-mppca_stat-noise_dwimap.nii.gz" in names
    assert "sub-01_desc-mppca_dwi.bval" in names
    sidecar = json.loads((out / "sub-01/dwi/sub-01_desc-mppca_dwi.json").read_text())
    assert sidecar["PhaseEncodingDirection"] == "j-" and sidecar["Provenance"]["InputDigests"][image.name]

    report = RunReport(data_file=load.outputs.data_file, gradients_file=load.outputs.gradients_file,
                       derivatives=result.derivatives, method="mppca", title="sub-01_dwi",
                       provenance=result.provenance).run(cwd=str(_in(tmp_path, "report"))).outputs
    assert {f["kind"] for f in report.figures} >= {"mosaic", "residualmap", "volumes", "noisemap", "rankmap"}
    assert report.qc_summary["NoiseSigmaMedian"] > 0 and not report.warnings
    ReportSink(output_dir=str(out), source_relpath=relpath, method="mppca", derivatives=result.derivatives,
               written=written, figures=report.figures, qc_table=report.qc_table, qc_summary=report.qc_summary,
               warnings=["a test warning"]).run(cwd=str(_in(tmp_path, "report_sink")))
    sidecar = json.loads((out / "sub-01/dwi/sub-01_desc-mppca_dwi.json").read_text())
    assert sidecar["QC"]["Figures"]["noisemap"].startswith("MP-PCA noise level")
    assert sidecar["Warnings"] == ["a test warning"]
    assert_figure(out / "sub-01/figures/sub-01_desc-mppca_mosaic.png")


def test_a_figure_that_fails_is_a_warning_not_a_lost_run(tmp_path, run_files, monkeypatch):
    from bids_denoise.reports import figures

    image, bval, bvec = run_files
    load = LoadRun(in_files=str(image), bval_files=str(bval), bvec_files=str(bvec)).run(cwd=str(_in(tmp_path, "l")))
    method = RunMethod(method="patch2self", parameters={}, data_file=load.outputs.data_file,
                       gradients_file=load.outputs.gradients_file, reference_files=str(image))
    result = method.run(cwd=str(_in(tmp_path, "m"))).outputs

    def broken(*args, **kwargs):
        raise ValueError("vmin must be less than or equal to vmax")

    monkeypatch.setattr(figures, "mosaic", broken)
    report = RunReport(data_file=load.outputs.data_file, gradients_file=load.outputs.gradients_file,
                       derivatives=result.derivatives, method="patch2self", title="t",
                       provenance=result.provenance).run(cwd=str(_in(tmp_path, "r"))).outputs
    assert report.warnings == ["figure 'mosaic' could not be made: ValueError: vmin must be less than or equal to vmax"]
    assert "residualmap" in {f["kind"] for f in report.figures}


def test_a_bad_run_fails_at_load_and_leaves_a_record(tmp_path, run_files):
    image, bval, bvec = run_files
    source = nib.load(image)
    data = source.get_fdata()
    data[1, 1, 1, 1] = np.nan
    nib.save(nib.Nifti1Image(data.astype(np.float32), source.affine), image)
    failures = tmp_path / "failures"
    node = LoadRun(in_files=str(image), bval_files=str(bval), bvec_files=str(bvec), failure_dir=str(failures),
                   run_label="sub-01_dwi", stage="load")
    with pytest.raises(InputDataError, match="NaN or infinite"):
        node.run(cwd=str(_in(tmp_path, "l")))
    (record,) = read_failures(failures)
    assert record["run"] == "sub-01_dwi" and record["stage"] == "load" and record["data_error"]
    assert record["message"].endswith("1 voxel value(s) are NaN or infinite")
