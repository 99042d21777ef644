"""MP-PCA: registration (``methods/mppca.py`` holds the method)."""

from __future__ import annotations

import numpy as np

from bids_denoise.contract import (
    ImageParam,
    MethodResult,
    MethodSpec,
    OutputMap,
    Param,
    auto_or,
    floor_warning,
    params_from,
)
from bids_denoise.methods.mppca import MPPCAOptions, demean_mode, mppca
from bids_denoise.registry import register
from bids_denoise.registry._references import (
    CORDEROGRANDE2019,
    EICHNER2015,
    GAVISH2017,
    KOAY2006,
    MANJON2013,
    VERAART2016,
)

#: What ``auto`` means for each modality. DWI (``benchmarks/dwi_defaults.py``): hard shrinkage, since the
#: Frobenius shrinker's extra PSNR costs white-matter FA above DIPY's on the crossing-fibre phantom. BOLD
#: (``benchmarks/bold_glm.py``, nilearn's GLM on phantoms from two generators): a 3x3x3 window, so that a
#: task course can enter a voxel's kept subspace only from voxels within sqrt(3) of it (dwidenoise's window,
#: 7x7x7 at 200 volumes, drew a false-positive halo up to 5 voxels around activation), each voxel's temporal
#: mean removed and the window's average course kept, the windows averaged with Gaussian weights.
AUTO = {
    "dwi": {"aggregate": "overcomplete", "demean": True, "shrinkage": "hard", "noise_floor": "koay",
            "phase": "use"},
    "bold": {"aggregate": "gaussian", "demean": "time", "shrinkage": "hard", "noise_floor": "none",
             "phase": "noise", "extent": (3, 3, 3)},
}


def resolve(parameters, modality) -> dict:
    """The parameters with each ``auto`` replaced by the modality's choice (an extent left unset is auto:
    dwidenoise's rule for DWI, :data:`AUTO`'s window for BOLD)."""
    return {key: AUTO[modality][key] if key in AUTO[modality] and value in ("auto", None) else value
            for key, value in parameters.items()}


