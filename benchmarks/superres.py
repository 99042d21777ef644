"""WASA super-resolution against interpolation, on an image with a known high-resolution original.

    python benchmarks/superres.py [--scale 2] [--budget 120] [--threads 2]

A T1w-like image of the project's phantom generator (with texture, so there is detail to recover)
is degraded along z the way a thick-slice acquisition is (slice-profile blur and decimation), then
brought back to the original grid by linear and cubic interpolation and by WASA trained on the
degraded image itself. PSNR and SSIM against the original, inside the head's bounding box.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def textured_head(shape=(64, 64, 48), seed=0):
    from scipy.ndimage import gaussian_filter

    from bids_denoise.testing.phantom import make_anatomical

    signal, _, affine = make_anatomical(shape, noise_sigma=0.0, seed=seed)
    rng = np.random.default_rng(seed)
    texture = gaussian_filter(rng.normal(size=shape), 1.2)
    return (signal * (1 + 0.6 * texture / texture.std()) * (signal > 0)).astype(np.float32), affine


def interpolate(low, scale, order):
    """Back to the high-resolution grid along z, on the same voxel centres as WASA's output."""
    from scipy.ndimage import map_coordinates

    n = low.shape[2] * scale
    z = (np.arange(n) + 0.5) / scale - 0.5
    grid = np.meshgrid(np.arange(low.shape[0]), np.arange(low.shape[1]), z, indexing="ij")
    return map_coordinates(low, grid, order=order, mode="nearest")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=int, default=2, choices=(2, 4))
    parser.add_argument("--budget", type=float, default=120.0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from bids_denoise.methods.core.networks import psnr, ssim
    from bids_denoise.methods.superres import degrade, super_resolve

    original, affine = textured_head()
    # the degraded acquisition: each thick slice averages `scale` thin ones (blur + decimate)
    low = degrade(original[None], args.scale, 2)[0]
    box = tuple(slice(np.min(i), np.max(i) + 1) for i in np.nonzero(original > 0))
    data_range = float(original.max())
    print(f"original {original.shape}, degraded {low.shape} (x{args.scale} along z), "
          f"WASA trained at most {args.budget:g} s on {args.threads} thread(s)")
    print(f"{'method':22s} {'PSNR dB':>8s} {'SSIM':>6s} {'seconds':>8s}")
    rows = [("linear interpolation", lambda: interpolate(low, args.scale, 1)),
            ("cubic interpolation", lambda: interpolate(low, args.scale, 3)),
            ("WASA (self-trained)", lambda: super_resolve(low, affine, axis=2, scale=args.scale,
                                                          max_seconds=args.budget, epochs=500)[0].image)]
    for name, run in rows:
        start = time.perf_counter()
        out = run()
        seconds = time.perf_counter() - start
        n = min(out.shape[2], original.shape[2])
        print(f"{name:22s} {psnr(original[box][..., :n], out[box][..., :n], data_range):8.2f} "
              f"{ssim(original[box][..., :n], out[box][..., :n], data_range):6.3f} {seconds:8.1f}", flush=True)


if __name__ == "__main__":
    main()
