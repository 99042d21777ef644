"""3D anatomical images (T1w, FLAIR): our methods side by side with non-local means, ANTs and BM4D.

    python benchmarks/anatomical.py [--generators mni synthetic] [--contrasts T1w FLAIR] [--snr 5 10 20]
                                    [--seeds 0] [--rows ...] [--threads 1] [--shape 96 112 40]

The peers are not the app's dependencies: run this in the benchmark environment (``make bench-env``,
then ``.venv-bench/bin/python benchmarks/anatomical.py``), where DIPY, antspyx and bm4d are installed.

Phantoms (``bids_denoise.testing.anat_phantom``): a central 96x112x40 block at 1 mm from two generators,
``mni`` (nilearn's MNI152 2009 template: the template itself as T1w, a mixture of its tissue maps as FLAIR)
and ``synthetic`` (a folded cortex built from geometry), each with a spherical white-matter lesion
(radius 3 voxels: -15% of white matter in T1w, +20% in FLAIR) and Rician noise, SNR = mean brain signal /
sigma.

Columns per case: PSNR (dB) and SSIM in the brain against the noise-free image, the lesion's contrast
against the white matter around it and the grey/white edge contrast, each as a fraction of the noise-free
image's (1.00 = kept). Rows: the noisy input; DIPY ``nlmeans`` (3D, Rician);
ANTs ``DenoiseImage`` (antspyx ``denoise_image``, Rician, its own noise estimate); BM4D (``bm4d``
package); the app's methods that take anatomical images, at their defaults through their registrations.
nlmeans and BM4D are given the true sigma (their best case: DIPY's ``estimate_sigma`` overestimated it by
50% on the MNI block, which made BM4D erase the lesion); ours estimate it themselves. ``!`` marks a row whose PSNR is below the input's or whose
lesion contrast kept is below 0.9.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import run_registered, table  # noqa: E402

PEERS = ("noisy", "DIPY nlmeans", "ANTs DenoiseImage", "BM4D")
OURS = ("patchpca", "noise2self", "median")


def denoise(name, phantom, seed):
    noisy = phantom.noisy
    if name == "noisy":
        return noisy
    if name == "DIPY nlmeans":
        from dipy.denoise.nlmeans import nlmeans

        return nlmeans(noisy.astype(np.float64), sigma=phantom.sigma, rician=True)
    if name == "ANTs DenoiseImage":
        import ants

        return ants.denoise_image(ants.from_numpy(noisy), noise_model="Rician").numpy()
    if name == "BM4D":
        import bm4d

        return bm4d.bm4d(noisy.astype(np.float64), sigma_psd=phantom.sigma)
    return run_registered(name, noisy, seed=seed)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--generators", nargs="+", default=["mni", "synthetic"])
    parser.add_argument("--contrasts", nargs="+", default=["T1w", "FLAIR"])
    parser.add_argument("--snr", nargs="+", type=float, default=[5.0, 10.0, 20.0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--rows", nargs="+", help="a subset of the rows (by the start of their names)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--shape", nargs=3, type=int, default=[96, 112, 40])
    args = parser.parse_args(argv)
    import os

    import torch

    from bids_denoise.testing.anat_phantom import anatomical_scores, make_anatomical_phantom

    torch.set_num_threads(args.threads)
    os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", str(args.threads))
    rows = [r for r in PEERS + OURS if not args.rows or any(r.startswith(p) for p in args.rows)]
    for generator in args.generators:
        for contrast in args.contrasts:
            for snr in args.snr:
                for seed in args.seeds:
                    phantom = make_anatomical_phantom(generator, contrast, shape=tuple(args.shape), snr=snr,
                                                      seed=seed)
                    base = anatomical_scores(phantom.noisy, phantom)
                    out_rows = []
                    for name in rows:
                        start = time.perf_counter()
                        scores = anatomical_scores(denoise(name, phantom, seed), phantom)
                        seconds = time.perf_counter() - start
                        harm = name != "noisy" and (scores["psnr"] < base["psnr"] or scores["lesion"] < 0.9)
                        out_rows.append([name, f"{scores['psnr']:.2f}", f"{scores['ssim']:.3f}",
                                         f"{scores['lesion']:.2f}", f"{scores['edge']:.2f}",
                                         f"{seconds:.0f}", "!" if harm else ""])
                    print(f"\n{generator} {contrast}, SNR {snr:g}, seed {seed}, {tuple(args.shape)}:")
                    table(out_rows, ["row", "PSNR dB", "SSIM", "lesion kept", "edge kept", "s", "harm"])
                    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
