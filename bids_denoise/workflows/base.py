"""The whole processing graph, assembled in one place.

One workflow per participant; inside it one sub-workflow per job: a run, the
echoes of a multi-echo BOLD run, or (when a method asks for it) the DWI runs of
a session, read together::

    load_run ─┬─> <method>_denoise ─┬─> <method>_sink           (images, maps, sidecars)
              │                     └─> <method>_report ─> <method>_report_sink   (figures, QC)
              └────────────────────────────┘

A job of several runs puts ``<method>_run<i>`` (:class:`~bids_denoise.interfaces.bids.SelectMember`:
that run's raw volumes and outputs) before each run's sink and report. The job is
read and checked once (``load_run``, with the phase of complex runs); every method
that takes the job's modality gets the same node
(:class:`~bids_denoise.interfaces.method.RunMethod`), set from its registry entry.
The derivatives are written before any figure is made, so a failed figure never
costs the data.
"""

from __future__ import annotations

import re

from nipype.pipeline import engine as pe

from bids_denoise.config import RunConfig
from bids_denoise.interfaces.bids import DerivativesSink, LoadRun, ReportSink, SelectMember
from bids_denoise.interfaces.method import RunMethod
from bids_denoise.interfaces.reports import RunReport


def init_participant_wf(subject: str, jobs, methods: list, config: RunConfig, *, device: str, failure_dir: str,
                        versions: dict):
    """Workflow for one participant: a sub-workflow per job."""
    workflow = pe.Workflow(name=f"sub_{node_safe(subject)}_wf", base_dir=str(config.execution.work_dir))
    for job in jobs:
        workflow.add_nodes([init_job_wf(job, methods, config, device=device, failure_dir=failure_dir,
                                        versions=versions)])
    return workflow


def init_job_wf(job, methods: list, config: RunConfig, *, device: str, failure_dir: str, versions: dict):
    """Load a job's runs, run each method that takes their modality, write each run's derivatives and QC."""
    workflow = pe.Workflow(name=f"{node_safe(job.label)}_wf")
    record = {"failure_dir": failure_dir, "run_label": job.label}
    specs = [spec for spec in methods if job.modality in spec.modalities]
    is_dwi, several = job.modality == "dwi", len(job.runs) > 1
    load = pe.Node(LoadRun(modality=job.modality, stage="load", **record), name="load_run")
    load.inputs.in_files = [str(run.path) for run in job.runs]
    if is_dwi:
        load.inputs.bval_files = [str(run.bval) for run in job.runs]
        load.inputs.bvec_files = [str(run.bvec) for run in job.runs]
    with_phase = any(spec.takes_phase for spec in specs) and all(run.phase for run in job.runs)
    if with_phase:
        load.inputs.phase_files = [str(run.phase) for run in job.runs]
        load.inputs.phase_units = [run.phase_units for run in job.runs]
    for spec in specs:
        denoise = _method_node(spec, config, device, record, spec.memory_gb(job.series_shape))
        denoise.inputs.reference_files = [str(run.path) for run in job.runs]
        if several:
            denoise.inputs.members, denoise.inputs.job = list(job.volumes), job.kind
        workflow.connect([(load, denoise, [("data_file", "data_file")])])
        if is_dwi:
            workflow.connect([(load, denoise, [("gradients_file", "gradients_file")])])
        if with_phase:
            workflow.connect([(load, denoise, [("phase_file", "phase_file")])])
        for index, run in enumerate(job.runs):
            suffix = f"_run{index}" if several else ""
            source = load
            if several:  # this run's raw volumes and outputs
                source = pe.Node(SelectMember(index=index, members=list(job.volumes), stage=f"{spec.name} output",
                                              **record), name=f"{spec.name}_run{index}")
                workflow.connect([(load, source, [("data_file", "data_file")] +
                                   ([("gradients_file", "gradients_file")] if is_dwi else [])),
                                  (denoise, source, [("derivatives", "derivatives")])])
            _connect_outputs(workflow, spec, run, config, versions, record, load, source, denoise, suffix,
                             selected=several)
    return workflow


