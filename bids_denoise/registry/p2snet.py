"""P2S-Net: registration (``methods/p2snet.py`` holds the method)."""

from __future__ import annotations

from bids_denoise.contract import MethodResult, MethodSpec, params_from
from bids_denoise.methods.p2snet import P2SNetOptions, p2snet
from bids_denoise.registry import register
from bids_denoise.registry._references import FADNAVIS2020, KOAY2006, XIANG2023
from bids_denoise.registry._training import save_weights


def run(inputs, parameters) -> MethodResult:
    result = p2snet(inputs.data, inputs.bvals, inputs.bvecs, P2SNetOptions.from_values(parameters), seed=inputs.seed,
                    device=inputs.device)
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
    mem_gb=1.5,
    # measured: 0.8 GB fixed and 10-11x the series in extra memory (benchmarks/scale.py)
    mem_per_input=12.0,
    params=params_from(P2SNetOptions),
))