def run(inputs, parameters) -> MethodResult:
    parameters = resolve(parameters, "dwi" if inputs.bvals is not None else "bold")
    mask = None
    if parameters["mask"] == "auto":
        from bids_denoise.methods.core.masking import b0_brain_mask

        # a BOLD series has no b-values: the mask comes from the mean of all volumes
        bvals = inputs.bvals if inputs.bvals is not None else np.zeros(inputs.data.shape[3])
        mask = b0_brain_mask(inputs.data, bvals)
    demean = parameters["demean"]
    if demean == "shell" and inputs.bvals is None:
        demean = True  # no shells outside diffusion: the window mean
    phase = inputs.phase if parameters["phase"] == "use" else None
    noise_sigma = parameters["noise_map"]  # None, one value, or the map the app loaded and checked
    details, warnings = {}, []
    if parameters["phase"] == "noise" and inputs.phase is not None:
        if noise_sigma is None:  # the receiver's noise level, measured in the imaginary channel
            from bids_denoise.methods.core.phase import noise_level

            noise_sigma = noise_level(inputs.data, inputs.phase, width=parameters["phase_filter_width"])
            details["noise_source"] = "the imaginary part of the phase-demodulated series"
        else:
            warnings.append("a noise level was given: the phase image was not used")
    # complex data have no noise floor: their real part is denoised (see methods/core/phase.py)
    noise_floor, refused = floor_warning(inputs.data, "none" if phase is not None else parameters["noise_floor"])
    if refused:
        warnings.append(refused)
    options = MPPCAOptions.from_values(dict(parameters, demean=demean, noise_floor=noise_floor))

    def denoise(data, bvals, phase, sigma):
        return mppca(data, options, mask=mask, noise_sigma=sigma, bvals=bvals if demean == "shell" else None,
                     phase=phase, device=inputs.device)

    scope = parameters["noise_scope"] if inputs.job == "session" else "run"
    if scope == "session" and noise_sigma is None:
        # one noise estimate over every run of the session, then each run denoised with it
        estimate = denoise(inputs.data, inputs.bvals, phase, None)
        results = [denoise(data, bvals, run_phase, estimate.noise_sigma)
                   for data, bvals, run_phase in zip(inputs.split(inputs.data), inputs.split(inputs.bvals),
                                                     inputs.split(phase))]
        image = np.concatenate([result.denoised for result in results], axis=3)
        noise, rank = estimate.noise_sigma, np.mean([result.rank for result in results], axis=0)
        result = results[0]
        details["noise_scope"] = "session: estimated over the stacked runs, each run denoised with it"
    else:
        # one decomposition over the series: the run, or the session's stacked runs (joint: each window sees every
        # run's volumes)
        if scope == "session":
            warnings.append("a noise level was given or measured in the phase: the session's runs were each denoised "
                            "with it")
        elif scope == "joint":
            details["noise_scope"] = "joint: one decomposition over the session's stacked runs"
        result = denoise(inputs.data, inputs.bvals, phase, noise_sigma)
        image, noise, rank = result.denoised, result.noise_sigma, result.rank
    removed = np.stack([_variance_removed(before, after) for before, after in
                        zip(inputs.split(inputs.data), inputs.split(image))], axis=3)
    if parameters["phase"] == "ignore" and inputs.phase is not None:
        warnings.append("the phase image was not used: MP-PCA denoised the magnitude (--mppca-phase ignore)")
    maps = {
        "noise": OutputMap(noise, "MP-PCA noise level: standard deviation of the noise per voxel",
                           summary_key="NoiseSigmaMedian"),
        "rank": OutputMap(rank, "MP-PCA rank: number of signal components kept per voxel"
                          + {"session": " (mean over the session's runs)",
                             "joint": " (of the one decomposition over the session's stacked runs)"}.get(scope, "")),
        "removed": OutputMap(removed, "Variance removed per voxel: the mean over the run's volumes of "
                             "(input - output)^2, to compare with the square of the noise map (more: signal or "
                             "noise floor removed too; less: noise left)", per_run=True),
    }
    if demean == "time":
        maps["edf"] = OutputMap(
            (rank + 1).astype(np.float32),
            "Effective temporal degrees of freedom of the denoised fluctuation per voxel: the components kept "
            "(rank) plus the window's average course, the trace of the operator that rebuilt the voxel. A GLM "
            "fitted to the output sees at most this many noise dimensions, not the number of volumes: its "
            "t-values are inflated near activation", summary_key="EffectiveDOFMedian")
        median_edf = float(np.median(maps["edf"].array[rank > 0])) if (rank > 0).any() else 0.0
        n_volumes = inputs.data.shape[3] // max(1, len(inputs.split(inputs.data)))
        if median_edf < n_volumes / 2:
            warnings.append(
                f"the denoised series keep a median of {median_edf:.1f} temporal degrees of freedom per voxel of "
                f"{n_volumes} volumes (stat-edf map): a first-level GLM's t and z values are inflated, by about "
                f"sqrt((T - p) / (edf - p)) where the task lies in the kept components (near activation); "
                "compare effect sizes (betas) at the group level or use permutation tests, not first-level "
                "thresholds")
    details.update({"extent": list(result.extent), "masked": mask is not None, "solver": result.solver,
                    "configuration": result.parameters})
    if inputs.job == "echoes":
        details["echoes"] = "denoised together (one decomposition over the stacked echoes)"
    what = "DWI series" if inputs.bvals is not None else "Series"
    how = " (complex: the phase-demodulated real part)" if phase is not None else (
        " (the magnitude, at the noise level of the phase-demodulated imaginary part)" if "noise_source" in details else "")
    return MethodResult(image, f"{what} denoised with MP-PCA{how}", maps=maps, details=details, warnings=warnings)


