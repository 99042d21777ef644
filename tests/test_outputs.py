"""The output layout: every name built from entities and parsed back, the .bidsignore, stale temporaries."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from bids_denoise.io import atomic_path, stale_temporaries
from bids_denoise.outputs import BIDSIGNORE_LINES, OutputLayout, OutputNameError, Source, build, parse


@pytest.fixture
def layout(tmp_path):
    return OutputLayout(tmp_path / "out")


def test_names_keep_every_source_entity_and_parse_back(layout):
    source = Source.from_relpath("sub-01/ses-pre/dwi/sub-01_ses-pre_acq-mb_dir-AP_run-02_dwi.nii.gz")
    image = layout.image(source, "method")
    assert image.relative_to(layout.root).as_posix() == \
        "sub-01/ses-pre/dwi/sub-01_ses-pre_acq-mb_dir-AP_run-02_desc-method_dwi.nii.gz"
    entities = parse(image)
    assert {key: entities[key] for key in ("subject", "session", "acquisition", "direction", "desc", "suffix")} == \
        {"subject": "01", "session": "pre", "acquisition": "mb", "direction": "AP", "desc": "method", "suffix": "dwi"}
    assert str(entities["run"]) == "02"  # padding kept
    noise = layout.map(source, "method", "noise")
    assert noise.name == "sub-01_ses-pre_acq-mb_dir-AP_run-02_desc-method_stat-noise_dwimap.nii.gz"
    assert parse(noise)["stat"] == "noise"
    assert layout.sidecar(noise).name.endswith("_stat-noise_dwimap.json")
    assert [p.suffix for p in layout.gradients(source, "method")] == [".bval", ".bvec"]
    assert layout.qc_table(source, "method").name.endswith("_desc-method_dwiqc.tsv")
    figure = layout.figure(source, "method", "mosaic")
    assert figure.relative_to(layout.root).as_posix() == \
        "sub-01/figures/sub-01_ses-pre_acq-mb_dir-AP_run-02_desc-method_mosaic.png"
    assert layout.prov_record(source, "method").parent.name == "prov"


def test_new_grid_entity_goes_before_desc_and_anat_has_no_session(layout):
    source = Source.from_relpath("sub-01/anat/sub-01_rec-norm_T1w.nii.gz")
    image = layout.image(source, "sr", extra={"res": "sr2"})
    assert image.relative_to(layout.root).as_posix() == "sub-01/anat/sub-01_rec-norm_res-sr2_desc-sr_T1w.nii.gz"


def test_a_source_desc_is_replaced_not_repeated(layout):
    source = Source.from_relpath("sub-01/dwi/sub-01_desc-preproc_dwi.nii.gz")
    assert layout.image(source, "method").name == "sub-01_desc-method_dwi.nii.gz"


def test_a_name_that_would_lose_an_entity_is_refused():
    with pytest.raises(OutputNameError, match="would lose"):
        build("image", {"subject": "01", "datatype": "dwi", "suffix": "dwi", "extension": ".nii.gz",
                        "nonentity": "x"})


def test_dataset_files_are_written_once_and_bidsignore_is_completed(layout, tmp_path):
    layout.root.mkdir(parents=True)
    (layout.root / ".bidsignore").write_text("mine\n*_dwi.bval\n")
    first, second = tmp_path / "first", tmp_path / "second"
    for raw in (first, second):
        raw.mkdir()
        (raw / "dataset_description.json").write_text(f'{{"Name": "{raw.name}", "BIDSVersion": "1.10.0"}}')
    layout.write_dataset_files(first)
    layout.write_dataset_files(second)
    description = (layout.root / "dataset_description.json").read_text()
    assert "derivatives of first" in description and "second" not in description
    lines = (layout.root / ".bidsignore").read_text().splitlines()
    assert lines[0] == "mine" and set(BIDSIGNORE_LINES) <= set(lines) and len(lines) == len(set(lines))


def test_main_sidecars_are_images_not_maps(layout):
    source = Source.from_relpath("sub-01/dwi/sub-01_dwi.nii.gz")
    for path in (layout.sidecar(layout.image(source, "a")), layout.sidecar(layout.map(source, "a", "noise"))):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{}")
    assert [p.name for p in layout.main_sidecars("01")] == ["sub-01_desc-a_dwi.json"]


def test_stale_temporaries_of_dead_processes_are_found_live_ones_kept(tmp_path):
    # a temporary file of a process that has exited (a killed run)
    code = ("import sys\nfrom bids_denoise.io import atomic_path\n"
            "cm = atomic_path(sys.argv[1]); cm.__enter__().write_text('half')\nimport os; os._exit(0)\n")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "x.nii.gz")], check=True)
    left = list(tmp_path.glob(".*.part*"))
    assert len(left) == 1 and not (tmp_path / "x.nii.gz").exists()
    with atomic_path(tmp_path / "y.nii.gz") as live:  # this process's own, in progress
        live.write_text("writing")
        assert stale_temporaries(tmp_path) == left
    layout = OutputLayout(tmp_path)
    assert layout.remove_stale_temporaries() == left
    assert not list(tmp_path.glob(".*.part*")) and (tmp_path / "y.nii.gz").exists()
    assert os.getpid()  # the live file was renamed into place, not removed
