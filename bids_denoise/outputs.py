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

#: entities of ours that BIDS does not define (statistical maps, as nipreps name them), after ``desc``
EXTRA_ENTITIES = (("stat", "stat"),)


@lru_cache(maxsize=1)
def entity_order() -> tuple:
    """The entities a name may carry, as (pybids name, key) pairs, in the order BIDS writes them.

    The order is the BIDS schema's (``bidsschematools``, which pybids ships with); the names are pybids'
    (its entity table, raw and derivatives), which the selection and ``build_path`` use.
    """
    from bidsschematools.schema import load_schema

    schema = load_schema()
    by_key = {}
    for entity in _pybids_entities():
        match = re.search(r"([a-zA-Z0-9]+)-\(", entity.get("pattern", ""))
        if match:
            by_key.setdefault(match[1], entity["name"])
    order = []
    for name in schema.rules.entities:
        key = schema.objects.entities[name].name
        if key in by_key and key != "sub":
            order.append((by_key[key], key))
    return tuple(order) + EXTRA_ENTITIES


@lru_cache(maxsize=1)
def _name_pattern() -> str:
    return "sub-{subject}" + "".join(f"[_{key}-{{{name}}}]" for name, key in entity_order()) + "_{suffix}"


_FOLDER = "sub-{subject}[/ses-{session}]/{datatype}/"


def _patterns(kind: str) -> str:
    """The path pattern (pybids ``build_path``) of a kind of output."""
    return {
        "image": _FOLDER + _name_pattern() + "{extension}",
        "figure": "sub-{subject}/figures/" + _name_pattern() + ".png",
        "prov": "prov/" + _name_pattern() + ".jsonld",
        "label": _name_pattern(),
    }[kind]


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
    "*_boldmap.*",
    "*_T1wmap.*",
    "*_T2wmap.*",
    "*_FLAIRmap.*",
    "*_dwiqc.tsv",
    "*_boldqc.tsv",
    PROV_DIR,
    LOGS_DIR,
    "sub-*/log",
    "sub-*/figures",
    "*.html",
    GROUP_TABLE,
    GROUP_FIGURE,
)

#: the longest names of a map (``stat-<name>``) and of figures (their suffix) a method's outputs take, for the
#: check of file names' lengths before a run
LONGEST_MAP = "removed"
LONGEST_FIGURES = ("calibration", "residualmap", "removedmap")

#: the raw layout: the records of denoised runs in its nested derivatives dataset describe images that are the
#: enclosing dataset's (the validator would call them sidecars without a data file)
#: (bids-validator-deno 3.0.2 does not match "*_desc-*_dwi.json": every such sidecar there is a record anyway)
RAW_RECORD_LINES = ("*_dwi.json", "*_bold.json", "*_T1w.json", "*_T2w.json")
#: the raw layout: what it holds (its source, the method of each modality), relative to the nested dataset
RAW_LAYOUT_STATE = f"{LOGS_DIR}/raw_layout.json"
#: the raw layout: the commands to run next, relative to OUTPUT_DIR
NEXT_STEPS = "code/bids-denoise/next_steps.md"

#: suffixes of the images a method writes (maps and QC tables are derived from the source suffix)
IMAGE_SUFFIXES = ("dwi", "T1w", "T2w", "bold")


class OutputNameError(ValueError):
    """An output name cannot hold every entity of its source."""


def _pybids_entities() -> list:
    """pybids' entity table: raw, then derivatives."""
    import os

    import bids.layout

    folder = Path(os.path.dirname(bids.layout.__file__)) / "config"
    return [entity for name in ("bids.json", "derivatives.json")
            for entity in json.loads((folder / name).read_text())["entities"]]


@lru_cache(maxsize=1)
def _config():
    """pybids' entity table (raw and derivatives) plus ours (``stat``)."""
    from bids.layout.models import Config

    extra = [{"name": name, "pattern": f"{key}-([a-zA-Z0-9+]+)"} for name, key in EXTRA_ENTITIES]
    return Config(name="bids-denoise", entities=_pybids_entities() + extra)


def parse(path) -> dict:
    """The entities of a file name (``subject``, ``desc``, ``stat``, ``suffix``, ``extension`` ...)."""
    from bids.layout import parse_file_entities

    return parse_file_entities(str(path), config=_config())


