"""NORDIC: registration (``methods/nordic.py`` holds the method)."""

from __future__ import annotations

import numpy as np

from bids_denoise.contract import ImageParam, MethodResult, MethodSpec, OutputMap, Param, params_from
from bids_denoise.methods.nordic import NordicOptions, nordic
from bids_denoise.registry import register
from bids_denoise.registry._references import MOELLER2021, VIZIOLI2021


def check(parameters) -> str | None:
    if parameters["noise_map"] is not None and parameters["noise_volumes"]:
        return "--nordic-noise-map and --nordic-noise-volumes both set the noise level: give one"
    if isinstance(parameters["noise_map"], str) and parameters["gfactor_map"] is not None:
        return ("--nordic-noise-map as a map already holds the g-factor: give --nordic-gfactor-map with a noise level "
                "(one number) or alone")
    return None


def run(inputs, parameters) -> MethodResult:
    magnitudes = inputs.split(inputs.data)
    phase = inputs.phase if parameters["phase"] == "use" else None
    phases = None if phase is None else inputs.split(phase)
    several = len(magnitudes) > 1
    options = NordicOptions.from_values(dict(parameters, joint=parameters["echoes"] == "joint"))
    result = nordic(magnitudes if several else magnitudes[0], (phases if several else phases[0]) if phases else None,
                    options, noise_sigma=parameters["noise_map"], gfactor=parameters["gfactor_map"], seed=inputs.seed)
    parts = result.denoised if several else [result.denoised]
    details = dict(result.details)
    maps = {
        "noise": OutputMap(result.noise_sigma, "NORDIC noise level: standard deviation of the thermal noise per "
                                               "voxel", summary_key="NoiseSigmaMedian"),
        "rank": OutputMap(result.rank, "NORDIC rank: components kept per voxel (averaged over patches)"),
    }
    sidecar, warnings = {}, []
    if parameters["noise_volumes"]:
        sidecar["NoiseScansRemoved"] = parameters["noise_volumes"]
        warnings.append(f"the last {parameters['noise_volumes']} volumes were noise scans: they set the threshold "
                        "and are not in this series")
    if inputs.phase is not None and phase is None:
        warnings.append("the phase image was not used (--nordic-phase ignore)")
    what = "complex, phase-demodulated" if phase is not None else "magnitude"
    echoes = f", {len(parts)} echoes {'together' if details.get('joint') else 'one by one'}" if several else ""
    return MethodResult(np.concatenate(parts, axis=3), f"BOLD series denoised with NORDIC ({what}{echoes}, locally "
                        "low-rank, hard threshold at the thermal noise level)", maps=maps, details=details,
                        sidecar=sidecar, warnings=warnings, member_volumes=tuple(p.shape[3] for p in parts))


def describe(parameters) -> str:
    noise = (f"the last {parameters['noise_volumes']} volumes (noise scans)" if parameters["noise_volumes"]
             else "the Marchenko-Pastur distribution of the data")
    if parameters["noise_map"] is not None:
        noise = ("a given noise level" if isinstance(parameters["noise_map"], float) else
                 "a given noise map, by which the data were divided before and multiplied after")
    if parameters["gfactor_map"] is not None:
        noise += (", the data divided by a given g-factor map before denoising and multiplied by it after (g-factor "
                  "normalisation)")
    complex_runs = (" Complex runs (part-mag with part-phase) were denoised as complex data after each volume's "
                    "slowly varying phase was removed." if parameters["phase"] == "use" else "")
    complex_runs += (" The echoes of multi-echo runs were denoised "
                     f"{'together (one decomposition)' if parameters['echoes'] == 'joint' else 'one by one'}.")
    return ("BOLD series were denoised with NORDIC [moeller2021] [vizioli2021]: locally low-rank patches "
            f"(about {parameters['patch_ratio']:g} voxels per volume) whose singular values below the thermal "
            f"noise level, estimated from {noise}, were set to zero; overlapping patches were averaged."
            + complex_runs)


SPEC = register(MethodSpec(
    name="nordic",
    title="NORDIC",
    summary="locally low-rank denoising of BOLD with a hard threshold at the thermal noise level (magnitude; "
            "experimental: see docs/benchmarks.md, BOLD)",
    run=run,
    check=check,
    describe=describe,
    references=(MOELLER2021, VIZIOLI2021),
    modalities=("bold",),
    mem_gb=0.5,
    # measured: 10.6-14x the series in extra memory (float64 and complex copies; benchmarks/scale.py)
    mem_per_input=15.0,
    joint=("echoes",),
    takes_phase=True,
    params=params_from(NordicOptions) + (
        ImageParam("noise_map", default=None, numbers=True, what="noise map",
                   help="a known noise level: one number, or a 3D NIfTI map of the noise standard deviation on the "
                        "run's grid (the data are divided by it before denoising and multiplied after)"),
        ImageParam("gfactor_map", default=None, strict=True, what="g-factor map",
                   help="a 3D NIfTI g-factor map on the run's grid (unitless, above zero): the data are divided by it "
                        "before denoising and multiplied after, and the noise level is measured (noise volumes or "
                        "the data) unless --nordic-noise-map gives it as one number"),
        Param("phase", str, "use", "complex runs (part-mag with a part-phase image): denoise them as complex data "
              "(use, default) or the magnitude alone (ignore)", choices=("use", "ignore")),
        Param("echoes", str, "joint", "multi-echo runs: one decomposition for all echoes (joint, default) or "
              "each echo alone (separate)", choices=("joint", "separate")),
    ),
))
