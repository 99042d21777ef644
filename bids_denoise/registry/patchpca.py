"""Patch PCA for 3D images: registration (``methods/patchpca.py`` holds the method)."""

from __future__ import annotations

import numpy as np

from bids_denoise.contract import MethodResult, MethodSpec, OutputMap, params_from
from bids_denoise.methods.patchpca import PatchPCAOptions, patch_pca
from bids_denoise.registry import register
from bids_denoise.registry._references import MANJON2013, MANJON2015, VERAART2016


def run(inputs, parameters) -> MethodResult:
    options = PatchPCAOptions.from_values(parameters)
    result = patch_pca(inputs.data, options, device=inputs.device)
    image = result.denoised.reshape(inputs.data.shape)
    values = (2 * options.patch_radius + 1) ** 3
    maps = {
        "noise": OutputMap(result.noise_sigma, "Patch PCA noise level: standard deviation of the noise per voxel, "
                           "from the Marchenko-Pastur fit of the window's patches", summary_key="NoiseSigmaMedian"),
        "rank": OutputMap(result.rank, "Patch PCA rank: signal components kept per voxel (of "
                          f"{values} patch values; window-averaged)"),
    }
    details = {"patch_values": values, "window": [options.extent] * 3,
               "rank_median": float(np.median(result.rank))}
    return MethodResult(image, "Image denoised with Marchenko-Pastur PCA of its patches", maps=maps,
                        details=details)


def describe(parameters) -> str:
    side = 2 * parameters["patch_radius"] + 1
    return (f"Images were denoised by Marchenko-Pastur PCA of their patches [manjon2013, manjon2015, veraart2016]: "
            f"each voxel's {side}x{side}x{side} neighbourhood was read as a vector, the patches of each "
            f"{parameters['extent']}-voxel window were decomposed together, the components that fit the "
            "Marchenko-Pastur law of noise were removed, every window's patches were averaged with Gaussian weights "
            "and each voxel was the mean of the patch values that covered it."
            + (f" A second pass [manjon2015] took each voxel as the mean of the noisy voxels within "
               f"{parameters['guide_radius']} voxels weighted by the similarity of their first-pass values "
               f"(width {parameters['guide_strength']:g} times the noise level), with the Rician noise floor "
               "removed." if parameters["guide_radius"] else ""))


def memory(shape) -> float:
    """GB beyond ``mem_gb`` at the default 3x3x3 patches: the stack of 27 patch values per voxel, in and out of
    the local-PCA engine with its float64 accumulators, about 5 copies of the stack in float32 (5x5x5 patches
    need 125/27 times this: the node's --mem-gb says so where a user picks them)."""
    return float(np.prod(shape[:3])) * 27 * 4 * 5 / 2**30


SPEC = register(MethodSpec(
    name="patchpca",
    title="Patch PCA",
    summary="Marchenko-Pastur PCA of a 3D image's patches (T1w, T2w, FLAIR): nothing learned, no parameter "
            "tuned per image",
    run=run,
    describe=describe,
    references=(MANJON2013, MANJON2015, VERAART2016),
    modalities=("anat",),
    default=True,
    mem_gb=0.5,
    memory=memory,
    params=params_from(PatchPCAOptions),
))
