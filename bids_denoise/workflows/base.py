"""The whole processing graph, assembled in one place.

One workflow per participant; inside it one sub-workflow per DWI run:
check the run -> one node per selected method -> its QC report -> write the derivatives.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from nipype.pipeline import engine as pe

from bids_denoise.interfaces.bids import CheckRun, DerivativesSink
from bids_denoise.interfaces.reports import RunReport
from bids_denoise.registry import MethodSpec


@dataclass
class WorkflowSettings:
    """Run settings every node needs (one place, as fMRIPrep's config)."""

    output_dir: Path
    work_dir: Path
    device: str = "cpu"
    seed: int = 0
    omp_nthreads: int = 1
    method_parameters: dict = field(default_factory=dict)
    command_line: str = ""
    versions: dict = field(default_factory=dict)
    gpu_plugin_args: dict = field(default_factory=dict)  # e.g. {"sbatch_args": "--gres=gpu:1"}


def init_participant_wf(subject: str, runs, methods: list[MethodSpec], settings: WorkflowSettings):
    """Workflow for one participant: a sub-workflow per run."""
    workflow = pe.Workflow(name=f"sub_{_safe(subject)}_wf", base_dir=str(settings.work_dir))
    for run in runs:
        workflow.add_nodes([init_run_wf(run, methods, settings)])
    return workflow


def init_run_wf(run, methods: list[MethodSpec], settings: WorkflowSettings):
    """Check one run, run each method that takes its modality, write the derivatives."""
    methods = [spec for spec in methods if run.modality in spec.modalities]
    workflow = pe.Workflow(name=f"{_safe(run.label)}_wf")
    check = pe.Node(CheckRun(modality=run.modality), name="check_run")
    check.inputs.in_file = str(run.path)
    check.inputs.bval_file = str(run.bval) if run.bval else None
    check.inputs.bvec_file = str(run.bvec) if run.bvec else None
    on_gpu = settings.device.startswith("cuda")
    for spec in methods:
        denoise = pe.Node(
            spec.interface(),
            name=f"{spec.name}_denoise",
            n_procs=1 if (spec.uses_gpu and on_gpu) else settings.omp_nthreads,
            mem_gb=spec.mem_gb,
        )
        denoise.inputs.parameters = settings.method_parameters.get(spec.name, spec.defaults())
        denoise.inputs.device = settings.device if spec.uses_gpu else "cpu"
        denoise.inputs.use_gpu = bool(spec.uses_gpu and on_gpu)
        if spec.uses_gpu and settings.gpu_plugin_args and settings.device != "cpu":
            # batch plugins: GPU nodes ask for a GPU, CPU nodes keep the plugin's own arguments
            denoise.plugin_args = dict(settings.gpu_plugin_args, overwrite=True)
        denoise.inputs.seed = settings.seed
        denoise.inputs.omp_nthreads = settings.omp_nthreads
        report = pe.Node(RunReport(method=spec.name, title=run.label), name=f"{spec.name}_report")
        sink = pe.Node(DerivativesSink(), name=f"{spec.name}_sink", run_without_submitting=True,
                       overwrite=True)
        sink.inputs.output_dir = str(settings.output_dir)
        sink.inputs.source_relpath = run.relpath
        sink.inputs.source_metadata = run.metadata
        sink.inputs.method = spec.name
        sink.inputs.suffix = run.suffix
        sink.inputs.command_line = settings.command_line
        sink.inputs.versions = settings.versions
        workflow.connect([
            (check, denoise, [("in_file", "in_file")]),
            (check, sink, [("in_file", "source_file")]),
            (check, report, [("in_file", "in_file")]),
            (denoise, report, [("derivatives", "derivatives"), ("provenance", "provenance")]),
            (denoise, sink, [("derivatives", "derivatives"), ("provenance", "provenance")]),
            (report, sink, [("figures", "figures"), ("qc_summary", "qc_summary")]),
        ])
        if run.modality == "dwi":
            workflow.connect([
                (check, denoise, [("bval_file", "bval_file"), ("bvec_file", "bvec_file")]),
                (check, sink, [("bval_file", "bval_file"), ("bvec_file", "bvec_file")]),
                (check, report, [("bval_file", "bval_file")]),
                (report, sink, [("qc_table", "qc_table")]),
            ])
    return workflow


def _safe(label: str) -> str:
    return re.sub(r"[^0-9a-zA-Z]", "_", label)
