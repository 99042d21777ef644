"""Where Patch2Self's FA bias comes from: each step of the app's default, alone and together.

    python benchmarks/patch2self_bias.py [--shape 32 32 20] [--directions 30] [--threads 1] [--seed 0]

On the brain-like phantom (b0s and two shells, b=1000 and 2000, Rician noise at SNR 10 and 20 in
white matter), for every variant: PSNR of each shell against the noise-free signal (brain), the mean
absolute FA and MD errors in white matter (DTI on b <= 1100 against the fit on the noise-free
signal), whether it passes the harm check (``bids_denoise.testing.harm.check_no_harm``: every
shell's PSNR above the noisy input's, FA and MD errors no worse) and the seconds taken. Rows: the
noisy input, MP-PCA at the app's default, DIPY's own Patch2Self (if DIPY and scikit-learn are
installed), then ours from DIPY's options step by step to the app's default.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import time

import numpy as np
import torch


def variants(bvals, n_fit_voxels, noise_sigma, seed):
    from bids_denoise.methods.mppca import mppca
    from bids_denoise.methods.patch2self import DIPY_OPTIONS, LOW_BIAS_OPTIONS, patch2self

    def ours(options, **changes):
        return lambda data: patch2self(data, bvals, options, **changes)

    dipy_mode = DIPY_OPTIONS
    rows = {
        "noisy input": lambda data: data,
        "MP-PCA (app default)": lambda data: mppca(data, aggregate="overcomplete", demean=True, shrinkage="hard",
                                                   noise_floor="koay").denoised,
    }
    try:
        import sklearn  # noqa: F401  (DIPY's Patch2Self needs it)
        from dipy.denoise.patch2self import patch2self as dipy_patch2self

        def dipy_v3(data):
            np.random.seed(seed)
            with contextlib.redirect_stderr(io.StringIO()):  # its progress bar
                return dipy_patch2self(data, bvals, version=3, shift_intensity=False, verbose=False)

        rows["DIPY patch2self v3"] = dipy_v3
    except ImportError:
        pass
    rows.update({
        "ours, DIPY options (b0_dwi)": ours(dipy_mode),
        "  grouping shell": ours(dipy_mode, grouping="shell"),
        "  ridge, alpha = N sigma^2": ours(dipy_mode, model="ridge", alpha=n_fit_voxels * noise_sigma**2),
        "  patch radius 1": ours(dipy_mode, patch_radius=1),
        "  fit mask auto": ours(dipy_mode, fit_mask="auto"),
        "  grouping all": ours(dipy_mode, grouping="all"),
        "  tiles (auto)": ours(dipy_mode, tile="auto"),
        "  blend volume": ours(dipy_mode, blend="volume"),
        "  noise floor koay": ours(dipy_mode, noise_floor="koay"),
        "mask + all": ours(dipy_mode, fit_mask="auto", grouping="all"),
        "mask + all + tiles": ours(dipy_mode, fit_mask="auto", grouping="all", tile="auto"),
        "mask + all + blend + koay (no tiles)": ours(LOW_BIAS_OPTIONS, tile=None),
        "mask + all + tiles + blend": ours(LOW_BIAS_OPTIONS, noise_floor="none"),
        "mask + b0_dwi + tiles + blend + koay": ours(LOW_BIAS_OPTIONS, grouping="b0_dwi"),
        "mask + all + tiles + blend + koay (app)": ours(LOW_BIAS_OPTIONS),
        "no tiles, patch radius 1": ours(LOW_BIAS_OPTIONS, tile=None, patch_radius=1),
    })
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=3, default=[32, 32, 20])
    parser.add_argument("--directions", type=int, default=30, help="directions per shell")
    parser.add_argument("--shells", type=float, nargs="+", default=[1000.0, 2000.0], help="b-values of the shells")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.disable(logging.WARNING)  # the small-group warnings of the shell grouping

    from bids_denoise.testing import harm
    from bids_denoise.testing.phantom import make_phantom

    shells = tuple((bvalue, args.directions) for bvalue in args.shells)
    print(f"phantom {tuple(args.shape)}, 5 b0s, {args.directions} directions at b="
          f"{' and '.join(f'{b:g}' for b in args.shells)}, Rician noise, seed {args.seed}, {args.threads} thread(s); "
          "PSNR in the brain, errors in white matter")
    psnr_columns = " | ".join(f"PSNR b{b:g}" for b in [0.0, *args.shells])
    print(f"| SNR | variant | {psnr_columns} | FA error | MD error (1e-6 mm²/s) | harm check | seconds |")
    print("|---|---|" + "---|" * (len(args.shells) + 1) + "---|---|---|---|")
    for snr in (10, 20):
        # S0 = 1000 in white matter: noise sigma 1000 / SNR
        phantom = make_phantom(tuple(args.shape), n_b0=5, shells=shells, noise_sigma=1.0 / snr, seed=args.seed)
        reference = harm.tensor_reference(phantom)
        rows = variants(phantom.bvals, int(phantom.mask.sum()), 1000.0 / snr, args.seed)
        for name, denoise in rows.items():
            start = time.perf_counter()
            out = np.asarray(denoise(phantom.noisy), dtype=np.float32)
            seconds = time.perf_counter() - start
            report = harm.harm_report(out, phantom, reference)
            failures = harm.check_no_harm(out, phantom, report)
            result = report["output"]
            verdict = "—" if name == "noisy input" else ("pass" if not failures else
                                                          "fails: " + ", ".join(f.split(" ")[0] for f in failures))
            psnr = " | ".join(f"{value:.2f}" for _, value in sorted(result["psnr"].items()))
            print(f"| {snr} | {name.strip()} | {psnr} | {result['fa']:.4f} | {result['md'] * 1e6:.1f} | {verdict} "
                  f"| {seconds:.2f} |", flush=True)


if __name__ == "__main__":
    main()