def build(kind: str, entities: dict) -> str:
    """A path relative to OUTPUT_DIR; raises OutputNameError if an entity would be lost."""
    from bids.layout.writing import build_path

    entities = {key: value for key, value in entities.items() if value is not None}
    relpath = build_path(entities, [_patterns(kind)], strict=False)
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
    """The paths of one OUTPUT_DIR (derivatives layout).

    ``root`` is where derivatives go; ``dataset_root`` is OUTPUT_DIR (the same
    here; for the raw layout the derivatives are a dataset nested inside it).
    """

    kind = "derivatives"

    def __init__(self, root):
        self.root = Path(root)
        self.dataset_root = self.root

    def relpath(self, path: Path) -> str:
        """A path relative to OUTPUT_DIR."""
        return Path(path).relative_to(self.dataset_root).as_posix()

    def record(self, source: Source, desc: str, *, extra=None) -> Path:
        """The JSON that records a method's main output (provenance, QC, warnings): its sidecar here."""
        return self.sidecar(self.image(source, desc, extra=extra))

    def raw_sidecar(self, source: Source, *, extra=None) -> Path | None:
        """The raw-dataset sidecar of a denoised run (raw layout only)."""
        return None

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

    def names_of(self, source: Source, desc: str) -> list[str]:
        """The file names a method's outputs of ``source`` can take (its image, sidecar, maps, QC table,
        figures, provenance record), for checking them against the file system's limit before a run."""
        paths = [self.image(source, desc), self.sidecar(self.image(source, desc)), self.qc_table(source, desc),
                 self.prov_record(source, desc), self.map(source, desc, LONGEST_MAP)]
        paths += [self.figure(source, desc, kind) for kind in LONGEST_FIGURES]
        return [path.name for path in paths]

    # -- per participant -------------------------------------------------------------------
    def log_dir(self, subject: str) -> Path:
        return self.root / f"sub-{subject}" / "log"

    def participant_report(self, subject: str) -> Path:
        return self.root / f"sub-{subject}.html"

    def main_sidecars(self, subject: str | None = None) -> list[Path]:
        """Sidecars of the methods' main outputs (not of maps), found on disk."""
        pattern = f"sub-{subject}/**/*_desc-*.json" if subject else "sub-*/**/*_desc-*.json"
        return sorted(path for path in self.root.glob(pattern) if _is_main(parse(path)))

    def figures_of(self, sidecar: Path) -> dict[str, Path]:
        """The figures of a main output (given by its sidecar), by kind."""
        entities = parse(sidecar)
        folder = self.root / f"sub-{entities['subject']}" / "figures"
        return {parse(path)["suffix"]: path for path in sorted(folder.glob("*.png"))
                if _same_output(parse(path), entities)}

    def files_of(self, sidecar: Path) -> list[Path]:
        """The files beside a main output's sidecar that belong to the same output (its image, maps, QC
        table, gradients), found on disk."""
        entities = parse(sidecar)
        return sorted(path for path in sidecar.parent.iterdir()
                      if path != sidecar and path.is_file() and _same_output(parse(path), entities))

    def image_of(self, sidecar: Path) -> Path:
        """The image a main output's sidecar describes (beside it: this layout's records are sidecars)."""
        return sidecar.parent / Path(build("image", dict(parse(sidecar), extension=".nii.gz"))).name

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

    def write_dataset_files(self, bids_dir: Path) -> None:
        """The dataset-level files of OUTPUT_DIR."""
        from bids_denoise.provenance import dataset_description

        self._write_description_and_ignore(dataset_description(bids_dir, self.root), BIDSIGNORE_LINES)

    def _write_description_and_ignore(self, description: dict, ignore_lines) -> None:
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
        lines = existing + [line for line in ignore_lines if line not in existing]
        if lines != existing:
            write_text("\n".join(lines) + "\n", ignore)


