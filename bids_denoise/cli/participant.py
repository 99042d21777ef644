"""The participant level, step by step: check the directories and the device, validate and select the
input, check each run, prepare the outputs, run one graph per participant, write the reports, and
summarise the failures in one line each with the right exit code."""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import sys
import uuid
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

from bids_denoise.cli.errors import (
    EXIT_CANTCREAT,
    EXIT_DATAERR,
    EXIT_FAILURE,
    EXIT_INVALID_BIDS,
    EXIT_IOERR,
    EXIT_NOINPUT,
    EXIT_NOTHING_SELECTED,
    EXIT_OK,
    EXIT_USAGE,
    AppError,
)

LOGGER = logging.getLogger("bids_denoise")


def run_participant(config, methods) -> int:
    check_directories(config)
    device = resolve_device(config)
    validate_input(config)
    specs = [methods[name] for name in config.workflow.all_methods]
    runs = select_runs(config, specs)
    jobs, bad_runs = check_runs(config, runs, specs)
    check_memory(config, jobs, specs)
    failures = []
    if jobs:
        prepare_work_dir(config)
        with holding_work_dir(config):
            layout = prepare_output(config, {modality: spec.name for spec in specs if spec.role == "denoise"
                                             for modality in spec.modalities})
            failures = run_graph(config, jobs, specs, device, layout)
    return summarize(config, [run for job in jobs for run in job.runs], bad_runs, failures)


def check_directories(config) -> None:
    """BIDS_DIR is a BIDS dataset; OUTPUT_DIR is neither BIDS_DIR nor inside it (but for derivatives/)."""
    from bids_denoise import bids

    bids_dir, output_dir = config.execution.bids_dir, config.execution.output_dir
    try:
        bids.check_bids_root(bids_dir)
    except bids.BIDSInputError as err:
        raise AppError(err.exit_code, str(err)) from None
    derivatives = bids_dir / "derivatives"
    if output_dir == bids_dir or (bids_dir in output_dir.parents and derivatives not in output_dir.parents):
        raise AppError(EXIT_USAGE, f"{output_dir}: OUTPUT_DIR must not be BIDS_DIR or inside it, except under its "
                                   f"derivatives/ (e.g. {derivatives / 'bids-denoise'})")
    work_dir = config.execution.work_dir
    if work_dir == bids_dir or bids_dir in work_dir.parents:
        raise AppError(EXIT_USAGE, f"{work_dir}: the work directory must not be inside BIDS_DIR")


def resolve_device(config) -> str:
    """The torch device, resolved here for local plugins (on the compute nodes for batch plugins)."""
    from bids_denoise.methods.core.device import DeviceUnavailableError
    from bids_denoise.methods.core.device import resolve_device as resolve

    requested = config.workflow.device
    if not config.nipype.is_local:
        LOGGER.info("plugin %s: device %r is resolved on the compute nodes", config.nipype.plugin, requested)
        return requested
    try:
        device = str(resolve(requested))
    except DeviceUnavailableError as err:
        raise AppError(EXIT_USAGE, str(err)) from None
    LOGGER.info("device: %s%s", device, " (CUDA GPU found)" if device.startswith("cuda") else "")
    if config.nipype.plugin == "MultiProc":
        config.nipype.plugin_args.setdefault("n_gpu_procs", 1 if device.startswith("cuda") else 0)
    return device


def validate_input(config) -> None:
    """The official validator on BIDS_DIR (a warning where it cannot run)."""
    from bids_denoise import bids

    if config.execution.skip_bids_validation:
        return
    bids_dir = config.execution.bids_dir
    try:
        n_errors, lines = bids.validate_dataset(bids_dir)
    except (OSError, subprocess.SubprocessError) as err:
        LOGGER.warning("the BIDS validator could not be run (%s); skipping validation", err)
        return
    if n_errors:
        for line in lines[:20]:
            print(f"  {line}", file=sys.stderr)
        raise AppError(EXIT_INVALID_BIDS, f"{bids_dir}: the BIDS validator found {n_errors} error(s) "
                                          "(see above; --skip-bids-validation to go on regardless)")


