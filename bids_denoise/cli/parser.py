"""The command line's parser and the run configuration it builds.

Every method's options come from its registry entry; a saved configuration file goes through this same
parser (:meth:`~bids_denoise.config.RunConfig.to_args`), so what the command line refuses, the file is
refused for, in one line (exit 64).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bids_denoise import __version__
from bids_denoise.cli.errors import EXIT_USAGE, AppError
from bids_denoise.engine import plugin_names
from bids_denoise.machine import available_cpus, total_memory_gb


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors exiting 64; ``origin`` names a configuration file the arguments came from."""

    origin: str | None = None

    def error(self, message):
        if self.origin:
            self.exit(EXIT_USAGE, f"bids-denoise: error: {self.origin}: {message}\n")
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
                        help="a run configuration saved by an earlier run (sub-XX/log/*_config.json): every "
                             "option it holds (selection, output layout, methods and parameters, device, seed, "
                             "engine), unless given on this command line; BIDS_DIR, OUTPUT_DIR and the level come "
                             "from the command line")

    selection = parser.add_argument_group("Selecting data")
    selection.add_argument("--participant-label", "--participant_label", nargs="+", dest="participant_label",
                           metavar="LABEL", type=_label("sub-"), help="participants to process (with or without sub-)")
    selection.add_argument("--session-label", "--session_label", nargs="+", dest="session_label",
                           metavar="LABEL", type=_label("ses-"), help="sessions to process (with or without ses-)")
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
    output.add_argument("--copy-mode", choices=["copy", "link", "symlink"], default="copy",
                        help="--output-layout bids: how the input's other files are carried over: copy (default: "
                             "copy-on-write clones where the file system makes them, else copies; files of their own, "
                             "so nothing written into the output reaches the input), link (hard links: the input's "
                             "own files, which a later tool writing into the output would change) or symlink "
                             "(relative symbolic links)")
    output.add_argument("--carry-over", choices=["selected", "all"], default="selected",
                        help="--output-layout bids: carry over only the selected participants and sessions "
                             "(default: every run in the output is denoised) or every participant (the others "
                             "raw, as their records in derivatives/bids-denoise show)")

    processing = parser.add_argument_group("Processing")
    processing.add_argument("--methods", nargs="+", default=defaults, choices=denoisers, metavar="METHOD",
                            help=f"methods to run (default {' '.join(defaults)}; available: {', '.join(denoisers)})")
    processing.add_argument("--super-resolution", choices=upsamplers, default=None,
                            help="also raise the resolution: " + "; ".join(
                                f"{name}: {methods[name].summary}" for name in upsamplers))
    processing.add_argument("--device", default="auto", help="auto (CUDA if torch sees a GPU), cpu, cuda or cuda:N")
    processing.add_argument("--seed", type=int, default=0, help="seed for every random choice (default 0)")
    processing.add_argument("--evaluate", action="store_true",
                            help="also score each method on each run without ground truth: the run is split into "
                                 "folds, the method denoises it without each fold and a model predicts the fold's raw "
                                 "volumes (DWI: spherical harmonics per shell; BOLD: neighbours in time), against the "
                                 "same without denoising; costs about one run of the method per fold (5 for DWI, 2 for "
                                 "BOLD); the scores go into the sidecar and the report")

    engine = parser.add_argument_group("Engine")
    engine.add_argument("-w", "--work-dir", type=Path, default=Path("work"),
                        help="Nipype work directory (cache); default ./work")
    engine.add_argument("--nprocs", "--n-cpus", type=_cpus("--nprocs"), default=available_cpus(), dest="nprocs",
                        help="processes MultiProc may run at once")
    engine.add_argument("--mem-gb", type=_memory, default=None,
                        help="memory (GB) MultiProc may give its nodes at once (default: 90%% of the machine's)")
    engine.add_argument("--omp-nthreads", type=_cpus("--omp-nthreads"), default=min(8, available_cpus()),
                        help="threads per method node (MP-PCA's windows, BLAS, torch); MultiProc runs a node only "
                             "where that many of --nprocs are free, so nothing is oversubscribed (default: the "
                             "CPUs this process may use, at most 8)")
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
            kwargs = {"dest": spec.option_dest(param), "default": param.default, "type": param.argparse_type,
                      "help": param.help}
            if param.choices:
                kwargs["choices"] = param.choices
            group.add_argument(f"--{spec.name}-{param.option}", *param.aliases, **kwargs)
    return parser



def parse_command_line(argv, methods):
    """The parsed command line; with ``--config-file``, the file's values under the command line's."""
    parser = build_parser(methods)
    args = parser.parse_args(argv)
    if args.config_file:
        parser.set_defaults(**_defaults_from(args.config_file, methods))
        args = parser.parse_args(argv)
    return args


