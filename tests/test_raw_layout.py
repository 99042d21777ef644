"""--output-layout bids: a denoised raw BIDS dataset that fMRIPrep's and QSIPrep's own queries take."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bids_denoise.bids import find_validator, validate_dataset
from bids_denoise.cli import main
from tests.conftest import tree_digest

DWI = "sub-01/ses-post/dwi/sub-01_ses-post_acq-multiband_dwi.nii.gz"
T1W = "sub-01/ses-post/anat/sub-01_ses-post_T1w.nii.gz"


@pytest.fixture(scope="module")
def raw_with_fieldmap(dataset_template, tmp_path_factory):
    """The phantom dataset with a fieldmap whose IntendedFor names a DWI run."""
    template, truths = dataset_template
    raw = tmp_path_factory.mktemp("raw_layout") / "ds"
    shutil.copytree(template, raw)
    fmap = raw / "sub-01" / "ses-post" / "fmap" / "sub-01_ses-post_dir-PA_epi.nii.gz"
    fmap.parent.mkdir()
    dwi = nib.load(raw / DWI)
    nib.save(nib.Nifti1Image(dwi.get_fdata()[..., :1].astype(np.float32), dwi.affine), fmap)
    fmap.with_name(fmap.name.replace(".nii.gz", ".json")).write_text(json.dumps({
        "PhaseEncodingDirection": "j", "TotalReadoutTime": 0.05, "IntendedFor": [f"bids::{DWI}"]}))
    return raw, truths


def run_app(raw, out, work, *args):
    return main([str(raw), str(out), "participant", "-w", str(work), "--skip-bids-validation",
                 "--output-layout", "bids", *map(str, args)])


def raw_part(out: Path) -> dict:
    """Every file of the raw dataset (not the nested derivatives), by path: bytes."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and "derivatives" not in p.relative_to(out).parts}


@pytest.fixture(scope="module")
def denoised_dataset(raw_with_fieldmap, tmp_path_factory):
    """One run of the app, --output-layout bids, sub-01, median (it takes DWI and T1w)."""
    raw, _ = raw_with_fieldmap
    before = tree_digest(raw)
    folder = tmp_path_factory.mktemp("raw_layout_out")
    code = run_app(raw, folder / "out", folder / "work", "--participant-label", "01", "--methods", "median")
    return raw, folder / "out", code, before


def test_a_denoised_raw_dataset(denoised_dataset):
    raw, out, code, before = denoised_dataset
    assert code == 0
    assert tree_digest(raw) == before  # the input is never modified (links are replaced, not written)

    # the dataset-level files and the selected participant's are there (--carry-over selected, the default: no
    # raw run passes for a denoised one); the denoised runs under their raw names with their metadata, the
    # rest carried over as files of their own (copies: writing into them cannot reach the input)
    denoised_runs = {str(p.relative_to(raw)) for p in (raw / "sub-01").rglob("*.nii.gz") if "fmap" not in p.parts}
    sidecars = {relpath.replace(".nii.gz", ".json") for relpath in denoised_runs}
    expected = {str(p.relative_to(raw)) for p in raw.rglob("*") if p.is_file() and not p.relative_to(raw).parts[0]
                .startswith("sub-")} | {str(p.relative_to(raw)) for p in (raw / "sub-01").rglob("*") if p.is_file()}
    assert set(raw_part(out)) == expected | sidecars | {"code/bids-denoise/next_steps.md"}
    assert not (out / "sub-02").exists()
    nested = out / "derivatives" / "bids-denoise"
    for relpath in (DWI, T1W):
        denoised, source = out / relpath, raw / relpath
        assert not np.array_equal(nib.load(denoised).get_fdata(), nib.load(source).get_fdata())
        assert np.allclose(nib.load(denoised).affine, nib.load(source).affine)
        sidecar = json.loads(denoised.with_name(denoised.name.replace(".nii.gz", ".json")).read_text())
        assert "Denoising" not in sidecar  # no key the next pipeline does not know
        record = nested / relpath.replace(".nii.gz", ".json").replace(f"_{relpath.split('_')[-1].split('.')[0]}.",
                                                                     f"_desc-median_{relpath.split('_')[-1].split('.')[0]}.")
        assert json.loads(record.read_text())["Provenance"]["Method"] == "median"
        assert json.loads(record.read_text())["Image"] == f"bids::{relpath}"
    assert json.loads((out / DWI.replace(".nii.gz", ".json")).read_text())["PhaseEncodingDirection"] == "j-"
    carried = out / "sub-01" / "ses-post" / "fmap" / "sub-01_ses-post_dir-PA_epi.nii.gz"  # not denoised
    source = raw / carried.relative_to(out)
    assert carried.stat().st_ino != source.stat().st_ino and carried.read_bytes() == source.read_bytes()
    assert carried.stat().st_mode == source.stat().st_mode
    assert (out / "dwi.bval").read_text() == (raw / "dwi.bval").read_text()
    next_steps = (out / "code" / "bids-denoise" / "next_steps.md").read_text()
    assert "--denoise-method none" in next_steps

    description = json.loads((out / "dataset_description.json").read_text())
    source_description = json.loads((raw / "dataset_description.json").read_text())
    assert description["Name"] == source_description["Name"] and description["DatasetType"] == "raw"
    assert description["GeneratedBy"][-1]["Name"] == "bids-denoise"
    # a relative URL: valid wherever the two datasets move together; no host path
    assert description["SourceDatasets"][-1]["URL"] == os.path.relpath(raw.resolve(), out.resolve())
    assert str(raw.resolve()) not in (out / "dataset_description.json").read_text()
    assert json.loads((nested / "dataset_description.json").read_text())["DatasetType"] == "derivative"
    assert list(nested.rglob("*_desc-median_*.png")) and "--denoise-method none" in (nested / "sub-01.html").read_text()

    if find_validator():
        n_errors, errors = validate_dataset(out)  # as a raw dataset (IntendedFor still resolves)
        assert n_errors == 0, errors
        n_errors, errors = validate_dataset(nested)  # the records of denoised runs have no image here: ignored
        assert n_errors == 0, errors


