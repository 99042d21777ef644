"""MP-PCA: registration (``methods/mppca.py`` holds the method)."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from bids_denoise.contract import (MethodResult, MethodSpec, OutputMap, Param, Reference, boolean, default_of,
                                   integers, positive)
from bids_denoise.methods.mppca import mppca
from bids_denoise.registry import register

VERAART2016 = Reference(
    "veraart2016",
    "Veraart J, Novikov DS, Christiaens D, Ades-aron B, Sijbers J, Fieremans E. Denoising of diffusion MRI using "
    "random matrix theory. NeuroImage 142:394-406, 2016.",
    "@article{veraart2016,\n  author={Veraart, Jelle and Novikov, Dmitry S. and Christiaens, Daan and Ades-aron, "
    "Benjamin and Sijbers, Jan and Fieremans, Els},\n  title={Denoising of diffusion MRI using random matrix "
    "theory},\n  journal={NeuroImage},\n  volume={142},\n  pages={394--406},\n  year={2016}\n}",
)
CORDEROGRANDE2019 = Reference(
    "corderogrande2019",
    "Cordero-Grande L, Christiaens D, Hutter J, Price AN, Hajnal JV. Complex diffusion-weighted image estimation "
    "via matrix recovery under general noise models. NeuroImage 200:391-404, 2019.",
    "@article{corderogrande2019,\n  author={Cordero-Grande, Lucilio and Christiaens, Daan and Hutter, Jana and "
    "Price, Anthony N. and Hajnal, Jo V.},\n  title={Complex diffusion-weighted image estimation via matrix "
    "recovery under general noise models},\n  journal={NeuroImage},\n  volume={200},\n  pages={391--404},\n"
    "  year={2019}\n}",
)
GAVISH2017 = Reference(
    "gavish2017",
    "Gavish M, Donoho DL. Optimal shrinkage of singular values. IEEE Transactions on Information Theory "
    "63(4):2137-2152, 2017.",
    "@article{gavish2017,\n  author={Gavish, Matan and Donoho, David L.},\n  title={Optimal shrinkage of singular "
    "values},\n  journal={IEEE Transactions on Information Theory},\n  volume={63},\n  number={4},\n"
    "  pages={2137--2152},\n  year={2017}\n}",
)
KOAY2006 = Reference(
    "koay2006",
    "Koay CG, Basser PJ. Analytically exact correction scheme for signal extraction from noisy magnitude MR "
    "signals. Journal of Magnetic Resonance 179(2):317-322, 2006.",
    "@article{koay2006,\n  author={Koay, Cheng Guan and Basser, Peter J.},\n  title={Analytically exact correction "
    "scheme for signal extraction from noisy magnitude MR signals},\n  journal={Journal of Magnetic Resonance},\n"
    "  volume={179},\n  number={2},\n  pages={317--322},\n  year={2006}\n}",
)
MANJON2013 = Reference(
    "manjon2013",
    "Manjon JV, Coupe P, Concha L, Buades A, Collins DL, Robles M. Diffusion weighted image denoising using "
    "overcomplete local PCA. PLoS One 8(9):e73021, 2013.",
    "@article{manjon2013,\n  author={Manj{\\'o}n, Jos{\\'e} V. and Coup{\\'e}, Pierrick and Concha, Luis and Buades, "
    "Antonio and Collins, D. Louis and Robles, Montserrat},\n  title={Diffusion weighted image denoising using "
    "overcomplete local PCA},\n  journal={PLoS One},\n  volume={8},\n  number={9},\n  pages={e73021},\n"
    "  year={2013}\n}",
)


EICHNER2015 = Reference(
    "eichner2015",
    "Eichner C, Cauley SF, Cohen-Adad J, Moller HE, Turner R, Setsompop K, Wald LL. Real diffusion-weighted MRI "
    "enabling true signal averaging and increasing diffusion contrast. NeuroImage 122:373-384, 2015.",
    "@article{eichner2015,\n  author={Eichner, Cornelius and Cauley, Stephen F. and Cohen-Adad, Julien and "
    "M{\\\"o}ller, Harald E. and Turner, Robert and Setsompop, Kawin and Wald, Lawrence L.},\n  title={Real "
    "diffusion-weighted MRI enabling true signal averaging and increasing diffusion contrast},\n"
    "  journal={NeuroImage},\n  volume={122},\n  pages={373--384},\n  year={2015}\n}",
)


def demean_mode(text):
    """``true``/``false`` (remove each window's mean or not), ``shell`` (per shell; DWI), ``time`` (each
    voxel's temporal mean; BOLD), or ``auto``."""
    value = str(text).strip().lower()
    return value if value in ("shell", "time", "auto") else boolean(text)


def noise_map(text):
    """A noise level: one number, or a 3D NIfTI map of it (checked against the run when it is loaded)."""
    try:
        value = float(text)
    except ValueError:
        path = Path(text).resolve()
        if not path.is_file():
            raise argparse.ArgumentTypeError(f"{text}: neither a number nor an existing NIfTI file") from None
        return str(path)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"a noise level must be above zero, got {text!r}")
    return value