def select_runs(config, specs):
    from bids_denoise import bids

    modalities = sorted({m for spec in specs for m in spec.modalities}, key=list(bids.MODALITIES).index)
    try:
        layout = bids.build_layout(config.execution.bids_dir)
        return bids.select_runs(layout, config.execution.participant_label, config.execution.session_label,
                                config.execution.bids_filters, modalities)
    except bids.NothingSelectedError as err:
        raise AppError(EXIT_NOTHING_SELECTED, str(err)) from None
    except OSError as err:  # an unreadable folder or file of BIDS_DIR, found while indexing it
        where = err.filename or config.execution.bids_dir
        raise AppError(EXIT_NOINPUT, f"{where}: cannot be read while indexing BIDS_DIR "
                                     f"({err.strerror or err})") from None


def check_runs(config, runs, specs):
    """Check each run from its header, gradient and phase files (its voxels are read once, in the graph),
    and group the good ones into jobs (a run's echoes; a session's DWI runs where a method asks for it).

    Returns the jobs and one error line per run (or group) left out.
    """
    from bids_denoise.bids import group_jobs
    from bids_denoise.io import InputDataError, check_run
    from bids_denoise.outputs import layout_for

    good, bad, grids = [], [], {}

    def refuse(message):
        if config.nipype.stop_on_first_crash:
            raise AppError(EXIT_DATAERR, message)
        print(f"bids-denoise: error: {message}", file=sys.stderr)
        bad.append(message)

    layout = layout_for(config.execution.output_dir, config.execution.output_layout)
    name_max = _name_max(config.execution.output_dir)
    for run in runs:
        try:
            if run.problem:
                raise InputDataError(run.problem)
            grids[str(run.path)] = check_run(run.path, run.bval, run.bvec, run.modality, phase_file=run.phase)
            longest = max((name for spec in specs if run.modality in spec.modalities
                           for name in layout.names_of(run.source, spec.name)), key=len, default="")
            if len(longest.encode()) > name_max:
                raise InputDataError(f"{run.path}: its outputs' names would be up to {len(longest.encode())} bytes "
                                     f"long ({longest[:40]}...), more than the file system allows ({name_max}): "
                                     "shorten its labels")
        except InputDataError as err:
            refuse(str(err))
        else:
            good.append(run)
    dwi_sessions = any(spec.wants_session(config.workflow.parameters.get(spec.name, {}))
                       for spec in specs if "dwi" in spec.modalities)
    jobs, errors = group_jobs(good, grids, dwi_sessions=dwi_sessions)
    for message in errors:
        refuse(message)
    return jobs, bad


def _name_max(folder: Path) -> int:
    """The longest file name the file system of ``folder`` (or its nearest existing parent) takes."""
    for parent in [folder, *folder.parents]:
        if parent.exists():
            try:
                return int(os.pathconf(parent, "PC_NAME_MAX"))
            except (OSError, ValueError):
                break
    return 255


def check_memory(config, jobs, specs) -> None:
    """Each method's node fits in the memory the engine may give it (else it would wait forever for memory
    that never frees): one line naming the run, the method and what it needs, exit 64."""
    from bids_denoise.machine import total_memory_gb

    if not config.nipype.is_local:
        return  # a batch plugin asks the cluster for each node's memory
    given = config.nipype.plugin_args.get("memory_gb")
    limit = float(given) if given else 0.9 * total_memory_gb()
    where = f"--mem-gb {limit:g}" if given else f"90% of this machine's memory, {limit:.1f} GB"
    for job in jobs:
        for spec in specs:
            if job.modality not in spec.modalities:
                continue
            need = spec.memory_gb(job.series_shape)
            if need > limit:
                raise AppError(EXIT_USAGE, f"{job.label}: {spec.name} needs about {need:.1f} GB for its "
                                           f"{'x'.join(map(str, job.series_shape))} series, more than {where}")


def prepare_work_dir(config) -> None:
    """The work directory exists and is writable (checked before anything is written to OUTPUT_DIR)."""
    _probe_writable(config.execution.work_dir, "the work directory (-w)")


@contextmanager
def holding_work_dir(config):
    """The work directory is this run's alone while it runs (one line, exit 64, where another run holds it)."""
    from bids_denoise.engine import WorkDirInUse, holding

    work_dir = config.execution.work_dir
    try:
        with holding(work_dir):
            yield
    except WorkDirInUse as err:
        who = f" (process {err.holder})" if err.holder > 0 else ""
        raise AppError(EXIT_USAGE, f"{work_dir}: the work directory is in use by another bids-denoise run{who}; "
                                   "give each run its own -w") from None


