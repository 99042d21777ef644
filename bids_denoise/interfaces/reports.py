"""The QC node of each run and method: residual statistics and figures.

A figure that cannot be made never costs the user the data: the derivatives
are written by their own sink, and a failed figure becomes a warning in the
report, the sidecar and the log.
"""

from __future__ import annotations

import logging
from pathlib import Path

from nipype.interfaces.base import File, TraitedSpec, traits

from bids_denoise.interfaces import records
from bids_denoise.interfaces.failures import RecordedInputSpec, RecordedInterface

LOGGER = logging.getLogger("bids_denoise")

CAPTIONS = {
    "mosaic": "Input, denoised and residual (input - output) of a b0 and one volume per shell. "
              "Structure in the residual means anatomy was removed.",
    "residualmap": "Residual RMS over volumes, per voxel.",
    "volumes": "Residual RMS of each volume inside the brain; red circles mark outliers within their shell.",
    "training": "Training and held-out validation loss per epoch.",
    "calibration": "Self-supervised (J-invariant) loss of each candidate parameter; the least is chosen.",
    "blend": "Weight of the network's output in each volume's blend with the input, chosen by the self-supervised "
             "risk (0: the input kept as it was).",
    "superres": "Input and super-resolved output: central crops of the same region in three orientations.",
    "tsnr": "Temporal SNR (mean over time / standard deviation over time) before and after, and their ratio. "
            "A ratio far above what thermal noise explains may mean signal was removed: read it with the carpet.",
    "carpet": "Carpet plots (brain voxels x time, each voxel's series demeaned and scaled by the input's "
              "standard deviation) before and after, and of the removed part: structure in the removed part "
              "(stripes, task blocks) is signal the denoiser took.",
}


class RunReportInputSpec(RecordedInputSpec):
    data_file = File(exists=True, mandatory=True, desc="the raw data (.npy) from LoadRun")
    gradients_file = File(exists=True, desc="bvals and bvecs (.npz), DWI only")
    derivatives = traits.List(traits.Dict, mandatory=True, desc="the method's outputs")
    method = traits.Str(mandatory=True)
    title = traits.Str(mandatory=True, desc="run label for figure titles")
    provenance = traits.Dict(desc="the method's provenance (training history, calibration)")


class RunReportOutputSpec(TraitedSpec):
    figures = traits.List(traits.Dict, desc="kind, caption and path of each figure")
    qc_table = File(exists=True, desc="per-volume residual RMS and outlier flags (TSV)")
    qc_summary = traits.Dict(desc="run-level QC numbers for sidecars and the group table")
    warnings = traits.List(traits.Str, desc="figures that could not be made, and why")


