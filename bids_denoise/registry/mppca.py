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


def demean_mode(text):
    """``true``/``false`` (remove each window's mean or not), or ``shell`` (per shell; DWI)."""
    return "shell" if str(text).strip().lower() == "shell" else boolean(text)


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


def _noise_sigma(parameters, shape):
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


def run(inputs, parameters) -> MethodResult:
    mask = None
    if parameters["mask"] == "auto":
        from bids_denoise.methods.masking import b0_brain_mask

        # a BOLD series has no b-values: the mask comes from the mean of all volumes
        bvals = inputs.bvals if inputs.bvals is not None else np.zeros(inputs.data.shape[3])
        mask = b0_brain_mask(inputs.data, bvals)
    demean = parameters["demean"]
    if demean == "shell" and inputs.bvals is None:
        demean = True  # no shells outside diffusion: the window mean
    result = mppca(
        inputs.data,
        mask=mask,
        extent=parameters["extent"],
        estimator=parameters["estimator"],
        aggregate=parameters["aggregate"],
        stride=parameters["stride"],
        demean=demean,
        bvals=inputs.bvals if demean == "shell" else None,
        shrinkage=parameters["shrinkage"],
        gaussian_width=parameters["gaussian_width"],
        noise_sigma=_noise_sigma(parameters, inputs.data.shape),
        noise_floor=parameters["noise_floor"],
        n_coils=parameters["n_coils"],
        device=inputs.device,
    )
    maps = {
        "noise": OutputMap(result.noise_sigma, "MP-PCA noise level: standard deviation of the noise per voxel",
                           summary_key="NoiseSigmaMedian"),
        "rank": OutputMap(result.rank, "MP-PCA rank: number of signal components kept per voxel"),
    }
    details = {"extent": list(result.extent), "masked": mask is not None, "solver": result.solver,
               "configuration": result.parameters}
    what = "DWI series" if inputs.bvals is not None else "Series"
    return MethodResult(result.denoised, f"{what} denoised with MP-PCA", maps=maps, details=details)


def describe(parameters) -> str:
    extent = parameters["extent"] or "the default (smallest odd cube holding at least as many voxels as volumes)"
    if parameters["noise_map"] is not None:
        noise = "a given noise level"
    else:
        noise = f"the {parameters['estimator']} noise estimator" + (
            " [corderogrande2019]" if parameters["estimator"] == "Exp2" else "")
    keep = ("the signal components' singular values were shrunk optimally for the Frobenius loss [gavish2017]"
            if parameters["shrinkage"] == "frobenius" else "the signal components were kept as they were")
    aggregate = {"centre": "only the window's centre voxel was rebuilt",
                 "overcomplete": "every window's voxels were rebuilt and averaged [manjon2013]",
                 "gaussian": "every window's voxels were rebuilt and averaged with Gaussian weights [manjon2013]"}
    floor = (" The Rician noise floor was then removed from the magnitude with the noise map [koay2006]."
             if parameters["noise_floor"] == "koay" else "")
    return (f"The image series were denoised with Marchenko-Pastur PCA [veraart2016] in a sliding window of extent "
            f"{extent}, with {noise}; {keep}, and {aggregate[parameters['aggregate']]}; the noise level was "
            f"mapped per voxel.{floor}")


SPEC = register(MethodSpec(
    name="mppca",
    title="MP-PCA",
    summary="Marchenko-Pastur PCA in a sliding window, with optimal shrinkage, overcomplete averaging and "
            "noise-floor removal by default (dwidenoise's and DIPY's modes as options), noise and rank maps",
    run=run,
    describe=describe,
    references=(VERAART2016, CORDEROGRANDE2019, GAVISH2017, KOAY2006, MANJON2013),
    modalities=("dwi", "bold"),
    default=True,
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
        Param("aggregate", str, "overcomplete",
              "rebuild the window centre (dwidenoise) or average all windows (DIPY; default), uniformly or with "
              "Gaussian weights", choices=("centre", "overcomplete", "gaussian")),
        Param("stride", integers(minimum=1), 1, "window step for overcomplete/gaussian: one or 'x,y,z'"),
        Param("demean", demean_mode, True,
              "remove each window's mean before the PCA (true, default, as DIPY), not (false, as dwidenoise), or "
              "each shell's (shell)"),
        Param("shrinkage", str, "frobenius",
              "keep the signal components as they are (hard, as dwidenoise and DIPY) or shrink them optimally "
              "(frobenius, Gavish-Donoho; default)", choices=("hard", "frobenius")),
        Param("noise_floor", str, "koay",
              "remove the Rician/noncentral-chi noise floor with the noise map (koay, default) or not (none)",
              choices=("none", "koay")),
        Param("n_coils", positive(int), default_of(mppca, "n_coils"),
              "receive channels of a sum-of-squares magnitude (noncentral chi with 2N degrees of freedom)"),
        Param("gaussian_width", positive(float), float(default_of(mppca, "gaussian_width")),
              "Gaussian weights' sigma as a fraction of the window (--mppca-aggregate gaussian)"),
        Param("noise_map", noise_map, None,
              "a known noise level (one number, or a 3D NIfTI sigma map) that sets the threshold instead of "
              "estimating it"),
    ),
))
