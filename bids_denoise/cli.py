"""The BIDS-App command line: ``bids-denoise BIDS_DIR OUTPUT_DIR {participant,group}``.

Exit codes follow the BIDS-Apps execution recommendations: 0 success, 1 a
processing failure, 16 the input failed BIDS validation, 18 the filters
selected nothing, 64 usage error, 65 bad input data, 66 no input, 73 the
output cannot be created, 74 an I/O error (a full disk), 130 interrupted.

The command line builds one :class:`~bids_denoise.config.RunConfig`; the
participant level is a sequence of small named steps, each of which either
returns what the next needs or raises :class:`AppError` with its exit code and
a one-line message.
"""

from __future__ import annotations

import argparse
import errno
import gc
import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import uuid
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

from bids_denoise import __version__

EXIT_OK, EXIT_FAILURE = 0, 1
EXIT_INVALID_BIDS, EXIT_NOTHING_SELECTED = 16, 18
EXIT_USAGE, EXIT_DATAERR, EXIT_NOINPUT, EXIT_CANTCREAT, EXIT_IOERR = 64, 65, 66, 73, 74
EXIT_INTERRUPTED = 130

LOGGER = logging.getLogger("bids_denoise")


class AppError(Exception):
    """A one-line error with its exit code."""

    def __init__(self, exit_code: int, message: str):
        super().__init__(message)
        self.exit_code = exit_code


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"bids-denoise: error: {message}\n")


def _filter_file(text) -> dict:
    """An argparse type: a readable JSON filter file of the shape pybids takes (one-line refusal)."""
    from bids_denoise.bids import check_filters

    path = Path(text)
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise argparse.ArgumentTypeError(f"{path}: not a readable JSON filter file ({err})") from None
    try:
        return check_filters(content, origin=str(path))
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def build_parser(methods) -> argparse.ArgumentParser:
    """The parser; every method option comes from the methods' registry entries."""
    from bids_denoise.registry import default_methods

    denoisers = sorted(name for name, spec in methods.items() if spec.role == "denoise")
    upsamplers = sorted(name for name, spec in methods.items() if spec.role == "superres")
    defaults = default_methods()
    parser = _Parser(prog="bids-denoise", description="Self-supervised denoising of MRI as a BIDS-App.")
    parser.add_argument("bids_dir", type=Path, help="the root of the input BIDS dataset")
    parser.add_argument("output_dir", type=Path, help="the derivatives dataset to write (created if absent)")
    parser.add_argument("analysis_level", choices=["participant", "group"], help="processing stage")
    parser.add_argument("--version", action="version", version=f"bids-denoise {__version__}")
    parser.add_argument("--config-file", type=Path, metavar="FILE",
                        help="a run configuration saved by an earlier run (sub-XX/log/*_config.json): its "
                             "methods, parameters, seed and engine settings, unless given on this command line")

    selection = parser.add_argument_group("Selecting data")
    selection.add_argument("--participant-label", "--participant_label", nargs="+", dest="participant_label",
                           metavar="LABEL", help="participants to process (with or without sub-)")
    selection.add_argument("--session-label", "--session_label", nargs="+", dest="session_label",
                           metavar="LABEL", help="sessions to process (with or without ses-)")
    selection.add_argument("--bids-filter-file", type=_filter_file, metavar="FILE", dest="bids_filters",
                           help='PyBIDS query JSON, e.g. {"dwi": {"acquisition": "multiband"}}; keys '
                                "subject/session are refused (use the labels)")
    selection.add_argument("--skip-bids-validation", "--skip_bids_validation", action="store_true",
                           help="do not run the BIDS validator on BIDS_DIR")

    output = parser.add_argument_group("Output")
    output.add_argument("--output-layout", choices=["derivatives", "bids"], default="derivatives",
                        help="derivatives: a BIDS-Derivatives dataset (default); bids: a raw BIDS dataset, the "
                             "input with each denoised run under its raw name, for fMRIPrep/QSIPrep to take as "
                             "their bids_dir (maps, figures and reports in OUTPUT_DIR/derivatives/bids-denoise)")
    output.add_argument("--copy-mode", choices=["link", "copy", "symlink"], default="link",
                        help="--output-layout bids: how the input's other files are carried over (default link: "
                             "hard links, copies across file systems)")
    output.add_argument("--carry-over", choices=["all", "selected"], default="all",
                        help="--output-layout bids: carry over every participant (default) or only the selected "
                             "participants and sessions")

    processing = parser.add_argument_group("Processing")
    processing.add_argument("--methods", nargs="+", default=defaults, choices=denoisers, metavar="METHOD",
                            help=f"methods to run (default {' '.join(defaults)}; available: {', '.join(denoisers)})")
    processing.add_argument("--super-resolution", choices=upsamplers, default=None,
                            help="also raise the resolution: " + "; ".join(
                                f"{name}: {methods[name].summary}" for name in upsamplers))
    processing.add_argument("--device", default="auto", help="auto (CUDA if torch sees a GPU), cpu, cuda or cuda:N")
    processing.add_argument("--seed", type=int, default=0, help="seed for every random choice (default 0)")

    engine = parser.add_argument_group("Engine")
    engine.add_argument("-w", "--work-dir", type=Path, default=Path("work"),
                        help="Nipype work directory (cache); default ./work")
    engine.add_argument("--nprocs", "--n-cpus", type=int, default=os.cpu_count() or 1, dest="nprocs",
                        help="processes MultiProc may run at once")
    engine.add_argument("--mem-gb", type=float, default=None, help="memory MultiProc may use")
    engine.add_argument("--omp-nthreads", type=int, default=1, help="BLAS/torch threads per node (default 1)")
    engine.add_argument("--use-plugin", type=Path, metavar="FILE",
                        help="Nipype plugin settings (YAML, fMRIPrep's format)")
    engine.add_argument("--plugin", help="Nipype plugin (MultiProc, Linear, SLURM, ...); overrides --use-plugin's")
    engine.add_argument("--plugin-args", metavar="JSON",
                        help='plugin arguments as JSON, e.g. \'{"sbatch_args": "-p cpu -c 2", '
                             '"gpu_sbatch_args": "-p gpu --gres=gpu:1"}\' (gpu_sbatch_args go to GPU nodes only)')
    engine.add_argument("--stop-on-first-crash", action="store_true", help="stop at the first failing run")

    for spec in methods.values():
        group = parser.add_argument_group(f"{spec.name} options ({spec.title}: {spec.summary})")
        for param in spec.params:
            kwargs = {"dest": spec.option_dest(param), "default": param.default, "type": param.type,
                      "help": param.help}
            if param.choices:
                kwargs["choices"] = param.choices
            group.add_argument(f"--{spec.name}-{param.option}", *param.aliases, **kwargs)
    return parser