class RawBIDSLayout(OutputLayout):
    """OUTPUT_DIR as a raw BIDS dataset: the input, with each denoised run under its raw name.

    What is not a run of the raw dataset (maps, figures, reports, provenance,
    logs, super-resolved images on a new grid) goes to the nested derivatives
    dataset ``OUTPUT_DIR/derivatives/bids-denoise``, where this class's
    inherited paths point.
    """

    kind = "bids"
    NESTED = Path("derivatives") / "bids-denoise"

    def __init__(self, root):
        super().__init__(Path(root) / self.NESTED)
        self.dataset_root = Path(root)

    def image(self, source: Source, desc: str, *, extra=None, extension=".nii.gz") -> Path:
        if _new_grid(extra) or extension != ".nii.gz":
            return super().image(source, desc, extra=extra, extension=extension)
        return self.dataset_root / source.relpath

    def gradients(self, source: Source, desc: str, *, extra=None):
        """A run on its raw grid keeps the raw bval/bvec (carried over); a new grid gets copies."""
        return super().gradients(source, desc, extra=extra) if _new_grid(extra) else None

    def record(self, source: Source, desc: str, *, extra=None) -> Path:
        return super().sidecar(super().image(source, desc, extra=extra))

    def raw_sidecar(self, source: Source, *, extra=None) -> Path | None:
        return None if _new_grid(extra) else self.sidecar(self.dataset_root / source.relpath)

    def write_dataset_files(self, bids_dir: Path) -> None:
        """The raw dataset's description (the source's, with GeneratedBy and SourceDatasets added)
        and the nested derivatives dataset's files: its description, whose raw dataset is the one around
        it, and a ``.bidsignore`` that also leaves out the records of the denoised runs (their images are
        the enclosing dataset's)."""
        from bids_denoise.provenance import dataset_description, raw_dataset_description

        raw = OutputLayout(self.dataset_root)
        raw._write_description_and_ignore(raw_dataset_description(bids_dir, self.dataset_root), ())
        description = dataset_description(bids_dir, self.root)
        description["DatasetLinks"] = {"raw": "../../"}
        description["SourceDatasets"] = [{"URL": "../../"}]
        self._write_description_and_ignore(description, BIDSIGNORE_LINES + RAW_RECORD_LINES)

    def check_owner(self, bids_dir: Path, methods: dict) -> str | None:
        """Whether OUTPUT_DIR may hold this run's raw layout: empty, or written by bids-denoise for the same
        input with the same method for each modality (a raw dataset holds one version of each run). Returns
        why not, or None."""
        entries = [path for path in self.dataset_root.iterdir()] if self.dataset_root.is_dir() else []
        if not entries:
            return None
        state = _read_json(self.path(RAW_LAYOUT_STATE))
        if not state:
            return (f"{self.dataset_root}: not empty, and not a raw layout bids-denoise wrote: choose an empty or new "
                    "OUTPUT_DIR (it would mix another dataset's files with the denoised runs)")
        if state.get("source") != str(Path(bids_dir).resolve()):
            return (f"{self.dataset_root}: the raw layout of another dataset ({state.get('source')}): choose an "
                    "empty or new OUTPUT_DIR")
        changed = {modality: (state["methods"].get(modality), method) for modality, method in methods.items()
                   if state["methods"].get(modality) not in (None, method)}
        if changed:
            said = "; ".join(f"{modality} runs denoised with {old}, not {new}" for modality, (old, new) in
                             sorted(changed.items()))
            return (f"{self.dataset_root}: {said}: a raw dataset holds one denoised version of each run; write this "
                    "run to a new OUTPUT_DIR, or rerun with the same methods")
        return None

    def record_owner(self, bids_dir: Path, methods: dict) -> None:
        """Record what this raw layout holds: its source and the method of each modality."""
        from bids_denoise.io import write_json

        state = _read_json(self.path(RAW_LAYOUT_STATE)) or {"methods": {}}
        state.update(source=str(Path(bids_dir).resolve()))
        state["methods"].update(methods)
        write_json(state, self.path(RAW_LAYOUT_STATE))

    def carry_over(self, bids_dir: Path, *, subjects=None, sessions=None, mode="copy") -> list[Path]:
        """Bring every file of BIDS_DIR that is not already in OUTPUT_DIR (denoised runs replace theirs).

        ``subjects``/``sessions`` limit the participants' folders carried (None: all); ``derivatives/`` and
        hidden entries (but ``.bidsignore``) are left out. A file already present is kept, so participant
        jobs may run in any order. ``mode`` (see :func:`carry`): ``copy`` (a copy-on-write clone where the
        file system makes one, else a copy), ``link`` (a hard link: the same file as the input's) or
        ``symlink`` (a relative symbolic link).
        """
        carried = []
        for source in _dataset_files(Path(bids_dir), subjects, sessions):
            relative = source.relative_to(bids_dir)
            destination = self.dataset_root / relative
            if destination.exists() or destination.is_symlink():
                continue
            carry(source, destination, mode, root=Path(bids_dir))
            carried.append(destination)
        return carried

    def write_next_steps(self, methods: dict) -> Path:
        """``code/bids-denoise/next_steps.md``: the commands that take this dataset on, with the options that keep
        it from being denoised twice (BIDS keeps ``code/`` for such notes)."""
        from bids_denoise.io import write_text

        lines = ["# What to run next on this denoised dataset", "",
                 "Each run of this dataset is denoised under its raw name "
                 f"({', '.join(f'{modality}: {method}' for modality, method in sorted(methods.items()))}); "
                 "what was done to each run is recorded in `derivatives/bids-denoise` (its sidecar, provenance "
                 "and figures). Give this folder to the next pipeline as its `bids_dir`:", ""]
        if "bold" in methods:
            lines += ["```bash", "fmriprep <this dataset> <output> participant --participant-label <label> \\",
                      "    --fs-license-file <license.txt>", "```",
                      "fMRIPrep does not denoise thermal noise itself, so nothing is done twice.", ""]
        if "dwi" in methods:
            lines += ["```bash", "qsiprep <this dataset> <output> participant --participant-label <label> \\",
                      "    --denoise-method none --output-resolution <mm>", "```",
                      "`--denoise-method none`: QSIPrep denoises DWI with `dwidenoise` by default; these runs are "
                      "already denoised, and denoising twice removes signal.", ""]
        return write_text("\n".join(lines), self.dataset_root / NEXT_STEPS)


