"""One run configuration, built once by the command line (as fMRIPrep's ``config``).

The graph reads it; it is saved beside each participant's log (``sub-XX/log/<time>_config.json``) and
a run is reproduced from it with ``bids-denoise BIDS_DIR OUTPUT_DIR participant --config-file FILE``.

Each field says which command-line option sets it (``option`` in its metadata), so both directions
are generated from the fields: :meth:`RunConfig.from_args` reads a parsed command line,
:meth:`RunConfig.to_args` writes the options that set the same values. A configuration file is read
back through the same parser as the command line (``to_args`` first, the command line after it, so
the command line wins): a value the command line would refuse, the file is refused for, with the same
one-line error (exit 64). Fields without an option (the positional arguments, the command line and
version that are records of a run) are not restored from a file.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path


def _opt(option: str | None = None, *, dest: str | None = None, kind: str = "value", default=None, factory=None):
    """A field set by ``option`` on the command line (``dest``: its argparse destination, if not the field's
    name); ``kind``: how its value is written back (``value``, ``list``, ``flag``, ``json`` or ``filters``)."""
    metadata = {"option": option, "dest": dest, "kind": kind}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class Execution:
    """What to process and where."""

    bids_dir: Path = _opt()
    output_dir: Path = _opt()
    work_dir: Path = _opt("-w")
    analysis_level: str = _opt(default="participant")
    participant_label: list | None = _opt("--participant-label", kind="list")
    session_label: list | None = _opt("--session-label", kind="list")
    bids_filters: dict = _opt("--bids-filter-file", kind="filters", factory=dict)
    skip_bids_validation: bool = _opt("--skip-bids-validation", kind="flag", default=False)
    #: ``derivatives`` (a derivatives dataset) or ``bids`` (a raw dataset for the next pipeline)
    output_layout: str = _opt("--output-layout", default="derivatives")
    #: raw layout: how input files are carried over and which participants
    copy_mode: str = _opt("--copy-mode", default="copy")
    carry_over: str = _opt("--carry-over", default="selected")
    command_line: str = _opt(default="")
    version: str = _opt(default="")


@dataclass
class Nipype:
    """How the graph runs."""

    plugin: str = _opt("--plugin", default="MultiProc")
    plugin_args: dict = _opt("--plugin-args", kind="json", factory=dict)
    #: extra plugin arguments of GPU nodes (batch plugins), e.g. {"sbatch_args": "--gres=gpu:1"}; written
    #: back within --plugin-args as ``gpu_sbatch_args``
    gpu_plugin_args: dict = _opt(factory=dict)
    nprocs: int = _opt("--nprocs", default=1)
    mem_gb: float | None = _opt("--mem-gb")
    omp_nthreads: int = _opt("--omp-nthreads", default=1)
    stop_on_first_crash: bool = _opt("--stop-on-first-crash", kind="flag", default=False)

    LOCAL_PLUGINS = ("MultiProc", "Linear")

    @property
    def is_local(self) -> bool:
        return self.plugin in self.LOCAL_PLUGINS


@dataclass
class Workflow:
    """What the graph does: the methods, their parameters (parsed), the device and the seed."""

    methods: list = _opt("--methods", kind="list", factory=list)
    super_resolution: str | None = _opt("--super-resolution")
    #: {method: {parameter: value}}, each written back as ``--<method>-<parameter>``
    parameters: dict = _opt(kind="parameters", factory=dict)
    device: str = _opt("--device", default="auto")
    seed: int = _opt("--seed", default=0)
    #: score each method on each run, leak-free (bids_denoise.evaluate)
    evaluate: bool = _opt("--evaluate", kind="flag", default=False)

    @property
    def all_methods(self) -> list:
        """Denoising methods, then super-resolution, each once."""
        return list(dict.fromkeys(self.methods + ([self.super_resolution] if self.super_resolution else [])))


SECTIONS = {"execution": Execution, "nipype": Nipype, "workflow": Workflow}


@dataclass
class RunConfig:
    execution: Execution
    nipype: Nipype = field(default_factory=Nipype)
    workflow: Workflow = field(default_factory=Workflow)

    # -- to and from the command line ----------------------------------------------------------
    @classmethod
    def from_args(cls, args, methods, *, nipype: Nipype, command_line: str, version: str) -> "RunConfig":
        """The configuration of a parsed command line (``nipype``: the engine settings the command line
        resolved, see :func:`bids_denoise.cli.parser.nipype_settings`)."""
        values = {}
        for name in ("execution", "workflow"):
            section = {}
            for spec in fields(SECTIONS[name]):
                dest = spec.metadata.get("dest") or spec.name
                if hasattr(args, dest):
                    section[spec.name] = getattr(args, dest)
            values[name] = section
        execution = Execution(**dict(values["execution"], command_line=command_line, version=version))
        for key in ("bids_dir", "output_dir", "work_dir"):
            setattr(execution, key, Path(getattr(execution, key)).resolve())
        execution.bids_filters = execution.bids_filters or {}
        workflow = Workflow(**{key: value for key, value in values["workflow"].items() if key != "parameters"})
        workflow.methods = list(dict.fromkeys(workflow.methods))
        workflow.parameters = {
            name: {param.name: _plain(getattr(args, methods[name].option_dest(param))) for param in methods[name].params}
            for name in workflow.all_methods
        }
        return cls(execution, nipype, workflow)

    def to_args(self, methods) -> list[str]:
        """The options that set this configuration's restorable values (not the positional arguments)."""
        tokens = []
        for section_name, section_class in SECTIONS.items():
            section = getattr(self, section_name)
            for spec in fields(section_class):
                option, kind = spec.metadata.get("option"), spec.metadata.get("kind")
                value = getattr(section, spec.name)
                if kind == "parameters":
                    tokens += _parameter_args(value, methods)
                elif option is None or value is None or kind == "filters":
                    continue  # a record, not an option; filters are restored by the parser's default
                elif kind == "flag":
                    tokens += [option] if value else []
                elif kind == "list":
                    tokens += [option, *(str(item) for item in value)] if value else []
                elif kind == "json":
                    merged = dict(value)
                    if section_name == "nipype" and self.nipype.gpu_plugin_args.get("sbatch_args"):
                        merged["gpu_sbatch_args"] = self.nipype.gpu_plugin_args["sbatch_args"]
                    tokens += [option, json.dumps(merged)] if merged else []
                else:
                    tokens += [option, str(value)]
        return tokens

    # -- files ------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {section.name: _plain(asdict(getattr(self, section.name))) for section in fields(self)}

    def save(self, path) -> Path:
        from bids_denoise.io import write_json

        return write_json(self.to_dict(), path)

    @classmethod
    def from_dict(cls, payload: dict) -> "RunConfig":
        """The configuration of a saved file's content; ValueError (one line) for what it cannot be."""
        if not isinstance(payload, dict):
            raise ValueError(f"expected a JSON object with sections {', '.join(SECTIONS)}, got "
                             f"{type(payload).__name__}")
        unknown = sorted(set(payload) - set(SECTIONS))
        if unknown:
            raise ValueError(f"unknown section(s) {', '.join(unknown)} (known: {', '.join(SECTIONS)})")
        sections = {}
        for name, section_class in SECTIONS.items():
            values = payload.get(name, {})
            if not isinstance(values, dict):
                raise ValueError(f"section {name!r} must be a JSON object, got {type(values).__name__}")
            known = {spec.name: spec for spec in fields(section_class)}
            unknown = sorted(set(values) - set(known))
            if unknown:
                raise ValueError(f"section {name!r}: unknown key(s) {', '.join(unknown)}")
            for key, value in values.items():
                kind = known[key].metadata.get("kind")
                if kind == "list" and value is not None and not isinstance(value, list):
                    raise ValueError(f"{name}.{key} must be a list, got {json.dumps(value)}")
                if kind in ("json", "filters", "parameters") and not isinstance(value, dict):
                    raise ValueError(f"{name}.{key} must be a JSON object, got {json.dumps(value)}")
            sections[name] = values
        execution = dict(sections["execution"])
        for key in ("bids_dir", "output_dir", "work_dir"):
            execution[key] = Path(execution.get(key) or ".")
        return cls(Execution(**execution), Nipype(**sections["nipype"]), Workflow(**sections["workflow"]))

    @classmethod
    def load(cls, path) -> "RunConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))