INTERRUPTED = "bids-denoise: interrupted; rerun the same command to resume"


def main(argv=None) -> int:
    os.environ.setdefault("NIPYPE_NO_ET", "1")
    os.environ.setdefault("LOGNAME", os.environ.get("USER", "bids-denoise"))
    previous = _handle_interrupts()
    try:
        return _main(argv)
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def _handle_interrupts():
    """Ctrl-C ends the app at once with one line and exit 130, wherever it arrives (a KeyboardInterrupt
    raised inside Nipype's or logging's handlers can be swallowed). Every output is written atomically
    and the work directory caches, so a rerun resumes; its temporary files are removed then."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def interrupted(signum, frame):
        print(INTERRUPTED, file=sys.stderr, flush=True)
        os._exit(EXIT_INTERRUPTED)

    return signal.signal(signal.SIGINT, interrupted)


def _main(argv) -> int:
    from bids_denoise import registry

    methods = registry.load_all()
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(methods)
    args = parser.parse_args(argv)
    if args.config_file:
        parser.set_defaults(**_defaults_from(args.config_file, methods))
        args = parser.parse_args(argv)
    _setup_logging()
    try:
        config = build_config(args, methods, "bids-denoise " + " ".join(shlex.quote(a) for a in argv))
        if config.execution.analysis_level == "group":
            return run_group(config)
        return run_participant(config, methods)
    except AppError as err:
        print(f"bids-denoise: error: {err}", file=sys.stderr)
        return err.exit_code


def _defaults_from(path: Path, methods) -> dict:
    """Parser defaults from a saved run configuration (the command line still overrides them)."""
    from bids_denoise.config import RunConfig

    try:
        saved = RunConfig.load(path)
    except (OSError, ValueError, KeyError, TypeError) as err:
        print(f"bids-denoise: error: {path}: not a readable run configuration ({err})", file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None
    defaults = {
        "methods": saved.workflow.methods, "super_resolution": saved.workflow.super_resolution,
        "device": saved.workflow.device, "seed": saved.workflow.seed,
        "participant_label": saved.execution.participant_label, "session_label": saved.execution.session_label,
        "bids_filters": saved.execution.bids_filters or None,
        "omp_nthreads": saved.nipype.omp_nthreads, "stop_on_first_crash": saved.nipype.stop_on_first_crash,
    }
    for name, values in saved.workflow.parameters.items():
        spec = methods.get(name)
        for param in spec.params if spec else ():
            if param.name in values:
                defaults[spec.option_dest(param)] = values[param.name]
    return defaults


def build_config(args, methods, command_line: str):
    """The run configuration from the parsed command line (usage errors raise AppError 64)."""
    from bids_denoise.config import Execution, Nipype, RunConfig, Workflow

    execution = Execution(
        bids_dir=args.bids_dir.resolve(), output_dir=args.output_dir.resolve(), work_dir=args.work_dir.resolve(),
        analysis_level=args.analysis_level, participant_label=args.participant_label,
        session_label=args.session_label, bids_filters=args.bids_filters or {},
        skip_bids_validation=args.skip_bids_validation, output_layout=args.output_layout,
        copy_mode=args.copy_mode, carry_over=args.carry_over, command_line=command_line, version=__version__,
    )
    workflow = Workflow(methods=list(dict.fromkeys(args.methods)), super_resolution=args.super_resolution,
                        device=args.device, seed=args.seed)
    workflow.parameters = {
        name: {param.name: _plain(getattr(args, methods[name].option_dest(param))) for param in methods[name].params}
        for name in workflow.all_methods
    }
    for name in workflow.all_methods:
        problem = methods[name].check(workflow.parameters[name]) if methods[name].check else None
        if problem:
            raise AppError(EXIT_USAGE, problem)
    if execution.output_layout == "bids":
        _one_denoiser_per_modality(workflow, methods)
    return RunConfig(execution, _nipype_settings(args, Nipype), workflow)


def _one_denoiser_per_modality(workflow, methods) -> None:
    """A raw dataset holds one version of each run: one denoising method per modality."""
    for modality in sorted({m for name in workflow.methods for m in methods[name].modalities}):
        takers = [name for name in workflow.methods if modality in methods[name].modalities]
        if len(takers) > 1:
            raise AppError(EXIT_USAGE, f"--output-layout bids writes one denoised version of each run: choose one "
                                       f"method for {modality} runs, not {' and '.join(takers)}")


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def _nipype_settings(args, Nipype):
    settings = Nipype(nprocs=args.nprocs, mem_gb=args.mem_gb, omp_nthreads=args.omp_nthreads,
                      stop_on_first_crash=args.stop_on_first_crash)
    if args.use_plugin:
        import yaml

        try:
            loaded = yaml.safe_load(args.use_plugin.read_text()) or {}
        except (OSError, yaml.YAMLError) as err:
            raise AppError(EXIT_USAGE, f"{args.use_plugin}: not a readable plugin file ({err})") from None
        if not isinstance(loaded, dict):
            raise AppError(EXIT_USAGE, f"{args.use_plugin}: a plugin file holds 'plugin:' and 'plugin_args:'")
        settings.plugin = loaded.get("plugin", "MultiProc")
        settings.plugin_args = dict(loaded.get("plugin_args") or {})
    if args.plugin:
        settings.plugin = args.plugin
    if args.plugin_args:
        try:
            extra = json.loads(args.plugin_args)
        except ValueError as err:
            raise AppError(EXIT_USAGE, f"--plugin-args: not valid JSON ({err})") from None
        if not isinstance(extra, dict):
            raise AppError(EXIT_USAGE, "--plugin-args: expected a JSON object")
        settings.plugin_args.update(extra)
    plugin_args = settings.plugin_args
    if settings.plugin == "MultiProc":
        plugin_args.setdefault("n_procs", args.nprocs)
        if args.mem_gb:
            plugin_args.setdefault("memory_gb", args.mem_gb)
        plugin_args.setdefault("raise_insufficient", False)
        plugin_args.setdefault("maxtasksperchild", 1)
    plugin_args.setdefault("poll_sleep_duration", 0.1 if settings.is_local else 2)
    gpu_args = plugin_args.pop("gpu_sbatch_args", None)
    settings.gpu_plugin_args = {"sbatch_args": gpu_args} if gpu_args else {}
    return settings


def _setup_logging():
    logging.raiseExceptions = False  # a log file on a full disk must not print tracebacks over the summary
    if not LOGGER.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s [bids-denoise] %(levelname)s: %(message)s", "%H:%M:%S"))
        LOGGER.addHandler(handler)
        LOGGER.setLevel(logging.INFO)
        logging.getLogger("bids_denoise.methods").setLevel(logging.WARNING)
    if os.environ.get("BIDS_DENOISE_VERBOSE") != "1":
        from nipype import logging as nipype_logging

        nipype_logging.getLogger("nipype.workflow").setLevel(logging.WARNING)
        nipype_logging.getLogger("nipype.interface").setLevel(logging.WARNING)


# ------------------------------------------------------------------------------------------------
# The participant level, step by step


def run_participant(config, methods) -> int:
    check_directories(config)
    device = resolve_device(config)
    validate_input(config)
    specs = [methods[name] for name in config.workflow.all_methods]
    runs = select_runs(config, specs)
    jobs, bad_runs = check_runs(config, runs, specs)
    failures = []
    if jobs:
        prepare_work_dir(config)
        layout = prepare_output(config)
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
    from bids_denoise.methods._device import DeviceUnavailableError
    from bids_denoise.methods._device import resolve_device as resolve

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


def check_runs(config, runs, specs):
    """Check each run from its header, gradient and phase files (its voxels are read once, in the graph),
    and group the good ones into jobs (a run's echoes; a session's DWI runs where a method asks for it).

    Returns the jobs and one error line per run (or group) left out.
    """
    from bids_denoise.bids import group_jobs
    from bids_denoise.io import InputDataError, check_run

    good, bad, grids = [], [], {}

    def refuse(message):
        if config.nipype.stop_on_first_crash:
            raise AppError(EXIT_DATAERR, message)
        print(f"bids-denoise: error: {message}", file=sys.stderr)
        bad.append(message)

    for run in runs:
        try:
            if run.problem:
                raise InputDataError(run.problem)
            grids[str(run.path)] = check_run(run.path, run.bval, run.bvec, run.modality, phase_file=run.phase)
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


def prepare_work_dir(config) -> None:
    """The work directory exists and is writable (checked before anything is written to OUTPUT_DIR)."""
    _probe_writable(config.execution.work_dir, "the work directory (-w)")


def prepare_output(config):
    """OUTPUT_DIR writable, stale temporary files of killed runs removed, dataset-level files written;
    for the raw layout, the input's other files carried over."""
    from bids_denoise.bids import strip_prefix
    from bids_denoise.outputs import layout_for

    execution = config.execution
    _probe_writable(execution.output_dir, "OUTPUT_DIR")
    layout = layout_for(execution.output_dir, execution.output_layout)
    for path in layout.remove_stale_temporaries():
        LOGGER.info("removed %s, left by an interrupted run", path)
    with _io_errors():
        layout.write_dataset_files(execution.bids_dir)
        if execution.output_layout == "bids":
            selected = execution.carry_over == "selected"
            subjects = {strip_prefix(s, "sub-") for s in execution.participant_label or []} or None
            sessions = {strip_prefix(s, "ses-") for s in execution.session_label or []} or None
            carried = layout.carry_over(execution.bids_dir, subjects=subjects if selected else None,
                                        sessions=sessions if selected else None, mode=execution.copy_mode)
            LOGGER.info("carried over %d file(s) of %s (%s)", len(carried), execution.bids_dir, execution.copy_mode)
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
def _io_errors():
    """A failed write (a full disk) becomes one line naming the file, exit 74."""
    try:
        yield
    except OSError as err:
        raise AppError(EXIT_IOERR, f"{err.filename or ''}: {err.strerror or err}".lstrip(": ")) from None


