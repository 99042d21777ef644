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
    """Mostly negative values: no magnitude data, so the default noise-floor removal (which sets values at or
    below the Rician floor to zero: 99.6% of this output) is not applied, and the sidecar says why."""
    raw, _ = dataset
    rewrite(post_dwi(raw), lambda data: data - 0.7 * data.max())
    code = run_app(raw, tmp_path, *SELECT, "--methods", "patch2self", "mppca")
    assert code == 0, capsys.readouterr().err
    out = tmp_path / "out"
    assert len(list(out.rglob("*_desc-*_dwi.nii.gz"))) == 2
    assert list((out / "sub-01" / "figures").glob("*_desc-*_mosaic.png"))
    noisy = nib.load(post_dwi(raw)).get_fdata()
    for method in ("patch2self", "mppca"):
        (image,) = out.rglob(f"*_desc-{method}_dwi.nii.gz")
        denoised = nib.load(image).get_fdata()
        assert np.mean(denoised == 0) < 0.01, method
        assert np.corrcoef(denoised.ravel(), noisy.ravel())[0, 1] > 0.9, method
        sidecar = json.loads(image.with_name(image.name.replace(".nii.gz", ".json")).read_text())
        assert any("not magnitude data" in warning for warning in sidecar["Warnings"]), method


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


def test_intensities_near_1e30_give_mppca_finite_maps_and_no_warnings(dataset, tmp_path, capsys):
    """MP-PCA's variance-removed map holds squares (1e60 here): it used to overflow float32 to infinity, and the
    report, reading it, blamed a work-directory file as bad input (exit 65)."""
    raw, _ = dataset
    rewrite(post_dwi(raw), lambda data: data * np.float32(1e30))
    code = run_app(raw, tmp_path, *SELECT, "--methods", "mppca")
    err = capsys.readouterr().err
    assert code == 0, err
    assert "Warning" not in err and "overflow" not in err and str(tmp_path / "work") not in err, err
    for path in (tmp_path / "out").rglob("*_desc-mppca_*.nii.gz"):
        values = nib.load(path).get_fdata()
        assert np.isfinite(values).all() and values.max() > 0, path.name


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


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and signals to a worker (Linux)")
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGSEGV], ids=["out-of-memory kill", "segfault"])
def test_a_dead_worker_ends_the_run_naming_its_node_and_a_rerun_resumes(dataset, tmp_path, how):
    """What the kernel's out-of-memory killer (SIGKILL) or a crash in native code (SIGSEGV) does to a
    MultiProc worker: the run must end (exit 1, one line naming the node), not wait for it forever."""
    raw, _ = dataset
    out, work = tmp_path / "out", tmp_path / "work"
    before = tree_digest(raw)
    process = _start(raw, out, work)
    # a worker running a method's node: Nipype runs each node in its own folder of the work directory
    deadline, busy = time.time() + 120, None
    while busy is None and time.time() < deadline and process.poll() is None:
        for pid in _children(process.pid):
            try:
                folder = Path(os.readlink(f"/proc/{pid}/cwd"))
            except OSError:
                continue
            if folder.name.endswith("_denoise") and work in folder.parents:
                busy = (pid, folder.name)
                break
        time.sleep(0.02)
    assert busy, process.communicate()[0]
    os.kill(busy[0], how)
    output, _ = process.communicate(timeout=180)  # a hang fails here
    assert process.returncode == 1, output
    lines = [line for line in output.splitlines() if line.startswith("bids-denoise: error:")]
    assert len(lines) == 1 and "a worker process died while running" in lines[0], output
    assert busy[1] in lines[0], (busy, lines[0])
    assert "Traceback" not in output and tree_digest(raw) == before
    rerun = subprocess.run([sys.executable, "-m", "bids_denoise", str(raw), str(out), "participant", "-w", str(work),
                            *SELECT, "--methods", "patch2self", "mppca"], capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert len(list(out.rglob("*_desc-*_dwi.nii.gz"))) == 2 and _no_temporaries(out)


def test_sigterm_is_one_line_and_exit_143(dataset, tmp_path):
    raw, _ = dataset
    process = _start(raw, tmp_path / "out", tmp_path / "work")
    assert _wait_for_workers(process)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 143, output
    assert output.strip().splitlines()[-1] == "bids-denoise: terminated (SIGTERM); rerun the same command to resume"
    assert "Traceback" not in output


# -- round 3: what the command line refuses before anything runs ----------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--nprocs", "0"], "--nprocs must be from 1 to"),
    (["--nprocs", "-4"], "--nprocs must be from 1 to"),
    (["--nprocs", "100000"], "--nprocs must be from 1 to"),
    (["--omp-nthreads", "100000"], "--omp-nthreads must be from 1 to"),
    (["--mem-gb", "0.001"], "--mem-gb must be from 0.1 to"),
    (["--mem-gb", "-5"], "--mem-gb must be from 0.1 to"),
    (["--plugin", "Bogus"], "--plugin Bogus: not a Nipype plugin (available:"),
    (["--plugin-args", '{"n_procs": "x"}'], "--plugin-args: n_procs must be a whole number"),
    (["--plugin-args", '{"memory_gb": -1}'], "--plugin-args: memory_gb must be a number of gigabytes"),
    (["--plugin-args", "[1]"], "--plugin-args: expected a JSON object"),
    (["--participant-label", "snr10ü日本"], "is not a BIDS label (ASCII letters and digits only)"),
    (["--session-label", "pre/post"], "is not a BIDS label"),
    (["--mppca-noise-map=inf"], "a noise map value must be a finite number above zero"),
])
def test_resources_plugins_and_labels_are_checked_before_anything_runs(dataset, tmp_path, capsys, args, message):
    """Each used to hang (hundreds of thousands of processes, a memory limit no node fits), crash a worker
    (OpenBLAS on 100000 threads), print a traceback, or treat 'snr10ü日本' as 'snr10'."""
    raw, _ = dataset
    before = tree_digest(raw)
    try:
        code = run_app(raw, tmp_path, "--skip-bids-validation", *args)
    except SystemExit as exit_info:  # argparse's refusal
        code = exit_info.code
    err = capsys.readouterr().err
    assert code == 64, err
    assert "Traceback" not in err and message in err, err
    assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists()
    assert tree_digest(raw) == before


