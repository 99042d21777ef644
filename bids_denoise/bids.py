"""BIDS in and BIDS-Derivatives out: queries, naming, sidecars and provenance.

Inputs are found with pybids (so bval/bvec/JSON resolve through the BIDS
inheritance principle); outputs are named from the source file name with every
source entity kept and ``desc-<method>`` added, and described by sidecars that
carry the source's acquisition metadata and this file's provenance.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from bids_denoise.outputs import Source


class BIDSInputError(ValueError):
    """The input is not a usable BIDS dataset (exit code 16 or 66)."""

    def __init__(self, message, exit_code):
        super().__init__(message)
        self.exit_code = exit_code


class NothingSelectedError(ValueError):
    """The filters selected no run (exit code 18)."""


#: What each modality selects: (datatype, suffixes, bids-filter-file keys)
MODALITIES = {
    "dwi": ("dwi", ["dwi"], ["dwi"]),
    "anat": ("anat", ["T1w", "T2w", "FLAIR"], ["t1w", "t2w", "flair"]),
    "bold": ("func", ["bold"], ["bold"]),
}

#: modalities whose runs are series of volumes (4D)
SERIES = ("dwi", "bold")

#: query keys a filter file may not set: the app sets them (or the labels do)
RESERVED_FILTER_KEYS = {
    "subject": "use --participant-label",
    "session": "use --session-label",
    "suffix": "the modality sets it",
    "datatype": "the modality sets it",
    "extension": "the app selects the NIfTI images",
    "return_type": "a pybids option, not a filter",
    "target": "a pybids option, not a filter",
    "scope": "a pybids option, not a filter",
    "regex_search": "a pybids option, not a filter",
    "absolute_paths": "a pybids option, not a filter",
    "invalid_filters": "a pybids option, not a filter",
}


@dataclass
class Run:
    """One selected run and the files that go with it."""

    path: Path
    bval: Path | None
    bvec: Path | None
    source: Source
    metadata: dict = field(default_factory=dict)
    modality: str = "dwi"
    #: the ``part-phase`` image of a ``part-mag`` run (same entities), if the dataset has one
    phase: Path | None = None
    #: the units its phase image's sidecar gives (``auto``: none, or "arbitrary": found from the values)
    phase_units: str = "auto"
    #: why this file cannot be denoised (e.g. a phase image without its magnitude), found at selection
    problem: str | None = None

    @property
    def subject(self) -> str:
        return self.source.subject

    @property
    def relpath(self) -> str:
        return self.source.relpath

    @property
    def label(self) -> str:
        """The source file name without extension, e.g. ``sub-01_run-1_dwi``."""
        return self.source.label


@dataclass
class Job:
    """Runs read and denoised together: one run, the echoes of a multi-echo BOLD run, or the DWI
    runs of a session (their volumes stacked; see :class:`bids_denoise.contract.MethodInputs`).

    ``volumes`` holds each run's number of volumes (from its header).
    """

    runs: list
    kind: str = "run"
    volumes: tuple = ()
    #: the runs' grid (X, Y, Z), from their headers
    shape: tuple = ()

    @property
    def subject(self) -> str:
        return self.runs[0].subject

    @property
    def modality(self) -> str:
        return self.runs[0].modality

    @property
    def series_shape(self) -> tuple:
        """The shape of the job's runs stacked: (X, Y, Z, all their volumes), or (X, Y, Z) for an image."""
        volumes = sum(self.volumes)
        return tuple(self.shape) + ((volumes,) if volumes > 1 or self.modality != "anat" else ())

    @property
    def label(self) -> str:
        """Names the job in node names, logs and failure lines: the run's label, the echoes' label
        without ``echo-``, or ``sub-X[_ses-Y]_dwi-session``."""
        from bids_denoise.outputs import build

        first = self.runs[0]
        if self.kind == "echoes":
            return build("label", {key: value for key, value in first.source.entities.items() if key != "echo"})
        if self.kind == "session":
            entities = {key: first.source.entities.get(key) for key in ("subject", "session", "suffix")}
            return build("label", entities) + "-session"
        return first.label


