"""The whole processing graph, assembled in one place.

One workflow per participant; inside it one sub-workflow per run::

    load_run ─┬─> <method>_denoise ─┬─> <method>_sink           (images, maps, sidecars)
              │                     └─> <method>_report ─> <method>_report_sink   (figures, QC)
              └────────────────────────────┘

The run is read and checked once (``load_run``); every method that takes the
run's modality gets the same node (:class:`~bids_denoise.interfaces.method.RunMethod`),
set from its registry entry. The derivatives are written before any figure is
made, so a failed figure never costs the data.
"""

from __future__ import annotations

import re

from nipype.pipeline import engine as pe

from bids_denoise.config import RunConfig
from bids_denoise.interfaces.bids import DerivativesSink, LoadRun, ReportSink
from bids_denoise.interfaces.method import RunMethod
from bids_denoise.interfaces.reports import RunReport


def init_participant_wf(subject: str, runs, methods: list, config: RunConfig, *, device: str, failure_dir: str,
                        versions: dict):
    """Workflow for one participant: a sub-workflow per run."""
    workflow = pe.Workflow(name=f"sub_{node_safe(subject)}_wf", base_dir=str(config.execution.work_dir))
    for run in runs:
        workflow.add_nodes([init_run_wf(run, methods, config, device=device, failure_dir=failure_dir,
                                        versions=versions)])
    return workflow


def init_run_wf(run, methods: list, config: RunConfig, *, device: str, failure_dir: str, versions: dict):
    """Load one run, run each method that takes its modality, write the derivatives and the QC."""
    workflow = pe.Workflow(name=f"{node_safe(run.label)}_wf")
    record = {"failure_dir": failure_dir, "run_label": run.label}
    load = pe.Node(LoadRun(modality=run.modality, stage="load", **record), name="load_run")
    load.inputs.in_file = str(run.path)
    if run.modality == "dwi":
        load.inputs.bval_file, load.inputs.bvec_file = str(run.bval), str(run.bvec)
    for spec in (spec for spec in methods if run.modality in spec.modalities):
        denoise = _method_node(spec, config, device, record)
        denoise.inputs.reference_file = str(run.path)
        report = pe.Node(RunReport(method=spec.name, title=run.label, stage=f"{spec.name} report", **record),
                         name=f"{spec.name}_report")
        sink = pe.Node(DerivativesSink(stage=f"{spec.name} output", **record), name=f"{spec.name}_sink",
                       run_without_submitting=True, overwrite=True)
        report_sink = pe.Node(ReportSink(stage=f"{spec.name} report output", **record),
                              name=f"{spec.name}_report_sink", run_without_submitting=True, overwrite=True)
        for node in (sink, report_sink):
            node.inputs.output_dir = str(config.execution.output_dir)
            node.inputs.layout_kind = config.execution.output_layout
            node.inputs.source_relpath = run.relpath
            node.inputs.method = spec.name
        sink.inputs.source_metadata = run.metadata
        sink.inputs.command_line = config.execution.command_line
        sink.inputs.versions = versions
        if run.modality == "dwi":
            sink.inputs.bval_file, sink.inputs.bvec_file = str(run.bval), str(run.bvec)
        workflow.connect([
            (load, denoise, [("data_file", "data_file")]),
            (load, report, [("data_file", "data_file")]),
            (load, sink, [("digests", "input_digests"), ("warnings", "input_warnings")]),
            (denoise, sink, [("derivatives", "derivatives"), ("provenance", "provenance")]),
            (denoise, report, [("derivatives", "derivatives"), ("provenance", "provenance")]),
            (denoise, report_sink, [("derivatives", "derivatives")]),
            (sink, report_sink, [("out_files", "written")]),
            (report, report_sink, [("figures", "figures"), ("qc_summary", "qc_summary"),
                                   ("warnings", "warnings")]),
        ])
        if run.modality == "dwi":
            workflow.connect([
                (load, denoise, [("gradients_file", "gradients_file")]),
                (load, report, [("gradients_file", "gradients_file")]),
                (report, report_sink, [("qc_table", "qc_table")]),
            ])
    return workflow


def _method_node(spec, config: RunConfig, device: str, record: dict):
    """The node of one method, set from its registry entry: parameters, device, threads, GPU."""
    on_gpu = spec.uses_gpu and device.startswith("cuda")
    omp_nthreads = config.nipype.omp_nthreads
    node = pe.Node(RunMethod(method=spec.name, stage=spec.name, **record), name=f"{spec.name}_denoise",
                   n_procs=1 if on_gpu else omp_nthreads, mem_gb=spec.mem_gb)
    node.inputs.parameters = config.workflow.parameters.get(spec.name, spec.defaults())
    node.inputs.device = device if spec.uses_gpu else "cpu"
    node.inputs.use_gpu = on_gpu
    node.inputs.seed = config.workflow.seed
    node.inputs.omp_nthreads = omp_nthreads
    if spec.uses_gpu and config.nipype.gpu_plugin_args and device != "cpu":
        # batch plugins: GPU nodes ask for a GPU, CPU nodes keep the plugin's own arguments
        node.plugin_args = dict(config.nipype.gpu_plugin_args, overwrite=True)
    return node


def node_safe(label: str) -> str:
    """A run or subject label as a Nipype node name."""
    return re.sub(r"[^0-9a-zA-Z]", "_", label)
