"""Citation boilerplate written from what actually ran (the sidecars on disk).

The methods' sentences and references come from the registry; the software behind every run is cited here.
"""

from __future__ import annotations

import json
from pathlib import Path

REFERENCES = {
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


def render_citation(sidecars) -> tuple[str, str] | None:
    """The methods paragraph (Markdown) and its BibTeX, from the main outputs' sidecars on disk.

    Each method's sentence and references come from its registry entry, with the
    parameters recorded in the sidecar's provenance.
    """
    from bids_denoise import registry

    specs = registry.load_all()
    used, versions = {}, {}
    for sidecar in sidecars:
        provenance = json.loads(Path(sidecar).read_text()).get("Provenance", {})
        if provenance.get("Method") in specs:
            used.setdefault(provenance["Method"], provenance.get("Parameters", {}))
            versions = provenance.get("SoftwareVersions", versions)
    if not used:
        return None
    references, sentences = {}, []
    for name, parameters in sorted(used.items()):
        spec = specs[name]
        sentences.append(spec.describe(spec.parse(parameters)))
        references.update((ref.key, (ref.text, ref.bibtex)) for ref in spec.references)
    software = ["nipype", "pybids", "pytorch", "nibabel"] + (["dipy"] if versions.get("dipy") else [])
    references.update((REFERENCES[key][0], REFERENCES[key][1:]) for key in software)
    text_software = (
        f"Processing used bids-denoise {versions.get('bids-denoise')}, built on Nipype {versions.get('nipype')} "
        f"[gorgolewski2011], PyBIDS {versions.get('pybids')} [yarkoni2019], PyTorch {versions.get('torch')} "
        f"[paszke2019], NumPy {versions.get('numpy')} and NiBabel {versions.get('nibabel')} [brett2024]"
        + (f"; DIPY {versions.get('dipy')} [garyfallidis2014] was available" if versions.get("dipy") else "") + ".")
    listing = "\n".join(f"- [{key}] {text}" for key, (text, _) in references.items())
    text = ("# Methods\n\n*This paragraph was written by bids-denoise from what it ran; you may copy it into "
            "your manuscript.*\n\n" + " ".join(sentences) + " " + text_software + "\n\n## References\n\n"
            + listing + "\n")
    bib = "\n\n".join(bibtex for _, bibtex in references.values()) + "\n"
    return text, bib
