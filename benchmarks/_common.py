"""Helpers for the benchmarks: run a case in a fresh process (``bids_denoise.testing.resources``), run a method
through its registration, print a table."""

from __future__ import annotations

from bids_denoise.testing.resources import measure, measure_best  # noqa: F401  (the benchmarks' helpers)


def run_registered(method, data, bvals=None, bvecs=None, values=None, seed=0, members=(), job="run"):
    """``method`` on a series through its registration, as the app runs it (its defaults with ``values``), in a
    throw-away work directory (the learned methods keep their weights there); ``members`` and ``job`` describe
    runs stacked along the volume axis (``"session"``). Returns the output image."""
    import shutil
    import tempfile

    import numpy as np

    from bids_denoise import registry
    from bids_denoise.contract import MethodInputs

    spec = registry.load_all()[method]
    work = tempfile.mkdtemp(prefix=f"{method}_")
    try:
        inputs = MethodInputs(data=data, affine=np.eye(4), bvals=bvals, bvecs=bvecs, seed=seed, work_dir=work,
                              members=tuple(members), job=job)
        return spec.run(inputs, spec.parse(values or {})).image
    finally:
        shutil.rmtree(work, ignore_errors=True)


def table(rows, headers):
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(headers)]
    line = " | ".join(str(h).ljust(w) for h, w in zip(headers, widths))
    print(line)
    print("-|-".join("-" * w for w in widths))
    for row in rows:
        print(" | ".join(str(c).ljust(w) for c, w in zip(row, widths)))
