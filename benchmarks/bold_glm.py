"""BOLD denoising under a user's GLM: ROI t and false positives by distance from activation, null runs.

    python benchmarks/bold_glm.py [--geometries small large folded] [--snrs 15 40] [--seeds 1 2]
                                  [--kinds magnitude complex echoes] [--rows ...] [--scorer nilearn]

Data: :mod:`bids_denoise.testing.bold_glm` — three geometries from two generators (``small`` 25x30x20x200
and ``large`` 40x48x30x150 from ``bold_phantom``; ``folded`` 36x42x26x160 at TR 1.5 s from
``folded_bold_phantom``), each run as a magnitude run, a complex run (with its phase) and a three-echo
run, at tSNR about 15 and 40, seeds 1 and 2, and a null run (no task) per geometry, SNR and seed. Each row
denoises each run (echoes one by one; complex runs with the phase as the app uses it), then nilearn's
``FirstLevelModel`` (AR(1), cosine drift, the run's events) gives the task's t map; |t| > 3.1.

Rows: the noisy input; the 1.5-voxel Gaussian (the reference: the t gain of smoothing); ``mppca`` at the
app's BOLD default (the registry's own run, as the app calls it); the previous BOLD default (centre voxel
of the dwidenoise-rule window, 7x7x7 here, temporal means removed); MP-PCA in ``dwidenoise``'s mode; NORDIC
(``bids_denoise.methods.nordic``, withdrawn from the app: complex runs denoised as complex data, echoes
jointly, as it was run).

Columns per (geometry, kind, tSNR), the mean of the seeds: ROI mean t; t gain over the noisy input;
grey-matter false-positive rates 0-2, 2-5 and beyond 5 voxels from the active region (and, in a table
of their own, per 1-voxel distance bin up to 12: the window's reach); the null run's
false-positive rate over grey matter; and the targets: ``2-5`` FP 2-5 at most 1.5x the noisy input's,
``>5`` FP beyond 5 at most the noisy input's, ``null`` at most the noisy input's, ``gain`` t gain at or
above the Gaussian's. The last table counts the blocks where each row meets each target.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import table  # noqa: E402


def app_mppca(case, **changes):
    from bids_denoise.testing.bold_glm import registered

    return registered(case, "mppca", **changes)


def previous_default(case):
    return app_mppca(case, aggregate="centre", extent=_dwidenoise_extent(case))


def dwidenoise_mode(case):
    return app_mppca(case, aggregate="centre", demean="false", extent=_dwidenoise_extent(case), phase="ignore")


def _dwidenoise_extent(case):
    from bids_denoise.methods.core.windows import default_extent

    return default_extent(case.n_volumes, case.mask.shape)


def nordic_row(case):
    from bids_denoise.methods.nordic import nordic

    if len(case.magnitude) == 1:
        return [nordic(case.magnitude[0], None if case.phase is None else case.phase[0]).denoised]
    return list(nordic(list(case.magnitude), None, joint=True).denoised)


def rows():
    from bids_denoise.testing.bold_glm import gaussian

    return {
        "noisy input": lambda case: list(case.magnitude),
        "1.5-voxel Gaussian": gaussian,
        "mppca (BOLD default)": app_mppca,
        "mppca, previous default (7x7x7 centre)": previous_default,
        "mppca, dwidenoise's mode": dwidenoise_mode,
        "nordic (withdrawn)": nordic_row,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--geometries", nargs="+", default=["small", "large", "folded"])
    parser.add_argument("--snrs", nargs="+", type=float, default=[15.0, 40.0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--kinds", nargs="+", default=["magnitude", "complex", "echoes"])
    parser.add_argument("--rows", nargs="+", help="a subset of the rows (by the start of their names)")
    parser.add_argument("--scorer", choices=("nilearn", "ols"), default="nilearn")
    args = parser.parse_args(argv)
    import torch

    from bids_denoise.testing.bold_glm import make_case, score

    torch.set_num_threads(1)
    chosen = {name: run for name, run in rows().items()
              if not args.rows or any(name.startswith(prefix) for prefix in args.rows) or name in
              ("noisy input", "1.5-voxel Gaussian")}
    results = defaultdict(lambda: defaultdict(list))  # (geometry, kind, snr) -> (row, metric) -> values
    seconds = defaultdict(list)
    profiles = defaultdict(list)  # row -> per task run, FP per 1-voxel distance bin
    for geometry in args.geometries:
        for snr in args.snrs:
            for seed in args.seeds:
                for kind in args.kinds:
                    for null in (False, True):
                        case = make_case(geometry, snr, seed, kind, null)
                        for name, run in chosen.items():
                            start = time.perf_counter()
                            outputs = run(case)
                            seconds[name].append(time.perf_counter() - start)
                            scores = score(outputs, case, scorers=(args.scorer,))[args.scorer]
                            block = results[geometry, kind, snr]
                            if null:
                                block[name, "null"].append(scores["fp_all"])
                            else:
                                for key in ("roi_t", "fp_0-2", "fp_2-5", "fp_>5"):
                                    block[name, key].append(scores[key])
                                profiles[name].append(scores["fp_profile"])
                print(f"done {geometry} tSNR {snr:g} seed {seed}", file=sys.stderr, flush=True)
    met = defaultdict(lambda: defaultdict(int))
    for (geometry, kind, snr), block in results.items():
        mean = {key: float(np.mean(values)) for key, values in block.items()}
        noisy, gauss = "noisy input", "1.5-voxel Gaussian"
        lines = []
        for name in chosen:
            gain = mean[name, "roi_t"] / mean[noisy, "roi_t"]
            checks = {
                "2-5": mean[name, "fp_2-5"] <= 1.5 * mean[noisy, "fp_2-5"],
                ">5": mean[name, "fp_>5"] <= mean[noisy, "fp_>5"],
                "null": mean[name, "null"] <= mean[noisy, "null"],
                "gain": gain >= mean[gauss, "roi_t"] / mean[noisy, "roi_t"] - 1e-9,
            }
            for target, ok in checks.items():
                met[name][target] += ok
            met[name]["all"] += all(checks.values())
            met[name]["blocks"] += 1
            lines.append([name, f"{mean[name, 'roi_t']:.2f}", f"{gain:.2f}",
                          *(f"{100 * mean[name, key]:.2f}" for key in ("fp_0-2", "fp_2-5", "fp_>5", "null")),
                          " ".join(target for target, ok in checks.items() if ok) or "-"])
        print(f"\n{geometry}, {kind}, tSNR {snr:g} ({args.scorer}; FP in % of grey-matter voxels)")
        table(lines, ["row", "ROI t", "t gain", "FP 0-2", "FP 2-5", "FP >5", "null FP", "targets met"])
    bins = [f"({low},{low + 1}]" for low in range(12)]
    print(f"\nFalse positives by distance from the active region (% of grey-matter voxels, 1-voxel bins, mean "
          f"over the task runs; {args.scorer})")
    table([[name, *(f"{100 * value:.2f}" for value in np.nanmean(np.array(profiles[name], dtype=float), axis=0))]
           for name in chosen], ["row", *bins])
    print(f"\nTargets met, blocks of {len(results)} ({args.scorer}); seconds: median per run, one thread")
    table([[name, *(f"{met[name][t]}/{met[name]['blocks']}" for t in ("2-5", ">5", "null", "gain", "all")),
            f"{np.median(seconds[name]):.1f}"] for name in chosen],
          ["row", "FP 2-5", "FP >5", "null", "gain", "all four", "seconds"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
