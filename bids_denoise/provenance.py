"""What bids-denoise says about what it did: dataset descriptions, software versions, provenance records.

The derivatives dataset's ``dataset_description.json`` (and the raw layout's), the versions of the
software that shaped an output, the container it ran in, and the BEP028-style (draft) provenance
record of each run and method. Selection of the input is :mod:`bids_denoise.bids`; paths are
:mod:`bids_denoise.outputs`.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

from bids_denoise import __version__

CODE_URL = "https://github.com/bids-denoise/bids-denoise"
BIDS_VERSION = "1.10.0"


def generated_by(**extra) -> dict:
    """This software's ``GeneratedBy`` entry (with the container where it runs in one)."""
    entry = {"Name": "bids-denoise", "Version": __version__, "CodeURL": CODE_URL, **extra}
    container = container_info()
    if container:
        entry["Container"] = container
    return entry


def _source(bids_dir: Path, root: Path, raw: dict) -> dict:
    """The input dataset as a ``SourceDatasets`` entry: its path relative to ``root`` (a relative URL, valid
    wherever the two are moved or mounted together; never a host path) and its DOI where it has one."""
    source = {"URL": os.path.relpath(Path(bids_dir).resolve(), Path(root).resolve())}
    if raw.get("DatasetDOI"):
        source["DOI"] = raw["DatasetDOI"]
    return source


def _read_description(bids_dir: Path) -> dict:
    try:
        content = json.loads((Path(bids_dir) / "dataset_description.json").read_text())
    except (OSError, ValueError):
        return {}
    return content if isinstance(content, dict) else {}


def dataset_description(bids_dir: Path, root: Path) -> dict:
    """The description of the derivatives dataset at ``root``."""
    raw = _read_description(bids_dir)
    source = _source(bids_dir, root, raw)
    return {
        "Name": f"bids-denoise derivatives of {raw.get('Name', Path(bids_dir).name)}",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": [generated_by()],
        "SourceDatasets": [source],
        "DatasetLinks": {"raw": source["URL"]},
    }


def raw_dataset_description(bids_dir: Path, root: Path) -> dict:
    """The source's description for the denoised raw dataset at ``root``: its name and fields kept, bids-denoise
    added to ``GeneratedBy`` (after the source's own entries) and the source in ``SourceDatasets``."""
    raw = _read_description(bids_dir)
    ours = generated_by(Description="thermal noise removed from the runs recorded in derivatives/bids-denoise "
                                    "(each run's record, provenance and figures); the other files carried over as "
                                    "they were")
    source = _source(bids_dir, root, raw)
    description = dict(raw)
    description.setdefault("Name", Path(bids_dir).name)
    description.setdefault("BIDSVersion", BIDS_VERSION)
    description["DatasetType"] = "raw"
    description["GeneratedBy"] = [entry for entry in raw.get("GeneratedBy", []) if entry.get("Name") != "bids-denoise"]
    description["GeneratedBy"].append(ours)
    description["SourceDatasets"] = [entry for entry in raw.get("SourceDatasets", []) if entry != source] + [source]
    return description


def container_info() -> dict | None:
    """Describe the container we run in, if any (set by the Dockerfile / Singularity.def)."""
    kind = os.environ.get("BIDS_DENOISE_CONTAINER")
    if not kind:
        if Path("/.dockerenv").exists():
            kind = "docker"
        elif os.environ.get("APPTAINER_CONTAINER") or os.environ.get("SINGULARITY_CONTAINER"):
            kind = "singularity"
    if not kind:
        return None
    info = {"Type": kind}
    tag = os.environ.get("BIDS_DENOISE_IMAGE")
    if tag:
        info["Tag"] = tag
    return info


def software_versions() -> dict:
    """Versions of everything that shaped an output, for provenance."""
    import importlib.metadata as metadata

    versions = {"bids-denoise": __version__, "python": platform.python_version()}
    for package in ("numpy", "scipy", "torch", "nibabel", "nipype", "pybids", "dipy", "scikit-learn"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def provenance_record(run, method: str, outputs: list, provenance: dict) -> dict:
    """A BEP028-style (draft) provenance record for one run (an :class:`bids_denoise.outputs.Source`) and
    method, as JSON-LD."""
    activity_id = f"urn:bids-denoise:{run.label}:{method}"
    software_id = f"urn:bids-denoise:software:{__version__}"
    return {
        "@context": "https://purl.org/nidash/bidsprov/context.json",
        "Records": {
            "Software": [
                {"@id": software_id, "@type": "prov:SoftwareAgent", "Label": "bids-denoise",
                 "Version": __version__, "AltIdentifier": CODE_URL}
            ],
            "Activities": [
                {
                    "@id": activity_id,
                    "Label": method,
                    "Command": provenance.get("CommandLine"),
                    "AssociatedWith": software_id,
                    "Used": [run.uri],
                    "StartedAtTime": provenance.get("StartTime"),
                    "EndedAtTime": provenance.get("EndTime"),
                    "Parameters": provenance.get("Parameters"),
                }
            ],
            "Entities": [
                {"@id": run.uri, "Label": Path(run.relpath).name,
                 "Digest": {"sha256": provenance.get("InputDigests", {}).get(Path(run.relpath).name)}}
            ]
            + [
                {"@id": f"bids::{relpath}", "Label": Path(relpath).name,
                 "GeneratedBy": activity_id, "Digest": {"sha256": digest}}
                for relpath, digest in outputs
            ],
        },
    }
