"""Which MP-PCA configuration keeps FA: every variant against DIPY's ``mppca`` on phantoms from two generators.

    python benchmarks/dwi_defaults.py [--snr 10 20] [--seeds 1] [--threads 1]

Phantoms (both Rician, S0 = 1000 in white matter, SNR = S0 / sigma):

* ``head``: ``bids_denoise.testing.phantom.make_phantom``, 40x48x28, 6 b0 + 32 b=1000 + 32 b=2000, one tensor per
  voxel bending across an ellipsoidal head;
* ``multitensor``: ``bids_denoise.testing.multitensor_phantom`` (DIPY's ``multi_tensor``), 28x32x20, 5 b0 + 30
  b=1000 + 40 b=2500, crossing bundles (90 and 60 degrees), free water, a folded cortex, a receive bias.

Columns, per phantom and SNR: PSNR (dB) of the diffusion-weighted volumes in the brain (the mean over shells
of each shell's PSNR against the noise-free signal, peak its maximum) and the white-matter FA mean absolute
error of DTI (DIPY ``TensorModel``, b <= 1100) against the fit on the noise-free signal. Rows: the noisy
input; DIPY ``mppca`` (patch radius 2); ours in every combination of shrinkage (frobenius / hard) and noise
floor (koay / none) with the app's other DWI defaults (overcomplete averaging, window demeaning, the default
window); ours in ``dwidenoise``'s mode. A row whose FA error is above DIPY's on a case is marked ``*``.

With ``--real DIR`` (a folder of ``<name>.nii.gz`` + ``.bval`` + ``.bvec`` series, e.g. MRtrix3's test images in
``../shared/data/mrtrix3``), a second table scores every row on each real series without ground truth, by the
app's leak-free score (:func:`bids_denoise.evaluate.dwi_score`, ``--evaluate``): R² of the held-out raw volumes
predicted from the denoised remaining ones (the raw run's own R² in the ``noisy`` row), and the white-matter
FA of DTI before -> after (:func:`bids_denoise.evaluate.fa_change`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import measure, table  # noqa: E402

VARIANTS = {
    "ours: frobenius + koay (the default before)": {"shrinkage": "frobenius", "noise_floor": "koay"},
    "ours: hard + koay (app default)": {"shrinkage": "hard", "noise_floor": "koay"},
    "ours: frobenius, no floor removal": {"shrinkage": "frobenius", "noise_floor": "none"},
    "ours: hard, no floor removal": {"shrinkage": "hard", "noise_floor": "none"},
}


def make(generator, snr, seed):
    if generator == "head":
        from bids_denoise.testing.phantom import make_phantom

        return make_phantom((40, 48, 28), n_b0=6, shells=((1000.0, 32), (2000.0, 32)), noise_sigma=1.0 / snr,
                            seed=seed)
    from bids_denoise.testing.multitensor_phantom import make_multitensor_phantom

    return make_multitensor_phantom(snr=snr, seed=seed)


def scores(out, phantom, reference):
    from bids_denoise.testing.harm import shell_psnr, tensor_errors

    psnr = shell_psnr(out, phantom)
    dwi = [value for b, value in psnr.items() if b > 0]
    return float(np.mean(dwi)), tensor_errors(out, phantom, reference)["fa"]


def run_case(name, options, generator, snr, seed):
    def run(_):
        phantom = make(generator, snr, seed)
        from bids_denoise.testing.harm import tensor_reference

        reference = tensor_reference(phantom)
        if name == "noisy":
            out = phantom.noisy
        elif name == "DIPY mppca":
            from dipy.denoise.localpca import mppca as dipy_mppca

            out = dipy_mppca(phantom.noisy.astype(np.float64), patch_radius=2)
        else:
            from bids_denoise.methods.mppca import mppca

            out = mppca(phantom.noisy, **options).denoised
        return scores(out, phantom, reference)

    return run


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--snr", nargs="+", type=float, default=[10.0, 20.0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--real", type=Path, help="a folder of real DWI series to score leak-free")
    args = parser.parse_args(argv)
    app = {"aggregate": "overcomplete", "demean": True}
    rows = {"noisy": None, "DIPY mppca": None}
    rows.update({name: dict(app, **options) for name, options in VARIANTS.items()})
    rows["ours: dwidenoise's mode"] = {}
    cases = [(generator, snr, seed) for generator in ("head", "multitensor") for snr in args.snr for seed in args.seeds]
    results = {}
    for name, options in rows.items():
        for case in cases:
            _, _, results[name, case] = measure(run_case(name, options, *case), lambda: None, threads=args.threads)
        print(f"done {name}", file=sys.stderr, flush=True)
    lines = []
    for name in rows:
        line = [name]
        for case in cases:
            psnr, fa = results[name, case]
            worse = name not in ("noisy", "DIPY mppca") and fa > results["DIPY mppca", case][1]
            line.append(f"{psnr:.2f} / {fa:.4f}{' *' if worse else ''}")
        lines.append(line)
    print("PSNR (dB, diffusion-weighted) / white-matter FA error; * FA error above DIPY mppca's")
    table(lines, ["row"] + [f"{generator} SNR {snr:g} seed {seed}" for generator, snr, seed in cases])
    if args.real:
        real_table(rows, args.real)
    return 0


def denoiser(name, options):
    if name == "noisy":
        return lambda data, bvals, bvecs: data
    if name == "DIPY mppca":
        from dipy.denoise.localpca import mppca as dipy_mppca

        return lambda data, bvals, bvecs: dipy_mppca(data.astype(np.float64), patch_radius=2)
    from bids_denoise.methods.mppca import mppca

    return lambda data, bvals, bvecs: mppca(data, bvals=bvals, **options).denoised


def real_table(rows, folder):
    import nibabel as nib

    from bids_denoise.evaluate import dwi_score, fa_change

    series = sorted(folder.glob("*.nii.gz"))
    series = [path for path in series if path.with_name(path.name[:-7] + ".bval").exists()]
    lines = []
    for name, options in rows.items():
        line = [name]
        for path in series:
            stem = path.with_name(path.name[:-7])
            data = nib.load(path).get_fdata(dtype=np.float32)
            bvals, bvecs = np.loadtxt(f"{stem}.bval"), np.loadtxt(f"{stem}.bvec")
            denoise = denoiser(name, options)
            score = dwi_score(denoise, data, bvals, bvecs, seed=0)
            fa = fa_change(data, denoise(data, bvals, bvecs), bvals, bvecs)
            fa_text = "n/a" if fa["fa_raw"] is None else f"{fa['fa_raw']:.3f} -> {fa['fa_denoised']:.3f}"
            r2 = score.r2_without if name == "noisy" else score.r2
            line.append(f"{r2:.4f}{'' if name == 'noisy' or score.helps else ' x'} / {fa_text}")
        lines.append(line)
        print(f"done {name} (real)", file=sys.stderr, flush=True)
    print("\nReal series, leak-free: held-out R² (x: not better than the raw run) / white-matter FA before -> after")
    table(lines, ["row"] + [path.name[:-7] for path in series])


if __name__ == "__main__":
    sys.exit(main())