def given_noise_sigma(parameters, shape):
    """The noise level ``noise_map`` gives: None, one value, or a sigma map checked against the series."""
    given = parameters["noise_map"]
    if given is None or isinstance(given, float):
        return given
    from bids_denoise.io import InputDataError, load_nifti

    _, sigma = load_nifti(given, ndim=3)
    if sigma.shape != tuple(shape[:3]):
        raise InputDataError(f"{given}: a noise map of shape {sigma.shape} for a series of shape {tuple(shape)}")
    if (sigma < 0).any():
        raise InputDataError(f"{given}: a noise map must not be negative")
    return sigma


#: What ``auto`` means for each modality (measured: ``benchmarks/mppca_quality.py`` for DWI,
#: ``benchmarks/bold.py`` for BOLD, where the centre voxel with each voxel's temporal mean removed and the
#: window's average course kept leaks less noise into neighbours and keeps more physiology than
#: dwidenoise's mode, with fewer false positives than the DWI configuration).
AUTO = {
    "dwi": {"aggregate": "overcomplete", "demean": True, "shrinkage": "frobenius", "noise_floor": "koay",
            "phase": "use"},
    "bold": {"aggregate": "centre", "demean": "time", "shrinkage": "hard", "noise_floor": "none", "phase": "noise"},
}


def resolve(parameters, modality) -> dict:
    """The parameters with each ``auto`` replaced by the modality's choice."""
    return {key: AUTO[modality][key] if key in AUTO[modality] and value == "auto" else value
            for key, value in parameters.items()}