def prepare_output(config, raw_methods=None):
    """OUTPUT_DIR writable, stale temporary files of killed runs removed, dataset-level files written;
    for the raw layout (``raw_methods``: the method of each modality), OUTPUT_DIR empty or this layout's own,
    the input's other files carried over, the next steps written."""
    from bids_denoise.bids import strip_prefix
    from bids_denoise.outputs import layout_for

    execution = config.execution
    layout = layout_for(execution.output_dir, execution.output_layout)
    raw_layout = execution.output_layout == "bids"
    if raw_layout:
        refused = layout.check_owner(execution.bids_dir, raw_methods)
        if refused:
            raise AppError(EXIT_USAGE, refused)
    _probe_writable(execution.output_dir, "OUTPUT_DIR")
    for path in layout.remove_stale_temporaries():
        LOGGER.info("removed %s, left by an interrupted run", path)
    with io_errors():
        layout.write_dataset_files(execution.bids_dir)
        if raw_layout:
            layout.record_owner(execution.bids_dir, raw_methods)
            layout.write_next_steps(raw_methods)
            selected = execution.carry_over == "selected"
            subjects = {strip_prefix(s, "sub-") for s in execution.participant_label or []} or None
            sessions = {strip_prefix(s, "ses-") for s in execution.session_label or []} or None
            carried = layout.carry_over(execution.bids_dir, subjects=subjects if selected else None,
                                        sessions=sessions if selected else None, mode=execution.copy_mode)
            LOGGER.info("carried over %d file(s) of %s (%s)", len(carried), execution.bids_dir, execution.copy_mode)
            if execution.copy_mode == "link":
                LOGGER.warning("--copy-mode link: the carried files are the input's own (hard links): a tool that "
                               "writes into them changes the input dataset")
            if not selected and (subjects or sessions):
                LOGGER.warning("--carry-over all: participants and sessions not selected are carried over raw; "
                               "derivatives/bids-denoise records which runs were denoised")
    return layout