def test_fmriprep_and_qsiprep_queries_take_it(denoised_dataset):
    collect_data = pytest.importorskip("niworkflows.utils.bids").collect_data
    from bids import BIDSLayout
    from bids.layout import Query

    raw, out, code, _ = denoised_dataset
    assert code == 0
    raw_data, _ = collect_data(str(raw), "01", bids_validate=False)
    out_data, _ = collect_data(str(out), "01", bids_validate=False)
    assert {key for key, files in out_data.items() if files} >= {"t1w", "dwi"}
    for key, files in raw_data.items():  # every file fMRIPrep took from the input, under the same name
        assert [str(Path(f).relative_to(out)) for f in out_data[key]] == \
            [str(Path(f).relative_to(raw)) for f in files], key
    assert str(out / T1W) in out_data["t1w"]
    # QSIPrep's DWI query: datatype dwi, suffix dwi, part mag or absent, with the gradients
    layout = BIDSLayout(str(out), validate=False, derivatives=False)
    found = layout.get(subject="01", session="post", datatype="dwi", suffix="dwi", part=["mag", Query.NONE],
                       extension=[".nii", ".nii.gz"], return_type="filename")
    assert found == [str(out / DWI)]
    assert Path(layout.get_bval(found[0])).read_text() == (raw / "dwi.bval").read_text()
    assert Path(layout.get_bvec(found[0])).exists()
    raw_layout = BIDSLayout(str(raw), validate=False, derivatives=False)
    assert layout.get_metadata(found[0]) == raw_layout.get_metadata(str(raw / DWI))  # the same metadata


def test_two_jobs_make_the_dataset_one_run_makes_and_reruns_change_nothing(dataset, tmp_path, capsys):
    raw, _ = dataset
    together, apart = tmp_path / "together", tmp_path / "apart"
    select = ("--session-label", "post", "--methods", "mppca")
    assert run_app(raw, together, tmp_path / "w0", *select) == 0, capsys.readouterr().err
    for label in ("02", "01"):
        assert run_app(raw, apart, tmp_path / f"w{label}", "--participant-label", label, *select) == 0
    assert raw_part(apart) == raw_part(together)
    again = raw_part(apart)
    assert run_app(raw, apart, tmp_path / "w01", "--participant-label", "01", *select) == 0
    assert raw_part(apart) == again  # idempotent
    assert not list(apart.rglob(".*.part*"))


