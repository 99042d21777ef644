"""Nipype interface and registry entry for Patch2Self."""

from __future__ import annotations

import logging

from bids_denoise.interfaces.base import MethodInterface
from bids_denoise.registry import MethodSpec, Param, register

LOGGER = logging.getLogger("bids_denoise")


def _radius(text):
    values = [int(v) for v in str(text).replace(",", " ").split()]
    return values[0] if len(values) == 1 else values


class Patch2SelfDenoise(MethodInterface):
    """Patch2Self (ours, exact and fast; or DIPY's, for comparison)."""

    method_name = "patch2self"

    def _denoise(self, data, bvals, bvecs, mask, parameters, device):
        backend = parameters.get("backend", "bids-denoise")
        common = {
            key: parameters[key]
            for key in ("patch_radius", "model", "alpha", "b0_threshold", "b0_denoising",
                        "shift_intensity", "clip_negative_vals")
        }
        if backend == "dipy":
            import numpy as np
            from dipy.denoise.patch2self import patch2self as dipy_patch2self

            if parameters.get("grouping", "b0_dwi") != "b0_dwi":
                raise ValueError("--patch2self-backend dipy supports only --patch2self-grouping b0_dwi")
            version = 1 if common["patch_radius"] not in (0, [0, 0, 0]) else 3
            if version == 3:
                del common["patch_radius"]  # DIPY's version 3 refuses any patch_radius argument
            denoised = dipy_patch2self(data, bvals, version=version, verbose=False, **common)
            return denoised.astype(np.float32), {}, {"backend": f"dipy version={version}"}

        from bids_denoise.methods.masking import b0_brain_mask
        from bids_denoise.methods.patch2self import patch2self

        if parameters.get("fit_mask", "none") == "auto" and mask is None:
            mask = b0_brain_mask(data, bvals, b0_threshold=common["b0_threshold"])
        denoised, info = patch2self(
            data, bvals, grouping=parameters.get("grouping", "b0_dwi"), mask=mask,
            device=device, return_info=True, **common,
        )
        details = {
            "backend": "bids-denoise",
            "groups": info.groups,
            "passed_through_volumes": info.passed_through,
            "fit_voxels": info.fit_voxels,
            "regularised_groups": info.regularised_groups,
        }
        return denoised, {}, details


SPEC = register(
    MethodSpec(
        name="patch2self",
        interface=Patch2SelfDenoise,
        description=(
            "Patch2Self self-supervised denoising: each volume predicted from the other "
            "volumes of its group by leave-one-volume-out linear regression"
        ),
        modalities=("dwi",),
        uses_gpu=True,
        mem_gb=4.0,
        citation=(
            "Fadnavis S., Batson J., Garyfallidis E. Patch2Self: Denoising Diffusion MRI with "
            "Self-Supervised Learning. Advances in Neural Information Processing Systems 33 (2020)."
        ),
        params=(
            Param("backend", str, "bids-denoise", "implementation: ours (exact Gram-matrix solve) or DIPY's",
                  choices=("bids-denoise", "dipy")),
            Param("patch_radius", _radius, 0, "radius of the neighbourhood each volume contributes (0, or 'r' or 'rx,ry,rz')"),
            Param("model", str, "ols", "regression model", choices=("ols", "ridge")),
            Param("alpha", float, 1.0, "ridge penalty (model ridge)"),
            Param("b0_threshold", float, 50.0, "b-values up to this are b0 volumes"),
            Param("b0_denoising", lambda v: str(v).lower() in ("1", "true", "yes"), True,
                  "denoise the b0 volumes too (true/false)"),
            Param("shift_intensity", lambda v: str(v).lower() in ("1", "true", "yes"), False,
                  "shift a volume with negative values so its minimum is zero (true/false)"),
            Param("clip_negative_vals", lambda v: str(v).lower() in ("1", "true", "yes"), False,
                  "set negative values to zero (true/false)"),
            Param("grouping", str, "b0_dwi", "regress within b0s and all DWIs, or within each shell",
                  choices=("b0_dwi", "shell")),
            Param("fit_mask", str, "none", "fit the regressions inside an automatic b0 brain mask "
                  "(prediction is made everywhere)", choices=("none", "auto")),
        ),
    )
)