def test_a_node_that_cannot_fit_in_memory_is_one_line_naming_run_method_and_need(dataset, tmp_path, capsys):
    raw, _ = dataset
    code = run_app(raw, tmp_path, *SELECT, "--methods", "patch2self", "--mem-gb", "0.5")
    one_error_line(capsys, code, 64, "sub-01_ses-post_acq-multiband_dwi: patch2self needs about",
                   "more than --mem-gb 0.5")
    assert not (tmp_path / "out").exists()


def test_a_work_directory_in_use_by_another_run_is_refused(dataset, tmp_path, capsys):
    """Two runs sharing one -w used to overwrite each other's nodes ("graph failed: RuntimeError: ...")."""
    from bids_denoise.engine import holding

    raw, _ = dataset
    (tmp_path / "work").mkdir()
    held = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom bids_denoise.engine import holding\n"
                             f"with holding({str(tmp_path / 'work')!r}):\n    print('held', flush=True)\n"
                             "    time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert held.stdout.readline().strip() == "held"
        code = run_app(raw, tmp_path, *SELECT, "--methods", "mppca")
        one_error_line(capsys, code, 64, f"{tmp_path / 'work'}: the work directory is in use by another "
                                         f"bids-denoise run (process {held.pid})")
        assert not list((tmp_path / "out").rglob("*_desc-*"))
    finally:
        held.kill()
        held.wait()
    with holding(tmp_path / "work"):  # free again once that run is gone
        pass
    assert run_app(raw, tmp_path, *SELECT, "--methods", "mppca") == 0, capsys.readouterr().err


@pytest.mark.parametrize("content, message", [
    ("[1, 2]", "must hold a JSON object"),
    ('{"Name": "x", "BIDSVersion": "1.10.0", "GeneratedBy": "a tool"}', "GeneratedBy must be a list of objects"),
])
def test_a_dataset_description_of_the_wrong_shape_is_one_line(dataset, tmp_path, capsys, content, message):
    raw, _ = dataset
    (raw / "dataset_description.json").write_text(content)
    code = run_app(raw, tmp_path, *SELECT)
    one_error_line(capsys, code, 16, "dataset_description.json", message)


def test_a_header_larger_than_the_machine_is_refused_before_reading(dataset, tmp_path, capsys):
    raw, _ = dataset
    image = nib.load(post_dwi(raw))
    header = image.header.copy()
    header.set_data_shape((32767, 32767, 32767, 32767))
    import gzip

    post_dwi(raw).write_bytes(gzip.compress(header.binaryblock + b"\0" * 68))  # a header, and almost no data
    code = run_app(raw, tmp_path, *SELECT)
    err = one_error_line(capsys, code, 65, f"{post_dwi(raw)}: its header declares a 32767x32767x32767x32767 image",
                         "more than this machine's memory")
    assert "MemoryError" not in err