def test_copies_symlinks_and_selected_participants(dataset, tmp_path, capsys):
    raw, _ = dataset
    out = tmp_path / "out"
    code = run_app(raw, out, tmp_path / "w", "--participant-label", "01", "--session-label", "post",
                   "--methods", "mppca", "--copy-mode", "symlink", "--carry-over", "selected")
    assert code == 0, capsys.readouterr().err
    assert not (out / "sub-02").exists() and not (out / "sub-01" / "ses-pre").exists()
    assert (out / T1W).is_symlink() and (out / T1W).resolve() == (raw / T1W).resolve()
    assert not os.path.isabs(os.readlink(out / T1W))  # relative: valid where the two datasets move together
    assert not (out / DWI).is_symlink()  # the denoised run replaced its link
    assert not (raw / DWI).is_symlink() and nib.load(raw / DWI).shape == nib.load(out / DWI).shape
    copied = tmp_path / "copied"
    assert run_app(raw, copied, tmp_path / "w2", "--participant-label", "01", "--session-label", "post",
                   "--methods", "mppca", "--copy-mode", "copy") == 0
    assert (copied / T1W).stat().st_ino != (raw / T1W).stat().st_ino


def test_one_method_per_modality(dataset, tmp_path, capsys):
    raw, _ = dataset
    code = run_app(raw, tmp_path / "out", tmp_path / "w", "--methods", "patch2self", "mppca")
    err = capsys.readouterr().err
    assert code == 64 and "choose one method for dwi runs" in err
    assert not (tmp_path / "out").exists()


def test_an_uncompressed_run_keeps_its_name(dataset, tmp_path, capsys):
    raw, _ = dataset
    source = raw / DWI
    plain = source.with_name(source.name.replace(".nii.gz", ".nii"))
    nib.save(nib.load(source), plain)
    source.unlink()
    shutil.rmtree(raw / "sub-02")
    out = tmp_path / "out"
    assert run_app(raw, out, tmp_path / "w", "--session-label", "post", "--methods", "mppca") == 0, \
        capsys.readouterr().err
    written = out / plain.relative_to(raw)
    assert written.exists() and not written.with_name(written.name + ".gz").exists()
    assert written.read_bytes()[:4] != b"\x1f\x8b\x08\x00"[:4]  # not gzip under a .nii name
    assert nib.load(written).shape == nib.load(plain).shape


def test_an_output_dir_holding_another_dataset_is_refused(dataset, tmp_path, capsys):
    """The raw layout used to merge into whatever OUTPUT_DIR held: the denoised DWI beside another dataset's
    bval."""
    raw, _ = dataset
    other = tmp_path / "other"
    other.mkdir()
    (other / "dataset_description.json").write_text('{"Name": "another", "BIDSVersion": "1.10.0"}')
    (other / "dwi.bval").write_text("0 3000 3000\n")
    before = tree_digest(other)
    code = run_app(raw, other, tmp_path / "w", "--participant-label", "01", "--methods", "mppca")
    err = capsys.readouterr().err
    assert code == 64 and f"{other}: not empty, and not a raw layout bids-denoise wrote" in err, err
    assert tree_digest(other) == before


def test_a_rerun_with_another_method_is_refused(dataset, tmp_path, capsys):
    """A rerun into the same raw layout with another method used to swap the DWI runs while the first
    method's maps and report sections stayed."""
    raw, _ = dataset
    out = tmp_path / "out"
    select = ("--participant-label", "01", "--session-label", "post")
    assert run_app(raw, out, tmp_path / "w", *select, "--methods", "mppca") == 0, capsys.readouterr().err
    before = tree_digest(out)
    code = run_app(raw, out, tmp_path / "w2", *select, "--methods", "median")
    err = capsys.readouterr().err
    assert code == 64 and "dwi runs denoised with mppca, not median" in err, err
    assert tree_digest(out) == before
    assert run_app(raw, out, tmp_path / "w", *select, "--methods", "mppca") == 0  # the same methods: fine


def test_a_link_out_of_the_input_is_never_read_into_the_output(dataset, tmp_path, capsys):
    """--copy-mode copy followed an input symlink to a private (0600) file and wrote its content as 0644."""
    raw, _ = dataset
    secret = tmp_path / "private.txt"
    secret.write_text("not for everyone")
    secret.chmod(0o600)
    (raw / "sub-01" / "notes.txt").symlink_to(secret)
    readable = raw / "README"
    readable.chmod(0o640)
    out = tmp_path / "out"
    code = run_app(raw, out, tmp_path / "w", "--participant-label", "01", "--session-label", "post",
                   "--methods", "mppca", "--copy-mode", "copy")
    assert code == 0, capsys.readouterr().err
    carried = out / "sub-01" / "notes.txt"
    assert carried.is_symlink() and os.readlink(carried) == str(secret)  # a link, its target's mode unchanged
    assert (out / "README").stat().st_mode & 0o777 == 0o640  # the source's mode bits, never wider
