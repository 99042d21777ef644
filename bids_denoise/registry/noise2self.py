"""Noise2Self: registration (``methods/noise2self.py`` holds the method)."""

from __future__ import annotations

from bids_denoise.contract import MethodResult, MethodSpec, params_from
from bids_denoise.methods.noise2self import Noise2SelfOptions, noise2self
from bids_denoise.registry import register
from bids_denoise.registry._references import BATSON2019
from bids_denoise.registry._training import save_weights


def run(inputs, parameters) -> MethodResult:
    options = Noise2SelfOptions.from_values(parameters)
    if not inputs.is_series:  # an image alone has no series
        options = options.replace(context="volume")
    result = noise2self(inputs.data, inputs.bvals, inputs.bvecs, options, seed=inputs.seed, device=inputs.device)
    details = {"context": result.context, "history": result.history, "final_validation_loss": result.final_loss,
               "weights": save_weights(result.state_dict, inputs.work_dir),
               "volume_context_volumes": list(result.volume_context_volumes),
               "blend": {"choices": result.choices, "blend_weights": result.blend_weights,
                         "blends": result.blends, "contrast_guard": result.guard}}
    warnings = []
    if result.choices and all(choice == "identity" for choice in result.choices):
        warnings.append("the network did not lower the estimated error of any volume: the input was returned "
                        "unchanged")
    if result.volume_context_volumes:
        warnings.append(f"volumes {list(result.volume_context_volumes)} are alone in their shell: denoised in the "
                        "volume context (from themselves only)")
    what = "DWI series" if inputs.bvals is not None else "Image"
    return MethodResult(result.denoised, f"{what} denoised with Noise2Self", details=details, warnings=warnings)


def describe(parameters) -> str:
    return ("Images were denoised with a J-invariant network trained by Noise2Self [batson2019] on the run itself "
            f"({parameters['context']} context, masker width {parameters['mask_width']}); for each volume the "
            "input, the J-invariant output and the single-pass output, each blended with the input, were weighed "
            "by their self-supervised risk estimates and the least kept, and, for DWI, every weight was scaled "
            "down until the angular contrast it lost was paid for by the noise it removed.")


SPEC = register(MethodSpec(
    name="noise2self",
    title="Noise2Self",
    summary="a J-invariant U-Net trained on the run itself (masked self-supervised loss)",
    run=run,
    describe=describe,
    references=(BATSON2019,),
    modalities=("dwi", "anat"),
    uses_gpu=True,
    learned=True,
    mem_gb=1.0,
    # measured: 16-20x the series in extra memory (benchmarks/scale.py)
    mem_per_input=20.0,
    # the app's default context is the series (the function's, the volume: it needs no b-values)
    params=params_from(Noise2SelfOptions, defaults={"context": "series"}),
))
