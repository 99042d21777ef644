"""Noise2Noise: registration (``methods/noise2noise.py`` holds the method)."""

from __future__ import annotations

from bids_denoise.contract import MethodResult, MethodSpec, Param, Reference, default_of, positive
from bids_denoise.methods.noise2noise import noise2noise
from bids_denoise.registry import register
from bids_denoise.registry._training import budget, budget_params, save_weights

LEHTINEN2018 = Reference(
    "lehtinen2018",
    "Lehtinen J, Munkberg J, Hasselgren J, Laine S, Karras T, Aittala M, Aila T. Noise2Noise: Learning Image "
    "Restoration without Clean Data. ICML 2018.",
    "@inproceedings{lehtinen2018,\n  author={Lehtinen, Jaakko and others},\n  title={Noise2Noise: Learning Image "
    "Restoration without Clean Data},\n  booktitle={ICML},\n  year={2018}\n}",
)


def run(inputs, parameters) -> MethodResult:
    result = noise2noise(
        inputs.data, inputs.bvals, inputs.bvecs, slice_axis=parameters["slice_axis"], context=parameters["context"],
        shell_tolerance=parameters["shell_tolerance"], seed=inputs.seed, device=inputs.device, **budget(parameters),
    )
    pairs = [{"volume": a, "partner": b, "angle_deg": round(float(angle), 1)} for a, b, angle in result.pairs]
    details = {
        "pairs": pairs,
        "passed_through_volumes": result.passed_through,
        "history": result.history,
        "pair_psnr": result.pair_psnr,
        "pair_ssim": result.pair_ssim,
        "weights": save_weights(result.state_dict, inputs.work_dir),
    }
    return MethodResult(result.denoised, "DWI series denoised with Noise2Noise", details=details,
                        tables={"Volume pairs used for training": pairs})


def describe(parameters) -> str:
    return ("Diffusion-weighted images were denoised with Noise2Noise [lehtinen2018]: a U-Net trained on the "
            "run itself to map each volume to the volume of its shell with the nearest gradient direction "
            f"(slices along axis {parameters['slice_axis']}, at most {parameters['epochs']} epochs).")


SPEC = register(MethodSpec(
    name="noise2noise",
    title="Noise2Noise",
    summary="a U-Net trained on the run to map each volume to the nearest-direction volume of its shell",
    run=run,
    describe=describe,
    references=(LEHTINEN2018,),
    modalities=("dwi",),
    uses_gpu=True,
    learned=True,
    mem_gb=4.0,
    params=budget_params(noise2noise) + (
        Param("slice_axis", int, default_of(noise2noise, "slice_axis"), "axis of the 2D slices", choices=(0, 1, 2)),
        Param("context", int, default_of(noise2noise, "context"),
              "neighbouring slices on each side as extra channels (2.5D); 0 = 2D"),
        Param("shell_tolerance", positive(float), default_of(noise2noise, "shell_tolerance"),
              "b-value gap that separates shells"),
    ),
))
