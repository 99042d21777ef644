"""Nipype interfaces and registry entries for the learned and calibrated methods.

Noise2Noise, Noise2Self and the self-calibrated median filter. The trained
weights are kept in the node's folder of the work directory (``weights.pt``),
so a cached rerun reuses them.
"""

from __future__ import annotations

from pathlib import Path

from bids_denoise.interfaces.base import MethodInterface
from bids_denoise.registry import MethodSpec, Param, register


def _flag(value):
    return str(value).lower() in ("1", "true", "yes")


def _save_weights(state_dict, cwd):
    import torch

    path = Path(cwd) / "weights.pt"
    torch.save(state_dict, path)
    return str(path)


def _budget(parameters):
    return {
        "epochs": parameters["epochs"],
        "max_seconds": parameters["max_seconds"],
        "steps_per_epoch": parameters["steps_per_epoch"],
        "batch_size": parameters["batch_size"],
    }


BUDGET_PARAMS = (
    Param("epochs", int, 30, "training epochs at most"),
    Param("max_seconds", float, 900.0, "training time budget in seconds"),
    Param("steps_per_epoch", int, 50, "optimiser steps per epoch"),
    Param("batch_size", int, 16, "slices per batch"),
)


class Noise2NoiseDenoise(MethodInterface):
    method_name = "noise2noise"

    def _denoise(self, data, bvals, bvecs, mask, parameters, device):
        from bids_denoise.methods.noise2noise import noise2noise

        result = noise2noise(
            data, bvals, bvecs, slice_axis=parameters["slice_axis"], context=parameters["context"],
            shell_tolerance=parameters["shell_tolerance"], seed=self.inputs.seed, device=device,
            **_budget(parameters),
        )
        details = {
            "pairs": [{"volume": a, "partner": b, "angle_deg": angle} for a, b, angle in result.pairs],
            "passed_through_volumes": result.passed_through,
            "history": result.history,
            "pair_psnr": result.pair_psnr,
            "pair_ssim": result.pair_ssim,
            "weights": _save_weights(result.state_dict, self._cwd),
        }
        return result.denoised, {}, details


class Noise2SelfDenoise(MethodInterface):
    method_name = "noise2self"

    def _denoise(self, data, bvals, bvecs, mask, parameters, device):
        from bids_denoise.methods.noise2self import noise2self

        context = parameters["context"] if data.ndim == 4 else "volume"  # an anatomical image has no series
        result = noise2self(
            data, bvals, context=context, width=parameters["mask_width"], mode=parameters["fill"],
            slice_axis=parameters["slice_axis"], seed=self.inputs.seed, device=device, **_budget(parameters),
        )
        details = {"context": context, "history": result.history, "final_validation_loss": result.final_loss,
                   "weights": _save_weights(result.state_dict, self._cwd)}
        return result.denoised, {}, details


class CalibratedMedian(MethodInterface):
    method_name = "median"

    def _denoise(self, data, bvals, bvecs, mask, parameters, device):
        import numpy as np

        from bids_denoise.methods.calibrate import calibrated_median, donut_median

        radius = parameters["radius"]
        details = {}
        anatomical = data.ndim == 3
        if anatomical:
            data = data[..., None]
        if radius == "auto":
            # calibrate on up to 8 volumes spread over the run: one radius for the run
            picks = np.unique(np.linspace(0, data.shape[3] - 1, min(8, data.shape[3])).round().astype(int))
            calibration = calibrated_median([data[..., v] for v in picks], radii=(1, 2, 3))
            radius = int(calibration.best)
            details["calibration"] = calibration.as_dict()
        radius = int(radius)
        details["radius"] = radius
        denoised = np.stack([donut_median(data[..., v], radius) for v in range(data.shape[3])], axis=-1)
        if anatomical:
            denoised = denoised[..., 0]
        return denoised.astype(np.float32), {}, details


def _radius(value):
    return "auto" if str(value) == "auto" else int(value)


register(MethodSpec(
    name="noise2noise", interface=Noise2NoiseDenoise, uses_gpu=True, mem_gb=4.0,
    description="Noise2Noise: a U-Net trained to map each DWI volume to the nearest-direction volume of its shell",
    citation="Lehtinen J. et al. Noise2Noise: Learning Image Restoration without Clean Data. ICML 2018.",
    params=BUDGET_PARAMS + (
        Param("slice_axis", int, 2, "axis of the 2D slices", choices=(0, 1, 2)),
        Param("context", int, 0, "neighbouring slices on each side as extra channels (2.5D); 0 = 2D"),
        Param("shell_tolerance", float, 100.0, "b-value gap that separates shells"),
    ),
))

register(MethodSpec(
    name="noise2self", interface=Noise2SelfDenoise, uses_gpu=True, mem_gb=4.0, modalities=("dwi", "anat"),
    description="Noise2Self: a J-invariant U-Net trained on the run itself (masked self-supervised loss)",
    citation="Batson J., Royer L. Noise2Self: Blind Denoising by Self-Supervision. ICML 2019.",
    params=BUDGET_PARAMS + (
        Param("context", str, "series", "each volume alone, or with other volumes of its shell as channels",
              choices=("volume", "series")),
        Param("mask_width", int, 3, "masker grid width"),
        Param("fill", str, "interpolate", "how masked voxels are filled", choices=("zero", "interpolate")),
        Param("slice_axis", int, 2, "axis of the 2D slices", choices=(0, 1, 2)),
    ),
))

register(MethodSpec(
    name="median", interface=CalibratedMedian, uses_gpu=False, mem_gb=1.0, modalities=("dwi", "anat"),
    description="Donut median filter (centre excluded) with the radius chosen by the Noise2Self self-supervised loss",
    citation="Batson J., Royer L. Noise2Self: Blind Denoising by Self-Supervision. ICML 2019.",
    params=(Param("radius", _radius, "auto", "filter radius in voxels, or auto (calibrated)"),),
))