def run(inputs, parameters) -> MethodResult:
    parameters = resolve(parameters, "dwi" if inputs.bvals is not None else "bold")
    mask = None
    if parameters["mask"] == "auto":
        from bids_denoise.methods.masking import b0_brain_mask

        # a BOLD series has no b-values: the mask comes from the mean of all volumes
        bvals = inputs.bvals if inputs.bvals is not None else np.zeros(inputs.data.shape[3])
        mask = b0_brain_mask(inputs.data, bvals)
    demean = parameters["demean"]
    if demean == "shell" and inputs.bvals is None:
        demean = True  # no shells outside diffusion: the window mean
    phase = inputs.phase if parameters["phase"] == "use" else None
    noise_sigma = given_noise_sigma(parameters, inputs.data.shape)
    details, warnings = {}, []
    if parameters["phase"] == "noise" and inputs.phase is not None:
        if noise_sigma is None:  # the receiver's noise level, measured in the imaginary channel
            from bids_denoise.methods.phase import noise_level

            noise_sigma = noise_level(inputs.data, inputs.phase, width=parameters["phase_filter_width"])
            details["noise_source"] = "the imaginary part of the phase-demodulated series"
        else:
            warnings.append("a noise level was given: the phase image was not used")
    options = dict(
        mask=mask,
        extent=parameters["extent"],
        estimator=parameters["estimator"],
        aggregate=parameters["aggregate"],
        stride=parameters["stride"],
        demean=demean,
        shrinkage=parameters["shrinkage"],
        gaussian_width=parameters["gaussian_width"],
        noise_sigma=noise_sigma,
        # complex data have no noise floor: their real part is denoised (see methods/phase.py)
        noise_floor="none" if phase is not None else parameters["noise_floor"],
        n_coils=parameters["n_coils"],
        phase_filter_width=parameters["phase_filter_width"],
        device=inputs.device,
    )

    def denoise(data, bvals, phase, **extra):
        return mppca(data, bvals=bvals if demean == "shell" else None, phase=phase, **dict(options, **extra))

    if inputs.job == "session" and options["noise_sigma"] is None:
        # one noise estimate over every run of the session, then each run denoised with it
        estimate = denoise(inputs.data, inputs.bvals, phase)
        results = [denoise(data, bvals, run_phase, noise_sigma=estimate.noise_sigma)
                   for data, bvals, run_phase in zip(inputs.split(inputs.data), _split(inputs, inputs.bvals),
                                                     _split(inputs, phase))]
        image = np.concatenate([result.denoised for result in results], axis=3)
        noise, rank = estimate.noise_sigma, np.mean([result.rank for result in results], axis=0)
        result = results[0]
        details["noise_scope"] = "session: estimated over the stacked runs, each run denoised with it"
    else:
        if inputs.job == "session":
            warnings.append("a noise level was given or measured in the phase: the session's runs were each denoised "
                            "with it")
        result = denoise(inputs.data, inputs.bvals, phase)
        image, noise, rank = result.denoised, result.noise_sigma, result.rank
    removed = np.stack([_variance_removed(before, after) for before, after in
                        zip(inputs.split(inputs.data), inputs.split(image))], axis=3)
    if parameters["phase"] == "ignore" and inputs.phase is not None:
        warnings.append("the phase image was not used: MP-PCA denoised the magnitude (--mppca-phase ignore)")
    maps = {
        "noise": OutputMap(noise, "MP-PCA noise level: standard deviation of the noise per voxel",
                           summary_key="NoiseSigmaMedian"),
        "rank": OutputMap(rank, "MP-PCA rank: number of signal components kept per voxel"
                          + (" (mean over the session's runs)" if inputs.job == "session" else "")),
        "removed": OutputMap(removed, "Variance removed per voxel: the mean over the run's volumes of "
                             "(input - output)^2, to compare with the square of the noise map (more: signal or "
                             "noise floor removed too; less: noise left)", per_run=True),
    }
    details.update({"extent": list(result.extent), "masked": mask is not None, "solver": result.solver,
                    "configuration": result.parameters})
    if inputs.job == "echoes":
        details["echoes"] = "denoised together (one decomposition over the stacked echoes)"
    what = "DWI series" if inputs.bvals is not None else "Series"
    how = " (complex: the phase-demodulated real part)" if phase is not None else (
        " (the magnitude, at the noise level of the phase-demodulated imaginary part)" if "noise_source" in details else "")
    return MethodResult(image, f"{what} denoised with MP-PCA{how}", maps=maps, details=details, warnings=warnings)


def _variance_removed(before, after):
    """The mean over volumes of (before - after)^2, slice by slice (no full-size float64 temporary)."""
    return np.stack([np.mean((before[:, :, z].astype(np.float64) - after[:, :, z]) ** 2, axis=-1)
                     for z in range(before.shape[2])], axis=2).astype(np.float32)


def _split(inputs, array):
    """Per-run parts of a stacked array (volumes last), or Nones."""
    if array is None:
        return [None] * len(inputs.member_volumes)
    return np.split(array, np.cumsum(inputs.member_volumes)[:-1], axis=-1)


