"""Few-direction DWI (clinical protocols): where the classical denoisers are weak, side by side with DIPY.

    python benchmarks/few_directions.py [--directions 6 12 20] [--snr 5 10 20] [--seeds 1]
                                        [--generators head multitensor] [--rows ...] [--threads 1]

Phantoms: one b0 and ``--directions`` directions at b=1000 (Rician, S0 = 1000 in white matter, SNR = S0 /
sigma), from two generators: ``head`` (``bids_denoise.testing.phantom.make_phantom``, 40x48x28, one tensor per
voxel bending across an ellipsoidal head) and ``multitensor`` (``bids_denoise.testing.multitensor_phantom``,
DIPY's ``multi_tensor``, 28x32x20: crossing bundles, free water, a folded cortex, a receive bias).

Columns per case: PSNR (dB) of the diffusion-weighted volumes in the brain against the noise-free signal,
and the white-matter FA and MD (10^-3 mm²/s) mean absolute errors of DTI against the fit on the noise-free
signal. Rows: the noisy input; DIPY's ``mppca`` (patch radius 2), ``patch2self`` (OLS, as DIPY's default) and
``nlmeans`` per volume (sigma from ``estimate_sigma``, Rician) as the classical peers; the app's methods at
their defaults through their registrations (``--rows`` picks by name start; the learned methods train at
their defaults, minutes per case on CPU). A row whose PSNR is below the noisy input's or whose FA error is
above it is marked ``!`` (it harmed the run).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import run_registered, table  # noqa: E402

CLASSICAL = ("noisy", "DIPY mppca", "DIPY patch2self", "DIPY nlmeans")
OURS = ("mppca", "patch2self", "median", "noise2self", "p2snet")


def make(generator, directions, snr, seed):
    shells = ((1000.0, int(directions)),)
    if generator == "head":
        from bids_denoise.testing.phantom import make_phantom

        return make_phantom((40, 48, 28), n_b0=1, shells=shells, noise_sigma=1.0 / snr, seed=seed)
    from bids_denoise.testing.multitensor_phantom import make_multitensor_phantom

    return make_multitensor_phantom(n_b0=1, shells=shells, snr=snr, seed=seed)


def denoise(name, phantom, seed):
    data = phantom.noisy.astype(np.float32)
    if name == "noisy":
        return data
    if name == "DIPY mppca":
        from dipy.denoise.localpca import mppca

        return mppca(data.astype(np.float64), patch_radius=2)
    if name == "DIPY patch2self":
        from dipy.denoise.patch2self import patch2self

        return patch2self(data.astype(np.float64), phantom.bvals, model="ols", verbose=False)
    if name == "DIPY nlmeans":
        from dipy.denoise.nlmeans import nlmeans
        from dipy.denoise.noise_estimate import estimate_sigma

        sigma = estimate_sigma(data.astype(np.float64), N=1)
        return nlmeans(data.astype(np.float64), sigma=sigma, mask=phantom.mask, rician=True)
    return run_registered(name, data, phantom.bvals, phantom.bvecs, seed=seed)


#: the real series of ``--real`` (MRtrix3's test data, shared/data/mrtrix3): file stem, the shell to cut
REAL_SERIES = (("msmt_dwi", 1200.0), ("dwi", 3000.0))


def real_cut(folder, stem="msmt_dwi", b_target=1200.0, directions=12):
    """One of MRtrix3's test series cut to one b0 and ``directions`` of its directions at ``b_target``, spread
    (greedy farthest point, antipodes the same): a real few-direction protocol."""
    import nibabel as nib

    data = nib.load(folder / f"{stem}.nii.gz").get_fdata(dtype=np.float32)
    bvals = np.loadtxt(folder / f"{stem}.bval")
    bvecs = np.loadtxt(folder / f"{stem}.bvec")
    shell = np.flatnonzero(np.abs(bvals - b_target) < 100)
    chosen = [int(shell[0])]
    while len(chosen) < directions:
        closeness = np.abs(bvecs[:, shell].T @ bvecs[:, chosen]).max(axis=1)
        chosen.append(int(shell[np.argmin(closeness)]))
    keep = [int(np.flatnonzero(bvals < 50)[0])] + chosen
    return data[..., keep], bvals[keep], bvecs[:, keep]


def real_rows(folder, rows, seed, stem, b_target):
    """The leak-free score (``bids_denoise.evaluate.dwi_score``) of each row on a real cut."""
    from types import SimpleNamespace

    from bids_denoise.evaluate import dwi_score

    data, bvals, bvecs = real_cut(folder, stem, b_target)
    lines = []
    for name in rows:
        if name == "noisy":
            continue

        def run(part, part_bvals, part_bvecs, name=name):
            phantom = SimpleNamespace(noisy=part, bvals=part_bvals, bvecs=part_bvecs, mask=None)
            return denoise(name, phantom, seed)

        start = time.perf_counter()
        try:
            score = dwi_score(run, data, bvals, bvecs, seed=seed)
        except Exception as err:  # noqa: BLE001 - a method that refuses the run is a result too
            lines.append([name, f"refused: {str(err).splitlines()[0][:60]}", "", ""])
            continue
        lines.append([name, f"{score.r2:.4f}", f"{score.r2_without:.4f}", f"{score.rmse / score.rmse_without:.3f}",
                      f"{time.perf_counter() - start:.0f}"])
    print(f"\nMRtrix3's {stem} series cut to 1 b0 + 12 directions at b={b_target:g} ({data.shape}): held-out raw "
          "volumes predicted leak-free (5 folds)")
    table(lines, ["row", "R² denoised", "R² raw", "RMSE ratio", "s"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--directions", nargs="+", type=int, default=[6, 12, 20])
    parser.add_argument("--snr", nargs="+", type=float, default=[5.0, 10.0, 20.0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1])
    parser.add_argument("--generators", nargs="+", default=["head", "multitensor"])
    parser.add_argument("--rows", nargs="+", help="a subset of the rows (by the start of their names)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--real", type=Path, help="a folder with MRtrix3's test series (shared/data/mrtrix3): score "
                                                  "the rows on its msmt_dwi (b=1200) and dwi (b=3000) series, each "
                                                  "cut to 1 b0 + 12 directions, instead")
    args = parser.parse_args(argv)
    import torch

    from bids_denoise.testing.harm import shell_psnr, tensor_errors, tensor_reference

    torch.set_num_threads(args.threads)
    rows = [name for name in CLASSICAL + OURS
            if name == "noisy" or not args.rows or any(name.startswith(prefix) for prefix in args.rows)]
    if args.real:
        for stem, b_target in REAL_SERIES:
            real_rows(args.real, rows, args.seeds[0], stem, b_target)
        return 0
    cases = [(generator, directions, snr, seed) for generator in args.generators for directions in args.directions
             for snr in args.snr for seed in args.seeds]
    results, seconds = {}, {name: [] for name in rows}
    for case in cases:
        generator, directions, snr, seed = case
        phantom = make(*case)
        reference = tensor_reference(phantom)
        for name in rows:
            start = time.perf_counter()
            try:
                out = denoise(name, phantom, seed)
            except Exception as err:  # noqa: BLE001 - a method that refuses the run is a result too
                results[name, case] = f"refused: {str(err).splitlines()[0][:60]}"
                continue
            seconds[name].append(time.perf_counter() - start)
            psnr = float(np.mean([value for b, value in shell_psnr(out, phantom).items() if b > 0]))
            errors = tensor_errors(out, phantom, reference)
            results[name, case] = (psnr, errors["fa"], errors["md"] * 1e3)
            print(f"  {name}: {psnr:.2f} dB, FA error {errors['fa']:.4f}, MD error {errors['md'] * 1e3:.4f} "
                  f"({seconds[name][-1]:.0f} s)", file=sys.stderr, flush=True)
        print(f"done {generator} {directions} directions SNR {snr:g} seed {seed}", file=sys.stderr, flush=True)
    for generator in args.generators:
        for directions in args.directions:
            chosen = [case for case in cases if case[:2] == (generator, directions)]
            lines = []
            for name in rows:
                line = [name]
                for case in chosen:
                    value = results[name, case]
                    if isinstance(value, str):
                        line.append(value)
                        continue
                    noisy = results["noisy", case]
                    harmed = name != "noisy" and (value[0] < noisy[0] or value[1] > noisy[1])
                    line.append(f"{value[0]:.2f} / {value[1]:.4f} / {value[2]:.4f}{' !' if harmed else ''}")
                lines.append(line)
            print(f"\n{generator}, 1 b0 + {directions} directions at b=1000: PSNR dB / WM FA error / WM MD error "
                  "(10^-3 mm²/s); ! harmed the run")
            table(lines, ["row"] + [f"SNR {case[2]:g} seed {case[3]}" for case in chosen])
    print("\nMedian seconds per case, one thread")
    table([[name, f"{np.median(seconds[name]):.1f}" if seconds[name] else "-"] for name in rows], ["row", "seconds"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
