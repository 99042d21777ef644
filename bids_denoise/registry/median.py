"""The self-calibrated median filter: registration (``methods/median.py`` holds the method)."""

from __future__ import annotations

import numpy as np

from bids_denoise.contract import MethodResult, MethodSpec, params_from
from bids_denoise.methods.median import MedianOptions, median_denoise
from bids_denoise.registry import register
from bids_denoise.registry._references import BATSON2019, STEIN1981, VERAART2016


def run(inputs, parameters) -> MethodResult:
    result = median_denoise(inputs.data, MedianOptions.from_values(parameters))
    what = "DWI series" if inputs.bvals is not None else "Image"
    details = result.details
    guided = details.get("guide") == "profile"
    if details["filter"] == "identity":
        description = f"{what} passed through unchanged: the self-supervised calibration found no filter that helps"
    else:
        how = "blended with the input per volume" if guided else "locally blended with the input"
        description = (f"{what} denoised with a self-calibrated {details['filter']} filter "
                       f"(radius {details['radius']}, {how})")
    warnings = []
    if details["filter"] == "identity":
        warnings.append("the calibration chose no filtering (the output equals the input)")
        if not details["calibration"].get("noise_independent", True):
            warnings.append("neighbouring voxels share their noise (interpolated, resampled or smoothed data?): "
                            "the median's risk estimate does not hold there")
    return MethodResult(result.denoised, description, details=details, warnings=warnings)


def median_memory(shape) -> float:
    """GB the median needs beyond its fixed 0.5: about 8 times the series in float32 (the series in float64, the
    output, MP-PCA's noise estimate, the calibration's volumes), and the profile guide's neighbour distances, 124
    float32 values a voxel for its largest radius (2); the rest goes slab by slab (measured:
    tests/methods/test_memory.py, benchmarks/scale.py)."""
    voxels = float(np.prod(shape[:3]))
    volumes = shape[3] if len(shape) > 3 else 1
    return (voxels * volumes * 4 * 8 + voxels * 124 * 4 * (volumes >= 3)) / 2**30 + 0.25


def describe(parameters) -> str:
    guided = ("Series of at least 8 volumes were filtered with a median over the neighbours whose signal in the "
              "other volumes matched the voxel's (the voxel itself left out), blended with the input per volume; "
              "its radius and weights were chosen from the self-supervised Noise2Self loss [batson2019] with the "
              "noise level of Marchenko-Pastur PCA [veraart2016], and no filtering was kept where neighbouring "
              "voxels shared their noise. Other "
              if parameters["guide"] != "none" else "")
    return (guided + ("images" if guided else "Images")
            + " were filtered with a median filter whose radius, form (with or without the centre voxel) and local "
            "blend with the input were chosen without ground truth, from the self-supervised Noise2Self loss "
            "[batson2019] and Stein's unbiased risk estimate [stein1981]; no filtering was kept where no candidate "
            "lowered the estimated risk.")


SPEC = register(MethodSpec(
    name="median",
    title="Calibrated median",
    summary="a median filter calibrated without ground truth (radius, form, local blend with the input; "
            "no filtering when it does not help)",
    run=run,
    describe=describe,
    references=(BATSON2019, STEIN1981, VERAART2016),
    modalities=("dwi", "anat"),
    mem_gb=0.5,
    memory=median_memory,
    params=params_from(MedianOptions),
))
