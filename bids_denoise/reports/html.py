"""Self-contained HTML reports, assembled from what is on disk in OUTPUT_DIR.

Built from the sidecars and figures the participant runs wrote, so a report is
complete even when runs were processed by separate jobs. No JavaScript: the
figures are PNG files beside the page, referenced by relative links.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from bids_denoise.io import write_text

STYLE = """
body { font-family: sans-serif; margin: 2em auto; max-width: 960px; color: #222; }
h1 { border-bottom: 2px solid #444; } h2 { margin-top: 2em; border-bottom: 1px solid #aaa; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.9em; }
td, th { border: 1px solid #ccc; padding: 2px 8px; text-align: left; vertical-align: top; }
figure { margin: 1em 0; } figcaption { font-size: 0.85em; color: #555; }
img { max-width: 100%; } .flag { color: #b00; font-weight: bold; }
"""


def _page(title, body):
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{STYLE}</style></head>\n"
            f"<body>\n<h1>{html.escape(title)}</h1>\n{body}\n</body></html>\n")


def _table(rows):
    cells = "".join(
        f"<tr><th>{html.escape(str(key))}</th><td>{html.escape(str(value))}</td></tr>" for key, value in rows
    )
    return f"<table>{cells}</table>"


CAPTIONS = {
    "mosaic": "Input, denoised and residual (input - output) of a b0 and one volume per shell. "
              "Structure in the residual means anatomy was removed.",
    "residualmap": "Residual RMS over volumes, per voxel.",
    "volumes": "Residual RMS of each volume inside the brain; red circles mark outliers within their shell.",
    "noisemap": "Estimated noise standard deviation per voxel.",
    "rankmap": "Number of signal components kept per voxel.",
    "training": "Training and held-out validation loss per epoch.",
    "calibration": "Self-supervised (J-invariant) loss of each candidate parameter; the least is chosen.",
    "superres": "Input and super-resolved output: central crops of the same region in three orientations.",
}


IMAGE_SUFFIXES = ("dwi", "T1w", "T2w")


def denoised_sidecars(output_dir: Path, subject: str | None = None):
    """Sidecars of the main outputs (denoised or super-resolved images), not of maps."""
    pattern = f"sub-{subject}/**/*_desc-*.json" if subject else "sub-*/**/*_desc-*.json"
    return sorted(p for p in output_dir.glob(pattern) if p.stem.rsplit("_", 1)[-1] in IMAGE_SUFFIXES)


def write_participant_report(output_dir: Path, subject: str) -> Path:
    """Write OUTPUT_DIR/sub-<subject>.html from the subject's sidecars and figures."""
    output_dir = Path(output_dir)
    sections = []
    for sidecar in denoised_sidecars(output_dir, subject):
        payload = json.loads(sidecar.read_text())
        provenance = payload.get("Provenance", {})
        qc = payload.get("QC", {})
        stem = sidecar.stem.rsplit("_", 1)[0]
        image = sidecar.with_name(sidecar.name.replace(".json", ".nii.gz"))
        rows = [
            ("Method", provenance.get("Method")),
            ("Parameters", json.dumps(provenance.get("Parameters", {}), sort_keys=True)),
            ("Device", provenance.get("Device")),
            ("Seed", provenance.get("Seed")),
            ("Duration (s)", provenance.get("DurationSeconds")),
            ("Mean residual RMS", qc.get("ResidualRMS")),
        ]
        if "NoiseSigmaMedian" in qc:
            rows.append(("Median noise sigma (brain)", qc["NoiseSigmaMedian"]))
        outliers = qc.get("OutlierVolumes", [])
        flag = f'<p class="flag">Outlier volumes: {outliers}</p>' if outliers else "<p>No outlier volume.</p>"
        links = [image] + sorted(image.parent.glob(f"{stem}_*")) if image.exists() else []
        link_list = "".join(
            f'<li><a href="{html.escape(str(path.relative_to(output_dir)))}">{html.escape(path.name)}</a></li>'
            for path in dict.fromkeys(links) if path != sidecar
        )
        figures = []
        for kind, caption in CAPTIONS.items():
            figure = output_dir / f"sub-{subject}" / "figures" / f"{stem}_{kind}.png"
            if figure.exists():
                figures.append(
                    f'<figure><img src="{html.escape(str(figure.relative_to(output_dir)))}" alt="{kind}">'
                    f"<figcaption>{html.escape(caption)}</figcaption></figure>"
                )
        pairs = provenance.get("Details", {}).get("pairs")
        if pairs:
            cells = "".join(f"<tr><td>{p['volume']}</td><td>{p['partner']}</td><td>{p['angle_deg']:.1f}</td></tr>"
                            for p in pairs)
            figures.append("<details><summary>Volume pairs used for training</summary><table><tr><th>volume</th>"
                           f"<th>partner</th><th>angle (deg)</th></tr>{cells}</table></details>")
        sections.append(
            f"<h2>{html.escape(stem)}</h2>\n{_table(rows)}\n{flag}\n{''.join(figures)}\n"
            f"<details><summary>Files</summary><ul>{link_list}</ul></details>"
        )
    body = "\n".join(sections) or "<p>No denoised run found.</p>"
    citation = output_dir / "logs" / "CITATION.md"
    if citation.exists():
        body += f'\n<h2>Methods and citations</h2>\n<p><a href="logs/CITATION.md">logs/CITATION.md</a></p>'
    return write_text(_page(f"bids-denoise: sub-{subject}", body), output_dir / f"sub-{subject}.html")


def write_group_report(output_dir: Path, rows, plot: Path | None) -> Path:
    header = list(rows[0]) if rows else []
    table = "<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"
    for row in rows:
        table += "<tr>" + "".join(f"<td>{html.escape(str(row[h]))}</td>" for h in header) + "</tr>"
    table += "</table>"
    figure = ""
    if plot is not None:
        figure = f'<figure><img src="{html.escape(plot.name)}" alt="group"><figcaption>Mean residual RMS of each ' \
                 f"run, per method.</figcaption></figure>"
    subjects = sorted({row["subject"] for row in rows})
    links = "".join(f'<li><a href="sub-{s}.html">sub-{s}</a></li>' for s in subjects)
    body = f"{figure}\n{table}\n<h2>Participants</h2><ul>{links}</ul>"
    return write_text(_page("bids-denoise: group summary", body), output_dir / "group.html")
