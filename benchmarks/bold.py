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
* leak: spatial autocorrelation at lag 1 of the error (output - truth), mean over the 3 axes, in
  the brain (the noisy series' error, white noise, is about 0: a smoother spreads its error);
* physio: share of the physiological signal kept (least-squares coefficient of the output's
  fluctuations on the physiological signal's, 1 = kept whole);
* tSNR: median temporal mean / temporal std in the brain;
* seconds: one run in a fresh process with ``--threads`` BLAS threads.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import measure, table  # noqa: E402

THRESHOLD = 3.1


def make(shape, volumes, snr, echoes):
    from bids_denoise.testing.bold_phantom import make_bold_phantom

    return make_bold_phantom(shape, volumes, snr=snr, n_echoes=echoes, seed=1)


def task_t(series, phantom, voxels):
    design = np.stack([phantom.regressor, np.ones_like(phantom.regressor)], axis=1)
    values = series[voxels].T.astype(np.float64)
    beta, *_ = np.linalg.lstsq(design, values, rcond=None)
    residual = values - design @ beta
    variance = np.maximum((residual**2).sum(axis=0) / (len(phantom.regressor) - 2), 1e-30)
    return beta[0] / np.sqrt(variance * np.linalg.inv(design.T @ design)[0, 0])


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


def physiology_kept(series, phantom, echo):
    mask = phantom.mask
    physiology = phantom.physiology[echo][mask].astype(np.float64)
    rest = phantom.clean[echo][mask] - physiology
    output = series[mask].astype(np.float64)
    p = physiology - physiology.mean(axis=1, keepdims=True)
    o = output - rest
    o = o - o.mean(axis=1, keepdims=True)
    return float((o * p).sum() / (p**2).sum())


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

    def nordic(use_phase, joint=True):
        def run(p):
            from bids_denoise.methods.nordic import nordic as denoise

            phase = p.phase if use_phase else None
            if len(p.magnitude) == 1:
                return [denoise(p.magnitude[0], None if phase is None else phase[0]).denoised]
            return denoise(p.magnitude, phase, joint=joint).denoised
        return run

    single = [("noisy", noisy), ("noise-free (ceiling)", truth), ("Gaussian 1.5 vox FWHM", gaussian),
              ("MP-PCA (magnitude, defaults)", mppca), ("NORDIC magnitude", nordic(False)),
              ("NORDIC complex", nordic(True))]
    multi = [("noisy", noisy), ("Gaussian 1.5 vox FWHM", gaussian), ("MP-PCA per echo", mppca),
             ("NORDIC magnitude joint", nordic(False)), ("NORDIC complex joint", nordic(True)),
             ("NORDIC complex per echo", nordic(True, joint=False))]
    headers = ["SNR", "echoes", "method", "RMSE", "median t", "t gain", "TPR", "FPR", "leak", "physio", "tSNR", "seconds"]
    rows = []
    print(f"BOLD phantom {shape + (args.volumes,)}, {args.threads} BLAS thread(s), |t| > {THRESHOLD}")
    for snr in (15.0, 40.0):
        for echoes, cases in ((1, single), (3, multi)):
            phantom = make(shape, args.volumes, snr, echoes)
            from scipy.ndimage import binary_dilation

            near = binary_dilation(phantom.active, iterations=2)
            far = phantom.mask & ~near
            baseline = None
            for name, function in cases:
                seconds, _, outputs = measure(
                    function, lambda: make(shape, args.volumes, snr, echoes), args.threads)
                rmse, t, tpr, fpr, leak, physio, tsnr = metrics(outputs, phantom, far)
                baseline = baseline or t
                rows.append([f"{snr:.0f}", echoes, name, f"{rmse:.2f}", f"{t:.2f}", f"{t / baseline:.2f}", f"{tpr:.2f}",
                             f"{fpr:.3f}", f"{leak:.2f}", f"{physio:.2f}", f"{tsnr:.1f}", f"{seconds:.2f}"])
    table(rows, headers)


if __name__ == "__main__":
    main()
