"""The QC node of each run and method: residual statistics and figures."""

from __future__ import annotations

from pathlib import Path

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)


class RunReportInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="the raw DWI series or anatomical image")
    bval_file = File(exists=True, desc="DWI only")
    derivatives = traits.List(traits.Dict, mandatory=True, desc="the method's outputs")
    method = traits.Str(mandatory=True)
    title = traits.Str(mandatory=True, desc="run label for figure titles")
    provenance = traits.Dict(desc="the method's provenance (training history, calibration)")


class RunReportOutputSpec(TraitedSpec):
    figures = traits.List(traits.Dict, desc="kind and path of each figure")
    qc_table = File(exists=True, desc="per-volume residual RMS and outlier flags (TSV)")
    qc_summary = traits.Dict(desc="run-level QC numbers for sidecars and the group table")


class RunReport(SimpleInterface):
    """Mosaics of input/denoised/residual, maps, and the per-volume residual plot and table."""

    input_spec = RunReportInputSpec
    output_spec = RunReportOutputSpec

    def _run_interface(self, runtime):
        import numpy as np

        from bids_denoise.io import load_nifti, read_bvals, write_text
        from bids_denoise.methods.masking import b0_brain_mask
        from bids_denoise.reports import figures

        cwd = Path(runtime.cwd)
        series = isdefined(self.inputs.bval_file)
        by_kind = {item["kind"]: item["path"] for item in self.inputs.derivatives}
        _, noisy = load_nifti(self.inputs.in_file)
        _, denoised = load_nifti(by_kind["denoised"])
        if not series:  # an anatomical image: one "volume"
            noisy, denoised = noisy.reshape(noisy.shape[:3] + (1,)), denoised.reshape(denoised.shape[:3] + (1,))
        if noisy.shape[:3] != denoised.shape[:3]:  # super-resolution: a new grid, no residual
            figure = figures.superres_figure(noisy[..., 0], denoised[..., 0], cwd / "superres.png",
                                             f"{self.inputs.title}: {self.inputs.method}")
            self._results["figures"] = [{"kind": "superres", "path": str(figure)}]
            self._results["qc_summary"] = {"InputShape": list(noisy.shape), "OutputShape": list(denoised.shape)}
            return runtime
        bvals = read_bvals(self.inputs.bval_file, noisy.shape[3]) if series else np.zeros(1)
        mask = b0_brain_mask(noisy, bvals)
        rms, outlier, shells = figures.residual_statistics(noisy, denoised, bvals, mask)
        method, title = self.inputs.method, self.inputs.title

        representative = figures.representative_volumes(bvals, shells)
        residual_map = np.sqrt(np.mean((noisy - denoised) ** 2, axis=3))
        made = [
            ("mosaic", figures.mosaic(noisy, denoised, representative, cwd / "mosaic.png", f"{title}: {method}")),
            ("residualmap", figures.map_figure(residual_map, cwd / "residualmap.png", f"{method}: residual RMS map")),
        ]
        if series:
            made.append(("volumes", figures.volume_plot(rms, outlier, bvals, cwd / "volumes.png",
                                                        f"{method}: residual per volume")))
        summary = {
            "ResidualRMS": round(float(rms.mean()), 4),
            "OutlierVolumes": [int(v) for v in np.flatnonzero(outlier)],
            "BrainVoxels": int(mask.sum()),
        }
        if "noise" in by_kind:
            _, sigma = load_nifti(by_kind["noise"], ndim=3)
            summary["NoiseSigmaMedian"] = round(float(np.median(sigma[mask])), 4)
            made.append(("noisemap", figures.map_figure(sigma, cwd / "noisemap.png", f"{method}: noise sigma")))
        if "rank" in by_kind:
            _, rank = load_nifti(by_kind["rank"], ndim=3)
            made.append(("rankmap", figures.map_figure(rank, cwd / "rankmap.png", f"{method}: rank", cmap="viridis")))

        details = (self.inputs.provenance or {}).get("Details", {})
        if details.get("history", {}).get("epochs"):
            made.append(("training", figures.loss_curves(details["history"], cwd / "training.png", f"{method} training")))
        if details.get("calibration"):
            made.append(("calibration", figures.calibration_curve(details["calibration"], cwd / "calibration.png",
                                                                   f"{method}: self-supervised calibration")))

        if series:
            lines = ["volume\tbval\tshell\tresidual_rms\toutlier"]
            lines += [f"{i}\t{bvals[i]:g}\t{shells[i]}\t{rms[i]:.6g}\t{int(outlier[i])}" for i in range(rms.size)]
            self._results["qc_table"] = str(write_text("\n".join(lines) + "\n", cwd / "qc.tsv"))
        self._results["figures"] = [{"kind": kind, "path": str(path)} for kind, path in made]
        self._results["qc_summary"] = summary
        return runtime
