"""``--methods auto``: each run gets the method that predicts its own held-out volumes best, or none.

For each run, every candidate (below, at the app's defaults) is scored on the run itself by the leak-free
cross-validation of :mod:`bids_denoise.evaluate`: the candidate denoises the run without a fold's volumes and a
signal model predicts those raw volumes from what it kept. No denoising is a candidate too: a candidate wins
only if it predicts the held-out volumes better than the raw run does, and the lowest prediction error wins.
The winner then denoises the whole run and is written under its own ``desc-`` (``desc-none``: the input
unchanged, where no candidate helped); the table of scores goes into the sidecar and the report.

Cost: each candidate reruns once per fold (5 for DWI, 2 for BOLD), then the winner once: 16 runs of the
classical methods for a DWI run. Learned methods are not candidates (they would train once per fold).
"""

from __future__ import annotations

from bids_denoise.contract import MethodResult, MethodSpec, Param
from bids_denoise.registry import register

#: the candidates by name: (method, parameters other than its app defaults, modalities)
CANDIDATES = {
    "mppca": ("mppca", {}, ("dwi", "bold")),
    "mppca-frobenius": ("mppca", {"shrinkage": "frobenius"}, ("dwi",)),
    "patch2self": ("patch2self", {}, ("dwi",)),
    "median": ("median", {}, ("dwi",)),
}

#: scored unless ``--auto-candidates`` says otherwise: the methods at their app defaults. ``mppca-frobenius``
#: predicts held-out volumes better on real series but lowers white-matter FA (docs/benchmarks.md), which
#: the score does not see: it is scored on request only.
DEFAULT_CANDIDATES = "mppca,patch2self,median"


def candidate_names(text: str) -> str:
    """``--auto-candidates``: a comma-separated list of the names in :data:`CANDIDATES` (returned checked,
    without spaces)."""
    names = tuple(name.strip() for name in str(text).split(",") if name.strip())
    unknown = [name for name in names if name not in CANDIDATES]
    if not names or unknown:
        raise ValueError(f"unknown candidate {', '.join(unknown) or repr(text)} (choose from {', '.join(CANDIDATES)})")
    return ",".join(names)


def run(inputs, parameters) -> MethodResult:
    from bids_denoise import evaluate, registry

    methods = registry.load_all()
    modality = "dwi" if inputs.bvals is not None else "bold" if inputs.is_series else None
    if modality is None:
        return MethodResult(inputs.data, "Image unchanged: an image alone has no volumes to hold out, so auto chose "
                                         "no method", entities={"desc": "none"},
                            details={"chosen": "none", "scores": []},
                            warnings=["auto scores series only: this image was not denoised"])
    table, best = [], None
    chosen_names = [label for label in parameters["candidates"].split(",") if modality in CANDIDATES[label][2]]
    if not chosen_names:
        return MethodResult(inputs.data, f"Series unchanged: no candidate of --auto-candidates applies to {modality}",
                            entities={"desc": "none"}, details={"chosen": "none", "scores": []},
                            warnings=[f"auto had no {modality} candidate: this run was not denoised"])
    for label in chosen_names:
        name, changes, _ = CANDIDATES[label]
        spec = methods[name]
        chosen = spec.parse(changes)
        score = evaluate.score_job(lambda part, spec=spec, chosen=chosen: spec.run(part, chosen).image, inputs)
        table.append({"method": label, **score.as_dict()})
        if score.helps and (best is None or score.rmse < best[2].rmse):
            best = (name, chosen, score, label)
    none = {"method": "none (the raw run)", "r2": table[0]["r2_without"], "rmse": table[0]["rmse_without"]}
    details = {"scores": table + [none], "folds": table[0]["folds"], "model": table[0]["model"]}
    if best is None:
        details["chosen"] = "none"
        return MethodResult(inputs.data, "Series unchanged: no candidate predicted the run's held-out volumes better "
                                         "than the raw run (auto chose none)", entities={"desc": "none"},
                            details=details, tables={"Scores of the candidates (held-out prediction)": details["scores"]},
                            warnings=["auto chose no denoising: no candidate predicted the held-out volumes better "
                                      "than the raw run"])
    name, chosen, score, label = best
    result = methods[name].run(inputs, chosen)
    details.update(chosen=label, parameters={key: value for key, value in chosen.items()
                                             if not hasattr(value, "shape")}, method_details=result.details)
    result.details = details
    result.entities = dict(result.entities, desc=name)
    result.description = (f"{result.description}; chosen by auto: it predicted the run's held-out volumes best "
                          f"(R² {score.r2:.3f} against {score.r2_without:.3f} without denoising)")
    result.tables = dict(result.tables, **{"Scores of the candidates (held-out prediction)": details["scores"]})
    return result


def describe(parameters) -> str:
    names = parameters["candidates"].replace(",", ", ")
    return ("The method for each run was chosen on the run itself, without ground truth: each candidate that "
            f"applies to the run (of {names}; all apply to DWI, MP-PCA to BOLD too) denoised the run without one fold of its volumes at a time, and a model fitted to what it kept (spherical harmonics per "
            "shell for DWI, neighbours in time for BOLD) predicted the held-out raw volumes; the candidate with the "
            "least prediction error was kept if it predicted them better than the raw run did, else none.")


def _references():
    from bids_denoise.registry import _references as refs

    return (refs.VERAART2016, refs.GAVISH2017, refs.FADNAVIS2020, refs.BATSON2019)


SPEC = register(MethodSpec(
    name="auto",
    title="Automatic choice",
    summary="each run gets the candidate that predicts its own held-out volumes best (leak-free cross-validation), "
            "or none; opt-in: 16 runs of the classical methods per DWI run",
    params=(Param("candidates", candidate_names, DEFAULT_CANDIDATES,
                  help="the candidates to score, comma-separated (those that apply to the run's modality are "
                       f"scored), of {', '.join(CANDIDATES)} (mppca-frobenius: MP-PCA with optimal shrinkage)"),),
    run=run,
    describe=describe,
    references=_references(),
    modalities=("dwi", "bold"),
    mem_gb=0.5,
    mem_per_input=5.0,
))
