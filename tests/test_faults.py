"""Faults and hostile input: one line for each, the right exit code, no output lost, nothing left behind."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bids_denoise.cli import main
from tests.conftest import tree_digest

SELECT = ("--participant-label", "01", "--session-label", "post", "--skip-bids-validation")


def run_app(raw, tmp_path, *args, out=None):
    out = out or tmp_path / "out"
    return main([str(raw), str(out), "participant", "-w", str(tmp_path / "work"), *map(str, args)])


def one_error_line(capsys, code, expected_code, *fragments):
    err = capsys.readouterr().err
    assert code == expected_code, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("bids-denoise: error:")]
    assert lines, err
    for fragment in fragments:
        assert any(fragment in line for line in lines), (fragment, err)
    return err


def post_dwi(raw):
    return raw / "sub-01" / "ses-post" / "dwi" / "sub-01_ses-post_acq-multiband_dwi.nii.gz"


def rewrite(path, function):
    image = nib.load(path)
    data = function(image.get_fdata().astype(np.float32))
    nib.save(nib.Nifti1Image(data.astype(np.float32), image.affine, image.header), path)


# -- the data ------------------------------------------------------------------------------------

def test_a_negative_series_keeps_its_derivatives_and_figures(dataset, tmp_path, capsys):
    raw, _ = dataset
    rewrite(post_dwi(raw), lambda data: data - 0.7 * data.max())
    code = run_app(raw, tmp_path, *SELECT, "--methods", "patch2self", "mppca")
    assert code == 0, capsys.readouterr().err
    out = tmp_path / "out"
    assert len(list(out.rglob("*_desc-*_dwi.nii.gz"))) == 2
    assert list((out / "sub-01" / "figures").glob("*_desc-*_mosaic.png"))


def test_extreme_intensities_give_the_scaled_result(dataset, tmp_path, capsys):
    raw, _ = dataset
    reference_out = tmp_path / "reference"
    assert run_app(raw, tmp_path, *SELECT, "--methods", "patch2self", out=reference_out) == 0
    (reference,) = reference_out.rglob("*_desc-patch2self_dwi.nii.gz")
    expected = nib.load(reference).get_fdata()
    original = post_dwi(raw).read_bytes()
    for scale in (1e-30, 1e30):
        post_dwi(raw).write_bytes(original)
        rewrite(post_dwi(raw), lambda data: data * np.float32(scale))
        out = tmp_path / f"scaled_{scale:g}"
        code = main([str(raw), str(out), "participant", "-w", str(tmp_path / f"work_{scale:g}"), *SELECT,
                     "--methods", "patch2self"])
        assert code == 0, capsys.readouterr().err
        (scaled,) = out.rglob("*_desc-patch2self_dwi.nii.gz")
        result = nib.load(scaled).get_fdata() / scale
        close = np.isclose(result, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
        # the scale is not a power of two, so the scaled input is rounded differently in float32; the
        # noise-floor correction (values at the floor become 0, steeply rising above it) turns that
        # rounding into larger changes for a few values at the floor, and only there
        assert close.mean() > 0.995, (scale, close.mean())  # measured 0.9985
        assert np.all(np.abs(expected[~close]) < 0.02 * np.abs(expected).max()), scale


@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 2, 2)])
def test_an_image_smaller_than_the_window_is_refused(tmp_path, capsys, shape):
    from bids_denoise.testing.phantom import make_bids_dataset

    raw = tmp_path / "ds"
    make_bids_dataset(raw, subjects=("01",), sessions=("post",), shape=shape, shells=((1000.0, 6),), n_b0=1,
                      anat_shape=(8, 8, 8))
    code = main([str(raw), str(tmp_path / "out"), "participant", "-w", str(tmp_path / "work"),
                 "--skip-bids-validation", "--methods", "mppca"])
    one_error_line(capsys, code, 65, "smaller than the MP-PCA window", "_dwi.nii.gz")
    assert not list((tmp_path / "out").rglob("*_desc-mppca_dwi.nii.gz"))


def test_odd_runs_are_described_in_the_sidecar(dataset, tmp_path, capsys):
    raw, _ = dataset
    bvec = post_dwi(raw).with_name(post_dwi(raw).name.replace(".nii.gz", ".bvec"))
    vectors = np.loadtxt(raw / "dwi.bvec")
    vectors[:, -1] = 0.0  # a b=1000 volume without a direction
    np.savetxt(bvec, vectors, fmt="%.6f")
    code = run_app(raw, tmp_path, *SELECT, "--methods", "mppca")
    err = capsys.readouterr().err
    assert code == 0, err
    (sidecar,) = (tmp_path / "out").rglob("*_desc-mppca_dwi.json")
    warnings = json.loads(sidecar.read_text())["Warnings"]
    assert any("zero or non-unit b-vector" in warning for warning in warnings)
    (log,) = (tmp_path / "out" / "sub-01" / "log").glob("*.log")
    assert "zero or non-unit b-vector" in log.read_text()  # and in the participant's log


# -- the filter file ----------------------------------------------------------------------------

@pytest.mark.parametrize("content, fragment", [
    ('"dwi"', "expected a JSON object"),
    ("[1]", "expected a JSON object"),
    ('{"dwi": "x"}', "must map entities to values"),
    ('{"dwi": ["a"]}', "must map entities to values"),
    ('{"dwi": {"return_type": "id"}}', "not allowed here"),
    ('{"dwi": {"extension": [".bval"]}}', "not allowed here"),
    ('{"dwi": {"foo": "x"}}', "not a BIDS entity"),
    ('{"DWI": {"acquisition": "x"}}', "unknown key 'DWI'"),
    ('{"dwi": {"subject": "02"}}', "use --participant-label"),
    ('{"dwi": {"session": "pre"}}', "use --session-label"),
    ('{"dwi": {"acquisition": {"a": 1}}}', "must be a string"),
    ("{not json", "not a readable JSON filter file"),
])
def test_filter_files_of_the_wrong_shape_are_usage_errors(dataset, tmp_path, capsys, content, fragment):
    raw, _ = dataset
    filters = tmp_path / "filters.json"
    filters.write_text(content)
    with pytest.raises(SystemExit) as exit_info:
        run_app(raw, tmp_path, "--bids-filter-file", filters)
    assert exit_info.value.code == 64
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


# -- the machine -------------------------------------------------------------------------------

def test_an_unwritable_work_directory_writes_nothing(dataset, tmp_path, capsys):
    raw, _ = dataset
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    code = main([str(raw), str(tmp_path / "out"), "participant", "-w", str(blocker / "work"), *SELECT])
    one_error_line(capsys, code, 73, "the work directory (-w)")
    assert not (tmp_path / "out").exists()


def test_a_validator_that_cannot_run_is_one_warning(dataset, tmp_path, capsys, caplog, monkeypatch):
    raw, _ = dataset
    fake = tmp_path / "bin" / "bids-validator-deno"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o644)  # present, not executable
    from bids_denoise import bids

    monkeypatch.setattr(bids, "find_validator", lambda: str(fake))
    code = main([str(raw), str(tmp_path / "out"), "participant", "-w", str(tmp_path / "work"),
                 "--participant-label", "01", "--session-label", "post", "--methods", "mppca"])
    err = capsys.readouterr().err
    assert code == 0 and "Traceback" not in err
    warning = next(r.getMessage() for r in caplog.records if "validator" in r.getMessage())
    assert "could not be run" in warning and "Permission denied" in warning


def test_a_processing_failure_names_run_method_cause_and_crash_file(dataset, tmp_path, capsys):
    pytest.importorskip("dipy")
    raw, _ = dataset
    code = run_app(raw, tmp_path, *SELECT, "--methods", "patch2self", "mppca", "--patch2self-backend", "dipy",
                   "--patch2self-grouping", "shell")
    err = one_error_line(capsys, code, 1, "sub-01_ses-post_acq-multiband_dwi: patch2self failed: ValueError: "
                                          "--patch2self-backend dipy supports only")
    line = next(line for line in err.splitlines() if "patch2self failed" in line)
    crash_file = Path(line.split("crash file ")[1])
    assert crash_file.exists() and crash_file.parent.name == "log"
    assert len(list((tmp_path / "out").rglob("*_desc-mppca_dwi.nii.gz"))) == 1  # the other method completed


def _mount_tmpfs(folder: Path, size: str) -> bool:
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          capture_output=True).returncode == 0


@pytest.fixture
def small_disk(tmp_path):
    """A 96 KiB file system (tmpfs, as root), or None where it cannot be mounted."""
    folder = tmp_path / "disk"
    if not _mount_tmpfs(folder, "96k"):
        yield None
        return
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def _no_temporaries(folder: Path):
    return not [p for p in folder.rglob(".*") if ".part" in p.name]


def test_disk_full_during_the_run(dataset, tmp_path, capsys, small_disk, monkeypatch):
    raw, _ = dataset
    out = small_disk / "out" if small_disk else tmp_path / "out"
    if small_disk is None:  # inject ENOSPC on the first image the sink writes
        import errno

        import bids_denoise.io as io

        real_copy = shutil.copyfile

        def full(source, destination, **kwargs):
            if str(out) in str(destination) and ".nii" in str(destination):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_copy(source, destination, **kwargs)

        monkeypatch.setattr(shutil, "copyfile", full)
        assert io  # the sink copies with shutil.copyfile
    code = run_app(raw, tmp_path, *SELECT, "--methods", "patch2self", out=out)
    one_error_line(capsys, code, 74, "No space left on device", str(out))
    assert _no_temporaries(out)


def test_disk_full_before_the_run(dataset, tmp_path, capsys, small_disk, monkeypatch):
    raw, _ = dataset
    if small_disk is not None:
        with open(small_disk / "filler", "wb", buffering=0) as handle:  # fill the disk
            try:
                while True:
                    handle.write(b"\0" * 4096)
            except OSError:
                pass
        out = small_disk / "out"
    else:
        import errno
        import tempfile

        out = tmp_path / "out"
        real = tempfile.mkstemp

        def full(*args, **kwargs):
            if str(out) in str(kwargs.get("dir", "")):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real(*args, **kwargs)

        monkeypatch.setattr(tempfile, "mkstemp", full)
    code = run_app(raw, tmp_path, *SELECT, "--methods", "mppca", out=out)
    one_error_line(capsys, code, 74, "No space left on device", str(out))
    assert _no_temporaries(out.parent)


# -- signals -------------------------------------------------------------------------------------

def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _start(raw, out, work):
    return subprocess.Popen([sys.executable, "-m", "bids_denoise", str(raw), str(out), "participant", "-w", str(work),
                             *SELECT, "--methods", "patch2self", "mppca", "--nprocs", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_workers(process, timeout=120.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        workers = _children(process.pid)
        if workers:
            return workers
        if process.poll() is not None:
            break
        time.sleep(0.05)
    return []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="workers die with the app through prctl (Linux)")
def test_kill_then_rerun_resumes_with_identical_output_and_no_orphans(dataset, tmp_path):
    raw, _ = dataset
    out, work = tmp_path / "out", tmp_path / "work"
    process = _start(raw, out, work)
    workers = _wait_for_workers(process)
    assert workers, process.communicate()[0]
    time.sleep(1.0)  # let the workers start their nodes
    workers = _children(process.pid)
    process.kill()
    process.wait()
    deadline = time.time() + 10
    while time.time() < deadline and any(_alive(pid) for pid in workers):
        time.sleep(0.1)
    assert not [pid for pid in workers if _alive(pid)], "workers outlived the killed app"
    # what a write interrupted by the kill leaves: a temporary file of a process that no longer runs
    left = out / "sub-01" / "ses-post" / "dwi" / f".x_dwi.nii.gz.{os.uname().nodename}~{process.pid}~abc.part.nii.gz"
    left.parent.mkdir(parents=True, exist_ok=True)
    left.write_bytes(b"half")

    rerun = subprocess.run([sys.executable, "-m", "bids_denoise", str(raw), str(out), "participant", "-w", str(work),
                            *SELECT, "--methods", "patch2self", "mppca"], capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert _no_temporaries(out)
    fresh = tmp_path / "fresh"
    assert main([str(raw), str(fresh), "participant", "-w", str(tmp_path / "fresh_work"), *SELECT,
                 "--methods", "patch2self", "mppca"]) == 0
    for image in sorted(fresh.rglob("*_desc-*.nii.gz")):
        resumed = out / image.relative_to(fresh)
        assert np.array_equal(nib.load(resumed).get_fdata(), nib.load(image).get_fdata()), image.name


def test_interrupt_is_one_line_and_exit_130(dataset, tmp_path):
    raw, _ = dataset
    before = tree_digest(raw)
    process = _start(raw, tmp_path / "out", tmp_path / "work")
    assert _wait_for_workers(process)
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 130, output
    assert "interrupted; rerun the same command to resume" in output
    assert "Traceback" not in output
    assert tree_digest(raw) == before
