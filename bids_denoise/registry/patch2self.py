"""Patch2Self: registration (``methods/patch2self.py`` holds the method)."""

from __future__ import annotations

import numpy as np

from bids_denoise.contract import (MethodResult, MethodSpec, Param, Reference, auto_or, boolean, default_of, integers,
                                   positive)
from bids_denoise.methods.patch2self import LOW_BIAS_OPTIONS, patch2self
from bids_denoise.registry import register
from bids_denoise.registry.mppca import CORDEROGRANDE2019, KOAY2006
from bids_denoise.registry.noise2self import BATSON2019

FADNAVIS2020 = Reference(
    "fadnavis2020",
    "Fadnavis S, Batson J, Garyfallidis E. Patch2Self: Denoising Diffusion MRI with Self-Supervised Learning. "
    "Advances in Neural Information Processing Systems 33, 2020.",
    "@inproceedings{fadnavis2020,\n  author={Fadnavis, Shreyas and Batson, Joshua and Garyfallidis, Eleftherios},\n"
    "  title={Patch2Self: Denoising Diffusion MRI with Self-Supervised Learning},\n"
    "  booktitle={Advances in Neural Information Processing Systems},\n  volume={33},\n  year={2020}\n}",
)

#: parameters shared by our implementation and DIPY's
COMMON = ("patch_radius", "model", "alpha", "b0_threshold", "b0_denoising", "shift_intensity", "clip_negative_vals")


def tile_option(text):
    """``auto``, ``none`` (one fit for the whole image), or a tile edge: one integer or three (``x,y,z``)."""
    if str(text).strip() == "none":
        return None
    return auto_or(integers(minimum=2))(text)


def run(inputs, parameters) -> MethodResult:
    common = {key: parameters[key] for key in COMMON}
    if parameters["backend"] == "dipy":
        return _run_dipy(inputs, parameters, common)
    denoised, info = patch2self(inputs.data, inputs.bvals, grouping=parameters["grouping"],
                                mask="auto" if parameters["fit_mask"] == "auto" else None,
                                tile=parameters["tile"], blend=parameters["blend"], noise_floor=parameters["noise_floor"],
                                n_coils=parameters["n_coils"], device=inputs.device, return_info=True, **common)
    details = {
        "backend": "bids-denoise",
        "groups": info.groups,
        "passed_through_volumes": info.passed_through,
        "fit_voxels": info.fit_voxels,
        "fit_mask": info.fit_mask,
        "regularised_groups": info.regularised_groups,
        "noise_sigma": info.noise_sigma,
        "blend_weights": info.blend_weights,
        "outside_blend_weights": info.outside_blend_weights,
        "tile": info.tile,
        "tiles_fitted": info.tiles,
    }
    warnings, description = [], "DWI series denoised with Patch2Self"
    if info.noise_sigma == 0:
        warnings.append("no noise component found in the fitted voxels: no blend with the input, "
                        "no noise-floor removal")
    if info.passed_through:
        warnings.append(f"volumes {info.passed_through} are alone in their group: passed through unchanged")
        if len(info.passed_through) == inputs.data.shape[3]:
            description = "DWI series passed through unchanged: no Patch2Self group had two volumes"
    return MethodResult(denoised, description, details=details, warnings=warnings)


def _run_dipy(inputs, parameters, common) -> MethodResult:
    from dipy.denoise.patch2self import patch2self as dipy_patch2self

    if parameters["grouping"] == "shell":
        # DIPY regresses within b0s and within DWIs; "all", the default of our backend, falls back to it
        raise ValueError("--patch2self-backend dipy supports only --patch2self-grouping b0_dwi (or the "
                         "default, all, which falls back to DIPY's b0_dwi)")
    version = 1 if common["patch_radius"] not in (0, [0, 0, 0]) else 3
    if version == 3:
        del common["patch_radius"]  # DIPY's version 3 refuses any patch_radius argument
    denoised = dipy_patch2self(inputs.data, inputs.bvals, version=version, verbose=False, **common)
    return MethodResult(denoised.astype(np.float32), "DWI series denoised with Patch2Self (DIPY)",
                        details={"backend": f"dipy version={version}"},
                        warnings=["DIPY's Patch2Self: grouping b0_dwi, no fit mask, no blend, no noise-floor "
                                  "removal (those options are ours)"])


GROUPING = {"all": "every volume predicted from all the others",
            "b0_dwi": "b0 and diffusion-weighted volumes regressed apart",
            "shell": "each shell regressed apart"}


