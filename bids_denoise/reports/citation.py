"""Citation boilerplate written from what actually ran (the sidecars on disk)."""

from __future__ import annotations

import json
from pathlib import Path

from bids_denoise.io import write_text

REFERENCES = {
    "patch2self": ("fadnavis2020", "Fadnavis S, Batson J, Garyfallidis E. Patch2Self: Denoising Diffusion MRI "
                   "with Self-Supervised Learning. Advances in Neural Information Processing Systems 33, 2020.",
                   "@inproceedings{fadnavis2020,\n  author={Fadnavis, Shreyas and Batson, Joshua and Garyfallidis, "
                   "Eleftherios},\n  title={Patch2Self: Denoising Diffusion MRI with Self-Supervised Learning},\n"
                   "  booktitle={Advances in Neural Information Processing Systems},\n  volume={33},\n  year={2020}\n}"),
    "veraart2016": ("veraart2016", "Veraart J, Novikov DS, Christiaens D, Ades-aron B, Sijbers J, Fieremans E. "
                    "Denoising of diffusion MRI using random matrix theory. NeuroImage 142:394-406, 2016.",
                    "@article{veraart2016,\n  author={Veraart, Jelle and Novikov, Dmitry S. and Christiaens, Daan and "
                    "Ades-aron, Benjamin and Sijbers, Jan and Fieremans, Els},\n  title={Denoising of diffusion MRI "
                    "using random matrix theory},\n  journal={NeuroImage},\n  volume={142},\n  pages={394--406},\n"
                    "  year={2016}\n}"),
    "corderogrande2019": ("corderogrande2019", "Cordero-Grande L, Christiaens D, Hutter J, Price AN, Hajnal JV. "
                          "Complex diffusion-weighted image estimation via matrix recovery under general noise "
                          "models. NeuroImage 200:391-404, 2019.",
                          "@article{corderogrande2019,\n  author={Cordero-Grande, Lucilio and Christiaens, Daan and "
                          "Hutter, Jana and Price, Anthony N. and Hajnal, Jo V.},\n  title={Complex diffusion-weighted "
                          "image estimation via matrix recovery under general noise models},\n  journal={NeuroImage},\n"
                          "  volume={200},\n  pages={391--404},\n  year={2019}\n}"),
    "noise2noise": ("lehtinen2018", "Lehtinen J, Munkberg J, Hasselgren J, Laine S, Karras T, Aittala M, Aila T. "
                    "Noise2Noise: Learning Image Restoration without Clean Data. ICML 2018.",
                    "@inproceedings{lehtinen2018,\n  author={Lehtinen, Jaakko and others},\n  title={Noise2Noise: "
                    "Learning Image Restoration without Clean Data},\n  booktitle={ICML},\n  year={2018}\n}"),
    "noise2self": ("batson2019", "Batson J, Royer L. Noise2Self: Blind Denoising by Self-Supervision. ICML 2019.",
                   "@inproceedings{batson2019,\n  author={Batson, Joshua and Royer, Loic},\n  title={Noise2Self: Blind "
                   "Denoising by Self-Supervision},\n  booktitle={ICML},\n  year={2019}\n}"),
    "nipype": ("gorgolewski2011", "Gorgolewski K, et al. Nipype: a flexible, lightweight and extensible neuroimaging "
               "data processing framework in Python. Frontiers in Neuroinformatics 5:13, 2011.",
               "@article{gorgolewski2011,\n  author={Gorgolewski, Krzysztof and others},\n  title={Nipype: a flexible, "
               "lightweight and extensible neuroimaging data processing framework in Python},\n  journal={Frontiers in "
               "Neuroinformatics},\n  volume={5},\n  pages={13},\n  year={2011}\n}"),
    "pybids": ("yarkoni2019", "Yarkoni T, et al. PyBIDS: Python tools for BIDS datasets. Journal of Open Source "
               "Software 4(40):1294, 2019.",
               "@article{yarkoni2019,\n  author={Yarkoni, Tal and others},\n  title={PyBIDS: Python tools for BIDS "
               "datasets},\n  journal={Journal of Open Source Software},\n  volume={4},\n  number={40},\n"
               "  pages={1294},\n  year={2019}\n}"),
    "dipy": ("garyfallidis2014", "Garyfallidis E, et al. Dipy, a library for the analysis of diffusion MRI data. "
             "Frontiers in Neuroinformatics 8:8, 2014.",
             "@article{garyfallidis2014,\n  author={Garyfallidis, Eleftherios and others},\n  title={Dipy, a library "
             "for the analysis of diffusion MRI data},\n  journal={Frontiers in Neuroinformatics},\n  volume={8},\n"
             "  pages={8},\n  year={2014}\n}"),
    "pytorch": ("paszke2019", "Paszke A, et al. PyTorch: An Imperative Style, High-Performance Deep Learning "
                "Library. Advances in Neural Information Processing Systems 32, 2019.",
                "@inproceedings{paszke2019,\n  author={Paszke, Adam and others},\n  title={PyTorch: An Imperative "
                "Style, High-Performance Deep Learning Library},\n  booktitle={Advances in Neural Information "
                "Processing Systems},\n  volume={32},\n  year={2019}\n}"),
    "nibabel": ("brett2024", "Brett M, et al. nipy/nibabel. Zenodo. https://doi.org/10.5281/zenodo.591597",
                "@misc{brett2024,\n  author={Brett, Matthew and others},\n  title={nipy/nibabel},\n"
                "  publisher={Zenodo},\n  doi={10.5281/zenodo.591597}\n}"),
}


