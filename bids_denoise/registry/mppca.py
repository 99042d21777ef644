"""MP-PCA: registration (``methods/mppca.py`` holds the method)."""

from __future__ import annotations

import numpy as np

from bids_denoise.contract import MethodResult, MethodSpec, OutputMap, Param, Reference, boolean, integers
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


def run(inputs, parameters) -> MethodResult:
    mask = None
    if parameters["mask"] == "auto":
        from bids_denoise.methods.masking import b0_brain_mask

        # a BOLD series has no b-values: the mask comes from the mean of all volumes
        bvals = inputs.bvals if inputs.bvals is not None else np.zeros(inputs.data.shape[3])
        mask = b0_brain_mask(inputs.data, bvals)
    result = mppca(
        inputs.data,
        mask=mask,
        extent=parameters["extent"],
        estimator=parameters["estimator"],
        aggregate=parameters["aggregate"],
        stride=parameters["stride"],
        demean=parameters["demean"],
        device=inputs.device,
    )
    maps = {
        "noise": OutputMap(result.noise_sigma, "MP-PCA noise level: standard deviation of the noise per voxel",
                           summary_key="NoiseSigmaMedian"),
        "rank": OutputMap(result.rank, "MP-PCA rank: number of signal components kept per voxel"),
    }
    details = {"extent": list(result.extent), "masked": mask is not None, "solver": result.solver}
    what = "DWI series" if inputs.bvals is not None else "Series"
    return MethodResult(result.denoised, f"{what} denoised with MP-PCA", maps=maps, details=details)


def describe(parameters) -> str:
    estimator = parameters["estimator"]
    extent = parameters["extent"] or "the default (smallest odd cube holding at least as many voxels as volumes)"
    return (f"The image series were denoised with Marchenko-Pastur PCA [veraart2016] in a sliding "
            f"window of extent {extent}, with the {estimator} noise estimator"
            f"{' [corderogrande2019]' if estimator == 'Exp2' else ''}; the noise level was mapped per voxel.")


SPEC = register(MethodSpec(
    name="mppca",
    title="MP-PCA",
    summary="Marchenko-Pastur PCA in a sliding window, as MRtrix3 dwidenoise, with noise and rank maps",
    run=run,
    describe=describe,
    references=(VERAART2016, CORDEROGRANDE2019),
    modalities=("dwi", "bold"),
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
        Param("aggregate", str, "centre",
              "rebuild the window centre (dwidenoise) or average all windows (DIPY)",
              choices=("centre", "overcomplete")),
        Param("stride", integers(minimum=1), 1, "window step for --mppca-aggregate overcomplete: one or 'x,y,z'"),
        Param("demean", boolean, False, "remove each window's mean before the PCA, as DIPY (true/false)"),
    ),
))
