"""WASA super-resolution: registration (``methods/superres.py`` holds the method)."""

from __future__ import annotations

import dataclasses

import numpy as np

from bids_denoise.contract import MethodResult, MethodSpec, Param, auto_or, integer_list, params_from
from bids_denoise.methods.superres import WASAOptions, super_resolve
from bids_denoise.registry import register
from bids_denoise.registry._references import ZHAO2021


def run(inputs, parameters) -> MethodResult:
    axes = parameters["axes"]
    if axes == "auto":  # the through-plane axis: the largest voxel size
        axes = [int(np.argmax(inputs.zooms))]
    options = WASAOptions.from_values(parameters)
    scale = options.scale
    series = inputs.data if inputs.is_series else inputs.data[..., None]
    # one network per axis, trained on a b0 (or the image), applied to every volume
    reference = series[..., int(np.argmin(inputs.bvals))] if inputs.bvals is not None else series[..., 0]
    affine, histories, outputs = inputs.affine, [], [series[..., v] for v in range(series.shape[3])]
    for axis in axes:
        along = options.replace(axis=axis)
        trained, model = super_resolve(reference, affine, along, seed=inputs.seed, device=inputs.device)
        histories.append({"axis": axis, **trained.history})
        reference = trained.image
        outputs = [super_resolve(volume, affine, along, model=model, device=inputs.device)[0].image
                   for volume in outputs]
        affine = trained.affine
    label = f"sr{scale}" + ("" if len(axes) == 1 else "x" + "".join(str(a) for a in axes))
    zooms = np.round(np.linalg.norm(affine[:3, :3], axis=0), 3).tolist()
    history = histories[0] if len(histories) == 1 else {
        "epochs": histories[-1]["epochs"], "stopped": "; ".join(h["stopped"] for h in histories)}
    image = np.stack(outputs, axis=-1)
    return MethodResult(
        image if inputs.is_series else image[..., 0],
        f"Super-resolved x{scale} along voxel axes {axes} (WASA)",
        details={"axes": axes, "scale": scale, "history": history},
        affine=affine,
        entities={"res": label},
        sidecar={"Resolution": {label: f"x{scale} along voxel axes {axes} by WASA super-resolution "
                                       f"(voxel size {zooms} mm)"}},
    )


def describe(parameters) -> str:
    return (f"The resolution was raised x{parameters['scale']} along the through-plane axis by a wavelet-attention "
            "network (WASA) trained on the subject's own in-plane detail, as SMORE [zhao2021] proposes.")


def _params() -> tuple:
    """The scale and the axes first, then the training budget; the function's one ``axis`` is the app's list
    of ``axes`` (an app-only parameter)."""
    params = {param.name: param for param in params_from(WASAOptions)}
    scale = dataclasses.replace(params.pop("scale"), aliases=("--sr-scale",))
    axes = Param("axes", auto_or(integer_list), "auto",
                 "voxel axes to super-resolve, e.g. '2' or '0,2' (auto: the thickest)", aliases=("--sr-axes",))
    return (scale, axes) + tuple(params.values())


SPEC = register(MethodSpec(
    name="wasa",
    title="WASA super-resolution",
    summary="wavelet-attention super-resolution trained on the subject's own in-plane detail (SMORE-style)",
    run=run,
    describe=describe,
    references=(ZHAO2021,),
    role="superres",
    modalities=("dwi", "anat"),
    uses_gpu=True,
    learned=True,
    mem_gb=4.0,
    params=_params(),
))