def test_a_folder_linked_into_the_dataset_is_no_run_of_its_own(dataset, tmp_path, capsys):
    """A symbolic link to a parent folder (a loop) shows every file again under longer paths: they used to
    be runs of their own ("Duplicate node name"), and sub-02's files came in under sub-01."""
    raw, _ = dataset
    (raw / "sub-01" / "loop").symlink_to("..")
    code = run_app(raw, tmp_path, "--participant-label", "01", "--skip-bids-validation", "--methods", "mppca")
    assert code == 0, capsys.readouterr().err
    written = sorted(path.relative_to(tmp_path / "out") for path in (tmp_path / "out").rglob("*_desc-mppca_dwi.nii.gz"))
    assert written and all(path.parts[0] == "sub-01" and "loop" not in path.parts for path in written), written
    assert not (tmp_path / "out" / "sub-02").exists()


def test_an_unreadable_folder_is_one_line(dataset, tmp_path, capsys, monkeypatch):
    """pybids' traceback on a folder it cannot read. Tests run as root, who reads every folder, so the index's
    refusal is raised where it builds the layout, as pybids raises it for an unreadable folder."""
    from bids_denoise import bids

    raw, _ = dataset
    folder = raw / "sub-02"

    def unreadable(bids_dir, database_dir=None):
        raise PermissionError(13, "Permission denied", str(folder))

    monkeypatch.setattr(bids, "build_layout", unreadable)
    code = run_app(raw, tmp_path, *SELECT)
    one_error_line(capsys, code, 66, f"{folder}: cannot be read while indexing BIDS_DIR (Permission denied)")


def test_a_home_that_cannot_be_written_is_one_note(dataset, tmp_path):
    raw, _ = dataset
    done = subprocess.run([sys.executable, "-m", "bids_denoise", str(raw), str(tmp_path / "out"), "participant",
                           "-w", str(tmp_path / "work"), *SELECT, "--methods", "mppca"],
                          capture_output=True, text=True, env=dict(os.environ, HOME="/dev/null/home"))
    assert done.returncode == 0, done.stderr
    assert "HOME (/dev/null/home) cannot be written" in done.stderr
    assert "Traceback" not in done.stderr and "matplotlib" not in done.stderr.lower()


def test_labels_too_long_for_file_names_are_refused_before_the_run(tmp_path, capsys):
    from bids_denoise.testing.phantom import make_bids_dataset

    raw = tmp_path / "ds"
    make_bids_dataset(raw, shape=(10, 10, 6), shells=((1000.0, 8),), n_b0=2, subjects=("01",), sessions=None,
                      runs_in_first_session=1)
    (dwi,) = raw.rglob("*_dwi.nii.gz")
    long = dwi.with_name(dwi.name.replace("acq-multiband", f"acq-{'a' * 228}"))  # 250 characters: it fits
    dwi.rename(long)
    code = main([str(raw), str(tmp_path / "out"), "participant", "-w", str(tmp_path / "work"),
                 "--skip-bids-validation", "--methods", "mppca"])
    err = one_error_line(capsys, code, 65, f"{long}: its outputs' names would be up to",
                         "more than the file system allows")
    assert "File name too long" not in err


@pytest.mark.timeout(300)
def test_a_run_from_a_session_that_already_ran_torch_threads_completes(dataset, tmp_path, capsys):
    """A forked worker of a process whose OpenMP pool is running waits for ever (GNU libgomp): the last CI
    hung so. Runs started from a Python session start their workers from a fork server; the command
    line (a fresh process) still forks them."""
    import torch

    from bids_denoise.engine import worker_start_method

    raw, _ = dataset
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        matrix = torch.randn(512, 512)
        assert torch.isfinite(matrix @ matrix).all()  # the pool is up in this process now
        assert worker_start_method() == "forkserver"
        code = run_app(raw, tmp_path, "--methods", "patch2self", "--nprocs", "2", "--omp-nthreads", "2")
    finally:
        torch.set_num_threads(threads)
    assert code == 0, capsys.readouterr().err
    fresh = subprocess.run([sys.executable, "-c", "import bids_denoise.cli.run as r, bids_denoise.engine as e; "
                            "e.mark_fresh_process(); print(e.worker_start_method())"],
                           capture_output=True, text=True, check=True)
    assert fresh.stdout.strip() == "fork"
