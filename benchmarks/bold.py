"""BOLD fMRI denoising: NORDIC (magnitude, complex, multi-echo), MP-PCA, Gaussian smoothing and the
noisy series side by side in one run, on the phantom of ``bids_denoise.testing.bold_phantom``.

    python benchmarks/bold.py [--threads 1] [--shape 24 24 12] [--volumes 80]

Two noise levels (SNR = tSNR of the noisy series about 15 and 40), single echo (TE 30 ms) and three
echoes (14, 35, 56 ms; metrics averaged over echoes). Columns:

* RMSE to the noise-free series, inside the brain;
* median t, t gain: median OLS t-value of the task regressor (with an intercept; physiology not modelled)
  in the active region, and its ratio to the noisy series' (noise-free series: the ceiling);
* TPR: share of active voxels with |t| > 3.1; FPR: share of brain voxels farther than 2 voxels
  from the active region with |t| > 3.1;
* leak: how much of a voxel's noise reaches its neighbours: the regression coefficient of a face
  neighbour's output error (output - truth) on the voxel's own noise (noisy - truth), over time,
  divided by the voxel's own coefficient, averaged over the brain (0 for a voxel-wise method; the
  ratio of the kernel's weights, 0.29, for the 1.5-voxel Gaussian); leak 2: the same two voxels away
  (0.01 for the Gaussian; a window method spreads noise over its whole window);
* err ACF: spatial autocorrelation at lag 1 of the error, mean over the 3 axes, in the brain (the
  noise's is about 0; removing white noise alone raises it where the signal left is smooth);
* physio: share of the physiological signal kept (least-squares coefficient of the output's
  fluctuations on the physiological signal's, 1 = kept whole);
* tSNR: median temporal mean / temporal std in the brain;
* seconds: one run in a fresh process with ``--threads`` BLAS threads (``dwidenoise`` with
  ``-nthreads`` 1 whatever ``--threads``, its file I/O included).

Rows: MRtrix3 ``dwidenoise`` (Debian's ``mrtrix3``; left out where it is not installed) on the
magnitude series with its default window, as the fMRIPrep pull request runs it; our MP-PCA in its
``dwidenoise`` mode (centre voxel, hard threshold, the same window: the parity line after each block
compares the two) and with the app's BOLD default (a 3x3x3 window averaged with Gaussian weights, each
voxel's temporal mean removed and the window's average course kept) on the magnitude and with the phase;
NORDIC (withdrawn from the app: ``benchmarks/bold_glm.py``). The GLM a user fits, false positives by
distance from activation and null runs are ``benchmarks/bold_glm.py``'s.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import measure, table  # noqa: E402

from bids_denoise.testing.bold_phantom import neighbour_leak, physiology_kept, task_t  # noqa: E402

THRESHOLD = 3.1


def make(shape, volumes, snr, echoes):
    from bids_denoise.testing.bold_phantom import make_bold_phantom

    return make_bold_phantom(shape, volumes, snr=snr, n_echoes=echoes, seed=1)


def lag_one_correlation(error, mask):
    values = []
    for axis in range(3):
        first = [slice(None)] * 3
        second = [slice(None)] * 3
        first[axis], second[axis] = slice(0, -1), slice(1, None)
        both = mask[tuple(first)] & mask[tuple(second)]
        a = error[tuple(first)][both].ravel().astype(np.float64)
        b = error[tuple(second)][both].ravel().astype(np.float64)
        values.append(np.corrcoef(a, b)[0, 1])
    return float(np.mean(values))


def metrics(outputs, phantom, far):
    rows = []
    for echo, series in enumerate(outputs):
        brain, active = phantom.mask, phantom.active
        truth = phantom.clean[echo]
        t_active = task_t(series, phantom, active)
        t_far = task_t(series, phantom, far)
        mean, std = series[brain].mean(axis=1), series[brain].std(axis=1)
        rows.append([
            np.sqrt(np.mean((series[brain] - truth[brain]) ** 2)),
            np.median(t_active),
            np.mean(np.abs(t_active) > THRESHOLD),
            np.mean(np.abs(t_far) > THRESHOLD),
            neighbour_leak(series, phantom, echo),
            neighbour_leak(series, phantom, echo, distance=2),
            lag_one_correlation(series - truth, brain) if np.any(series != truth) else 0.0,
            physiology_kept(series, phantom, echo),
            np.median(mean / np.maximum(std, 1e-30)),
        ])
    return np.mean(rows, axis=0)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--shape", type=int, nargs=3, default=[24, 24, 12])
    parser.add_argument("--volumes", type=int, default=80)
    parser.add_argument("--speed-shape", type=int, nargs=3, default=[64, 64, 32],
                        help="a BOLD run of a usual size for the speed comparison with dwidenoise")
    parser.add_argument("--speed-volumes", type=int, default=200, help="its volumes (0: no speed comparison)")
    parser.add_argument("--speed-only", action="store_true", help="the speed comparison alone")
    args = parser.parse_args()
    shape = tuple(args.shape)

    def noisy(p):
        return list(p.magnitude)

    def truth(p):
        return list(p.clean)

    def gaussian(p):
        from scipy.ndimage import gaussian_filter

        sigma = 1.5 / (2.0 * np.sqrt(2.0 * np.log(2.0)))
        return [gaussian_filter(m, (sigma, sigma, sigma, 0.0)).astype(np.float32) for m in p.magnitude]

    def mppca(p):
        from bids_denoise.methods.mppca import mppca as run

        return [run(m).denoised for m in p.magnitude]

    def mppca_app(phase="ignore", joint=False, dwi=False):
        """The app's defaults for BOLD (registry/mppca.py's AUTO: a 3x3x3 window, Gaussian averaging, hard
        threshold, each voxel's temporal mean removed and the window's average course kept, echo by echo;
        for a complex run the
        magnitude at the noise level of the phase's imaginary channel, ``phase="noise"``), with the
        magnitude alone (``"ignore"``), the complex series (``"use"``) or the echoes side by side, or with
        ``dwi`` its DWI configuration (overcomplete, demeaned, Frobenius shrinkage, the Koay noise-floor
        correction for magnitude data)."""
        def run(p):
            from bids_denoise.methods.core.phase import noise_level
            from bids_denoise.methods.mppca import mppca as denoise
            from bids_denoise.registry.mppca import AUTO

            options = {key: value for key, value in AUTO["bold"].items() if key != "phase"}
            if dwi:
                options = {"aggregate": "overcomplete", "demean": True, "shrinkage": "frobenius",
                           "noise_floor": "none" if phase == "use" else "koay"}
            magnitudes, phases = p.magnitude, p.phase
            if joint:  # the echoes side by side: one decomposition
                magnitudes, phases = [np.concatenate(magnitudes, axis=3)], [np.concatenate(phases, axis=3)]
            outputs = []
            for magnitude, series_phase in zip(magnitudes, phases):
                extra = {}
                if phase == "use":
                    extra["phase"] = series_phase
                elif phase == "noise":
                    extra["noise_sigma"] = noise_level(magnitude, series_phase)
                outputs.append(denoise(magnitude, **options, **extra).denoised)
            return np.split(outputs[0], len(p.magnitude), axis=3) if joint else outputs
        return run

    def dwidenoise(p):
        """MRtrix3 dwidenoise on the magnitude series, one thread, its default window (as the fMRIPrep
        pull request runs it), echo by echo."""
        import shutil
        import subprocess
        import tempfile

        import nibabel as nib

        outputs = []
        for magnitude in p.magnitude:
            folder = Path(tempfile.mkdtemp(prefix="bold_dwidenoise_"))
            try:
                nib.save(nib.Nifti1Image(magnitude, p.affine), str(folder / "in.nii"))
                subprocess.run(["dwidenoise", str(folder / "in.nii"), str(folder / "out.nii"), "-nthreads", "1",
                                "-quiet", "-force"], check=True)
                outputs.append(np.asarray(nib.load(str(folder / "out.nii")).get_fdata(dtype=np.float32)))
            finally:
                shutil.rmtree(folder, ignore_errors=True)
        return outputs

    has_dwidenoise = shutil.which("dwidenoise") is not None
    peer = [("MRtrix3 dwidenoise (magnitude)", dwidenoise)] if has_dwidenoise else []

    def nordic(use_phase, joint=True):
        def run(p):
            from bids_denoise.methods.nordic import nordic as denoise

            phase = p.phase if use_phase else None
            if len(p.magnitude) == 1:
                return [denoise(p.magnitude[0], None if phase is None else phase[0]).denoised]
            return denoise(p.magnitude, phase, joint=joint).denoised
        return run

    single = [("noisy", noisy), ("noise-free (ceiling)", truth), ("Gaussian 1.5 vox FWHM", gaussian), *peer,
              ("MP-PCA as dwidenoise (magnitude)", mppca),
              ("MP-PCA app default (magnitude)", mppca_app()),
              ("MP-PCA app default (complex: noise level from phase)", mppca_app("noise")),
              ("MP-PCA complex series (--mppca-phase use)", mppca_app("use")),
              ("MP-PCA DWI configuration (magnitude)", mppca_app(dwi=True)),
              ("NORDIC magnitude", nordic(False)), ("NORDIC complex", nordic(True))]
    multi = [("noisy", noisy), ("Gaussian 1.5 vox FWHM", gaussian), *peer, ("MP-PCA as dwidenoise per echo", mppca),
             ("MP-PCA app default (magnitude, per echo)", mppca_app()),
             ("MP-PCA app default (complex, per echo)", mppca_app("noise")),
             ("MP-PCA default, magnitude, joint", mppca_app(joint=True)),
             ("MP-PCA complex series, joint", mppca_app("use", joint=True)),
             ("MP-PCA complex series, per echo", mppca_app("use")),
             ("NORDIC magnitude joint", nordic(False)), ("NORDIC complex joint", nordic(True)),
             ("NORDIC complex per echo", nordic(True, joint=False))]
    headers = ["SNR", "echoes", "method", "RMSE", "median t", "t gain", "TPR", "FPR", "leak", "leak 2", "err ACF", "physio",
               "tSNR", "seconds"]
    rows, parities = [], []
    print(f"BOLD phantom {shape + (args.volumes,)}, {args.threads} BLAS thread(s), |t| > {THRESHOLD}")
    for snr in () if args.speed_only else (15.0, 40.0):
        for echoes, cases in ((1, single), (3, multi)):
            phantom = make(shape, args.volumes, snr, echoes)
            from scipy.ndimage import binary_dilation

            near = binary_dilation(phantom.active, iterations=2)
            far = phantom.mask & ~near
            baseline = None
            parity = {}
            for name, function in cases:
                seconds, _, outputs = measure(
                    function, lambda: make(shape, args.volumes, snr, echoes), args.threads)
                if name.startswith(("MRtrix3 dwidenoise", "MP-PCA as dwidenoise")):
                    parity[name.split()[0]] = outputs
                rmse, t, tpr, fpr, leak, leak2, acf, physio, tsnr = metrics(outputs, phantom, far)
                baseline = baseline or t
                rows.append([f"{snr:.0f}", echoes, name, f"{rmse:.2f}", f"{t:.2f}", f"{t / baseline:.2f}", f"{tpr:.2f}",
                             f"{fpr:.3f}", f"{leak:.2f}", f"{leak2:.2f}", f"{acf:.2f}", f"{physio:.2f}", f"{tsnr:.1f}",
                             f"{seconds:.2f}"])
            if len(parity) == 2:
                ours, theirs = np.stack(parity["MP-PCA"]), np.stack(parity["MRtrix3"])
                brain = np.broadcast_to(phantom.mask[None, ..., None], ours.shape)
                difference = np.abs(ours - theirs)[brain] / np.abs(theirs[brain]).max()
                parities.append(f"SNR {snr:.0f}, {echoes} echo(es): ours as dwidenoise against dwidenoise, largest "
                                f"difference {difference.max():.2e} of the peak, voxels differing by more than 1e-3: "
                                f"{np.mean(difference > 1e-3):.2%}")
    if rows:
        table(rows, headers)
    for line in parities:
        print(line)
    if has_dwidenoise and args.speed_volumes:
        speed(tuple(args.speed_shape), args.speed_volumes, dwidenoise, mppca, mppca_app())


def speed(shape, volumes, dwidenoise, as_dwidenoise, default):
    """Seconds and extra peak memory on one thread for one magnitude series of a usual size: MRtrix3
    dwidenoise against our MP-PCA in its mode (and their difference) and with the app's BOLD default."""
    def series():
        return make(shape, volumes, 40.0, 1)

    print(f"\nspeed: one magnitude series {shape + (volumes,)}, one thread, default window")
    rows, outputs = [], {}
    cases = (("MRtrix3 dwidenoise", dwidenoise), ("MP-PCA as dwidenoise", as_dwidenoise),
             ("MP-PCA app default for BOLD", default))
    for name, function in cases:
        seconds, extra, result = measure(function, series, 1)
        outputs[name] = result[0]
        input_bytes = np.prod(shape) * volumes * 4
        rows.append([name, f"{seconds:.1f}", "(own process)" if name.startswith("MRtrix3") else f"{extra / input_bytes:.1f}x"])
    reference = outputs["MRtrix3 dwidenoise"]
    difference = np.abs(outputs["MP-PCA as dwidenoise"] - reference) / np.abs(reference).max()
    table(rows, ["method", "seconds", "extra peak memory"])
    print(f"speed-up in dwidenoise's mode {float(rows[0][1]) / max(float(rows[1][1]), 1e-9):.1f}x, with the BOLD "
          f"default {float(rows[0][1]) / max(float(rows[2][1]), 1e-9):.1f}x; in its mode, largest difference "
          f"{difference.max():.2e} of the peak; voxels differing by more than 1e-3: {np.mean(difference > 1e-3):.3%}")


if __name__ == "__main__":
    main()
