"""Self-contained HTML reports, assembled from what is on disk in OUTPUT_DIR.

Built from the sidecars and figures the participant runs wrote, so a report is
complete even when runs were processed by separate jobs. No JavaScript: the
figures are PNG files beside the page, referenced by relative links.
"""

from __future__ import annotations

import html
import json

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


DOWNSTREAM = (
    "<h2>Using this dataset downstream</h2>\n<p>The folder two levels up from this page is a raw BIDS dataset: "
    "each denoised run is under its raw name, every other file of the input is carried over. Give it to the "
    "next pipeline as its <code>bids_dir</code>, and turn that pipeline's own thermal denoising off so that "
    "nothing is denoised twice: <code>qsiprep &lt;dataset&gt; &lt;out&gt; participant --denoise-method none</code>; "
    "fMRIPrep does not denoise, so <code>fmriprep &lt;dataset&gt; &lt;out&gt; participant</code> as usual.</p>\n"
)


def render_participant_report(layout, subject: str) -> str:
    """The participant's page, from the sidecars and figures its runs wrote (``layout``: an OutputLayout)."""
    from bids_denoise.outputs import CITATION_MD

    root = layout.root
    sections, summary = [], []
    for number, sidecar in enumerate(layout.main_sidecars(subject)):
        payload = json.loads(sidecar.read_text())
        provenance, qc = payload.get("Provenance", {}), payload.get("QC", {})
        name = layout.image_of(sidecar).name.removesuffix(".nii.gz")
        summary.append(_summary_row(number, name, payload))
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
        history = provenance.get("Details", {}).get("history") or {}
        if history.get("epochs") is not None and history.get("planned"):
            rows.append(("Training", f"{len(history['epochs'])} of {history['planned']} epochs planned"
                                     + (f" ({history['stopped']})" if history.get("stopped") else "")))
        outliers = qc.get("OutlierVolumes", [])
        notes = [f'<p class="flag">Outlier volumes: {outliers}</p>' if outliers else "<p>No outlier volume.</p>"]
        notes += [f'<p class="flag">Warning: {html.escape(str(w))}</p>' for w in payload.get("Warnings", [])]
        files = layout.files_of(sidecar)
        link_list = "".join(
            f'<li><a href="{html.escape(str(path.relative_to(root)))}">{html.escape(path.name)}</a></li>'
            for path in files
        )
        figures = layout.figures_of(sidecar)
        blocks = [
            f'<figure><img src="{html.escape(str(figures[kind].relative_to(root)))}" alt="{html.escape(kind)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>"
            for kind, caption in qc.get("Figures", {}).items() if kind in figures
        ]
        for caption, table_rows in provenance.get("Details", {}).get("tables", {}).items():
            blocks.append(f"<details><summary>{html.escape(caption)}</summary>{_rows_table(table_rows)}</details>")
        evaluation = provenance.get("Evaluation") or {}
        if "r2" in evaluation:
            rows.append(("Held-out prediction (R², leak-free)", f"{evaluation['r2']:.3f} denoised, "
                                                                f"{evaluation['r2_without']:.3f} without denoising "
                                                                f"({evaluation.get('model', '')}, "
                                                                f"{evaluation.get('folds', '')} folds)"))
        sections.append(
            f'<h2 id="run-{number}">{html.escape(name)}</h2>\n{_table(rows)}\n{"".join(notes)}\n{"".join(blocks)}\n'
            f"<details><summary>Files</summary><ul>{link_list}</ul></details>"
        )
    body = "\n".join(sections) or "<p>No denoised run found.</p>"
    if summary:
        body = _summary_table(summary) + "\n" + body
    if layout.kind == "bids":
        body = DOWNSTREAM + body
    if (root / CITATION_MD).exists():
        body += f'\n<h2>Methods and citations</h2>\n<p><a href="{CITATION_MD}">{CITATION_MD}</a></p>'
    return _page(f"bids-denoise: sub-{subject}", body)


def _summary_row(number: int, name: str, payload: dict) -> dict:
    """One run's line of the summary: what ran on it, whether it helped (where scored), how long it took."""
    provenance = payload.get("Provenance", {})
    details = provenance.get("Details", {})
    evaluation = provenance.get("Evaluation") or {}
    if "r2" in evaluation:
        score = f"{evaluation['r2']:.3f} against {evaluation['r2_without']:.3f} without"
        verdict = "helped" if evaluation.get("helps") else "did not help"
    elif "chosen" in details and details.get("scores"):
        best = details["scores"][0] if details["chosen"] == "none" else next(
            (row for row in details["scores"] if row["method"] == details["chosen"]), details["scores"][0])
        score = f"{best['r2']:.3f} against {best['r2_without']:.3f} without"
        verdict = "chose none" if details["chosen"] == "none" else f"chose {details['chosen']}"
    else:
        score, verdict = "not scored (--evaluate)", ""
    fa = (evaluation.get("fa_change") if isinstance(evaluation, dict) else None)
    return {"number": number, "name": name, "method": provenance.get("Method", ""), "score": score,
            "verdict": verdict, "fa": "" if fa is None else f"{fa:+.3f}",
            "seconds": provenance.get("DurationSeconds", ""), "warnings": len(payload.get("Warnings", []))}


def _summary_table(rows) -> str:
    """The page's opening: each run, its method, its held-out score against no denoising, time, warnings."""
    lines = "".join(
        f'<tr><td><a href="#run-{row["number"]}">{html.escape(row["name"])}</a></td><td>{html.escape(str(row["method"]))}'
        f'</td><td>{html.escape(row["score"])}</td><td>{html.escape(row["verdict"])}</td><td>{html.escape(row["fa"])}'
        f'</td><td>{html.escape(str(row["seconds"]))}</td><td>{row["warnings"] or ""}</td></tr>'
        for row in rows)
    return ("<h2>Summary</h2>\n<table><tr><th>Run</th><th>Method</th><th>Held-out prediction R² (leak-free)</th>"
            "<th></th><th>WM FA change</th><th>Seconds</th><th>Warnings</th></tr>" + lines + "</table>")


def _rows_table(rows) -> str:
    header = list(dict.fromkeys(key for row in rows for key in row))  # every row's columns, first seen first
    cells = "<tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in header) + "</tr>"
    for row in rows:
        cells += "<tr>" + "".join(f"<td>{html.escape(str(row.get(h, '')))}</td>" for h in header) + "</tr>"
    return f"<table>{cells}</table>"


def render_group_report(rows, figure_name: str | None) -> str:
    """The group page: the table of every run and method, and the residual figure."""
    figure = ""
    if figure_name is not None:
        figure = (f'<figure><img src="{html.escape(figure_name)}" alt="group"><figcaption>Mean residual RMS of '
                  "each run, per method.</figcaption></figure>")
    subjects = sorted({row["subject"] for row in rows})
    links = "".join(f'<li><a href="sub-{s}.html">sub-{s}</a></li>' for s in subjects)
    return _page("bids-denoise: group summary", f"{figure}\n{_rows_table(rows)}\n<h2>Participants</h2><ul>{links}</ul>")
