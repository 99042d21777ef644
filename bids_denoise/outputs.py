"""Every path bids-denoise writes into OUTPUT_DIR, and the one writer of dataset-level files.

Names are built from BIDS entities with pybids' ``build_path`` and this
module's path patterns, and parsed back with ``parse_file_entities``: no other
module concatenates or splits a BIDS name. The ``.bidsignore`` lines follow from
the same table of non-standard outputs.

A derivative keeps every entity of its source and adds ``desc-<method>`` (and
``res-``, ``stat-`` where they apply)::

    sub-01/ses-pre/dwi/sub-01_ses-pre_acq-mb_run-1_desc-<method>_dwi.nii.gz
    sub-01/ses-pre/dwi/sub-01_ses-pre_acq-mb_run-1_desc-<method>_stat-noise_dwimap.nii.gz
    sub-01/figures/sub-01_ses-pre_acq-mb_run-1_desc-<method>_mosaic.png
    prov/sub-01_ses-pre_acq-mb_run-1_desc-<method>_prov.jsonld
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

#: the entities a name may carry, in the order BIDS writes them
ENTITY_ORDER = (
    ("session", "ses"), ("sample", "sample"), ("task", "task"), ("tracksys", "tracksys"),
    ("acquisition", "acq"), ("nucleus", "nuc"), ("volume", "voi"), ("ceagent", "ce"), ("tracer", "trc"),
    ("staining", "stain"), ("reconstruction", "rec"), ("direction", "dir"), ("run", "run"),
    ("modality", "mod"), ("echo", "echo"), ("flip", "flip"), ("inv", "inv"), ("mt", "mt"), ("part", "part"),
    ("proc", "proc"), ("hemi", "hemi"), ("space", "space"), ("recording", "recording"), ("chunk", "chunk"),
    ("segmentation", "seg"), ("res", "res"), ("den", "den"), ("label", "label"), ("desc", "desc"), ("stat", "stat"),
)
_NAME = "sub-{subject}" + "".join(f"[_{key}-{{{name}}}]" for name, key in ENTITY_ORDER) + "_{suffix}"
_FOLDER = "sub-{subject}[/ses-{session}]/{datatype}/"

#: path patterns (pybids ``build_path``), by kind of output
PATTERNS = {
    "image": _FOLDER + _NAME + "{extension}",
    "figure": "sub-{subject}/figures/" + _NAME + ".png",
    "prov": "prov/" + _NAME + ".jsonld",
}

#: dataset-level files and folders, relative to OUTPUT_DIR
DESCRIPTION, BIDSIGNORE = "dataset_description.json", ".bidsignore"
PROV_DIR, LOGS_DIR = "prov", "logs"
CITATION_MD, CITATION_BIB = f"{LOGS_DIR}/CITATION.md", f"{LOGS_DIR}/CITATION.bib"
GROUP_TABLE, GROUP_REPORT, GROUP_FIGURE = "group.tsv", "group.html", "group_residuals.png"

#: what the validator must not judge. bids-validator-deno 3.0.2 rejects bval/bvec carrying desc- in
#: derivatives, and it matches neither "dir/" patterns nor "*_desc-*_dwi.bval": keep these forms
BIDSIGNORE_LINES = (
    "*_dwi.bval",
    "*_dwi.bvec",
    "*_dwimap.*",
    "*_dwiqc.tsv",
    PROV_DIR,
    LOGS_DIR,
    "sub-*/log",
    "sub-*/figures",
    "*.html",
    GROUP_TABLE,
    GROUP_FIGURE,
)

#: suffixes of the images a method writes (maps and QC tables are derived from the source suffix)
IMAGE_SUFFIXES = ("dwi", "T1w", "T2w")


class OutputNameError(ValueError):
    """An output name cannot hold every entity of its source."""


@lru_cache(maxsize=1)
def _config():
    """pybids' entity table (raw and derivatives) plus ``stat``."""
    import os

    import bids.layout
    from bids.layout.models import Config

    folder = Path(os.path.dirname(bids.layout.__file__)) / "config"
    entities = []
    for name in ("bids.json", "derivatives.json"):
        entities += json.loads((folder / name).read_text())["entities"]
    entities.append({"name": "stat", "pattern": "stat-([a-zA-Z0-9+]+)"})
    return Config(name="bids-denoise", entities=entities)


def parse(path) -> dict:
    """The entities of a file name (``subject``, ``desc``, ``stat``, ``suffix``, ``extension`` ...)."""
    from bids.layout import parse_file_entities

    return parse_file_entities(str(path), config=_config())


def build(kind: str, entities: dict) -> str:
    """A path relative to OUTPUT_DIR; raises OutputNameError if an entity would be lost."""
    from bids.layout.writing import build_path

    entities = {key: value for key, value in entities.items() if value is not None}
    relpath = build_path(entities, [PATTERNS[kind]], strict=False)
    if relpath is None:
        raise OutputNameError(f"cannot name a {kind} output from entities {entities}")
    named = {key for key in entities if key not in ("datatype", "extension")}
    lost = named - set(parse(relpath))
    if kind == "image" and lost:
        raise OutputNameError(f"{relpath}: would lose the entities {', '.join(sorted(lost))}")
    return relpath


