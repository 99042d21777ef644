"""Do the learned methods do harm? PSNR per shell and DTI errors in white matter on the phantom.

    python benchmarks/learned.py [--shape 32 32 20] [--budget 120] [--threads 2] [--only NAME ...]

The phantom of ``benchmarks/quality.py`` (5 b0s, 30 directions at b=1000, Rician noise, SNR 10 in
white matter). For each method: PSNR of every shell inside the brain against the noise-free signal
(peak: the shell's largest signal value), the mean absolute FA and MD errors in white matter (DIPY's
weighted-least-squares tensor fit against the fit on the noise-free signal; white matter: brain
voxels whose true FA is above 0.3) and the seconds taken. Rows: the noisy input, the app's default
MP-PCA, Noise2Self (both contexts), Noise2Noise (its default, which says no without repeated
measurements; nearest-direction pairing; a second run of the same gradient table as the pair
source) and P2S-Net. The learned methods train for at most --budget seconds each.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from bids_denoise.methods.core.shells import cluster_shells


def tensor_fit(series, bvals, bvecs, mask):
    from dipy.core.gradients import gradient_table
    from dipy.reconst.dti import TensorModel

    table = gradient_table(bvals, bvecs=bvecs.T, b0_threshold=50)
    return TensorModel(table).fit(np.clip(series, 1e-3, None), mask=mask)


def shell_psnr(out, signal, bvals, brain):
    shells = cluster_shells(bvals)
    values = []
    for label in np.unique(shells):
        volumes = shells == label
        mse = float(np.mean((out[..., volumes][brain] - signal[..., volumes][brain]) ** 2))
        values.append(10 * np.log10(float(signal[..., volumes].max()) ** 2 / mse))
    return values


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=3, default=[32, 32, 20])
    parser.add_argument("--budget", type=float, default=120.0, help="training seconds per learned method")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--only", nargs="*", help="rows whose name contains one of these words")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from bids_denoise.methods.mppca import mppca
    from bids_denoise.methods.noise2noise import noise2noise
    from bids_denoise.methods.noise2self import noise2self
    from bids_denoise.methods.p2snet import p2snet
    from bids_denoise.testing.phantom import make_phantom

    # S0 = 1000 in white matter: noise sigma 100 gives SNR 10 there
    make = lambda seed: make_phantom(tuple(args.shape), n_b0=5, shells=((1000.0, 30),), noise_sigma=0.1,  # noqa: E731
                                     seed=seed, gradient_seed=args.seed)
    phantom = make(args.seed)
    second_run = make(args.seed + 1000).noisy  # the same gradient table, other noise
    signal, bvals, bvecs, brain = phantom.signal, phantom.bvals, phantom.bvecs, phantom.mask
    truth = tensor_fit(signal, bvals, bvecs, brain)
    white = brain & (truth.fa > 0.3)
    budget = {"max_seconds": args.budget, "epochs": 1000}
    device = args.device
    methods = {
        "noisy input": lambda d: d,
        "MP-PCA (app default)": lambda d: mppca(d, aggregate="overcomplete", demean=True, shrinkage="hard",
                                                noise_floor="koay").denoised,
        "Noise2Self volume": lambda d: noise2self(d, bvals, bvecs, context="volume", seed=args.seed, device=device,
                                                  steps_per_epoch=25, **budget).denoised,
        "Noise2Self series": lambda d: noise2self(d, bvals, bvecs, context="series", seed=args.seed, device=device,
                                                  steps_per_epoch=25, **budget).denoised,
        "Noise2Noise default (repeats)": lambda d: noise2noise(d, bvals, bvecs, seed=args.seed, device=device,
                                                               steps_per_epoch=25, **budget).denoised,
        "Noise2Noise nearest direction": lambda d: noise2noise(d, bvals, bvecs, pairing="nearest", seed=args.seed,
                                                               device=device, steps_per_epoch=25, **budget).denoised,
        "Noise2Noise second run": lambda d: noise2noise(d, bvals, bvecs, repeat=second_run, seed=args.seed,
                                                        device=device, steps_per_epoch=25, **budget).denoised,
        "P2S-Net": lambda d: p2snet(d, bvals, bvecs, seed=args.seed, device=device, **budget).denoised,
    }
    if args.only:
        methods = {name: f for name, f in methods.items()
                   if name == "noisy input" or any(word.lower() in name.lower() for word in args.only)}
    shells = sorted({0.0} | {float(np.round(b, -2)) for b in bvals if b > 50})
    print(f"phantom {tuple(args.shape) + (phantom.noisy.shape[3],)}, Rician noise, SNR 10 in white matter, "
          f"{args.threads} torch thread(s), device {device}, learned methods trained for at most {args.budget:g} s")
    header = (f"{'method':32s} " + " ".join(f"{'PSNR b' + format(b, 'g'):>11s}" for b in shells)
              + f" {'FA err (WM)':>12s} {'MD err (WM)':>12s} {'seconds':>8s}")
    print(header)
    print("-" * len(header))
    for name, method in methods.items():
        start = time.perf_counter()
        out = np.asarray(method(phantom.noisy), dtype=np.float32)
        seconds = time.perf_counter() - start
        fit = tensor_fit(out, bvals, bvecs, brain)
        fa_error = float(np.mean(np.abs(fit.fa - truth.fa)[white]))
        md_error = float(np.mean(np.abs(fit.md - truth.md)[white]))
        values = " ".join(f"{value:11.2f}" for value in shell_psnr(out, signal, bvals, brain))
        print(f"{name:32s} {values} {fa_error:12.4f} {md_error * 1e6:10.1f}e-6 {seconds:8.1f}", flush=True)


if __name__ == "__main__":
    main()
