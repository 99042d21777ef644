"""The BIDS-App command line: ``bids-denoise BIDS_DIR OUTPUT_DIR {participant,group}``.

Exit codes follow the BIDS-Apps execution recommendations: 0 success, 1 a
processing failure, 16 the input failed BIDS validation, 18 the filters
selected nothing, 64 usage error, 65 bad input data, 66 no input, 73 the
output cannot be created.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import uuid
from datetime import datetime
from pathlib import Path

from bids_denoise import __version__

EXIT_OK, EXIT_FAILURE = 0, 1
EXIT_INVALID_BIDS, EXIT_NOTHING_SELECTED = 16, 18
EXIT_USAGE, EXIT_DATAERR, EXIT_NOINPUT, EXIT_CANTCREAT = 64, 65, 66, 73

LOGGER = logging.getLogger("bids_denoise")


class UsageError(Exception):
    """Bad arguments (exit 64)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"bids-denoise: error: {message}\n")


def build_parser(methods) -> argparse.ArgumentParser:
    parser = _Parser(
        prog="bids-denoise",
        description="Self-supervised denoising of diffusion MRI as a BIDS-App.",
    )
    parser.add_argument("bids_dir", type=Path, help="the root of the input BIDS dataset")
    parser.add_argument("output_dir", type=Path, help="the derivatives dataset to write (created if absent)")
    parser.add_argument("analysis_level", choices=["participant", "group"], help="processing stage")
    parser.add_argument("--version", action="version", version=f"bids-denoise {__version__}")

    selection = parser.add_argument_group("Selecting data")
    selection.add_argument("--participant-label", "--participant_label", nargs="+", dest="participant_label",
                           metavar="LABEL", help="participants to process (with or without sub-)")
    selection.add_argument("--session-label", "--session_label", nargs="+", dest="session_label",
                           metavar="LABEL", help="sessions to process (with or without ses-)")
    selection.add_argument("--bids-filter-file", type=Path, metavar="FILE",
                           help='PyBIDS query JSON, e.g. {"dwi": {"acquisition": "multiband"}}')
    selection.add_argument("--skip-bids-validation", "--skip_bids_validation", action="store_true",
                           help="do not run the BIDS validator on BIDS_DIR")

    processing = parser.add_argument_group("Processing")
    processing.add_argument("--methods", nargs="+", default=["patch2self"], choices=sorted(methods),
                            metavar="METHOD", help=f"methods to run (default patch2self; available: {', '.join(sorted(methods))})")
    processing.add_argument("--super-resolution", choices=["wasa"], default=None,
                            help="also raise the resolution (wasa: wavelet-attention network trained on the "
                                 "subject's own in-plane detail); see the wasa options (--sr-scale, --sr-axes)")
    processing.add_argument("--device", default="auto", help="auto (CUDA if torch sees a GPU), cpu, cuda or cuda:N")
    processing.add_argument("--seed", type=int, default=0, help="seed for every random choice (default 0)")

    engine = parser.add_argument_group("Engine")
    engine.add_argument("-w", "--work-dir", type=Path, default=Path("work"), help="Nipype work directory (cache); default ./work")
    engine.add_argument("--nprocs", "--n-cpus", type=int, default=os.cpu_count() or 1, dest="nprocs",
                        help="processes MultiProc may run at once")
    engine.add_argument("--mem-gb", type=float, default=None, help="memory MultiProc may use")
    engine.add_argument("--omp-nthreads", type=int, default=1, help="BLAS/torch threads per node (default 1)")
    engine.add_argument("--use-plugin", type=Path, metavar="FILE", help="Nipype plugin settings (YAML, fMRIPrep's format)")
    engine.add_argument("--plugin", help="Nipype plugin (MultiProc, Linear, SLURM, ...); overrides --use-plugin's")
    engine.add_argument("--plugin-args", metavar="JSON",
                        help='plugin arguments as JSON, e.g. \'{"sbatch_args": "-p cpu -c 2", '
                             '"gpu_sbatch_args": "-p gpu --gres=gpu:1"}\' (gpu_sbatch_args go to GPU nodes only)')
    engine.add_argument("--stop-on-first-crash", action="store_true", help="stop at the first failing run")

    for spec in methods.values():
        group = parser.add_argument_group(f"{spec.name} options")
        for param in spec.params:
            kwargs = {"dest": f"{spec.name}__{param.name}", "default": param.default, "help": param.help}
            if param.choices:
                kwargs["choices"] = param.choices
            kwargs["type"] = param.type
            if param.nargs:
                kwargs["nargs"] = param.nargs
            group.add_argument(f"--{spec.name}-{param.option}", *param.aliases, **kwargs)
    return parser


def main(argv=None) -> int:
    os.environ.setdefault("NIPYPE_NO_ET", "1")
    os.environ.setdefault("LOGNAME", os.environ.get("USER", "bids-denoise"))
    from bids_denoise import registry

    methods = registry.load_all()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(methods).parse_args(argv)
    if args.super_resolution and args.super_resolution not in args.methods:
        args.methods = list(args.methods) + [args.super_resolution]
    _setup_logging()
    command_line = "bids-denoise " + " ".join(shlex.quote(a) for a in argv)
    try:
        if args.analysis_level == "group":
            return run_group(args)
        return run_participant(args, methods, command_line)
    except UsageError as err:
        print(f"bids-denoise: error: {err}", file=sys.stderr)
        return EXIT_USAGE