class RunReport(RecordedInterface):
    """Mosaics of input/denoised/residual, the method's maps, the per-volume residual plot and table."""

    input_spec = RunReportInputSpec
    output_spec = RunReportOutputSpec

    def _run(self, runtime):
        from bids_denoise.interfaces.bids import read_loaded_run
        from bids_denoise.io import load_nifti

        self._cwd = Path(runtime.cwd)
        self._figures, self._warnings = [], []
        noisy, bvals, _ = read_loaded_run(self.inputs.data_file, self.inputs.gradients_file)
        main = records.main_image(records.read(self.inputs.derivatives))
        _, denoised = load_nifti(main.path, check_finite=False)  # our own output: its figures show what it is
        if noisy.ndim == 3:  # an anatomical image: one "volume"
            noisy, denoised = noisy[..., None], denoised.reshape(denoised.shape[:3] + (1,))
        if noisy.shape[:3] != denoised.shape[:3]:  # super-resolution: a new grid, no residual
            self._superres(noisy, denoised)
        else:
            # volumes a method dropped (trailing noise scans) are not compared
            noisy = noisy[..., : denoised.shape[3]]
            bvals = None if bvals is None else bvals[: denoised.shape[3]]
            self._residuals(noisy, denoised, bvals)
        self._learning()
        self._results["figures"] = self._figures
        self._results["warnings"] = self._warnings
        return runtime

    def _figure(self, kind, make, caption=None):
        """Make one figure; a failure becomes a warning, never an error."""
        path = self._cwd / f"{kind}.png"
        try:
            make(path)
        except Exception as err:  # noqa: BLE001 - any plotting failure is reported, not raised
            message = f"figure {kind!r} could not be made: {type(err).__name__}: {err}".splitlines()[0]
            LOGGER.warning("%s (%s): %s", self.inputs.title, self.inputs.method, message)
            self._warnings.append(message)
            return
        self._figures.append({"kind": kind, "path": str(path), "caption": caption or CAPTIONS.get(kind, "")})

    def _superres(self, noisy, denoised):
        from bids_denoise.reports import figures

        title = f"{self.inputs.title}: {self.inputs.method}"
        self._figure("superres", lambda path: figures.superres_figure(noisy[..., 0], denoised[..., 0], path, title))
        self._results["qc_summary"] = {"InputShape": list(noisy.shape), "OutputShape": list(denoised.shape)}

    def _residuals(self, noisy, denoised, bvals):
        import numpy as np

        from bids_denoise.io import load_nifti, write_text
        from bids_denoise.methods.core.masking import b0_brain_mask
        from bids_denoise.reports import figures

        series = noisy.shape[3] > 1
        time_series = series and bvals is None  # BOLD: no b-values, one "shell"
        bvals = bvals if bvals is not None else np.zeros(noisy.shape[3])
        mask = b0_brain_mask(noisy, bvals)
        rms, outlier, shells = figures.residual_statistics(noisy, denoised, bvals, mask)
        method, title = self.inputs.method, self.inputs.title
        kind = "series" if time_series else ("dwi" if series else "image")
        representative = figures.representative_volumes(bvals, shells, kind)
        residual_map = np.sqrt(np.mean((noisy - denoised) ** 2, axis=3))
        self._figure("mosaic", lambda path: figures.mosaic(noisy, denoised, representative, path, f"{title}: {method}"))
        self._figure("residualmap", lambda path: figures.map_figure(residual_map, path, f"{method}: residual RMS map"))
        if series:
            self._figure("volumes", lambda path: figures.volume_plot(rms, outlier, bvals, path,
                                                                     f"{method}: residual per volume"))
        if time_series:
            self._figure("tsnr", lambda path: figures.tsnr_figure(noisy, denoised, mask, path,
                                                                  f"{title}: temporal SNR ({method})"))
            self._figure("carpet", lambda path: figures.carpet_plot(noisy, denoised, mask, path,
                                                                    f"{title}: carpet ({method})"))
        summary = {
            "ResidualRMS": round(float(rms.mean()), 4),
            "OutlierVolumes": [int(v) for v in np.flatnonzero(outlier)],
            "BrainVoxels": int(mask.sum()),
        }
        for item in records.read(self.inputs.derivatives):
            if item.is_image:
                continue
            _, values = load_nifti(item.path, ndim=3, check_finite=False)
            if item.summary_key and mask.any():
                summary[item.summary_key] = round(float(np.median(values[mask])), 4)
            self._figure(f"{item.name}map", lambda path, values=values, item=item: figures.map_figure(
                values, path, f"{method}: {item.name}"), caption=item.description)
        if time_series:
            summary["TSNRMedianBefore"], summary["TSNRMedianAfter"] = (
                round(float(np.median(figures.tsnr(x)[mask])), 3) for x in (noisy, denoised))
        if series:
            lines = ["volume\tbval\tshell\tresidual_rms\toutlier"]
            lines += [f"{i}\t{bvals[i]:g}\t{shells[i]}\t{rms[i]:.6g}\t{int(outlier[i])}" for i in range(rms.size)]
            self._results["qc_table"] = str(write_text("\n".join(lines) + "\n", self._cwd / "qc.tsv"))
        self._results["qc_summary"] = summary

    def _learning(self):
        from bids_denoise.reports import figures

        details = (self.inputs.provenance or {}).get("Details", {})
        method = self.inputs.method
        if details.get("history", {}).get("epochs"):
            self._figure("training", lambda path: figures.loss_curves(details["history"], path, f"{method} training"))
        if details.get("calibration"):
            self._figure("calibration", lambda path: figures.calibration_curve(
                details["calibration"], path, f"{method}: self-supervised calibration"))
        if details.get("blend", {}).get("blend_weights"):
            self._figure("blend", lambda path: figures.blend_figure(
                details["blend"], path, f"{method}: each volume's blend with the input"))
