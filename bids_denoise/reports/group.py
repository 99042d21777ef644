"""The group level: one table and one page over every run and method the participant jobs wrote."""

from __future__ import annotations

import csv
import io
import json

COLUMNS = ("subject", "session", "acquisition", "run", "method", "duration_s", "device",
           "residual_rms", "noise_sigma", "outlier_volumes", "suffix", "file")


def collect_rows(layout) -> list[dict]:
    """One row per main output found under ``layout`` (an OutputLayout)."""
    from bids_denoise.outputs import parse

    rows = []
    for sidecar in layout.main_sidecars():
        payload = json.loads(sidecar.read_text())
        provenance, qc = payload.get("Provenance", {}), payload.get("QC", {})
        entities = parse(sidecar)
        image = payload.get("Image", "").removeprefix("bids::") or layout.relpath(layout.image_of(sidecar))
        rows.append({
            "subject": entities.get("subject", ""),
            "session": entities.get("session", ""),
            "acquisition": entities.get("acquisition", ""),
            "run": str(entities.get("run", "")),
            "method": provenance.get("Method", entities.get("desc", "")),
            "duration_s": provenance.get("DurationSeconds", ""),
            "device": provenance.get("Device", ""),
            "residual_rms": qc.get("ResidualRMS", ""),
            "noise_sigma": qc.get("NoiseSigmaMedian", "n/a"),
            "outlier_volumes": " ".join(str(v) for v in qc.get("OutlierVolumes", [])) or "none",
            "suffix": entities.get("suffix", ""),
            "file": image,
        })
    return rows


def render_table(rows) -> str:
    """The rows as a TSV table."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, delimiter="\t", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()