def describe(parameters) -> str:
    extent = parameters["extent"] or "the default (smallest odd cube holding at least as many voxels as volumes)"
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
            "averaging and noise-floor removal, for BOLD as dwidenoise with each voxel's temporal mean removed (each "
            "mode an option); complex runs, one "
            "noise estimate per session on request; noise, rank and variance-removed maps",
    run=run,
    describe=describe,
    references=(VERAART2016, CORDEROGRANDE2019, GAVISH2017, KOAY2006, MANJON2013, EICHNER2015),
    modalities=("dwi", "bold"),
    default=True,
    joint=lambda parameters: ("session",) + (("echoes",) if parameters["echoes"] == "joint" else ()),
    session=lambda parameters: parameters["noise_scope"] == "session",
    takes_phase=True,
    # the cost is one small eigenproblem per window: the compiled CPU solver does about 15,000
    # windows a second on one core here, while torch's batched CUDA eigh did about 1,000 68x68
    # matrices a second on an H100 (reported in the MP-PCA issue): MP-PCA runs on CPU threads
    uses_gpu=False,
    mem_gb=2.0,
    params=(
        Param("extent", integers(minimum=1, allow_auto=True), None,
              "window size: one odd number or 'x,y,z' (default: as dwidenoise)"),
        Param("estimator", str, "Exp2", "noise estimator", choices=("Exp2", "Exp1")),
        Param("mask", str, "none", "denoise inside an automatic b0 brain mask only (zero outside)",
              choices=("none", "auto")),
        Param("aggregate", str, "auto",
              "rebuild the window centre (dwidenoise) or average all windows (DIPY), uniformly or with Gaussian "
              "weights; auto (default): overcomplete for DWI, centre for BOLD",
              choices=("auto", "centre", "overcomplete", "gaussian")),
        Param("stride", integers(minimum=1), 1, "window step for overcomplete/gaussian: one or 'x,y,z'"),
        Param("demean", demean_mode, "auto",
              "remove each window's mean before the PCA (true, as DIPY), not (false, as dwidenoise), each "
              "shell's (shell), or each voxel's temporal mean with the window's average fluctuation kept (time: "
              "less noise spread into neighbours); auto (default): true for DWI, time for BOLD"),
        Param("shrinkage", str, "auto",
              "keep the signal components as they are (hard, as dwidenoise and DIPY) or shrink them optimally "
              "(frobenius, Gavish-Donoho); auto (default): frobenius for DWI, hard for BOLD",
              choices=("auto", "hard", "frobenius")),
        Param("noise_floor", str, "auto",
              "remove the Rician/noncentral-chi noise floor with the noise map (koay) or not (none); auto "
              "(default): koay for DWI, none for BOLD", choices=("auto", "none", "koay")),
        Param("n_coils", positive(int), default_of(mppca, "n_coils"),
              "receive channels of a sum-of-squares magnitude (noncentral chi with 2N degrees of freedom)"),
        Param("gaussian_width", positive(float), float(default_of(mppca, "gaussian_width")),
              "Gaussian weights' sigma as a fraction of the window (--mppca-aggregate gaussian)"),
        Param("noise_map", noise_map, None,
              "a known noise level (one number, or a 3D NIfTI sigma map) that sets the threshold instead of "
              "estimating it"),
        Param("noise_scope", str, "run",
              "estimate the noise level per run (run, default) or once over all DWI runs of a session with the "
              "same grid and denoise each run with it (session)", choices=("run", "session")),
        Param("phase", str, "auto",
              "complex runs (part-mag with a part-phase image): denoise the phase-demodulated complex series (use), "
              "the magnitude with the noise level the phase's imaginary channel measures (noise) "
              "or the magnitude alone (ignore); auto (default): use for DWI, noise for BOLD",
              choices=("auto", "use", "noise", "ignore")),
        Param("echoes", str, "separate",
              "multi-echo BOLD runs: each echo alone (separate, default: measured better on the BOLD phantom) or "
              "one decomposition for all echoes (joint)", choices=("separate", "joint")),
        Param("phase_filter_width", positive(float), float(default_of(mppca, "phase_filter_width")),
              "smoothness of the slowly varying phase removed from complex runs (k-space window power)"),
    ),
))