def _probe_writable(folder: Path, what: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{uuid.uuid4().hex}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        code = EXIT_IOERR if err.errno == errno.ENOSPC else EXIT_CANTCREAT
        raise AppError(code, f"{folder}: cannot create or write {what} ({err.strerror or err})") from None


@contextmanager
def io_errors():
    """A failed write (a full disk) becomes one line naming the file, exit 74."""
    try:
        yield
    except OSError as err:
        raise AppError(EXIT_IOERR, f"{err.filename or ''}: {err.strerror or err}".lstrip(": ")) from None


def run_graph(config, jobs, specs, device, layout) -> list[dict]:
    """Build and run one workflow per participant; return the failure records of the nodes that failed."""
    from bids_denoise.interfaces.failures import read_failures
    from bids_denoise.provenance import software_versions

    failure_dir = config.execution.work_dir / "failures" / f"{datetime.now():%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:8]}"
    versions = software_versions()
    by_subject = {}
    for job in jobs:
        by_subject.setdefault(job.subject, []).append(job)
    failures = []
    for subject, subject_jobs in sorted(by_subject.items()):
        log_dir = layout.log_dir(subject)
        started = datetime.now().timestamp()
        with io_errors():
            log_dir.mkdir(parents=True, exist_ok=True)
            stamp = f"{datetime.now():%Y%m%d-%H%M%S}_{uuid.uuid4().hex[:6]}"
            config.save(log_dir / f"bids-denoise_{stamp}_config.json")
        crashed = _run_participant_graph(config, subject, subject_jobs, specs, device, str(failure_dir / subject),
                                         versions, log_dir, stamp)
        records = read_failures(failure_dir / subject)
        if crashed and not records:  # a node failed before our code ran: Nipype's crash file says why
            records = [{"run": f"sub-{subject}", "stage": "graph", "type": "RuntimeError", "message": crashed,
                        "data_error": False, "disk_full": os.strerror(errno.ENOSPC) in crashed}]
        for record in records:
            record["crash_file"] = _crash_file(log_dir, record, started)
        failures += records
        write_participant_reports(layout, subject)
        if records and config.nipype.stop_on_first_crash:
            break
    return failures


def _run_participant_graph(config, subject, jobs, specs, device, failure_dir, versions, log_dir, stamp) -> str:
    """Run one participant's workflow; return Nipype's error line if it failed, else ''."""
    from bids_denoise.engine import configure, run_workflow
    from bids_denoise.workflows.base import init_participant_wf

    configure(config.nipype, log_dir)
    handler = logging.FileHandler(log_dir / f"bids-denoise_{stamp}.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    LOGGER.addHandler(handler)
    try:
        workflow = init_participant_wf(subject, jobs, specs, config, device=device, failure_dir=failure_dir,
                                       versions=versions)
        LOGGER.info("sub-%s: %d run(s), methods %s, plugin %s", subject, sum(len(job.runs) for job in jobs),
                    ", ".join(spec.name for spec in specs), config.nipype.plugin)
        return run_workflow(workflow, config.nipype)
    finally:
        LOGGER.removeHandler(handler)
        handler.close()


def _crash_file(log_dir: Path, record: dict, since: float) -> str | None:
    """The Nipype crash file of a failed node, matched by its run and node name."""
    from bids_denoise.workflows.base import node_safe

    run = node_safe(record.get("run", ""))
    # the node of each stage (workflows/base.py): "<method>" its _denoise node, "<method> report" its _report
    # node, "<method> output" its _sink or _run<i> node, "load" the load_run node
    stage = record.get("stage", "")
    method, _, part = stage.partition(" ")
    node = {"": f"{method}_denoise", "report": f"{method}_report", "output": f"{method}_",
            "report output": f"{method}_report_sink"}.get(part, "") if stage != "load" else "load_run"
    for path in sorted(log_dir.glob("crash-*.txt"), key=lambda p: p.stat().st_mtime, reverse=True):
        if path.stat().st_mtime < since - 1:
            continue
        head = path.read_text(errors="replace")[:2000]
        if f"{run}_wf.{node}" in head:
            return str(path)
    return None


def write_participant_reports(layout, subject) -> None:
    """The methods paragraph (over every participant written so far) and the participant's page."""
    from bids_denoise.io import write_text
    from bids_denoise.outputs import CITATION_BIB, CITATION_MD
    from bids_denoise.reports.citation import render_citation
    from bids_denoise.reports.html import render_participant_report

    with io_errors():
        citation = render_citation(layout.main_sidecars())
        if citation:
            write_text(citation[0], layout.path(CITATION_MD))
            write_text(citation[1], layout.path(CITATION_BIB))
        report = write_text(render_participant_report(layout, subject), layout.participant_report(subject))
    LOGGER.info("sub-%s: report %s", subject, report)


def _disk_full_line(message: str) -> str:
    """``<file>: No space left on device`` from an OSError's text."""
    import re

    match = re.search(r"\[Errno \d+\] ([^:]+): '(.+)'", message)
    return f"{match[2]}: {match[1]}" if match else message


def summarize(config, runs, bad_runs, failures) -> int:
    """One line per failure (run, stage, cause, crash file); the exit code."""
    data_errors = [record for record in failures if record.get("data_error")]
    for record in data_errors:
        print(f"bids-denoise: error: {record['message']}", file=sys.stderr)
    bad_runs = bad_runs + [record["message"] for record in data_errors]
    if bad_runs:
        print(f"bids-denoise: {len(bad_runs)} run(s) skipped for bad input data:", file=sys.stderr)
        for message in bad_runs:
            print(f"  - {message}", file=sys.stderr)
    processing = [record for record in failures if not record.get("data_error")]
    for record in processing:
        if record.get("disk_full"):
            print(f"bids-denoise: error: {_disk_full_line(record['message'])}", file=sys.stderr)
            continue
        where = f"; crash file {record['crash_file']}" if record.get("crash_file") else ""
        print(f"bids-denoise: error: {record['run']}: {record['stage']} failed: {record['type']}: "
              f"{record['message']}{where}", file=sys.stderr)
    if any(record.get("disk_full") for record in failures):
        return EXIT_IOERR
    if processing:
        return EXIT_FAILURE
    if bad_runs:
        return EXIT_DATAERR
    LOGGER.info("done: %d run(s) x %d method(s) written to %s", len(runs), len(config.workflow.all_methods),
                config.execution.output_dir)
    return EXIT_OK
