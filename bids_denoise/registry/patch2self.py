"""Patch2Self: registration (``methods/patch2self.py`` holds the method)."""

from __future__ import annotations

import numpy as np

from bids_denoise.contract import MethodResult, MethodSpec, Param, Reference, boolean, integers
from bids_denoise.methods.patch2self import patch2self
from bids_denoise.registry import register

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


def run(inputs, parameters) -> MethodResult:
    common = {key: parameters[key] for key in COMMON}
    if parameters["backend"] == "dipy":
        return _run_dipy(inputs, parameters, common)
    mask = None
    if parameters["fit_mask"] == "auto":
        from bids_denoise.methods.masking import b0_brain_mask

        mask = b0_brain_mask(inputs.data, inputs.bvals, b0_threshold=parameters["b0_threshold"])
    denoised, info = patch2self(inputs.data, inputs.bvals, grouping=parameters["grouping"], mask=mask,
                                device=inputs.device, return_info=True, **common)
    details = {
        "backend": "bids-denoise",
        "groups": info.groups,
        "passed_through_volumes": info.passed_through,
        "fit_voxels": info.fit_voxels,
        "regularised_groups": info.regularised_groups,
    }
    warnings, description = [], "DWI series denoised with Patch2Self"
    if info.passed_through:
        warnings.append(f"volumes {info.passed_through} are alone in their group: passed through unchanged")
        if len(info.passed_through) == inputs.data.shape[3]:
            description = "DWI series passed through unchanged: no Patch2Self group had two volumes"
    return MethodResult(denoised, description, details=details, warnings=warnings)


def _run_dipy(inputs, parameters, common) -> MethodResult:
    from dipy.denoise.patch2self import patch2self as dipy_patch2self

    if parameters["grouping"] != "b0_dwi":
        raise ValueError("--patch2self-backend dipy supports only --patch2self-grouping b0_dwi")
    version = 1 if common["patch_radius"] not in (0, [0, 0, 0]) else 3
    if version == 3:
        del common["patch_radius"]  # DIPY's version 3 refuses any patch_radius argument
    denoised = dipy_patch2self(inputs.data, inputs.bvals, version=version, verbose=False, **common)
    return MethodResult(denoised.astype(np.float32), "DWI series denoised with Patch2Self (DIPY)",
                        details={"backend": f"dipy version={version}"})


def describe(parameters) -> str:
    how = ("DIPY's implementation" if parameters["backend"] == "dipy" else
           "an exact implementation that derives every leave-one-volume-out regression from one Gram matrix")
    return (f"Diffusion-weighted images were denoised with Patch2Self [fadnavis2020], using {how} "
            f"(patch radius {parameters['patch_radius']}, {parameters['model']} regression, "
            f"b0 threshold {parameters['b0_threshold']:g} s/mm², grouping {parameters['grouping']}).")


SPEC = register(MethodSpec(
    name="patch2self",
    title="Patch2Self",
    summary="each volume predicted from the other volumes of its group by leave-one-volume-out regression "
            "(exact: every regression from one Gram matrix)",
    run=run,
    describe=describe,
    references=(FADNAVIS2020,),
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
        Param("grouping", str, "b0_dwi", "regress within b0s and all DWIs, or within each shell",
              choices=("b0_dwi", "shell")),
        Param("fit_mask", str, "none", "fit the regressions inside an automatic b0 brain mask "
              "(prediction is made everywhere)", choices=("none", "auto")),
    ),
))
