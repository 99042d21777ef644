"""Denoising quality side by side on the phantom with a known signal (Rician noise, SNR 10 and 20 in white matter).

    python benchmarks/quality.py [--shape 32 32 20] [--budget 120] [--threads 2] [--snr 10 20]

Rows: every DWI denoising method of the app at its app defaults (its registry entry's ``run`` with its
registry defaults; a learned method's ``max_seconds`` set to --budget), then other modes of some
methods. For every row and SNR: PSNR and SSIM of the DWI volumes against the noise-free signal (inside the
brain's bounding box), the RMSE inside the brain, the mean absolute FA and MD errors in white matter
(DIPY's tensor fit on the denoised series against the fit on the noise-free series), whether it
passes the harm check (``bids_denoise.testing.harm.check_no_harm``: every shell's PSNR in the brain
above the noisy input's, FA and MD errors in white matter no worse; "fails" names what is worse)
and the time taken. The learned methods train within --budget seconds on this CPU.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=3, default=[32, 32, 20])
    parser.add_argument("--budget", type=float, default=120.0, help="training seconds per learned method")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--snr", type=float, nargs="+", default=[10.0, 20.0], help="SNR in white matter")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from bids_denoise.testing.phantom import make_phantom

    print(f"phantom {tuple(args.shape) + (35,)}, 5 b0s and 30 directions at b=1000, Rician noise, "
          f"{args.threads} thread(s), learned methods trained for at most {args.budget:g} s")
    for snr in args.snr:
        # S0 = 1000 in white matter: noise sigma 1000 / SNR
        phantom = make_phantom(tuple(args.shape), n_b0=5, shells=((1000.0, 30),), noise_sigma=1.0 / snr,
                               seed=args.seed)
        print(f"\nSNR {snr:g} in white matter")
        compare(phantom, args)


def app_method(spec, phantom, args, **overrides):
    """``spec`` as the app runs it (registry defaults), the training budget capped at --budget."""
    from bids_denoise.contract import MethodInputs

    parameters = spec.defaults()
    if "max_seconds" in parameters:
        parameters["max_seconds"] = args.budget
    parameters.update(overrides)

    def run(data):
        with tempfile.TemporaryDirectory() as work_dir:  # learned methods save their weights there
            inputs = MethodInputs(data=data, affine=phantom.affine, bvals=phantom.bvals, bvecs=phantom.bvecs,
                                  seed=args.seed, work_dir=Path(work_dir))
            return spec.run(inputs, parameters).image

    return run


def compare(phantom, args):
    """One table: every method on one phantom, with the harm check."""
    from bids_denoise.methods.core.networks import psnr, ssim
    from bids_denoise.methods.mppca import mppca
    from bids_denoise.methods.patch2self import DIPY_OPTIONS, patch2self
    from bids_denoise.registry import by_role
    from bids_denoise.testing import harm

    signal, noisy, bvals, brain = phantom.signal, phantom.noisy, phantom.bvals, phantom.mask
    reference = harm.tensor_reference(phantom)
    specs = {name: spec for name, spec in by_role("denoise").items() if "dwi" in spec.modalities}

    methods = {"noisy input": lambda d: d}
    methods.update({f"{spec.title} (app default)": app_method(spec, phantom, args) for spec in specs.values()})
    methods.update({
        "Patch2Self (DIPY options)": lambda d: patch2self(d, bvals, DIPY_OPTIONS),
        "MP-PCA (dwidenoise)": lambda d: mppca(d).denoised,
        "MP-PCA (overcomplete, demean)": lambda d: mppca(d, aggregate="overcomplete", demean=True).denoised,
    })
    if "noise2self" in specs:
        methods["Noise2Self, volume context"] = app_method(specs["noise2self"], phantom, args, context="volume")
    header = (f"{'method':32s} {'PSNR dB':>8s} {'SSIM':>6s} {'RMSE':>7s} {'FA err (WM)':>12s} {'MD err (WM)':>12s} "
              f"{'seconds':>8s}  harm check")
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
        report = harm.harm_report(out, phantom, reference)
        failures = harm.check_no_harm(out, phantom, report)
        verdict = "-" if name == "noisy input" else "pass" if not failures else "fails: " + "; ".join(failures)
        errors = report["output"]
        print(f"{name:32s} {quality_psnr:8.2f} {quality_ssim:6.3f} {rmse:7.2f} {errors['fa']:12.4f} "
              f"{errors['md']:12.3g} {seconds:8.1f}  {verdict}", flush=True)


if __name__ == "__main__":
    main()