def run_graph(config, jobs, specs, device, layout) -> list[dict]:
    """Build and run one workflow per participant; return the failure records of the nodes that failed."""
    from bids_denoise.bids import software_versions
    from bids_denoise.interfaces.failures import read_failures

    failure_dir = config.execution.work_dir / "failures" / f"{datetime.now():%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:8]}"
    versions = software_versions()
    by_subject = {}
    for job in jobs:
        by_subject.setdefault(job.subject, []).append(job)
    failures = []
    for subject, subject_jobs in sorted(by_subject.items()):
        log_dir = layout.log_dir(subject)
        started = datetime.now().timestamp()
        with _io_errors():
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
    from nipype import config as nipype_config

    from bids_denoise.interfaces.failures import tie_workers_to_the_app
    from bids_denoise.workflows.base import init_participant_wf

    tie_workers_to_the_app()
    nipype_config.update_config({
        "execution": {
            "crashdump_dir": str(log_dir),
            "crashfile_format": "txt",
            "hash_method": "content",
            "check_version": "false",
            "stop_on_first_crash": str(bool(config.nipype.stop_on_first_crash)).lower(),
            "remove_unnecessary_outputs": "false",
            "use_relative_paths": "false",
            # Nipype reads its scheduler's poll interval here, not from the plugin arguments
            "poll_sleep_duration": str(config.nipype.plugin_args.get("poll_sleep_duration", 2)),
        },
        "monitoring": {"enabled": "false"},
    })
    handler = logging.FileHandler(log_dir / f"bids-denoise_{stamp}.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    LOGGER.addHandler(handler)
    try:
        workflow = init_participant_wf(subject, jobs, specs, config, device=device, failure_dir=failure_dir,
                                       versions=versions)
        LOGGER.info("sub-%s: %d run(s), methods %s, plugin %s", subject, sum(len(job.runs) for job in jobs),
                    ", ".join(spec.name for spec in specs), config.nipype.plugin)
        try:
            plugin_args = {key: value for key, value in config.nipype.plugin_args.items()
                           if key != "poll_sleep_duration"}
            # MultiProc collects garbage at every poll: keep the long-lived heap (torch, pybids)
            # out of those collections, which otherwise cost 0.2 s each
            gc.freeze()
            try:
                workflow.run(plugin=config.nipype.plugin, plugin_args=plugin_args)
            finally:
                gc.unfreeze()
        except (RuntimeError, OSError) as err:  # OSError: Nipype could not write its own files (a full disk)
            return str(err).splitlines()[0] if str(err) else "the workflow did not complete"
        return ""
    finally:
        LOGGER.removeHandler(handler)
        handler.close()


def _crash_file(log_dir: Path, record: dict, since: float) -> str | None:
    """The Nipype crash file of a failed node, matched by its run and node name."""
    from bids_denoise.workflows.base import node_safe

    run = node_safe(record.get("run", ""))
    for path in sorted(log_dir.glob("crash-*.txt"), key=lambda p: p.stat().st_mtime, reverse=True):
        if path.stat().st_mtime < since - 1:
            continue
        head = path.read_text(errors="replace")[:2000]
        if f"{run}_wf." in head:
            return str(path)
    return None


def write_participant_reports(layout, subject) -> None:
    """The methods paragraph (over every participant written so far) and the participant's page."""
    from bids_denoise.io import write_text
    from bids_denoise.outputs import CITATION_BIB, CITATION_MD
    from bids_denoise.reports.citation import render_citation
    from bids_denoise.reports.html import render_participant_report

    with _io_errors():
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


# ------------------------------------------------------------------------------------------------
# The group level


def run_group(config) -> int:
    """Collect what participant runs wrote: OUTPUT_DIR/group.tsv and group.html."""
    from bids_denoise.io import write_text
    from bids_denoise.outputs import DESCRIPTION, GROUP_FIGURE, GROUP_REPORT, GROUP_TABLE, detect_layout
    from bids_denoise.reports.figures import group_plot
    from bids_denoise.reports.group import collect_rows, render_table
    from bids_denoise.reports.html import render_group_report

    layout = detect_layout(config.execution.output_dir)
    if not layout.path(DESCRIPTION).exists():
        raise AppError(EXIT_NOINPUT, f"{layout.root}: no participant-level outputs found (run 'participant' first)")
    rows = collect_rows(layout)
    if not rows:
        raise AppError(EXIT_NOINPUT, f"{layout.root}: no denoised runs found")
    with _io_errors():
        write_text(render_table(rows), layout.path(GROUP_TABLE))
        plotted = [row for row in rows if row["residual_rms"] != ""]
        figure = group_plot(plotted, layout.path(GROUP_FIGURE)) if plotted else None
        write_text(render_group_report(rows, figure.name if figure else None), layout.path(GROUP_REPORT))
    LOGGER.info("group table of %d run(s): %s, %s", len(rows), layout.path(GROUP_TABLE), layout.path(GROUP_REPORT))
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