@dataclass(frozen=True)
class Source:
    """The identity of a source run: its entities (pybids names) and its path in BIDS_DIR."""

    relpath: str
    entities: dict

    @classmethod
    def from_relpath(cls, relpath: str) -> "Source":
        entities = {key: value for key, value in parse(relpath).items() if key != "extension"}
        return cls(relpath, entities)

    @property
    def subject(self) -> str:
        return self.entities["subject"]

    @property
    def suffix(self) -> str:
        return self.entities["suffix"]

    @property
    def label(self) -> str:
        """The source file name without extension, e.g. ``sub-01_run-1_dwi``."""
        return re.sub(r"\.nii(\.gz)?$", "", Path(self.relpath).name)

    @property
    def uri(self) -> str:
        return f"bids:raw:{self.relpath}"


class OutputLayout:
    """The paths of one OUTPUT_DIR (derivatives layout)."""

    def __init__(self, root):
        self.root = Path(root)

    # -- per run and method ----------------------------------------------------------------
    def _entities(self, source: Source, desc: str, extra: dict | None = None) -> dict:
        entities = {key: value for key, value in source.entities.items() if key not in ("desc",)}
        entities.update(extra or {})
        entities["desc"] = desc
        return entities

    def image(self, source: Source, desc: str, *, extra=None, extension=".nii.gz") -> Path:
        """The main output of a method (``desc-<method>``, source suffix)."""
        return self.root / build("image", dict(self._entities(source, desc, extra), extension=extension))

    def sidecar(self, image: Path) -> Path:
        return image.with_name(re.sub(r"(\.nii(\.gz)?|\.tsv)$", ".json", image.name))

    def gradients(self, source: Source, desc: str, *, extra=None) -> tuple[Path, Path]:
        """The bval/bvec that go with the main output."""
        return (self.image(source, desc, extra=extra, extension=".bval"),
                self.image(source, desc, extra=extra, extension=".bvec"))

    def map(self, source: Source, desc: str, name: str) -> Path:
        """A named map (``stat-<name>``, suffix ``<source suffix>map``)."""
        entities = self._entities(source, desc, {"stat": name, "suffix": f"{source.suffix}map"})
        return self.root / build("image", dict(entities, extension=".nii.gz"))

    def qc_table(self, source: Source, desc: str) -> Path:
        entities = self._entities(source, desc, {"suffix": f"{source.suffix}qc"})
        return self.root / build("image", dict(entities, extension=".tsv"))

    def figure(self, source: Source, desc: str, kind: str, *, extra=None) -> Path:
        return self.root / build("figure", dict(self._entities(source, desc, extra), suffix=kind))

    def prov_record(self, source: Source, desc: str, *, extra=None) -> Path:
        return self.root / build("prov", dict(self._entities(source, desc, extra), suffix="prov"))

    # -- per participant -------------------------------------------------------------------
    def log_dir(self, subject: str) -> Path:
        return self.root / f"sub-{subject}" / "log"

    def participant_report(self, subject: str) -> Path:
        return self.root / f"sub-{subject}.html"

    def main_sidecars(self, subject: str | None = None) -> list[Path]:
        """Sidecars of the methods' main outputs (not of maps), found on disk."""
        pattern = f"sub-{subject}/**/*_desc-*.json" if subject else "sub-*/**/*_desc-*.json"
        return sorted(path for path in self.root.glob(pattern) if parse(path).get("suffix") in IMAGE_SUFFIXES
                      and "stat" not in parse(path))

    def figures_of(self, sidecar: Path) -> dict[str, Path]:
        """The figures beside a main output, by kind."""
        entities = parse(sidecar)
        found = {}
        folder = self.root / f"sub-{entities['subject']}" / "figures"
        stem = sidecar.name[: sidecar.name.rindex("_")]
        for path in sorted(folder.glob(f"{stem}_*.png")):
            found[parse(path)["suffix"]] = path
        return found

    # -- dataset level ---------------------------------------------------------------------
    def path(self, relpath: str) -> Path:
        return self.root / relpath

    def remove_stale_temporaries(self) -> list[Path]:
        """Remove the temporary files a killed run left (never a finished output; see io.atomic_path)."""
        from bids_denoise.io import stale_temporaries

        if not self.root.is_dir():
            return []
        removed = stale_temporaries(self.root)
        for path in removed:
            path.unlink(missing_ok=True)
        return removed

    def write_dataset_files(self, description: dict) -> None:
        """dataset_description.json and .bidsignore, safe under concurrent participant jobs.

        An existing valid description is kept (the first job defines it); missing
        ``.bidsignore`` lines are added. Both are written atomically.
        """
        from bids_denoise.io import write_json, write_text

        self.root.mkdir(parents=True, exist_ok=True)
        target = self.path(DESCRIPTION)
        if not _valid_json(target):
            write_json(description, target)
        ignore = self.path(BIDSIGNORE)
        existing = ignore.read_text().splitlines() if ignore.exists() else []
        lines = existing + [line for line in BIDSIGNORE_LINES if line not in existing]
        if lines != existing:
            write_text("\n".join(lines) + "\n", ignore)


def _valid_json(path: Path) -> bool:
    try:
        json.loads(path.read_text())
        return True
    except (OSError, ValueError):
        return False
