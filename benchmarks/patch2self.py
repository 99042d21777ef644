"""Patch2Self: bids-denoise vs DIPY, side by side in one run, same arrays, same BLAS threads.

    python benchmarks/patch2self.py [--threads 1] [--quick]

Cases (from the Patch2Self issue):
  * radius 0, float32 (81, 106, 76, 160), 10 b0s, rank-8 signal + noise sigma 5: ours vs DIPY version 3
  * radius 1, (40, 48, 32, 64): ours vs DIPY version 1
Prints time, speed-up, peak memory beyond the input (as a multiple of the input's bytes), the RMSE
of each against the known signal and the RMSE between the two.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import measure, table  # noqa: E402


def synthetic(shape, n_volumes, n_b0, rank=8, sigma=5.0, seed=0):
    rng = np.random.default_rng(seed)
    bvals = np.r_[np.zeros(n_b0), np.full(n_volumes - n_b0, 1000.0)]
    loadings = rng.uniform(0, 1, (rank, n_volumes)).astype(np.float32)
    maps = rng.uniform(0, 60, tuple(shape) + (rank,)).astype(np.float32)
    signal = maps @ loadings
    noisy = (signal + rng.normal(0, sigma, signal.shape)).astype(np.float32)
    return signal, noisy, bvals


def run_case(shape, n_volumes, n_b0, radius, dipy_version, threads):
    def make():
        return synthetic(shape, n_volumes, n_b0)

    def ours(arrays):
        from bids_denoise.methods.patch2self import patch2self

        signal, noisy, bvals = arrays
        out = patch2self(noisy, bvals, patch_radius=radius)
        return out

    def dipy(arrays):
        from dipy.denoise.patch2self import patch2self

        signal, noisy, bvals = arrays
        np.random.seed(0)
        options = {"patch_radius": radius} if dipy_version == 1 else {}  # v3 refuses any radius
        out = patch2self(noisy, bvals, version=dipy_version, shift_intensity=False, verbose=False,
                         **options)
        return out.astype(np.float32)

    signal, noisy, _ = make()
    rows = []
    results = {}
    for name, function in (("bids-denoise", ours), (f"DIPY v{dipy_version}", dipy)):
        seconds, extra, out = measure(function, make, threads)
        results[name] = (seconds, out)
        rows.append([name, f"{seconds:.2f}", f"{extra / noisy.nbytes:.2f}",
                     f"{np.sqrt(np.mean((out - signal) ** 2)):.3f}"])
    ours_s, ours_out = results["bids-denoise"]
    dipy_s, dipy_out = results[f"DIPY v{dipy_version}"]
    rows[0].append(f"{dipy_s / ours_s:.1f}x")
    rows[1].append("1.0x")
    agreement = np.sqrt(np.mean((ours_out - dipy_out) ** 2))
    return rows, agreement, np.sqrt(np.mean((noisy - signal) ** 2))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="smaller arrays (for a fast check)")
    parser.add_argument("--radius", type=int, choices=(0, 1), nargs="+", default=[0, 1],
                        help="which cases to run (default both)")
    args = parser.parse_args()
    cases = [((81, 106, 76), 160, 10, 0, 3), ((40, 48, 32), 64, 4, 1, 1)]
    if args.quick:
        cases = [((40, 53, 38), 160, 10, 0, 3), ((20, 24, 16), 64, 4, 1, 1)]
    cases = [case for case in cases if case[3] in args.radius]
    for shape, n_volumes, n_b0, radius, version in cases:
        print(f"\nPatch2Self radius {radius}, float32 {shape + (n_volumes,)}, {n_b0} b0s, "
              f"{args.threads} BLAS thread(s)")
        rows, agreement, noise = run_case(shape, n_volumes, n_b0, radius, version, args.threads)
        table(rows, ["implementation", "seconds", "peak extra / input", "RMSE to signal", "speed-up"])
        print(f"RMSE between the two: {agreement:.3f} (noise RMSE {noise:.3f})")


if __name__ == "__main__":
    main()
