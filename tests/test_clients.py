"""The raw layout (``--output-layout bids``) as the real fMRIPrep and QSIPrep take it (issue 29).

Marker ``clients`` (run by ``.ci/run``, not by ``make test``). fMRIPrep 25.2.7 and QSIPrep 26.1.1 are
installed from PyPI into throw-away venvs of their own, cached in ``$BIDS_DENOISE_CLIENTS_CACHE``
(default ``~/.cache/bids-denoise/clients``); where pip cannot install them the program tests skip.
Each program runs with ``--boilerplate-only`` on a tiny raw dataset and on what bids-denoise made of
it: it builds its whole workflow graph, writes its citation boilerplate and stops, and its own input
queries then say what it collected. Both must agree for the raw and the denoised dataset.

The offline placeholders (``PLACEHOLDER_TEMPLATEFLOW``: tiny images under the names of the template
files the programs fetch while building their graphs; ``PLACEHOLDER_BIN``: scripts named like the
ANTs/FSL/AFNI/FreeSurfer/MRtrix3/DSI Studio commands they look for on PATH; ``PLACEHOLDER_LICENSE``: a
FreeSurfer licence file with no licence) are used ONLY to let the programs build their workflow
graphs: nothing is computed with them, and the tests check that the placeholder commands were only
asked for their version (and ``mri_convert`` for fMRIPrep's licence probe). See
``tests/clients/harness.py``.

The other tests here need no downstream program: the validator on the raw layout and its nested
derivatives, the raw data untouched when a later tool rewrites every carried file, what a partial run
leaves, and no host path in the output.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bids_denoise.bids import find_validator, validate_dataset
from tests.clients import harness
from tests.conftest import tree_digest

pytestmark = [pytest.mark.clients, pytest.mark.timeout(3600)]  # installs fMRIPrep and QSIPrep

SUB = f"sub-{harness.SUBJECT}"
DWI = f"{SUB}/dwi/{SUB}_dwi.nii.gz"
BOLD = f"{SUB}/func/{SUB}_task-{harness.TASK}_bold.nii.gz"
DENOISE = ("--output-layout", "bids", "--methods", "mppca")


def raw_part(root: Path) -> list[str]:
    """The files of the raw-layout dataset (not its nested derivatives)."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.is_file() and "derivatives" not in p.relative_to(root).parts)


@pytest.fixture(scope="module")
def raw_dataset(tmp_path_factory):
    return harness.make_raw_dataset(tmp_path_factory.mktemp("clients") / "raw")