def group_jobs(runs, volumes, *, dwi_sessions=False) -> tuple[list, list]:
    """Group checked runs into jobs: the echoes of a BOLD run together, and with ``dwi_sessions`` the
    DWI runs of a session that share a grid; every other run alone.

    ``volumes`` maps a run's path to its (shape, affine, volumes) from its header. Returns the jobs
    and one error line per group that cannot be read together (echoes of different shapes or grids).
    """
    import numpy as np

    def key_of(run):
        entities = dict(run.source.entities)
        if run.modality == "bold" and "echo" in entities:
            entities.pop("echo")
            return ("echoes", tuple(sorted(entities.items())))
        if run.modality == "dwi" and dwi_sessions:
            return ("session", run.subject, entities.get("session"))
        return ("run", run.relpath)

    groups = {}
    for run in runs:
        groups.setdefault(key_of(run), []).append(run)
    jobs, errors = [], []
    for key, members in groups.items():
        kind = key[0]
        if kind == "echoes":
            members.sort(key=lambda run: int(run.source.entities["echo"]) if str(run.source.entities["echo"])
                         .isdigit() else str(run.source.entities["echo"]))
        grids = []  # (shape, affine, runs) of each grid the group's runs are on
        for run in members:
            shape, affine, _ = volumes[str(run.path)]
            match = next((grid for grid in grids if grid[0] == shape[:3] and np.allclose(grid[1], affine, atol=1e-4)),
                         None)
            if match is None:
                grids.append((shape[:3], affine, [run]))
            else:
                match[2].append(run)
        if kind == "echoes" and len(grids) > 1:
            # the grid most echoes share is the run's; each echo on another one is named
            grids.sort(key=lambda grid: -len(grid[2]))
            shared = grids[0]
            reference = shared[2][0]
            for shape, _, odd_runs in grids[1:]:
                for odd in odd_runs:
                    errors.append(f"{odd.path}: this echo's grid ({'x'.join(map(str, shape))}) differs from echo "
                                  f"{reference.source.entities['echo']}'s ({'x'.join(map(str, shared[0]))}, or its "
                                  "affine does): the echoes of a run are denoised together")
            continue
        for shape, _, same_grid in grids:
            job_kind = kind if len(same_grid) > 1 else "run"
            jobs.append(Job(same_grid, job_kind, tuple(volumes[str(run.path)][2] for run in same_grid),
                            tuple(shape)))
    return jobs, errors


def filter_keys() -> list[str]:
    """The top-level keys a ``--bids-filter-file`` may have."""
    return [key for _, _, keys in MODALITIES.values() for key in keys]


def check_filters(filters, origin="--bids-filter-file") -> dict:
    """Check a filter file's content against the entities pybids knows; raise ValueError (one line).

    Its shape is ``{"<modality key>": {"<entity>": value or [values] or null}}``, as fMRIPrep's.
    """
    from bids_denoise.outputs import entity_order

    known_keys = filter_keys()
    entities = {name for name, _ in entity_order()}
    if not isinstance(filters, dict):
        raise ValueError(f"{origin}: expected a JSON object such as {{\"dwi\": {{\"acquisition\": \"mb\"}}}}, "
                         f"got {type(filters).__name__}")
    for key, query in filters.items():
        if key not in known_keys:
            raise ValueError(f"{origin}: unknown key {key!r} (known: {', '.join(known_keys)})")
        if not isinstance(query, dict):
            raise ValueError(f"{origin}: {key!r} must map entities to values, got {type(query).__name__}")
        for entity, value in query.items():
            if entity in RESERVED_FILTER_KEYS:
                raise ValueError(f"{origin}: {key}.{entity} is not allowed here ({RESERVED_FILTER_KEYS[entity]})")
            if entity not in entities:
                raise ValueError(f"{origin}: {key}.{entity} is not a BIDS entity pybids knows "
                                 f"(e.g. {', '.join(sorted(entities)[:6])} ...)")
            values = value if isinstance(value, list) else [value]
            if not values or not all(v is None or isinstance(v, (str, int)) and not isinstance(v, bool)
                                     for v in values):
                raise ValueError(f"{origin}: {key}.{entity} must be a string, an integer, null or a non-empty "
                                 f"list of those, got {json.dumps(value)}")
    return filters


def strip_prefix(label: str, prefix: str) -> str:
    return label[len(prefix) :] if label.startswith(prefix) else label


def check_bids_root(bids_dir: Path) -> None:
    if not bids_dir.is_dir():
        raise BIDSInputError(f"{bids_dir}: BIDS_DIR does not exist or is not a folder", 66)
    description = bids_dir / "dataset_description.json"
    if not description.is_file():
        raise BIDSInputError(
            f"{bids_dir}: not a BIDS dataset (no dataset_description.json at its top)", 16
        )
    try:
        content = json.loads(description.read_text())
    except (OSError, ValueError) as err:
        raise BIDSInputError(f"{description}: not valid JSON ({err})", 16) from None
    if not isinstance(content, dict):
        raise BIDSInputError(f"{description}: must hold a JSON object (Name, BIDSVersion ...), not a "
                             f"{type(content).__name__}", 16)
    for key in ("GeneratedBy", "SourceDatasets"):
        entries = content.get(key, [])
        if not isinstance(entries, list) or not all(isinstance(entry, dict) for entry in entries):
            raise BIDSInputError(f"{description}: {key} must be a list of objects, got {json.dumps(entries)}", 16)