def _parameter_args(parameters: dict, methods) -> list[str]:
    """``--<method>-<parameter> VALUE`` for each saved parameter value that is not the default."""
    tokens = []
    if not isinstance(parameters, dict):
        raise ValueError(f"workflow.parameters must be a JSON object, got {json.dumps(parameters)}")
    for name, values in parameters.items():
        spec = methods.get(name)
        if spec is None:
            raise ValueError(f"workflow.parameters: unknown method {name!r} (known: {', '.join(methods)})")
        if not isinstance(values, dict):
            raise ValueError(f"workflow.parameters.{name} must be a JSON object, got {json.dumps(values)}")
        by_name = {param.name: param for param in spec.params}
        unknown = sorted(set(values) - set(by_name))
        if unknown:
            raise ValueError(f"workflow.parameters.{name}: unknown parameter(s) {', '.join(unknown)}")
        for key, value in values.items():
            param = by_name[key]
            if value == _plain(param.default):
                continue
            tokens += [f"--{name}-{param.option}", _none_text(param) if value is None else as_text(value)]
    return tokens


def _none_text(param) -> str:
    """How the command line writes None for ``param``: ``none`` or ``auto``, whichever its parser reads as None."""
    for text in ("none", "auto"):
        try:
            if param.parse(text) is None:
                return text
        except Exception:  # noqa: BLE001 - a parser that refuses the word
            continue
    return "none"  # the parser refuses it: the same one-line error as on the command line


def as_text(value) -> str:
    """A saved value as the command line writes it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ",".join(as_text(item) for item in value)
    if isinstance(value, float) and math.isfinite(value) and value == int(value) and abs(value) < 1e15:
        return repr(value)
    return str(value)


def _plain(value):
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value