def _setup_logging():
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


def _fail(code: int, message: str) -> int:
    print(f"bids-denoise: error: {message}", file=sys.stderr)
    return code


def _check_dirs(args):
    """Check BIDS_DIR and OUTPUT_DIR; return an exit code or None."""
    from bids_denoise import bids

    bids_dir = args.bids_dir.resolve()
    try:
        bids.check_bids_root(bids_dir)
    except bids.BIDSInputError as err:
        return _fail(err.exit_code, str(err))
    output_dir = args.output_dir.resolve()
    derivatives = bids_dir / "derivatives"
    if output_dir == bids_dir or (bids_dir in output_dir.parents and derivatives not in output_dir.parents):
        return _fail(
            EXIT_USAGE,
            f"{output_dir}: OUTPUT_DIR must not be BIDS_DIR or inside it, except under its derivatives/ "
            f"(e.g. {derivatives / 'bids-denoise'})",
        )
    return None


def _prepare_output(output_dir):
    """Create OUTPUT_DIR (only once there is something to write) and prove it writable."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / f".write-test-{uuid.uuid4().hex}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        return _fail(EXIT_CANTCREAT, f"{output_dir}: cannot create or write OUTPUT_DIR ({err.strerror or err})")
    return None


def run_participant(args, methods, command_line) -> int:
    from bids_denoise import bids
    from bids_denoise.io import InputDataError, check_run
    from bids_denoise.methods._device import DeviceUnavailableError, resolve_device

    code = _check_dirs(args)
    if code is not None:
        return code
    bids_dir, output_dir = args.bids_dir.resolve(), args.output_dir.resolve()

    plugin = _plugin_settings(args)
    if plugin["plugin"] in LOCAL_PLUGINS:
        try:
            device = str(resolve_device(args.device))
        except DeviceUnavailableError as err:
            return _fail(EXIT_USAGE, str(err))
        LOGGER.info("device: %s%s", device, " (CUDA GPU found)" if device.startswith("cuda") else "")
        if plugin["plugin"] == "MultiProc":
            plugin["plugin_args"].setdefault("n_gpu_procs", 1 if device.startswith("cuda") else 0)
    else:
        # nodes run elsewhere: each resolves --device on its own machine (and fails there if asked
        # for CUDA without a GPU)
        device = args.device
        LOGGER.info("plugin %s: device %r is resolved on the compute nodes", plugin["plugin"], device)

    filters = {}
    if args.bids_filter_file:
        try:
            filters = json.loads(args.bids_filter_file.read_text())
        except (OSError, ValueError) as err:
            return _fail(EXIT_USAGE, f"{args.bids_filter_file}: not a readable JSON filter file ({err})")

    if not args.skip_bids_validation:
        try:
            n_errors, lines = bids.validate_dataset(bids_dir)
        except FileNotFoundError as err:
            LOGGER.warning("%s; skipping validation", err)
        else:
            if n_errors:
                for line in lines[:20]:
                    print(f"  {line}", file=sys.stderr)
                return _fail(EXIT_INVALID_BIDS, f"{bids_dir}: the BIDS validator found {n_errors} error(s) "
                                                "(see above; --skip-bids-validation to go on regardless)")

    try:
        layout = bids.build_layout(bids_dir)
        modalities = sorted({m for name in args.methods for m in methods[name].modalities}, key=["dwi", "anat"].index)
        runs = bids.select_runs(layout, args.participant_label, args.session_label, filters, modalities)
    except bids.NothingSelectedError as err:
        return _fail(EXIT_NOTHING_SELECTED, str(err))

    good_runs, bad_runs = [], []
    for run in runs:
        try:
            check_run(run.path, run.bval, run.bvec, run.modality)
        except InputDataError as err:
            print(f"bids-denoise: error: {err}", file=sys.stderr)
            if args.stop_on_first_crash:
                return EXIT_DATAERR
            bad_runs.append((run, str(err)))
        else:
            good_runs.append(run)

    selected = [methods[name] for name in dict.fromkeys(args.methods)]
    parameters = {
        spec.name: {param.name: getattr(args, f"{spec.name}__{param.name}") for param in spec.params}
        for spec in selected
    }
    failed = False
    if good_runs:
        code = _prepare_output(output_dir)
        if code is not None:
            return code
        bids.init_output_dir(output_dir, bids_dir)
        failed = _run_workflows(args, good_runs, selected, parameters, device, output_dir, command_line, plugin)

    if bad_runs:
        print(f"bids-denoise: {len(bad_runs)} run(s) skipped for bad input data:", file=sys.stderr)
        for _, message in bad_runs:
            print(f"  - {message}", file=sys.stderr)
    if failed:
        return EXIT_FAILURE
    if bad_runs:
        return EXIT_DATAERR
    LOGGER.info("done: %d run(s) x %d method(s) written to %s", len(good_runs), len(selected), output_dir)
    return EXIT_OK


LOCAL_PLUGINS = ("MultiProc", "Linear")


def _plugin_settings(args):
    settings = {"plugin": "MultiProc", "plugin_args": {}}
    if args.use_plugin:
        import yaml

        try:
            loaded = yaml.safe_load(args.use_plugin.read_text()) or {}
        except (OSError, yaml.YAMLError) as err:
            raise UsageError(f"{args.use_plugin}: not a readable plugin file ({err})") from None
        settings["plugin"] = loaded.get("plugin", "MultiProc")
        settings["plugin_args"] = dict(loaded.get("plugin_args") or {})
    if args.plugin:
        settings["plugin"] = args.plugin
    if args.plugin_args:
        try:
            settings["plugin_args"].update(json.loads(args.plugin_args))
        except ValueError as err:
            raise UsageError(f"--plugin-args: not valid JSON ({err})") from None
    plugin_args = settings["plugin_args"]
    if settings["plugin"] == "MultiProc":
        plugin_args.setdefault("n_procs", args.nprocs)
        if args.mem_gb:
            plugin_args.setdefault("memory_gb", args.mem_gb)
        plugin_args.setdefault("raise_insufficient", False)
        plugin_args.setdefault("maxtasksperchild", 1)
    plugin_args.setdefault("poll_sleep_duration", 0.1 if settings["plugin"] in LOCAL_PLUGINS else 2)
    gpu_args = plugin_args.pop("gpu_sbatch_args", None)
    settings["gpu_plugin_args"] = {"sbatch_args": gpu_args} if gpu_args else {}
    return settings


def _run_workflows(args, runs, selected, parameters, device, output_dir, command_line, plugin) -> bool:
    """Build and run one workflow per participant; return True if anything failed."""
    from nipype import config as nipype_config

    from bids_denoise import bids
    from bids_denoise.workflows.base import WorkflowSettings, init_participant_wf

    work_dir = args.work_dir.resolve()
    settings = WorkflowSettings(
        output_dir=output_dir,
        work_dir=work_dir,
        device=device,
        seed=args.seed,
        omp_nthreads=args.omp_nthreads,
        method_parameters=parameters,
        command_line=command_line,
        versions=bids.software_versions(),
        gpu_plugin_args=plugin["gpu_plugin_args"],
    )
    run_args = {"plugin": plugin["plugin"], "plugin_args": plugin["plugin_args"]}
    failed = False
    by_subject = {}
    for run in runs:
        by_subject.setdefault(run.subject, []).append(run)
    for subject, subject_runs in sorted(by_subject.items()):
        log_dir = output_dir / f"sub-{subject}" / "log"
        log_dir.mkdir(parents=True, exist_ok=True)
        nipype_config.update_config({
            "execution": {
                "crashdump_dir": str(log_dir),
                "crashfile_format": "txt",
                "hash_method": "content",
                "check_version": "false",
                "stop_on_first_crash": str(bool(args.stop_on_first_crash)).lower(),
                "remove_unnecessary_outputs": "false",
                "use_relative_paths": "false",
            },
            "monitoring": {"enabled": "false"},
        })
        handler = logging.FileHandler(log_dir / f"bids-denoise_{datetime.now():%Y%m%d-%H%M%S}_{uuid.uuid4().hex[:6]}.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
        LOGGER.addHandler(handler)
        try:
            workflow = init_participant_wf(subject, subject_runs, selected, settings)
            LOGGER.info("sub-%s: %d run(s), methods %s, plugin %s", subject, len(subject_runs),
                        ", ".join(s.name for s in selected), plugin["plugin"])
            try:
                workflow.run(**run_args)
            except RuntimeError as err:
                failed = True
                LOGGER.error("sub-%s: processing failed (%s); crash reports in %s", subject,
                             str(err).splitlines()[0], log_dir)
                if args.stop_on_first_crash:
                    break
        finally:
            LOGGER.removeHandler(handler)
            handler.close()
        _write_reports(output_dir, subject)
    return failed


def _write_reports(output_dir, subject):
    from bids_denoise.reports.citation import write_citation
    from bids_denoise.reports.html import write_participant_report

    write_citation(output_dir)
    report = write_participant_report(output_dir, subject)
    LOGGER.info("sub-%s: report %s", subject, report)


def run_group(args) -> int:
    """Collect what participant runs wrote: OUTPUT_DIR/group.tsv and group.html."""
    from bids_denoise.reports.group import write_group_outputs

    output_dir = args.output_dir.resolve()
    if not (output_dir / "dataset_description.json").exists():
        return _fail(EXIT_NOINPUT, f"{output_dir}: no participant-level outputs found (run 'participant' first)")
    rows = write_group_outputs(output_dir)
    if not rows:
        return _fail(EXIT_NOINPUT, f"{output_dir}: no denoised runs found")
    LOGGER.info("group table of %d run(s): %s, %s", len(rows), output_dir / "group.tsv", output_dir / "group.html")
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
