"""NORDIC: registration (``methods/nordic.py`` holds the method)."""

from __future__ import annotations

import numpy as np

from bids_denoise.contract import MethodResult, MethodSpec, OutputMap, Param, Reference, default_of, positive
from bids_denoise.methods.nordic import nordic
from bids_denoise.registry import register
from bids_denoise.registry.mppca import given_noise_sigma, noise_map

MOELLER2021 = Reference(
    "moeller2021",
    "Moeller S, Pisharady PK, Ramanna S, Lenglet C, Wu X, Dowdle L, Yacoub E, Ugurbil K, Akcakaya M. NOise "
    "reduction with DIstribution Corrected (NORDIC) PCA in dMRI with complex-valued parameter-free locally "
    "low-rank processing. NeuroImage 226:117539, 2021.",
    "@article{moeller2021,\n  author={Moeller, Steen and Pisharady, Pramod Kumar and Ramanna, Sudhir and Lenglet, "
    "Christophe and Wu, Xiaoping and Dowdle, Logan and Yacoub, Essa and Ugurbil, Kamil and Akcakaya, Mehmet},\n"
    "  title={NOise reduction with DIstribution Corrected (NORDIC) PCA in dMRI with complex-valued parameter-free "
    "locally low-rank processing},\n  journal={NeuroImage},\n  volume={226},\n  pages={117539},\n  year={2021}\n}",
)
VIZIOLI2021 = Reference(
    "vizioli2021",
    "Vizioli L, Moeller S, Dowdle L, et al. Lowering the thermal noise barrier in functional brain mapping with "
    "magnetic resonance imaging. Nature Communications 12:5181, 2021.",
    "@article{vizioli2021,\n  author={Vizioli, Luca and Moeller, Steen and Dowdle, Logan and others},\n"
    "  title={Lowering the thermal noise barrier in functional brain mapping with magnetic resonance imaging},\n"
    "  journal={Nature Communications},\n  volume={12},\n  pages={5181},\n  year={2021}\n}",
)


def check(parameters) -> str | None:
    if isinstance(parameters["noise_map"], float) and parameters["noise_volumes"]:
        return "--nordic-noise-map as one value and --nordic-noise-volumes both set the noise level: give one"
    return None


def run(inputs, parameters) -> MethodResult:
    magnitudes = inputs.split(inputs.data)
    phase = inputs.phase if parameters["phase"] == "use" else None
    phases = None if phase is None else inputs.split(phase)
    several = len(magnitudes) > 1
    result = nordic(magnitudes if several else magnitudes[0], (phases if several else phases[0]) if phases else None,
                    patch_ratio=parameters["patch_ratio"], noise_volumes=parameters["noise_volumes"],
                    phase_filter_width=parameters["phase_filter_width"], joint=parameters["echoes"] == "joint",
                    noise_sigma=given_noise_sigma(parameters, inputs.data.shape), seed=inputs.seed)
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
                 "a given noise map, by which the data were divided before and multiplied after (g-factor "
                 "normalisation)" + (" and " + noise if parameters["noise_volumes"] else ""))
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
            "experimental: see the README's BOLD measurements)",
    run=run,
    check=check,
    describe=describe,
    references=(MOELLER2021, VIZIOLI2021),
    modalities=("bold",),
    mem_gb=2.0,
    joint=("echoes",),
    takes_phase=True,
    params=(
        Param("patch_ratio", positive(float), default_of(nordic, "patch_ratio"),
              "voxels per volume in a patch (NORDIC's 11:1)"),
        Param("noise_volumes", int, default_of(nordic, "noise_volumes"),
              "the last N volumes are noise scans: they set the threshold and are dropped from the output"),
        Param("noise_map", noise_map, None,
              "a known noise level (one number) or a 3D NIfTI noise / g-factor map (the data are divided by it "
              "before denoising and multiplied after)"),
        Param("phase", str, "use", "complex runs (part-mag with a part-phase image): denoise them as complex data "
              "(use, default) or the magnitude alone (ignore)", choices=("use", "ignore")),
        Param("phase_filter_width", positive(float), float(default_of(nordic, "phase_filter_width")),
              "smoothness of the slowly varying phase removed from complex runs (k-space window power)"),
        Param("echoes", str, "joint", "multi-echo runs: one decomposition for all echoes (joint, default) or "
              "each echo alone (separate)", choices=("joint", "separate")),
    ),
))
