"""A session with two repeated DWI runs: Noise2Noise on true pairs across the runs, side by side with MP-PCA.

    python benchmarks/repeated_runs.py [--directions 12 30] [--snr 5 10] [--seeds 1]
                                       [--generators head multitensor] [--rows ...] [--threads 1]

Data: two runs of one protocol (one b0 and ``--directions`` directions at b=1000, the same gradient table),
the same noise-free signal and independent Rician noise (SNR = S0 / sigma, S0 = 1000), from two generators:
the head phantom (``testing/phantom.py``, 40x48x28) and DIPY's multi-tensor simulation
(``testing/multitensor_phantom.py``, 28x32x20, crossing fibres). Scores of the first run: PSNR (dB) of the
diffusion-weighted volumes in the brain, white-matter FA and MD (10^-3 mm²/s) errors of DTI against the fit
on the noise-free signal.

Rows: the noisy run; the mean of the two runs (not a denoiser of each run, the classical use of a repeat,
for reference); DIPY's ``mppca`` on the run (patch radius 2); our ``mppca`` at its default on the run, and
with ``--mppca-noise-scope joint`` (the session's runs stacked, one decomposition over twice the volumes);
``noise2noise`` at its defaults with ``--noise2noise-scope run`` (pairs within the run: the
b0 has no partner here, so it has nothing to train on) and ``session`` (each volume paired with its
repeat in the other run), both through their registrations as the app runs them.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import run_registered, table  # noqa: E402
from few_directions import make as few_direction_phantom  # noqa: E402

ROWS = ("noisy", "mean of the two runs", "DIPY mppca", "mppca", "mppca joint", "noise2noise run",
        "noise2noise session")


def make(generator, directions, snr, seed):
    """The first run (a Phantom) and the second run's noisy series (same signal, independent noise)."""
    phantom = few_direction_phantom(generator, directions, snr, seed)  # the few-direction benchmark's phantoms
    sigma = 1000.0 / snr
    rng = np.random.default_rng([seed, 2])
    signal = phantom.signal.astype(np.float64)
    second = np.sqrt((signal + rng.normal(0, sigma, signal.shape)) ** 2 + rng.normal(0, sigma, signal.shape) ** 2)
    return phantom, second.astype(np.float32)


def denoise(name, phantom, second, seed):
    first = phantom.noisy.astype(np.float32)
    n = first.shape[3]
    if name == "noisy":
        return first
    if name == "mean of the two runs":
        return (first + second) / 2
    if name == "DIPY mppca":
        from dipy.denoise.localpca import mppca

        return mppca(first.astype(np.float64), patch_radius=2)
    if name == "mppca":
        return run_registered("mppca", first, phantom.bvals, phantom.bvecs, seed=seed)
    both = np.concatenate([first, second], axis=3)
    bvals, bvecs = np.concatenate([phantom.bvals] * 2), np.concatenate([phantom.bvecs] * 2, axis=1)
    if name == "mppca joint":
        return run_registered("mppca", both, bvals, bvecs, values={"noise_scope": "joint"}, seed=seed,
                              members=(n, n), job="session")[..., :n]
    if name == "noise2noise run":
        return run_registered("noise2noise", first, phantom.bvals, phantom.bvecs, seed=seed)
    if name == "noise2noise session":
        return run_registered("noise2noise", both, bvals, bvecs, values={"scope": "session"}, seed=seed,
                              members=(n, n), job="session")[..., :n]
    raise ValueError(name)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--directions", nargs="+", type=int, default=[12, 30])
    parser.add_argument("--snr", nargs="+", type=float, default=[5.0, 10.0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1])
    parser.add_argument("--generators", nargs="+", default=["head", "multitensor"])
    parser.add_argument("--rows", nargs="+", help="a subset of the rows (by the start of their names)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    import torch

    from bids_denoise.testing.harm import shell_psnr, tensor_errors, tensor_reference

    torch.set_num_threads(args.threads)
    rows = [name for name in ROWS if name == "noisy" or not args.rows or any(name.startswith(p) for p in args.rows)]
    for generator in args.generators:
        for directions in args.directions:
            lines = []
            cases = [(snr, seed) for snr in args.snr for seed in args.seeds]
            results = {}
            for snr, seed in cases:
                phantom, second = make(generator, directions, snr, seed)
                reference = tensor_reference(phantom)
                for name in rows:
                    start = time.perf_counter()
                    out = denoise(name, phantom, second, seed)
                    psnr = float(np.mean([v for b, v in shell_psnr(out, phantom).items() if b > 0]))
                    errors = tensor_errors(out, phantom, reference)
                    results[name, snr, seed] = (psnr, errors["fa"], errors["md"] * 1e3, time.perf_counter() - start)
                    print(f"  {generator} {directions} SNR {snr:g}: {name} {psnr:.2f} dB, FA {errors['fa']:.4f} "
                          f"({results[name, snr, seed][3]:.0f} s)", file=sys.stderr, flush=True)
            for name in rows:
                line = [name]
                for snr, seed in cases:
                    value, noisy = results[name, snr, seed], results["noisy", snr, seed]
                    harmed = name != "noisy" and (value[0] < noisy[0] or value[1] > noisy[1])
                    line.append(f"{value[0]:.2f} / {value[1]:.4f} / {value[2]:.4f}{' !' if harmed else ''} "
                                f"({value[3]:.0f} s)")
                lines.append(line)
            print(f"\n{generator}, two runs of 1 b0 + {directions} directions at b=1000: the first run's PSNR dB / "
                  "WM FA error / WM MD error (10^-3 mm²/s) (seconds); ! harmed the run")
            table(lines, ["row"] + [f"SNR {snr:g} seed {seed}" for snr, seed in cases])
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
