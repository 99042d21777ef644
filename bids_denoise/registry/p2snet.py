"""P2S-Net: registration (``methods/p2snet.py`` holds the method)."""

from __future__ import annotations

from bids_denoise.contract import MethodResult, MethodSpec, Param, Reference, boolean, default_of, positive
from bids_denoise.methods.p2snet import p2snet
from bids_denoise.registry import register
from bids_denoise.registry._training import budget, budget_params, save_weights
from bids_denoise.registry.mppca import KOAY2006
from bids_denoise.registry.patch2self import FADNAVIS2020

XIANG2023 = Reference(
    "xiang2023",
    "Xiang T, Yurt M, Syed AB, Setsompop K, Chaudhari A. DDM2: Self-Supervised Diffusion MRI Denoising with "
    "Generative Diffusion Models. ICLR 2023.",
    "@inproceedings{xiang2023,\n  author={Xiang, Tiange and Yurt, Mahmut and Syed, Ali B. and Setsompop, Kawin and "
    "Chaudhari, Akshay},\n  title={{DDM2}: Self-Supervised Diffusion {MRI} Denoising with Generative Diffusion "
    "Models},\n  booktitle={ICLR},\n  year={2023}\n}",
)


def run(inputs, parameters) -> MethodResult:
    result = p2snet(
        inputs.data, inputs.bvals, inputs.bvecs, subspace_extent=parameters["subspace_extent"],
        width=parameters["width"], layers=parameters["layers"],
        crop=parameters["crop"], blend=parameters["blend"], noise_floor=parameters["noise_floor"],
        shell_tolerance=parameters["shell_tolerance"], seed=inputs.seed, device=inputs.device, **budget(parameters),
    )
    details = {"history": result.history, "blend_weights": result.blend_weights,
               "held_out_volumes": result.held_out_volumes, "contrast_guard": result.guard, "noise_floor_removed": result.noise_floor_removed,
               "weights": save_weights(result.state_dict, inputs.work_dir)}
    warnings = []
    kept = [v for v, weight in enumerate(result.blend_weights) if weight == 0.0]
    if kept:
        warnings.append(f"volumes {kept}: the network did not lower the estimated error, the input was kept")
    return MethodResult(result.denoised, "DWI series denoised with P2S-Net", details=details, warnings=warnings)


def describe(parameters) -> str:
    floor = (" The noise floor of the magnitude was removed from the network's prediction [koay2006]."
             if parameters["noise_floor"] == "koay" else "")
    return ("Diffusion-weighted images were denoised with a J-invariant network trained on the run itself: each "
            "volume predicted from the other volumes (their local signal subspace and spherical-harmonic "
            "predictions at its gradient direction, with their spatial neighbourhood), never from itself, as in Patch2Self [fadnavis2020] and the first stage "
            "of DDM2 [xiang2023]; each volume's output was blended with the input by the weight that minimises the "
            "self-supervised estimate of its error, scaled down until the angular contrast it lost was paid for by "
            f"the noise it removed (at most {parameters['epochs']} epochs, "
            f"{parameters['max_seconds']:g} s).{floor}")


SPEC = register(MethodSpec(
    name="p2snet",
    title="P2S-Net",
    summary="a diffusion-aware J-invariant CNN: each volume predicted from the other volumes and the b-vectors, "
            "trained on the run itself, blended with the input where it does not help",
    run=run,
    describe=describe,
    references=(FADNAVIS2020, XIANG2023, KOAY2006),
    modalities=("dwi",),
    uses_gpu=True,
    learned=True,
    mem_gb=4.0,
    params=budget_params(p2snet, unit="crops") + (
        Param("subspace_extent", positive(int), default_of(p2snet, "subspace_extent"),
              "window side (odd) of the local-subspace prediction"),
        Param("width", positive(int), default_of(p2snet, "width"), "hidden channels of the CNN"),
        Param("layers", positive(int), default_of(p2snet, "layers"), "3x3x3 convolution layers"),
        Param("crop", positive(int), default_of(p2snet, "crop"), "side of the training crops in voxels"),
        Param("blend", boolean, default_of(p2snet, "blend"),
              "blend each volume with the input by the self-supervised risk (false: the network's output as is)"),
        Param("noise_floor", str, default_of(p2snet, "noise_floor"),
              "remove the Rician noise floor at the end (koay) or not (none)", choices=("koay", "none")),
        Param("shell_tolerance", positive(float), default_of(p2snet, "shell_tolerance"),
              "b-value gap that separates shells"),
    ),
))
