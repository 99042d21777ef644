"""Denoising quality side by side on the phantom with a known signal (Rician noise, SNR 10 in white matter).

    python benchmarks/quality.py [--shape 32 32 20] [--budget 120] [--threads 2]

For every method: PSNR and SSIM of the DWI volumes against the noise-free signal (inside the brain's
bounding box), the RMSE inside the brain, the mean absolute FA error in white matter (DIPY's tensor
fit on the denoised series against the fit on the noise-free series) and the time taken. The learned
methods train within --budget seconds on this CPU.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def fractional_anisotropy(series, bvals, bvecs, mask):
    from dipy.core.gradients import gradient_table
    from dipy.reconst.dti import TensorModel

    table = gradient_table(bvals, bvecs=bvecs.T, b0_threshold=50)
    return TensorModel(table).fit(np.clip(series, 1e-3, None), mask=mask).fa


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=3, default=[32, 32, 20])
    parser.add_argument("--budget", type=float, default=120.0, help="training seconds per learned method")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from bids_denoise.methods.median import median_denoise
    from bids_denoise.methods.mppca import mppca
    from bids_denoise.methods.networks import psnr, ssim
    from bids_denoise.methods.noise2noise import noise2noise
    from bids_denoise.methods.noise2self import noise2self
    from bids_denoise.methods.patch2self import patch2self
    from bids_denoise.testing.phantom import make_phantom

    # S0 = 1000 in white matter: noise sigma 100 gives SNR 10 there
    phantom = make_phantom(tuple(args.shape), n_b0=5, shells=((1000.0, 30),), noise_sigma=0.1, seed=args.seed)
    signal, noisy, bvals, bvecs, brain = phantom.signal, phantom.noisy, phantom.bvals, phantom.bvecs, phantom.mask
    fa_true = fractional_anisotropy(signal, bvals, bvecs, brain)
    white = brain & (fa_true > 0.3)
    budget = {"max_seconds": args.budget, "epochs": 200, "steps_per_epoch": 25, "batch_size": 16}

    methods = {
        "noisy input": lambda d: d,
        "Patch2Self": lambda d: patch2self(d, bvals),
        "MP-PCA (dwidenoise)": lambda d: mppca(d).denoised,
        "MP-PCA (overcomplete, demean)": lambda d: mppca(d, aggregate="overcomplete", demean=True).denoised,
        "MP-PCA (app default)": lambda d: mppca(d, aggregate="overcomplete", demean=True, shrinkage="frobenius",
                                                noise_floor="koay").denoised,
        "Noise2Noise": lambda d: noise2noise(d, bvals, bvecs, seed=args.seed, **budget).denoised,
        "Noise2Self volume": lambda d: noise2self(d, bvals, context="volume", seed=args.seed, **budget).denoised,
        "Noise2Self series": lambda d: noise2self(d, bvals, context="series", seed=args.seed, **budget).denoised,
        "calibrated median": lambda d: median_denoise(d).denoised,
    }
    print(f"phantom {tuple(args.shape) + (noisy.shape[3],)}, Rician noise, SNR 10 in white matter, "
          f"{args.threads} thread(s), learned methods trained for at most {args.budget:g} s")
    header = f"{'method':32s} {'PSNR dB':>8s} {'SSIM':>6s} {'RMSE':>7s} {'FA err (WM)':>12s} {'seconds':>8s}"
    print(header)
    print("-" * len(header))
    box = tuple(slice(np.min(i), np.max(i) + 1) for i in np.nonzero(brain))
    data_range = float(signal.max())
    for name, method in methods.items():
        start = time.perf_counter()
        out = np.asarray(method(noisy), dtype=np.float32)
        seconds = time.perf_counter() - start
        dwi = bvals > 50
        quality_psnr = psnr(signal[box][..., dwi], out[box][..., dwi], data_range)
        quality_ssim = np.mean([ssim(signal[box][..., v], out[box][..., v], data_range) for v in np.flatnonzero(dwi)])
        rmse = float(np.sqrt(np.mean((out[brain] - signal[brain]) ** 2)))
        fa_error = float(np.mean(np.abs(fractional_anisotropy(out, bvals, bvecs, brain)[white] - fa_true[white])))
        print(f"{name:32s} {quality_psnr:8.2f} {quality_ssim:6.3f} {rmse:7.2f} {fa_error:12.4f} {seconds:8.1f}",
              flush=True)


if __name__ == "__main__":
    main()