def _variance_removed(before, after):
    """The mean over volumes of (before - after)^2, slice by slice (no full-size float64 temporary); float32,
    or float64 where the squares pass float32's range (intensities near 1e20 and above)."""
    removed = np.stack([np.mean((before[:, :, z].astype(np.float64) - after[:, :, z]) ** 2, axis=-1)
                        for z in range(before.shape[2])], axis=2)
    return removed if removed.max(initial=0.0) > np.finfo(np.float32).max else removed.astype(np.float32)


def describe(parameters) -> str:
    extent = parameters["extent"] or ("the default (for DWI the smallest odd cube holding at least as many voxels as "
                                      "volumes, for BOLD 3x3x3)")
    if parameters["noise_map"] is not None:
        noise = "a given noise level"
    else:
        noise = f"the {parameters['estimator']} noise estimator" + (
            " [corderogrande2019]" if parameters["estimator"] == "Exp2" else "")
    configurations = {resolve(parameters, modality)[key] != parameters[key] for modality in AUTO for key in AUTO[modality]}
    if True in configurations:  # an auto setting: say what each modality got
        how = "; ".join(f"for {'DWI' if modality == 'dwi' else 'BOLD'} series, {_configuration(resolve(parameters, modality))}"
                        for modality in AUTO)
    else:
        how = _configuration(parameters)
    extra = ""
    if parameters["phase"] in ("use", "auto"):
        extra += (" Complex runs (a part-mag image with its part-phase image), where present, were denoised as complex "
                  "data after each volume's slowly varying phase was removed [eichner2015], which leaves no noise "
                  "floor" + (" (DWI only)." if parameters["phase"] == "auto" else "."))
    if parameters["phase"] in ("noise", "auto"):
        extra += (" For complex" + (" BOLD" if parameters["phase"] == "auto" else "") + " runs, the magnitude was "
                  "denoised with the noise level measured in the imaginary part of the phase-demodulated series "
                  "(successive differences over time) in place of the estimate.")
    if parameters["echoes"] == "joint":
        extra += " The echoes of multi-echo BOLD runs were denoised together, with one decomposition."
    if parameters["noise_scope"] == "session":
        extra += " The noise level was estimated once over all DWI runs of a session and each run denoised with it."
    if parameters["noise_scope"] == "joint":
        extra += (" The DWI runs of a session on the same grid were denoised together, with one decomposition over "
                  "their stacked volumes.")
    return (f"The image series were denoised with Marchenko-Pastur PCA [veraart2016] in a sliding window of extent "
            f"{extent}, with {noise}; {how}; the noise level was mapped per voxel.{extra}")


def _configuration(parameters) -> str:
    keep = ("the signal components' singular values were shrunk optimally for the Frobenius loss [gavish2017]"
            if parameters["shrinkage"] == "frobenius" else "the signal components were kept as they were")
    aggregate = {"centre": "only the window's centre voxel was rebuilt",
                 "overcomplete": "every window's voxels were rebuilt and averaged [manjon2013]",
                 "gaussian": "every window's voxels were rebuilt and averaged with Gaussian weights [manjon2013]"}
    floor = (", and the Rician noise floor was removed from the magnitude with the noise map [koay2006]"
             if parameters["noise_floor"] == "koay" else "")
    demean = {True: "each window's mean removed first, ", "shell": "each shell's mean removed first, ",
              "time": "each voxel's temporal mean removed first and the window's average fluctuation kept as a "
                      "component, "}.get(parameters["demean"], "")
    return f"{demean}{keep}, {aggregate[parameters['aggregate']]}{floor}"