def describe(parameters) -> str:
    settings = (f"patch radius {parameters['patch_radius']}, {parameters['model']} regression, "
                f"b0 threshold {parameters['b0_threshold']:g} s/mm²")
    if parameters["backend"] == "dipy":
        return (f"Diffusion-weighted images were denoised with Patch2Self [fadnavis2020], using DIPY's implementation "
                f"({settings}, b0 and diffusion-weighted volumes regressed apart).")
    text = (f"Diffusion-weighted images were denoised with Patch2Self [fadnavis2020], using an exact implementation "
            f"that derives every leave-one-volume-out regression from one Gram matrix ({settings}, "
            f"{GROUPING[parameters['grouping']]}; the regressions were fitted "
            + ("inside an automatic b0 brain mask where the image has background around the brain, on every voxel "
               "otherwise" if parameters["fit_mask"] == "auto" else "on every voxel") + ").")
    if parameters["tile"] is not None:
        edge = ("an edge set by the number of volumes" if parameters["tile"] == "auto"
                else f"edge {parameters['tile']} voxels")
        text += (f" The regressions were also fitted in overlapping cubes ({edge}) and each voxel's "
                 "prediction averaged over its cubes, so that each region keeps its own mean signal.")
    noise = "the noise variance estimated by Marchenko-Pastur PCA of the fitted voxels [corderogrande2019]"
    if parameters["blend"] == "volume":
        text += (" Each volume's prediction, which does not see that volume's noise [batson2019], was blended with "
                 f"the input with the weight that minimises the expected squared error, given {noise}.")
        noise = "that noise level"
    if parameters["noise_floor"] == "koay":
        text += f" The noise floor of the magnitude data was then removed with {noise} [koay2006]."
    return text


SPEC = register(MethodSpec(
    name="patch2self",
    title="Patch2Self",
    summary="each volume predicted from the other volumes of its group by leave-one-volume-out regression "
            "(exact: every regression from one Gram matrix)",
    run=run,
    describe=describe,
    references=(FADNAVIS2020, BATSON2019, CORDEROGRANDE2019, KOAY2006),
    modalities=("dwi",),
    uses_gpu=True,
    mem_gb=4.0,
    params=(
        Param("backend", str, "bids-denoise", "implementation: ours (exact Gram-matrix solve) or DIPY's",
              choices=("bids-denoise", "dipy")),
        Param("patch_radius", integers(minimum=0), 0,
              "radius of the neighbourhood each volume contributes (0, or 'r' or 'rx,ry,rz')"),
        Param("model", str, "ols", "regression model", choices=("ols", "ridge")),
        Param("alpha", float, 1.0, "ridge penalty (model ridge)"),
        Param("b0_threshold", float, 50.0, "b-values up to this are b0 volumes"),
        Param("b0_denoising", boolean, True, "denoise the b0 volumes too (true/false)"),
        Param("shift_intensity", boolean, False,
              "shift a volume with negative values so its minimum is zero (true/false)"),
        Param("clip_negative_vals", boolean, False, "set negative values to zero (true/false)"),
        Param("grouping", str, LOW_BIAS_OPTIONS["grouping"],
              "predict each volume from all others (all, default), regress within b0s and within DWIs "
              "(b0_dwi, DIPY), or within each shell", choices=("all", "b0_dwi", "shell")),
        Param("fit_mask", str, LOW_BIAS_OPTIONS["mask"],
              "fit the regressions inside an automatic b0 brain mask where the image has background around "
              "the brain (auto, default), or on every voxel (none, DIPY); the prediction is made everywhere",
              choices=("auto", "none")),
        Param("tile", tile_option, LOW_BIAS_OPTIONS["tile"],
              "fit the regressions also in cubes overlapping by half (auto, default: an edge holding 5 voxels per "
              "volume; or an edge 'e' or 'x,y,z'), or once for the whole image (none, DIPY)"),
        Param("blend", str, LOW_BIAS_OPTIONS["blend"],
              "blend each volume's prediction with the input by the weight of least expected error, from the "
              "Marchenko-Pastur noise level of the fitted voxels (volume, default), or not (none, DIPY)",
              choices=("volume", "none")),
        Param("noise_floor", str, LOW_BIAS_OPTIONS["noise_floor"],
              "remove the Rician/noncentral-chi noise floor with that noise level (koay, default) or not "
              "(none, DIPY)", choices=("koay", "none")),
        Param("n_coils", positive(int), default_of(patch2self, "n_coils"),
              "receive channels of a sum-of-squares magnitude, for --patch2self-noise-floor koay"),
    ),
))
