"""Helpers for the benchmarks: run a case in a fresh process (``bids_denoise.testing.resources``), print a table."""

from __future__ import annotations

from bids_denoise.testing.resources import measure, measure_best  # noqa: F401  (the benchmarks' helpers)


def table(rows, headers):
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(headers)]
    line = " | ".join(str(h).ljust(w) for h, w in zip(headers, widths))
    print(line)
    print("-|-".join("-" * w for w in widths))
    for row in rows:
        print(" | ".join(str(c).ljust(w) for c, w in zip(row, widths)))
