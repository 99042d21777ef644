"""Patch2Self: registration (``methods/patch2self.py`` holds the method)."""

from __future__ import annotations

import numpy as np

from bids_denoise.contract import MethodResult, MethodSpec, Param, floor_warning, params_from
from bids_denoise.methods.patch2self import LOW_BIAS_OPTIONS, Patch2SelfOptions, patch2self
from bids_denoise.registry import register
from bids_denoise.registry._references import BATSON2019, CORDEROGRANDE2019, FADNAVIS2020, KOAY2006

#: parameters shared by our implementation and DIPY's
COMMON = ("patch_radius", "model", "alpha", "b0_threshold", "b0_denoising", "shift_intensity", "clip_negative_vals")


def run(inputs, parameters) -> MethodResult:
    common = {key: parameters[key] for key in COMMON}
    if parameters["backend"] == "dipy":
        return _run_dipy(inputs, parameters, common)
    noise_floor, refused = floor_warning(inputs.data, parameters["noise_floor"])
    denoised, info = patch2self(inputs.data, inputs.bvals,
                                Patch2SelfOptions.from_values(dict(parameters, noise_floor=noise_floor)),
                                device=inputs.device, return_info=True)
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
    warnings, description = [refused] if refused else [], "DWI series denoised with Patch2Self"
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
    mem_gb=0.5,
    # measured: 3.4-3.8x the series in extra memory below its 32 MiB chunks, less above (benchmarks/scale.py)
    mem_per_input=4.5,
    params=(
        Param("backend", str, "bids-denoise", "implementation: ours (exact Gram-matrix solve) or DIPY's",
              choices=("bids-denoise", "dipy")),
    ) + params_from(
        Patch2SelfOptions,
        # the app's defaults are the ones that do no harm (LOW_BIAS_OPTIONS); DIPY's are the function's
        defaults={name: getattr(LOW_BIAS_OPTIONS, name) for name in ("grouping", "fit_mask", "tile", "blend",
                                                                     "noise_floor")},
    ),
))
