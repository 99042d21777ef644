"""The group level: collect what participant runs wrote into OUTPUT_DIR/group.tsv and group.html."""

from __future__ import annotations

import logging

from bids_denoise.cli.errors import EXIT_NOINPUT, EXIT_OK, AppError
from bids_denoise.cli.participant import io_errors

LOGGER = logging.getLogger("bids_denoise")


def run_group(config) -> int:
    """Collect what participant runs wrote: OUTPUT_DIR/group.tsv and group.html."""
    from bids_denoise.io import write_text
    from bids_denoise.outputs import DESCRIPTION, GROUP_FIGURE, GROUP_REPORT, GROUP_TABLE, detect_layout
    from bids_denoise.reports.figures import group_plot
    from bids_denoise.reports.group import collect_rows, render_table
    from bids_denoise.reports.html import render_group_report

    layout = detect_layout(config.execution.output_dir)
    if not layout.path(DESCRIPTION).exists():
        raise AppError(EXIT_NOINPUT, f"{layout.root}: no participant-level outputs found (run 'participant' first)")
    rows = collect_rows(layout)
    if not rows:
        raise AppError(EXIT_NOINPUT, f"{layout.root}: no denoised runs found")
    with io_errors():
        write_text(render_table(rows), layout.path(GROUP_TABLE))
        plotted = [row for row in rows if row["residual_rms"] != ""]
        figure = group_plot(plotted, layout.path(GROUP_FIGURE)) if plotted else None
        write_text(render_group_report(rows, figure.name if figure else None), layout.path(GROUP_REPORT))
    LOGGER.info("group table of %d run(s): %s, %s", len(rows), layout.path(GROUP_TABLE), layout.path(GROUP_REPORT))
    return EXIT_OK
