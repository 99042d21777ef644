"""The group level: one table and one page over every run and method participant jobs wrote."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from bids_denoise.io import atomic_path
from bids_denoise.reports.html import denoised_sidecars, write_group_report

COLUMNS = ("subject", "session", "acquisition", "run", "method", "duration_s", "device",
           "residual_rms", "noise_sigma", "outlier_volumes", "suffix", "file")


def collect_rows(output_dir: Path) -> list[dict]:
    rows = []
    for sidecar in denoised_sidecars(output_dir):
        payload = json.loads(sidecar.read_text())
        provenance, qc = payload.get("Provenance", {}), payload.get("QC", {})
        entities = dict(part.split("-", 1) for part in sidecar.name.split("_")[:-1] if "-" in part)
        rows.append({
            "subject": entities.get("sub", ""),
            "session": entities.get("ses", ""),
            "acquisition": entities.get("acq", ""),
            "run": entities.get("run", ""),
            "method": provenance.get("Method", entities.get("desc", "")),
            "duration_s": provenance.get("DurationSeconds", ""),
            "device": provenance.get("Device", ""),
            "residual_rms": qc.get("ResidualRMS", ""),
            "noise_sigma": qc.get("NoiseSigmaMedian", "n/a"),
            "outlier_volumes": " ".join(str(v) for v in qc.get("OutlierVolumes", [])) or "none",
            "suffix": sidecar.stem.rsplit("_", 1)[-1],
            "file": str(sidecar.relative_to(output_dir)).replace(".json", ".nii.gz"),
        })
    return rows


def write_group_outputs(output_dir: Path) -> list[dict]:
    """Write group.tsv, group.html and its figure; return the rows (empty if none)."""
    from bids_denoise.reports.figures import group_plot

    rows = collect_rows(output_dir)
    if not rows:
        return rows
    with atomic_path(output_dir / "group.tsv") as temporary:
        with open(temporary, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=COLUMNS, delimiter="\t", lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
    plot = group_plot([r for r in rows if r["residual_rms"] != ""], output_dir / "group_residuals.png")
    write_group_report(output_dir, rows, plot)
    return rows
