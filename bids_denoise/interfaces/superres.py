"""Nipype interface and registry entry for WASA super-resolution (``--super-resolution wasa``)."""

from __future__ import annotations

import numpy as np

from bids_denoise.interfaces.base import MethodInterface
from bids_denoise.registry import MethodSpec, Param, register


def _axes(value):
    return "auto" if str(value) == "auto" else [int(v) for v in str(value).replace(",", " ").split()]


class SuperResolve(MethodInterface):
    """Train WASA on the run's own in-plane detail, then raise the resolution along the chosen axes."""

    method_name = "wasa"

    def _denoise(self, data, bvals, bvecs, mask, parameters, device):
        from bids_denoise.methods.superres import super_resolve

        zooms = np.linalg.norm(self._reference_affine[:3, :3], axis=0)
        axes = parameters["axes"]
        if axes == "auto":  # the through-plane axis: the largest voxel size
            axes = [int(np.argmax(zooms))]
        scale = int(parameters["scale"])
        series = data if data.ndim == 4 else data[..., None]
        # one network per axis, trained on a b0 (or the image), applied to every volume
        reference_volume = series[..., int(np.argmin(bvals))] if bvals is not None else series[..., 0]
        affine, histories, outputs = self._reference_affine, [], [series[..., v] for v in range(series.shape[3])]
        budget = {k: parameters[k] for k in ("epochs", "max_seconds", "steps_per_epoch", "batch_size")}
        for axis in axes:
            trained, model = super_resolve(reference_volume, affine, axis=axis, scale=scale, seed=self.inputs.seed,
                                           device=device, **budget)
            histories.append({"axis": axis, **trained.history})
            reference_volume = trained.image
            outputs = [super_resolve(v, affine, axis=axis, scale=scale, device=device, model=model)[0].image
                       for v in outputs]
            affine = trained.affine
        label = f"sr{scale}" + ("" if len(axes) == 1 else "x" + "".join(str(a) for a in axes))
        self._output_affine = affine
        self._output_entities = {"res": label}
        self._output_sidecar = {
            "Resolution": {label: f"x{scale} along voxel axes {axes} by WASA super-resolution "
                                  f"(voxel size {np.round(np.linalg.norm(affine[:3, :3], axis=0), 3).tolist()} mm)"}
        }
        result = np.stack(outputs, axis=-1)
        details = {"axes": axes, "scale": scale, "history": histories[0] if len(histories) == 1 else
                   {"epochs": histories[-1]["epochs"], "stopped": "; ".join(h["stopped"] for h in histories)},
                   "_description": f"Super-resolved x{scale} along voxel axes {axes} (WASA)"}
        return (result[..., 0] if data.ndim == 3 else result), {}, details


register(MethodSpec(
    name="wasa", interface=SuperResolve, uses_gpu=True, mem_gb=4.0, modalities=("dwi", "anat"),
    description="WASA wavelet-attention super-resolution, trained on the subject's own in-plane detail (SMORE-style)",
    citation="Zhao C. et al. SMORE: A Self-Supervised Anti-Aliasing and Super-Resolution Algorithm for MRI Using "
             "Deep Learning. IEEE Transactions on Medical Imaging 40 (2021) 805-817.",
    params=(
        Param("scale", int, 2, "resolution factor", choices=(2, 4), aliases=("--sr-scale",)),
        Param("axes", _axes, "auto", "voxel axes to super-resolve, e.g. '2' or '0,2' (auto: the thickest)",
              aliases=("--sr-axes",)),
        Param("epochs", int, 30, "training epochs at most"),
        Param("max_seconds", float, 900.0, "training time budget in seconds (per axis)"),
        Param("steps_per_epoch", int, 40, "optimiser steps per epoch"),
        Param("batch_size", int, 8, "patches per batch"),
    ),
))