def _defaults_from(path: Path, methods) -> dict:
    """Parser defaults from a saved run configuration, read through the parser itself."""
    from bids_denoise.bids import check_filters
    from bids_denoise.config import RunConfig

    try:
        saved = RunConfig.load(path)
        tokens = saved.to_args(methods)
        filters = check_filters(saved.execution.bids_filters, origin=f"{path}: execution.bids_filters")
    except (OSError, ValueError, KeyError, TypeError) as err:
        print(f"bids-denoise: error: {path}: not a usable run configuration ({str(err).splitlines()[0]})",
              file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None
    parser = build_parser(methods)
    parser.origin = str(path)
    given = parser.parse_args(["BIDS_DIR", "OUTPUT_DIR", "participant", *tokens])
    defaults = {dest: value for dest, value in vars(given).items()
                if dest not in ("bids_dir", "output_dir", "analysis_level") and value != parser.get_default(dest)}
    defaults["bids_filters"] = filters or None
    return defaults


def _label(prefix: str):
    """An argparse type: a BIDS label (ASCII letters and digits), with or without its ``prefix``."""
    import re

    def parse(text):
        label = text[len(prefix):] if text.startswith(prefix) else text
        if not re.fullmatch(r"[A-Za-z0-9]+", label):
            raise argparse.ArgumentTypeError(f"{text!r} is not a BIDS label (ASCII letters and digits only)")
        return text

    parse.__name__ = "label"
    return parse


def _cpus(option: str):
    """An argparse type: a number of processes or threads from 1 to the CPUs this process may use."""

    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        cpus = available_cpus()
        if not 1 <= value <= cpus:
            raise argparse.ArgumentTypeError(f"{option} must be from 1 to {cpus} (the CPUs this process may use), "
                                             f"got {value}")
        return value

    parse.__name__ = "integer"
    return parse


def _memory(text) -> float:
    """An argparse type: gigabytes above zero and at most the memory this process may use."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of gigabytes, got {text!r}") from None
    total = total_memory_gb()
    if not 0.1 <= value <= total:
        raise argparse.ArgumentTypeError(f"--mem-gb must be from 0.1 to {total:.1f} (this machine's memory), "
                                         f"got {text}")
    return value


def build_config(args, methods, command_line: str):
    """The run configuration from the parsed command line (usage errors raise AppError 64)."""
    from bids_denoise.config import RunConfig

    config = RunConfig.from_args(args, methods, nipype=nipype_settings(args), command_line=command_line,
                                 version=__version__)
    workflow = config.workflow
    for name in workflow.all_methods:
        problem = methods[name].check(workflow.parameters[name]) if methods[name].check else None
        if problem:
            raise AppError(EXIT_USAGE, problem)
    if "auto" in workflow.methods:
        beside = [name for name in workflow.methods if name != "auto"
                  and set(methods[name].modalities) & set(methods["auto"].modalities)]
        if beside:
            raise AppError(EXIT_USAGE, f"--methods auto writes the method it chooses for each DWI and BOLD run: run "
                                       f"{' and '.join(beside)} apart from it (or add them to a separate OUTPUT_DIR)")
    if config.execution.output_layout == "bids":
        _one_denoiser_per_modality(workflow, methods)
    return config


def _one_denoiser_per_modality(workflow, methods) -> None:
    """A raw dataset holds one version of each run: one denoising method per modality."""
    for modality in sorted({m for name in workflow.methods for m in methods[name].modalities}):
        takers = [name for name in workflow.methods if modality in methods[name].modalities]
        if len(takers) > 1:
            raise AppError(EXIT_USAGE, f"--output-layout bids writes one denoised version of each run: choose one "
                                       f"method for {modality} runs, not {' and '.join(takers)}")


def nipype_settings(args):
    """The engine settings of a parsed command line: plugin, its arguments (from --use-plugin, --plugin,
    --plugin-args and the resource options), the GPU nodes' extra arguments."""
    from bids_denoise.config import Nipype

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
    if settings.plugin not in plugin_names():
        raise AppError(EXIT_USAGE, f"--plugin {settings.plugin}: not a Nipype plugin (available: "
                                   f"{', '.join(plugin_names())})")
    if args.plugin_args:
        try:
            extra = json.loads(args.plugin_args)
        except ValueError as err:
            raise AppError(EXIT_USAGE, f"--plugin-args: not valid JSON ({err})") from None
        if not isinstance(extra, dict):
            raise AppError(EXIT_USAGE, "--plugin-args: expected a JSON object")
        settings.plugin_args.update(extra)
    plugin_args = settings.plugin_args
    _check_plugin_args(plugin_args)
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


#: plugin arguments whose values the engine reads, with what each must be
_PLUGIN_ARGS = {
    "n_procs": (lambda v: isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= available_cpus(),
                "a whole number from 1 to the CPUs this process may use"),
    "memory_gb": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= total_memory_gb(),
                  "a number of gigabytes above zero, at most this machine's memory"),
    "n_gpu_procs": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "a whole number from 0"),
    "raise_insufficient": (lambda v: isinstance(v, bool), "true or false"),
    "maxtasksperchild": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "a whole number from 1"),
    "poll_sleep_duration": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 600,
                            "seconds, above zero"),
    "sbatch_args": (lambda v: isinstance(v, str), "a string"),
    "gpu_sbatch_args": (lambda v: isinstance(v, str), "a string"),
    "max_jobs": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "a whole number from 1"),
}


def _check_plugin_args(plugin_args: dict) -> None:
    for key, value in plugin_args.items():
        check, what = _PLUGIN_ARGS.get(key, (None, None))
        if check is not None and not check(value):
            raise AppError(EXIT_USAGE, f"--plugin-args: {key} must be {what}, got {json.dumps(value)}")
