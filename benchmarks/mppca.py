"""MP-PCA: bids-denoise vs DIPY ``mppca``, side by side in one run, same data, same BLAS threads.

    python benchmarks/mppca.py [--threads 1] [--shape 48 56 40] [--volumes 70] [--repeat 1]

Same window (5x5x5, DIPY patch_radius=2) for every row. Rows: DIPY mppca; ours in DIPY's
overcomplete mode (every window position, window mean removed, weights 1/(1+rank)); the same on
grids of windows strided along z (1,1,2) and along every axis (2); ours in dwidenoise's mode (centre
voxel of each voxel's window); ours in the configuration of best quality in
``benchmarks/mppca_quality.py`` (DIPY's mode with Gavish-Donoho shrinkage and the Rician noise floor
removed). RMSE against the phantom's known signal, inside the brain, tells what each buys.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import measure_best, table  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--shape", type=int, nargs=3, default=[40, 48, 32])
    parser.add_argument("--volumes", type=int, default=70)
    parser.add_argument("--repeat", type=int, default=1, help="fresh-process runs per case; the shortest counts")
    args = parser.parse_args()
    shape, n_dirs = tuple(args.shape), args.volumes - 6

    def make():
        from bids_denoise.testing.phantom import make_phantom

        return make_phantom(shape, n_b0=6, shells=((1000.0, n_dirs // 2), (2000.0, n_dirs - n_dirs // 2)),
                            noise_sigma=0.05, seed=1)

    def small():
        from bids_denoise.testing.phantom import make_phantom

        return make_phantom((12, 12, 10), n_b0=6, shells=((1000.0, n_dirs // 2), (2000.0, n_dirs - n_dirs // 2)),
                            noise_sigma=0.05, seed=2)

    def dipy(phantom):
        from dipy.denoise.localpca import mppca

        return mppca(phantom.noisy, patch_radius=2).astype(np.float32)

    def ours(**options):
        def run(phantom):
            from bids_denoise.methods.mppca import mppca

            return mppca(phantom.noisy, extent=5, **options).denoised
        return run

    phantom = make()
    brain = phantom.mask
    print(f"MP-PCA, 5x5x5 window, float32 phantom {shape + (args.volumes,)}, {args.threads} BLAS thread(s)")
    rows, baseline = [], None
    cases = [
        ("DIPY mppca (overcomplete)", dipy),
        ("bids-denoise overcomplete (demean, as DIPY)", ours(aggregate="overcomplete", demean=True)),
        ("bids-denoise overcomplete stride 1,1,2 (demean)",
         ours(aggregate="overcomplete", stride=(1, 1, 2), demean=True)),
        ("bids-denoise overcomplete stride 2 (demean)", ours(aggregate="overcomplete", stride=2, demean=True)),
        ("bids-denoise centre (dwidenoise)", ours()),
        ("bids-denoise overcomplete demean + frobenius + koay (best quality)",
         ours(aggregate="overcomplete", demean=True, shrinkage="frobenius", noise_floor="koay")),
    ]
    outputs = {}
    for name, function in cases:
        seconds, extra, out = measure_best(function, make, args.threads, args.repeat, warmup=small)
        baseline = baseline or seconds
        outputs[name] = out
        error = np.sqrt(np.mean((out[brain] - phantom.signal[brain]) ** 2))
        rows.append([name, f"{seconds:.1f}", f"{baseline / seconds:.1f}x", f"{extra / phantom.noisy.nbytes:.2f}",
                     f"{error:.2f}"])
    table(rows, ["implementation", "seconds", "speed-up vs DIPY", "peak extra / input", "RMSE to signal (brain)"])
    noisy_error = np.sqrt(np.mean((phantom.noisy[brain] - phantom.signal[brain]) ** 2))
    agreement = np.sqrt(np.mean((outputs[cases[0][0]][brain] - outputs[cases[1][0]][brain]) ** 2))
    print(f"noisy RMSE {noisy_error:.2f}; RMSE between DIPY and our overcomplete mode {agreement:.3f}")


if __name__ == "__main__":
    main()