SPEC = register(MethodSpec(
    name="mppca",
    title="MP-PCA",
    summary="Marchenko-Pastur PCA in a sliding window; for DWI by default with optimal shrinkage, overcomplete "
            "averaging and noise-floor removal, for BOLD in a 3x3x3 window with Gaussian averaging and each voxel's "
            "temporal mean removed (each mode an option); complex runs, one "
            "noise estimate per session on request; noise, rank and variance-removed maps",
    run=run,
    describe=describe,
    references=(VERAART2016, CORDEROGRANDE2019, GAVISH2017, KOAY2006, MANJON2013, EICHNER2015),
    modalities=("dwi", "bold"),
    default=True,
    # the runs of a session only for a session-wide scope: with --mppca-noise-scope run, a session job another
    # method asked for is denoised run by run
    joint=lambda parameters: (("session",) if parameters["noise_scope"] in ("session", "joint") else ())
    + (("echoes",) if parameters["echoes"] == "joint" else ()),
    takes_phase=True,
    # the cost is one small eigenproblem per window: the compiled CPU solver does about 15,000
    # windows a second on one core here, while torch's batched CUDA eigh did about 1,000 68x68
    # matrices a second on an H100 (reported in the MP-PCA issue): MP-PCA runs on CPU threads
    uses_gpu=False,
    mem_gb=0.5,
    # measured: 1.5-1.7x the series in extra memory for DWI, 2.6-3.2x for BOLD (benchmarks/scale.py)
    mem_per_input=3.5,
    params=params_from(
        MPPCAOptions,
        defaults={"aggregate": "auto", "demean": "auto", "shrinkage": "auto", "noise_floor": "auto"},
        choices={"aggregate": ("auto",) + MPPCAOptions.choices_of("aggregate"),
                 "demean": None,
                 "shrinkage": ("auto",) + MPPCAOptions.choices_of("shrinkage"),
                 "noise_floor": ("auto",) + MPPCAOptions.choices_of("noise_floor")},
        helps={"extent": "window size: one odd number or 'x,y,z'; auto (default): as dwidenoise for DWI (the "
                         "smallest odd cube holding at least as many voxels as volumes), 3x3x3 for BOLD (larger "
                         "windows draw false positives around activation)",
               "aggregate": "rebuild the window centre (dwidenoise) or average all windows (DIPY), uniformly or "
                            "with Gaussian weights; auto (default): overcomplete for DWI, gaussian for BOLD",
               "demean": "remove each window's mean before the PCA (true, as DIPY), not (false, as dwidenoise), "
                         "each shell's (shell), or each voxel's temporal mean with the window's average "
                         "fluctuation kept (time: less noise spread into neighbours); auto (default): true for "
                         "DWI, time for BOLD",
               "shrinkage": "keep the signal components as they are (hard, as dwidenoise and DIPY) or shrink them "
                            "optimally (frobenius, Gavish-Donoho: more PSNR, but FA errors above DIPY's on a "
                            "crossing-fibre phantom); auto (default): hard",
               "noise_floor": "remove the Rician/noncentral-chi noise floor with the noise map (koay) or not "
                              "(none); auto (default): koay for DWI, none for BOLD"},
        parsers={"demean": auto_or(demean_mode)},
    ) + (
        Param("mask", str, "none", "denoise inside an automatic b0 brain mask only (zero outside)",
              choices=("none", "auto")),
        ImageParam("noise_map", default=None, numbers=True, what="noise map",
                   help="a known noise level: one number, or a 3D NIfTI map of the noise standard deviation on the "
                        "run's grid, that sets the threshold instead of estimating it"),
        Param("noise_scope", str, "run",
              "estimate the noise level per run (run, default) or once over all DWI runs of a session with the "
              "same grid and denoise each run with it (session), or denoise those runs together, one decomposition "
              "over their stacked volumes (joint: for repeated runs with no motion between them; measured better "
              "than each run alone)", choices=("run", "session", "joint")),
        Param("phase", str, "auto",
              "complex runs (part-mag with a part-phase image): denoise the phase-demodulated complex series (use), "
              "the magnitude with the noise level the phase's imaginary channel measures (noise) "
              "or the magnitude alone (ignore); auto (default): use for DWI, noise for BOLD",
              choices=("auto", "use", "noise", "ignore")),
        Param("echoes", str, "separate",
              "multi-echo BOLD runs: each echo alone (separate, default: measured better on the BOLD phantom) or "
              "one decomposition for all echoes (joint)", choices=("separate", "joint")),
    ),
))
