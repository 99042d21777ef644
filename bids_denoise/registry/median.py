"""The self-calibrated median filter: registration (``methods/median.py`` holds the method)."""

from __future__ import annotations

from bids_denoise.contract import MethodResult, MethodSpec, Param, auto_or, positive
from bids_denoise.registry import register
from bids_denoise.registry.noise2self import BATSON2019


def run(inputs, parameters) -> MethodResult:
    import numpy as np

    from bids_denoise.methods.calibrate import calibrated_median, donut_median

    data = inputs.data if inputs.is_series else inputs.data[..., None]
    radius, details = parameters["radius"], {}
    if radius == "auto":
        # calibrate on up to 8 volumes spread over the run: one radius for the run
        picks = np.unique(np.linspace(0, data.shape[3] - 1, min(8, data.shape[3])).round().astype(int))
        calibration = calibrated_median([data[..., v] for v in picks], radii=(1, 2, 3))
        radius = int(calibration.best)
        details["calibration"] = calibration.as_dict()
    details["radius"] = int(radius)
    denoised = np.stack([donut_median(data[..., v], int(radius)) for v in range(data.shape[3])], axis=-1)
    denoised = denoised if inputs.is_series else denoised[..., 0]
    what = "DWI series" if inputs.bvals is not None else "Image"
    return MethodResult(denoised.astype(np.float32), f"{what} denoised with a self-calibrated median filter",
                        details=details)


def describe(parameters) -> str:
    return ("Images were denoised with a median filter whose radius was chosen by the self-supervised "
            "Noise2Self loss [batson2019].")


SPEC = register(MethodSpec(
    name="median",
    title="Calibrated median",
    summary="a median filter whose radius is chosen by the self-supervised Noise2Self loss",
    run=run,
    describe=describe,
    references=(BATSON2019,),
    modalities=("dwi", "anat"),
    mem_gb=1.0,
    params=(Param("radius", auto_or(positive(int)), "auto", "filter radius in voxels, or auto (calibrated)"),),
))