def find_validator() -> str | None:
    """The official BIDS validator's executable, if installed."""
    here = Path(sys.executable).parent
    for name in ("bids-validator-deno", "bids-validator"):
        candidate = here / name
        if candidate.exists():
            return str(candidate)
        found = shutil.which(name)
        if found:
            return found
    return None


def validate_dataset(path: Path, *, timeout=600) -> tuple[int, list[str]]:
    """Run the official validator; return (number of errors, error lines)."""
    validator = find_validator()
    if validator is None:
        raise FileNotFoundError("the BIDS validator (bids-validator-deno) is not installed")
    env = dict(os.environ, NO_COLOR="1", DENO_NO_UPDATE_CHECK="1")
    proc = subprocess.run(
        [validator, str(path), "--format", "json", "--ignoreWarnings"],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    try:
        report = json.loads(proc.stdout)
    except ValueError:
        return 1, [f"validator failed to run: {proc.stderr.strip()[:500]}"]
    issues = report.get("issues", {}).get("issues", [])
    errors = [issue for issue in issues if issue.get("severity") == "error"]
    lines = [
        f"{issue.get('code')}: {issue.get('location', '')} {issue.get('issueMessage', '') or ''}".strip()
        for issue in errors
    ]
    return len(errors), lines


def build_layout(bids_dir: Path, database_dir: Path | None = None):
    """A pybids layout of the raw dataset (never writes into it)."""
    from bids import BIDSLayout
    from bids.layout import BIDSLayoutIndexer

    indexer = BIDSLayoutIndexer(validate=False, index_metadata=True)
    return BIDSLayout(
        str(bids_dir),
        validate=False,
        derivatives=False,
        indexer=indexer,
        database_path=str(database_dir) if database_dir else None,
    )


def select_runs(layout, participant_labels=None, session_labels=None, bids_filters=None, modalities=("dwi",)):
    """Every run of the given modalities the labels and filters select.

    DWI runs come with their bval/bvec; every run with its metadata, resolved
    through the inheritance principle.

    Raises
    ------
    NothingSelectedError
        With the labels that do exist, when nothing matches.
    """
    subjects = layout.get_subjects()
    if not subjects:
        raise NothingSelectedError(f"{layout.root}: no sub-* folders found in BIDS_DIR")
    wanted = [strip_prefix(label, "sub-") for label in (participant_labels or [])] or subjects
    missing = sorted(set(wanted) - set(subjects))
    if missing:
        raise NothingSelectedError(
            f"participant label(s) {', '.join(missing)} not found; "
            f"participants in the dataset: {', '.join(sorted(subjects))}"
        )
    sessions = None
    if session_labels:
        sessions = [strip_prefix(label, "ses-") for label in session_labels]
        known = layout.get_sessions(subject=wanted)
        if not set(sessions) & set(known):
            raise NothingSelectedError(
                f"session label(s) {', '.join(sessions)} not found for the selected participants; "
                f"sessions present: {', '.join(sorted(known)) or 'none'}"
            )
    runs = []
    for modality in modalities:
        datatype, suffixes, filter_keys = MODALITIES[modality]
        for suffix, filter_key in zip(suffixes, filter_keys):
            query = {"subject": wanted, "datatype": datatype, "suffix": suffix, "extension": [".nii", ".nii.gz"]}
            if sessions:
                query["session"] = sessions
            query.update((bids_filters or {}).get(filter_key, {}))
            if modality in SERIES:  # a phase image is not a run of its own: it goes with its magnitude
                runs += _series_runs(layout, query, modality, suffix)
                continue
            for bids_file in layout.get(return_type="object", **query):
                runs.append(_run_of(layout, bids_file, modality, suffix))
    runs = _distinct(runs)
    if not runs:
        present = layout.get(subject=wanted, datatype=[MODALITIES[m][0] for m in modalities], return_type="filename")
        raise NothingSelectedError(
            f"the filters selected no {'/'.join(modalities)} run; files under the selected participants: "
            + (", ".join(Path(p).name for p in present if p.endswith((".nii", ".nii.gz"))) or "none")
        )
    return runs


#: what a sidecar's ``Units`` (BIDS) or ``PhaseUnits`` says of a phase image, in the units of
#: :func:`bids_denoise.methods.core.phase.phase_units`
_PHASE_UNITS = {"rad": "radians", "radian": "radians", "radians": "radians", "deg": "degrees", "degree": "degrees",
                "degrees": "degrees", "scanner": "scanner", "scanner-unsigned": "scanner-unsigned"}


def phase_units_of_metadata(metadata: dict) -> str:
    """The units a phase image's sidecar states (``Units`` or ``PhaseUnits``), or ``auto``."""
    for key in ("PhaseUnits", "Units"):
        value = str(metadata.get(key, "")).strip().lower()
        if value in _PHASE_UNITS:
            return _PHASE_UNITS[value]
    return "auto"


def _distinct(runs) -> list:
    """The runs, each file once: a folder linked into the dataset (a symbolic link to a parent, a loop)
    shows the same files again under longer paths, which are dropped; two different files that would take
    the same output names are both refused (one line each)."""
    by_file = {}
    for run in sorted(runs, key=lambda run: (len(run.relpath), run.relpath)):
        if not _where_bids_puts_it(run):
            continue  # e.g. sub-01/loop/sub-02/...: a link inside the dataset, not a run of its own
        by_file.setdefault(Path(run.path).resolve(), run)
    kept = list(by_file.values())
    by_label = {}
    for run in kept:
        by_label.setdefault((run.modality, run.label), []).append(run)
    for same in by_label.values():
        if len(same) > 1:
            for run in same:
                others = ", ".join(other.relpath for other in same if other is not run)
                run.problem = run.problem or (f"{run.path}: another file of the dataset has the same name and "
                                              f"entities ({others}): their outputs would overwrite each other")
    return sorted(kept, key=lambda run: run.relpath)


def _where_bids_puts_it(run) -> bool:
    """Whether the run's file lies where BIDS puts a file of its entities: sub-<label>[/ses-<label>]/<datatype>/."""
    entities = run.source.entities
    folders = [f"sub-{entities['subject']}"] + ([f"ses-{entities['session']}"] if entities.get("session") else [])
    parts = Path(run.relpath).parts
    return list(parts[: len(folders)]) == folders and len(parts) == len(folders) + 2


def _series_runs(layout, query, modality, suffix):
    """The magnitude runs a query selects, each with its phase image; a phase image the query selects
    that has no magnitude beside it is a run with a problem (reported, not denoised)."""
    parts = query.pop("part", None)
    wanted_parts = set(parts if isinstance(parts, list) else [parts]) if parts is not None else None
    runs, phases = [], {}
    for bids_file in layout.get(return_type="object", **query):
        part = bids_file.entities.get("part")
        if wanted_parts is not None and part not in wanted_parts and not (part is None and None in wanted_parts):
            continue
        if part == "phase":
            phases[_partner_key(str(Path(bids_file.path).relative_to(layout.root)))] = bids_file
        elif part in (None, "mag"):
            runs.append(_run_of(layout, bids_file, modality, suffix))
    magnitudes = {_partner_key(run.source.relpath) for run in runs if run.source.entities.get("part")}
    for run in runs:
        if run.source.entities.get("part") == "mag":
            phase = phases.get(_partner_key(run.source.relpath))
            if phase is None:  # the filters may have left it out: look for it in the dataset
                found = layout.get(return_type="object", **dict(_entities_of(run.source), part="phase"),
                                   extension=[".nii", ".nii.gz"])
                phase = found[0] if found else None
            run.phase = Path(phase.path) if phase is not None else None
            if phase is not None:
                run.phase_units = phase_units_of_metadata(_metadata(layout, phase.path))
    for key, phase in phases.items():
        if key in magnitudes:
            continue
        found = layout.get(return_type="filename", **dict(_entities_of(Source.from_relpath(
            str(Path(phase.path).relative_to(layout.root)))), part="mag"), extension=[".nii", ".nii.gz"])
        if found:  # its magnitude exists but the filters left it out: not selected either
            continue
        run = _run_of(layout, phase, modality, suffix)
        run.problem = (f"{phase.path}: a phase image without its magnitude (no part-mag image with the same "
                       "entities): a phase image is denoised with its magnitude, never alone")
        runs.append(run)
    return runs


def _entities_of(source):
    """A source's entities as a pybids query (every entity it has)."""
    return {key: value for key, value in source.entities.items() if key not in ("extension",)}


def _partner_key(relpath):
    """A file's entities but its part: the same for a magnitude image and its phase."""
    return tuple(sorted((k, str(v)) for k, v in Source.from_relpath(relpath).entities.items()
                        if k not in ("part", "extension")))


def _run_of(layout, bids_file, modality, suffix):
    path = Path(bids_file.path)
    is_dwi = modality == "dwi"
    return Run(
        path=path,
        bval=_optional(layout.get_bval, str(path)) if is_dwi else None,
        bvec=_optional(layout.get_bvec, str(path)) if is_dwi else None,
        source=Source.from_relpath(str(path.relative_to(layout.root))),
        metadata=_metadata(layout, path),
        modality=modality,
    )


def _optional(getter, path):
    try:
        found = getter(path)
    except Exception:  # pybids raises bare errors when nothing is found
        return None
    return Path(found) if found else None


def _metadata(layout, path):
    try:
        return dict(layout.get_metadata(str(path)))
    except Exception:
        return {}