def _sentence(method, parameters, versions):
    if method == "patch2self":
        backend = parameters.get("backend", "bids-denoise")
        how = ("DIPY's implementation" if backend == "dipy" else
               "an exact implementation that derives every leave-one-volume-out regression from one Gram matrix")
        return (f"Diffusion-weighted images were denoised with Patch2Self [fadnavis2020], using {how} "
                f"(patch radius {parameters.get('patch_radius', 0)}, {parameters.get('model', 'ols')} regression, "
                f"b0 threshold {parameters.get('b0_threshold', 50)} s/mm², grouping "
                f"{parameters.get('grouping', 'b0_dwi')}).", ["patch2self"])
    if method == "mppca":
        estimator = parameters.get("estimator", "Exp2")
        cites = ["veraart2016"] + (["corderogrande2019"] if estimator == "Exp2" else [])
        extent = parameters.get("extent") or "the default (smallest odd cube holding at least as many voxels as volumes)"
        return (f"Diffusion-weighted images were denoised with Marchenko-Pastur PCA [veraart2016] in a sliding "
                f"window of extent {extent}, with the {estimator} noise estimator"
                f"{' [corderogrande2019]' if estimator == 'Exp2' else ''}; the noise level was mapped per voxel.",
                cites)
    if method == "noise2noise":
        return ("Diffusion-weighted images were denoised with Noise2Noise [lehtinen2018]: a U-Net trained on the "
                "run itself to map each volume to the volume of its shell with the nearest gradient direction "
                f"(slices along axis {parameters.get('slice_axis', 2)}, at most {parameters.get('epochs')} epochs).",
                ["noise2noise"])
    if method == "noise2self":
        return ("Diffusion-weighted images were denoised with a J-invariant network trained by Noise2Self "
                f"[batson2019] on the run itself ({parameters.get('context')} context, masker width "
                f"{parameters.get('mask_width')}).", ["noise2self"])
    if method == "median":
        return ("Images were denoised with a median filter whose radius was chosen by the self-supervised "
                "Noise2Self loss [batson2019].", ["noise2self"])
    return f"Images were denoised with {method}.", []


def write_citation(output_dir: Path) -> tuple[Path, Path] | None:
    """Write OUTPUT_DIR/logs/CITATION.md and CITATION.bib from the sidecars present."""
    from bids_denoise.reports.html import denoised_sidecars

    output_dir = Path(output_dir)
    used, versions = {}, {}
    for sidecar in denoised_sidecars(output_dir):
        provenance = json.loads(sidecar.read_text()).get("Provenance", {})
        if provenance.get("Method"):
            used.setdefault(provenance["Method"], provenance.get("Parameters", {}))
            versions = provenance.get("SoftwareVersions", versions)
    if not used:
        return None
    keys, sentences = [], []
    for method, parameters in sorted(used.items()):
        sentence, cites = _sentence(method, parameters, versions)
        sentences.append(sentence)
        keys += cites
    keys += ["nipype", "pybids", "pytorch", "nibabel"] + (["dipy"] if versions.get("dipy") else [])
    software = (f"Processing used bids-denoise {versions.get('bids-denoise')}, built on Nipype {versions.get('nipype')} "
                f"[gorgolewski2011], PyBIDS {versions.get('pybids')} [yarkoni2019], PyTorch {versions.get('torch')} "
                f"[paszke2019], NumPy {versions.get('numpy')} and NiBabel {versions.get('nibabel')} [brett2024]"
                + (f"; DIPY {versions.get('dipy')} [garyfallidis2014] was available" if versions.get("dipy") else "")
                + ".")
    references = "\n".join(f"- [{REFERENCES[k][0]}] {REFERENCES[k][1]}" for k in dict.fromkeys(keys))
    text = ("# Methods\n\n*This paragraph was written by bids-denoise from what it ran; you may copy it into "
            "your manuscript.*\n\n" + " ".join(sentences) + " " + software + "\n\n## References\n\n" + references + "\n")
    bib = "\n\n".join(REFERENCES[k][2] for k in dict.fromkeys(keys)) + "\n"
    logs = output_dir / "logs"
    return write_text(text, logs / "CITATION.md"), write_text(bib, logs / "CITATION.bib")
