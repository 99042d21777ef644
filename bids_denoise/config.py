"""One run configuration, built once by the command line (as fMRIPrep's ``config``).

The graph reads it; it is saved beside each participant's log
(``sub-XX/log/<time>_config.json``) and a run is reproduced from it with
``bids-denoise BIDS_DIR OUTPUT_DIR participant --config-file FILE``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path


@dataclass
class Execution:
    """What to process and where."""

    bids_dir: Path
    output_dir: Path
    work_dir: Path
    analysis_level: str = "participant"
    participant_label: list | None = None
    session_label: list | None = None
    bids_filters: dict = field(default_factory=dict)
    skip_bids_validation: bool = False
    #: ``derivatives`` (a derivatives dataset) or ``bids`` (a raw dataset for the next pipeline)
    output_layout: str = "derivatives"
    #: raw layout: how input files are carried over (link, copy, symlink) and which participants
    copy_mode: str = "link"
    carry_over: str = "all"
    command_line: str = ""
    version: str = ""


@dataclass
class Nipype:
    """How the graph runs."""

    plugin: str = "MultiProc"
    plugin_args: dict = field(default_factory=dict)
    #: extra plugin arguments of GPU nodes (batch plugins), e.g. {"sbatch_args": "--gres=gpu:1"}
    gpu_plugin_args: dict = field(default_factory=dict)
    nprocs: int = 1
    mem_gb: float | None = None
    omp_nthreads: int = 1
    stop_on_first_crash: bool = False

    LOCAL_PLUGINS = ("MultiProc", "Linear")

    @property
    def is_local(self) -> bool:
        return self.plugin in self.LOCAL_PLUGINS


@dataclass
class Workflow:
    """What the graph does: the methods, their parameters (parsed), the device and the seed."""

    methods: list = field(default_factory=list)
    super_resolution: str | None = None
    parameters: dict = field(default_factory=dict)
    device: str = "auto"
    seed: int = 0

    @property
    def all_methods(self) -> list:
        """Denoising methods, then super-resolution, each once."""
        return list(dict.fromkeys(self.methods + ([self.super_resolution] if self.super_resolution else [])))


@dataclass
class RunConfig:
    execution: Execution
    nipype: Nipype = field(default_factory=Nipype)
    workflow: Workflow = field(default_factory=Workflow)

    def to_dict(self) -> dict:
        return {section.name: _plain(asdict(getattr(self, section.name))) for section in fields(self)}

    def save(self, path) -> Path:
        from bids_denoise.io import write_json

        return write_json(self.to_dict(), path)

    @classmethod
    def from_dict(cls, payload: dict) -> "RunConfig":
        execution = dict(payload["execution"])
        for key in ("bids_dir", "output_dir", "work_dir"):
            execution[key] = Path(execution[key])
        return cls(Execution(**execution), Nipype(**payload.get("nipype", {})),
                   Workflow(**payload.get("workflow", {})))

    @classmethod
    def load(cls, path) -> "RunConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))


def _plain(value):
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value
