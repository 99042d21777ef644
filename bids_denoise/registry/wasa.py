"""WASA super-resolution: registration (``methods/superres.py`` holds the method)."""

from __future__ import annotations

import dataclasses

import numpy as np

from bids_denoise.contract import MethodResult, MethodSpec, Param, auto_or, integer_list, number, params_from, positive
from bids_denoise.methods.superres import WASAOptions, super_resolve
from bids_denoise.registry import register
from bids_denoise.registry._references import ZHAO2021

SCALES = (2, 4)


def scale_for(zoom: float, target: float) -> int | None:
    """The network's scale (2 or 4) that brings a voxel of ``zoom`` mm to ``target`` mm or finer, the smallest
    that does (4 where none does); None where the voxel is already at most the target."""
    if zoom <= target * 1.01:
        return None
    return next((scale for scale in SCALES if zoom / scale <= target * 1.01), SCALES[-1])


def run(inputs, parameters) -> MethodResult:
    axes = parameters["axes"]
    if axes == "auto":  # the through-plane axis: the largest voxel size
        axes = [int(np.argmax(inputs.zooms))]
    options = WASAOptions.from_values(parameters)
    scales = {axis: options.scale for axis in axes}
    warnings = []
    if parameters["target"] is not None:  # the scale of each axis from the voxel size asked for
        scales = {axis: scale_for(float(inputs.zooms[axis]), parameters["target"]) for axis in axes}
        kept = [axis for axis in axes if scales[axis] is None]
        if kept:
            warnings.append(f"voxel axes {kept} are already at most {parameters['target']:g} mm: not super-resolved")
        axes = [axis for axis in axes if scales[axis] is not None]
        if not axes:
            from bids_denoise.methods.core.errors import UnsuitableDataError

            raise UnsuitableDataError(f"every voxel axis asked for is already at most {parameters['target']:g} mm "
                                      f"(voxel size {np.round(inputs.zooms, 3).tolist()} mm): nothing to super-resolve")
    scale = max(scales[axis] for axis in axes)
    series = inputs.data if inputs.is_series else inputs.data[..., None]
    # one network per axis, trained on a b0 (or the image), applied to every volume
    reference = series[..., int(np.argmin(inputs.bvals))] if inputs.bvals is not None else series[..., 0]
    affine, histories, outputs = inputs.affine, [], [series[..., v] for v in range(series.shape[3])]
    for axis in axes:
        along = options.replace(axis=axis, scale=scales[axis])
        trained, model = super_resolve(reference, affine, along, seed=inputs.seed, device=inputs.device)
        histories.append({"axis": axis, **trained.history})
        reference = trained.image
        outputs = [super_resolve(volume, affine, along, model=model, device=inputs.device)[0].image
                   for volume in outputs]
        affine = trained.affine
    label = f"sr{scale}" + ("" if len(axes) == 1 else "x" + "".join(str(a) for a in axes))
    if len({scales[axis] for axis in axes}) > 1:
        label = "sr" + "x".join(f"{scales[axis]}a{axis}" for axis in axes)
    zooms = np.round(np.linalg.norm(affine[:3, :3], axis=0), 3).tolist()
    history = histories[0] if len(histories) == 1 else {
        "epochs": histories[-1]["epochs"], "stopped": "; ".join(h["stopped"] for h in histories)}
    image = np.stack(outputs, axis=-1)
    return MethodResult(
        image if inputs.is_series else image[..., 0],
        f"Super-resolved along voxel axes {axes}, x{[scales[axis] for axis in axes]} (WASA) to voxels of {zooms} mm",
        details={"axes": axes, "scale": scale, "scales": [scales[axis] for axis in axes], "voxel_size": zooms,
                 "history": history},
        warnings=warnings,
        affine=affine,
        entities={"res": label},
        sidecar={"Resolution": {label: f"x{[scales[axis] for axis in axes]} along voxel axes {axes} by WASA "
                                       f"super-resolution (voxel size {zooms} mm)"}},
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
    target = Param("target", _millimetres, None,
                   "the voxel size (mm) to reach along those axes: each axis gets the scale (2 or 4) that reaches it "
                   "(in place of --sr-scale); e.g. 1 for a 1x1x4 mm image", aliases=("--sr-target",))
    return (scale, axes, target) + tuple(params.values())


def _millimetres(text) -> float:
    """A voxel size in millimetres, above zero."""
    return positive(number)(text)


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