def _connect_outputs(workflow, spec, run, config, versions, record, load, source, denoise, suffix, *, selected):
    """A run's sink, report and report sink: from ``source`` (LoadRun, or the run's SelectMember)."""
    report = pe.Node(RunReport(method=spec.name, title=run.label, stage=f"{spec.name} report", **record),
                     name=f"{spec.name}_report{suffix}")
    sink = pe.Node(DerivativesSink(stage=f"{spec.name} output", **record), name=f"{spec.name}_sink{suffix}",
                   run_without_submitting=True, overwrite=True)
    report_sink = pe.Node(ReportSink(stage=f"{spec.name} report output", **record),
                          name=f"{spec.name}_report_sink{suffix}", run_without_submitting=True, overwrite=True)
    for node in (sink, report_sink):
        node.inputs.output_dir = str(config.execution.output_dir)
        node.inputs.layout_kind = config.execution.output_layout
        node.inputs.source_relpath = run.relpath
        node.inputs.method = spec.name
    sink.inputs.source_metadata = run.metadata
    sink.inputs.command_line = config.execution.command_line
    sink.inputs.versions = versions
    is_dwi = run.modality == "dwi"
    if is_dwi:
        sink.inputs.bval_file, sink.inputs.bvec_file = str(run.bval), str(run.bvec)
    outputs = source if selected else denoise
    workflow.connect([
        (source, report, [("data_file", "data_file")]),
        (load, sink, [("digests", "input_digests"), ("warnings", "input_warnings")]),
        (outputs, sink, [("derivatives", "derivatives")]),
        (denoise, sink, [("provenance", "provenance")]),
        (outputs, report, [("derivatives", "derivatives")]),
        (denoise, report, [("provenance", "provenance")]),
        (outputs, report_sink, [("derivatives", "derivatives")]),
        (sink, report_sink, [("out_files", "written")]),
        (report, report_sink, [("figures", "figures"), ("qc_summary", "qc_summary"), ("warnings", "warnings")]),
    ])
    if is_dwi:
        workflow.connect([
            (source, report, [("gradients_file", "gradients_file")]),
            (report, report_sink, [("qc_table", "qc_table")]),
        ])


def _method_node(spec, config: RunConfig, device: str, record: dict, mem_gb: float):
    """The node of one method, set from its registry entry: parameters, device, threads, GPU, memory."""
    on_gpu = spec.uses_gpu and device.startswith("cuda")
    omp_nthreads = config.nipype.omp_nthreads
    node = pe.Node(RunMethod(method=spec.name, stage=spec.name, **record), name=f"{spec.name}_denoise",
                   n_procs=1 if on_gpu else omp_nthreads, mem_gb=mem_gb)
    parameters = config.workflow.parameters.get(spec.name, spec.defaults())
    node.inputs.parameters = parameters
    node.inputs.image_files = {param.name: parameters[param.name] for param in spec.image_params
                               if param.names_file(parameters.get(param.name))}
    node.inputs.device = device if spec.uses_gpu else "cpu"
    node.inputs.use_gpu = on_gpu
    node.inputs.seed = config.workflow.seed
    node.inputs.evaluate = config.workflow.evaluate
    node.inputs.omp_nthreads = omp_nthreads
    if spec.uses_gpu and config.nipype.gpu_plugin_args and device != "cpu":
        # batch plugins: GPU nodes ask for a GPU, CPU nodes keep the plugin's own arguments
        node.plugin_args = dict(config.nipype.gpu_plugin_args, overwrite=True)
    return node


def node_safe(label: str) -> str:
    """A run or subject label as a Nipype node name."""
    return re.sub(r"[^0-9a-zA-Z]", "_", label)