def carry(source: Path, destination: Path, mode: str, *, root: Path) -> Path:
    """Put a file of the input dataset (under ``root``) at ``destination``, atomically, never exposing the input.

    ``copy``: a copy-on-write clone (``FICLONE``: Btrfs, XFS, ...) where the file system makes one, else a
    copy; either way a file of its own, so a later tool that writes into the output cannot change the input;
    it keeps the source's permission bits (never wider). ``link``: a hard link, the same file as the input's
    (writing into it writes into the raw data: on explicit request only). ``symlink``: a relative symbolic
    link (valid while the two datasets keep their places relative to each other). A source that is itself a
    symbolic link to a file outside ``root`` is carried as a link to the same target: its content is never read
    into the output (it may be a file its owner keeps private).
    """
    import os
    import stat

    from bids_denoise.io import atomic_path

    target = source.resolve()
    outside = source.is_symlink() and root.resolve() not in target.parents
    with atomic_path(destination, mode=None) as temporary:
        if outside:
            temporary.unlink()
            os.symlink(os.readlink(source), temporary)
        elif mode == "symlink":
            temporary.unlink()
            os.symlink(os.path.relpath(target, destination.parent), temporary)
        elif mode == "link":
            temporary.unlink()
            try:
                os.link(target, temporary)
            except OSError as err:
                import errno

                if err.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                    raise
                _clone_or_copy(target, temporary)
        else:
            _clone_or_copy(target, temporary)
        if not (outside or mode == "symlink") and not (mode == "link" and os.path.samefile(target, temporary)):
            os.chmod(temporary, stat.S_IMODE(os.stat(target).st_mode))
    return destination


def _clone_or_copy(source: Path, destination: Path) -> None:
    """A copy-on-write clone where the file system makes one (Linux ``FICLONE``), else a copy of the bytes."""
    import shutil

    try:
        import fcntl

        with open(source, "rb") as reader, open(destination, "wb") as writer:
            fcntl.ioctl(writer.fileno(), 0x40049409, reader.fileno())  # FICLONE
        return
    except (OSError, ImportError, AttributeError):
        pass
    shutil.copyfile(source, destination)


def _same_output(entities: dict, of: dict) -> bool:
    """Whether a file's entities name the same output as ``of`` (its suffix, extension and ``stat`` aside)."""
    ignored = ("suffix", "extension", "stat", "datatype")
    return {k: v for k, v in entities.items() if k not in ignored} == {k: v for k, v in of.items() if k not in ignored}


def _is_main(entities: dict) -> bool:
    return entities.get("suffix") in IMAGE_SUFFIXES and "stat" not in entities


def _new_grid(extra) -> bool:
    return bool(extra) and "res" in extra


def _dataset_files(bids_dir: Path, subjects, sessions):
    for path in sorted(bids_dir.rglob("*")):
        parts = path.relative_to(bids_dir).parts
        if parts[0] == "derivatives" or any(p.startswith(".") and p != BIDSIGNORE for p in parts):
            continue
        if subjects is not None and parts[0].startswith("sub-") and parts[0][4:] not in subjects:
            continue
        if sessions is not None and len(parts) > 1 and parts[1].startswith("ses-") and parts[1][4:] not in sessions:
            continue
        if path.is_file():
            yield path


def detect_layout(output_dir) -> OutputLayout:
    """The layout an earlier participant run wrote in OUTPUT_DIR (for the group level)."""
    nested = Path(output_dir) / RawBIDSLayout.NESTED / DESCRIPTION
    return layout_for(output_dir, "bids" if nested.exists() else "derivatives")


def layout_for(output_dir, kind: str = "derivatives") -> OutputLayout:
    """The layout of OUTPUT_DIR: ``derivatives`` (default) or ``bids`` (a raw dataset)."""
    return RawBIDSLayout(output_dir) if kind == "bids" else OutputLayout(output_dir)


def _read_json(path: Path) -> dict | None:
    try:
        content = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return content if isinstance(content, dict) else None


def _valid_json(path: Path) -> bool:
    try:
        json.loads(path.read_text())
        return True
    except (OSError, ValueError):
        return False
