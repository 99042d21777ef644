"""Noise2Noise: registration (``methods/noise2noise.py`` holds the method)."""

from __future__ import annotations

import numpy as np

from bids_denoise.contract import MethodResult, MethodSpec, Param, params_from
from bids_denoise.methods.noise2noise import Noise2NoiseOptions, noise2noise
from bids_denoise.registry import register
from bids_denoise.registry._references import LEHTINEN2018
from bids_denoise.registry._training import save_weights


def run(inputs, parameters) -> MethodResult:
    result = noise2noise(inputs.data, inputs.bvals, inputs.bvecs, Noise2NoiseOptions.from_values(parameters),
                         seed=inputs.seed, device=inputs.device)
    pairs = [{"volume": a, "partner": b, "angle_deg": round(float(angle), 1)} for a, b, angle in result.pairs]
    details = {
        "pairing": result.pairing,
        "pairs": pairs,
        "passed_through_volumes": result.passed_through,
        "blend_weights": result.blend_weights,
        "contrast_guard": result.guard,
        "history": result.history,
        "pair_psnr": result.pair_psnr,
        "pair_ssim": result.pair_ssim,
        "weights": None if result.state_dict is None else save_weights(result.state_dict, inputs.work_dir),
    }
    warnings = list(result.warnings)
    if inputs.job == "session":
        runs = len(inputs.member_volumes)
        run_of = np.repeat(np.arange(runs), inputs.member_volumes)  # each stacked volume's run
        details["session_runs"] = runs
        across = sum(1 for a, b, _ in result.pairs if run_of[a] != run_of[b])
        details["pairs_across_runs"] = across
        if runs > 1 and not across:
            warnings.append(f"the session's {runs} DWI runs share no direction within the maximum angle: each run was "
                            "trained on its own repeats")
    if result.pairing == "nearest":
        warnings.append("nearest-direction pairing: the training targets are other gradient directions, so the "
                        "network averages neighbouring directions and biases FA (see the README's measurements)")
    description = ("DWI series denoised with Noise2Noise" if result.pairs
                   else "DWI series returned unchanged: Noise2Noise found no repeated measurement to train on")
    return MethodResult(result.denoised, description, details=details, warnings=warnings,
                        tables={"Volume pairs used for training": pairs} if pairs else {})


def describe(parameters) -> str:
    if parameters["pairing"] == "nearest":
        pairs = "each volume to the volume of its shell with the nearest gradient direction"
    else:
        pairs = (f"each volume to a repeated measurement of it (the other b0s; the same direction within "
                 f"{parameters['max_angle']:g} degrees in its shell), volumes with no repeat left unchanged")
    where = ("the DWI runs of the session (same grid) together" if parameters["scope"] == "session"
             else "the run itself")
    if parameters["scope"] == "session" and parameters["pairing"] != "nearest":
        pairs = pairs.replace("a repeated measurement of it", "a repeated measurement of it in any run of the session")
    return ("Diffusion-weighted images were denoised with Noise2Noise [lehtinen2018]: a U-Net trained on "
            f"{where} to map {pairs}, its output blended with the input by the weight that best predicts the "
            "repeat, scaled down until the angular contrast it lost was paid for by the noise it removed (slices "
            f"along axis {parameters['slice_axis']}, at most {parameters['epochs']} epochs).")


SPEC = register(MethodSpec(
    name="noise2noise",
    title="Noise2Noise",
    summary="a U-Net trained on the run to map each volume to a repeated measurement of it (b0s, repeated "
            "directions); nearest-direction pairing as an option",
    run=run,
    describe=describe,
    references=(LEHTINEN2018,),
    modalities=("dwi",),
    uses_gpu=True,
    learned=True,
    mem_gb=1.0,
    # measured: 12-14x the series in extra memory (benchmarks/scale.py)
    mem_per_input=14.0,
    joint=lambda parameters: ("session",) if parameters["scope"] == "session" else (),
    params=params_from(Noise2NoiseOptions, helps={
        "pairing": "pair repeated measurements (repeats: b0s, directions within --noise2noise-max-angle) or each "
                   "volume with the nearest direction of its shell (nearest: biases FA)"}) + (
        Param("scope", str, "run",
              "train on each run's own repeats (run, default) or on all DWI runs of a session with the same grid "
              "together (session): a repeated run's volumes are true Noise2Noise pairs for each other",
              choices=("run", "session")),
    ),
))
