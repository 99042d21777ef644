"""WASA super-resolution: registration (``methods/superres.py`` holds the method)."""

from __future__ import annotations

import numpy as np

from bids_denoise.contract import MethodResult, MethodSpec, Param, Reference, auto_or, integer_list
from bids_denoise.methods.superres import super_resolve
from bids_denoise.registry import register
from bids_denoise.registry._training import budget, budget_params

ZHAO2021 = Reference(
    "zhao2021",
    "Zhao C, Dewey BE, Pham DL, Calabresi PA, Reich DS, Prince JL. SMORE: A Self-Supervised Anti-Aliasing and "
    "Super-Resolution Algorithm for MRI Using Deep Learning. IEEE Transactions on Medical Imaging 40:805-817, 2021.",
    "@article{zhao2021,\n  author={Zhao, Can and Dewey, Blake E. and Pham, Dzung L. and Calabresi, Peter A. and "
    "Reich, Daniel S. and Prince, Jerry L.},\n  title={SMORE: A Self-Supervised Anti-Aliasing and "
    "Super-Resolution Algorithm for MRI Using Deep Learning},\n  journal={IEEE Transactions on Medical Imaging},\n"
    "  volume={40},\n  pages={805--817},\n  year={2021}\n}",
)


def run(inputs, parameters) -> MethodResult:
    axes = parameters["axes"]
    if axes == "auto":  # the through-plane axis: the largest voxel size
        axes = [int(np.argmax(inputs.zooms))]
    scale = int(parameters["scale"])
    series = inputs.data if inputs.is_series else inputs.data[..., None]
    # one network per axis, trained on a b0 (or the image), applied to every volume
    reference = series[..., int(np.argmin(inputs.bvals))] if inputs.bvals is not None else series[..., 0]
    affine, histories, outputs = inputs.affine, [], [series[..., v] for v in range(series.shape[3])]
    for axis in axes:
        trained, model = super_resolve(reference, affine, axis=axis, scale=scale, seed=inputs.seed,
                                       device=inputs.device, **budget(parameters))
        histories.append({"axis": axis, **trained.history})
        reference = trained.image
        outputs = [super_resolve(volume, affine, axis=axis, scale=scale, device=inputs.device, model=model)[0].image
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
    params=(
        Param("scale", int, 2, "resolution factor", choices=(2, 4), aliases=("--sr-scale",)),
        Param("axes", auto_or(integer_list), "auto",
              "voxel axes to super-resolve, e.g. '2' or '0,2' (auto: the thickest)", aliases=("--sr-axes",)),
    ) + budget_params(super_resolve, unit="patches"),
))