@pytest.fixture(scope="module")
def denoised(raw_dataset, tmp_path_factory):
    """bids-denoise --output-layout bids --methods mppca on the raw dataset (validator on)."""
    folder = tmp_path_factory.mktemp("clients_denoised")
    before = tree_digest(raw_dataset)
    proc = harness.run_bids_denoise(raw_dataset, folder / "out", folder / "work", *DENOISE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return raw_dataset, folder / "out", before


@pytest.fixture(scope="session")
def installed():
    """{program: venv}, installing on first use; a program pip cannot install skips its tests."""
    venvs, failures = {}, {}

    def get(program):
        if program in failures:
            pytest.skip(failures[program])
        if program not in venvs:
            try:
                venvs[program], _ = harness.install(harness.CLIENTS[program])
            except harness.ClientUnavailable as err:
                failures[program] = f"{program} cannot be installed here: {err}"
                pytest.skip(failures[program])
        return venvs[program]

    return get


def test_the_dataset_and_its_raw_layout_are_valid_bids(denoised):
    raw, out, before = denoised
    if not find_validator():
        pytest.skip("bids-validator-deno is not installed")
    for dataset in (raw, out):
        n_errors, errors = validate_dataset(dataset)
        assert n_errors == 0, (dataset, errors)
    assert tree_digest(raw) == before  # the input is never modified
    assert set(raw_part(out)) >= {str(p.relative_to(raw)) for p in raw.rglob("*") if p.is_file()}
    for relpath in (DWI, BOLD):  # denoised under the raw names, the same grid
        denoised_image, source = nib.load(out / relpath), nib.load(raw / relpath)
        assert denoised_image.shape == source.shape and np.allclose(denoised_image.affine, source.affine)
        assert not np.array_equal(denoised_image.get_fdata(), source.get_fdata())


@pytest.mark.parametrize("program", sorted(harness.CLIENTS))
def test_the_program_takes_the_denoised_dataset_as_it_takes_the_raw_one(program, denoised, installed,
                                                                         tmp_path_factory):
    """fMRIPrep or QSIPrep, --boilerplate-only, on the raw dataset and on its raw layout.

    The placeholders (PLACEHOLDER_TEMPLATEFLOW, PLACEHOLDER_BIN, PLACEHOLDER_LICENSE) serve only to
    let the program build its workflow graph offline: it computes nothing with them.
    """
    raw, out, _ = denoised
    venv = installed(program)
    folder = tmp_path_factory.mktemp(f"clients_{program}")
    placeholders = harness.make_placeholders(folder / "placeholders", program, venv)
    runs = harness.run_clients(program, venv, {"raw": raw, "denoised": out}, folder, placeholders)

    for label, run in runs.items():
        assert run.returncode == 0, f"{program} on the {label} dataset exited {run.returncode}:\n{run.tail()}"
        assert run.nodes, f"{program} on the {label} dataset built no graph:\n{run.tail()}"
        assert run.boilerplate and run.boilerplate.strip(), f"{program} wrote no boilerplate ({label})"
        assert "collect_error" not in run.report, run.report.get("collect_error")
    raw_run, denoised_run = runs["raw"], runs["denoised"]
    assert denoised_run.nodes == raw_run.nodes
    assert harness.comparable_boilerplate(denoised_run) == harness.comparable_boilerplate(raw_run)
    inputs = harness.relative_inputs(raw_run)
    assert harness.relative_inputs(denoised_run) == inputs

    # every sidecar value the program read from the raw dataset, it reads from the denoised one
    raw_metadata, denoised_metadata = harness.relative_metadata(raw_run), harness.relative_metadata(denoised_run)
    assert set(denoised_metadata) == set(raw_metadata)
    for path, metadata in raw_metadata.items():
        changed = {key: (value, denoised_metadata[path].get(key)) for key, value in metadata.items()
                   if denoised_metadata[path].get(key) != value}
        assert not changed, (path, changed)

    # what the programs found: the test data are what they are meant to be
    found = inputs[harness.SUBJECT]
    fmaps = [f"<bids_dir>/{SUB}/fmap/{SUB}_acq-{acq}_dir-{d}_epi.nii.gz" for acq in ("bold", "dwi") for d in ("AP", "PA")]
    assert found["collected"]["t1w"] == [f"<bids_dir>/{SUB}/anat/{SUB}_T1w.nii.gz"]
    assert sorted(found["collected"]["fmap"]) == fmaps
    if program == "fmriprep":
        assert found["collected"]["bold"] == [f"<bids_dir>/{BOLD}"]
        assert found["fieldmaps"] == {"pepolarbold": {"method": "PEPOLAR", "sources": fmaps[:2]}}
        assert found["corrected_by"] == {f"<bids_dir>/{BOLD}": "pepolarbold"}  # through B0FieldSource
        assert "slice-time corrected" in raw_run.boilerplate and "`topup`" in raw_run.boilerplate
    else:
        assert found["collected"]["dwi"] == [f"<bids_dir>/{DWI}"]
        assert f"corrected by: auto+fmap+{SUB}_acq-dwi [intendedfor]" in found["grouping"]  # through IntendedFor
        assert not found["grouping_errors"]
        assert "Neither denoising nor Gibbs-ringing removal was applied" in raw_run.boilerplate

    # the placeholder commands were only asked for their version (and fMRIPrep's licence probe)
    for call in placeholders.called():
        assert call.endswith("--version") or call.startswith("mri_convert "), call


def test_the_skip_names_the_reason_when_pip_cannot_install(tmp_path, monkeypatch):
    """No index reachable: ClientUnavailable (the tests above skip), and no venv is left behind."""
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("PIP_NO_INDEX", "")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    client = harness.Client("fmriprep", "25.2.7")
    with pytest.raises(harness.ClientUnavailable, match="could not install fmriprep==25.2.7"):
        harness.install(client, root=tmp_path)
    assert not [p for p in tmp_path.iterdir() if p.is_dir()]


# --- what issue 29 asks of the raw layout itself ---------------------------------------------------


def test_the_nested_derivatives_are_valid_bids(denoised):
    _, out, _ = denoised
    if not find_validator():
        pytest.skip("bids-validator-deno is not installed")
    n_errors, errors = validate_dataset(out / "derivatives" / "bids-denoise")
    assert n_errors == 0, errors


def rewrite_like_a_later_tool(path: Path):
    """What an editor, a curation script or a 'fix my sidecar' step does: write the file in place."""
    name = path.name
    if name.endswith(".json"):
        content = json.loads(path.read_text())
        content["IntendedFor"] = []
        with open(path, "w") as handle:  # json.dump over the file, as such scripts do
            json.dump(content, handle)
    elif name.endswith((".nii.gz", ".nii")):
        image = nib.load(path)
        nib.save(nib.Nifti1Image(np.zeros(image.shape, np.float32), image.affine), str(path))
    else:  # tsv, README, bval, bvec: appended to
        with open(path, "a") as handle:
            handle.write("edited\n")


def test_a_tool_that_rewrites_every_carried_file_leaves_the_raw_data_alone(tmp_path):
    raw = harness.make_raw_dataset(tmp_path / "raw")
    out = tmp_path / "out"
    proc = harness.run_bids_denoise(raw, out, tmp_path / "work", *DENOISE, "--skip-bids-validation")
    assert proc.returncode == 0, proc.stderr[-3000:]
    before = harness.file_states(raw)
    denoised = {DWI, BOLD}
    carried = [relpath for relpath in raw_part(out) if relpath in before and relpath not in denoised]
    assert len(carried) >= 15
    refused = 0
    for relpath in carried:
        try:
            rewrite_like_a_later_tool(out / relpath)
        except PermissionError:  # a read-only copy is a fine answer too
            refused += 1
    after = harness.file_states(raw)
    changed = sorted(relpath for relpath in before if after.get(relpath) != before[relpath])
    assert not changed, f"rewriting the output changed the raw {changed} ({refused} refused)"


def test_a_partial_run_says_per_run_what_was_done(tmp_path):
    """--participant-label 01 of two participants: no run of sub-02 passes for a denoised one.

    Each DWI/BOLD run of sub-02 is either left out of the output or carries its own record (its
    metadata differs from the raw run's); sub-01's runs are denoised.
    """
    from bids import BIDSLayout

    raw = harness.make_raw_dataset(tmp_path / "raw", subjects=("01", "02"))
    out = tmp_path / "out"
    proc = harness.run_bids_denoise(raw, out, tmp_path / "work", *DENOISE, "--skip-bids-validation",
                                    "--participant-label", "01")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for relpath in (DWI, BOLD):
        assert not np.array_equal(nib.load(out / relpath).get_fdata(), nib.load(raw / relpath).get_fdata())
    raw_layout = BIDSLayout(str(raw), validate=False)
    out_layout = BIDSLayout(str(out), validate=False)
    silent = []
    for relpath in (DWI.replace("01", "02"), BOLD.replace("01", "02")):
        if not (out / relpath).exists():
            continue
        if out_layout.get_metadata(str(out / relpath)) == raw_layout.get_metadata(str(raw / relpath)):
            silent.append(relpath)
    assert not silent, f"carried over un-denoised with nothing to say so: {silent}"


def test_the_output_names_no_host_path(tmp_path):
    raw = harness.make_raw_dataset(tmp_path / "raw")
    out = tmp_path / "out"
    proc = harness.run_bids_denoise(raw, out, tmp_path / "work", *DENOISE, "--skip-bids-validation",
                                    "--copy-mode", "symlink")
    assert proc.returncode == 0, proc.stderr[-3000:]
    host = str(raw.resolve())
    problems = [str(description.relative_to(out)) for description in
                (out / "dataset_description.json", out / "derivatives" / "bids-denoise" / "dataset_description.json")
                if host in description.read_text()]
    problems += [f"{p.relative_to(out)} -> {os.readlink(p)}" for p in sorted(out.rglob("*"))
                 if p.is_symlink() and os.path.isabs(os.readlink(p))]
    assert not problems, f"the output names {host}: {problems[:5]} ({len(problems)} in all)"
