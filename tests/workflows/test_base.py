"""The graph: what nodes a run gets, from the registry entries and the run configuration."""

from __future__ import annotations

from pathlib import Path

from bids_denoise.bids import Job, Run
from bids_denoise.config import Execution, Nipype, RunConfig, Workflow
from bids_denoise.outputs import Source
from bids_denoise.registry import load_all
from bids_denoise.workflows.base import init_participant_wf


def _run(root, relpath, modality):
    """A run whose files exist (the graph's nodes check that their inputs do)."""
    path = root / relpath
    dwi = modality == "dwi"
    files = [path] + ([path.with_suffix("").with_suffix(ext) for ext in (".bval", ".bvec")] if dwi else [])
    for file in files:
        file.parent.mkdir(parents=True, exist_ok=True)
        file.touch()
    return Run(path=path, bval=files[1] if dwi else None, bvec=files[2] if dwi else None,
               source=Source.from_relpath(relpath), modality=modality)


def _config(tmp_path, methods, parameters=None, **nipype):
    specs = load_all()
    workflow = Workflow(methods=methods, parameters={name: dict(specs[name].defaults(), **(parameters or {}))
                                                     for name in methods}, seed=4)
    return RunConfig(Execution(Path("/data"), tmp_path / "out", tmp_path / "work"), Nipype(**nipype), workflow)


def test_each_run_gets_one_load_and_its_modalitys_methods(tmp_path):
    specs = load_all()
    methods = ["patch2self", "median"]
    config = _config(tmp_path, methods, omp_nthreads=2)
    runs = [_run(tmp_path, "sub-01/dwi/sub-01_dwi.nii.gz", "dwi"), _run(tmp_path, "sub-01/anat/sub-01_T1w.nii.gz", "anat")]
    workflow = init_participant_wf("01", [Job([run]) for run in runs], [specs[m] for m in methods], config, device="cpu",
                                   failure_dir=str(tmp_path / "f"), versions={})
    names = sorted(workflow.list_node_names())
    dwi_nodes = [n.split(".", 1)[1] for n in names if n.startswith("sub_01_dwi_wf")]
    anat_nodes = [n.split(".", 1)[1] for n in names if n.startswith("sub_01_T1w_wf")]
    assert sorted(dwi_nodes) == sorted(["load_run"] + [f"{m}_{k}" for m in methods
                                                      for k in ("denoise", "report", "sink", "report_sink")])
    assert sorted(anat_nodes) == sorted(["load_run"] + [f"median_{k}" for k in ("denoise", "report", "sink",
                                                                               "report_sink")])
    node = workflow.get_node("sub_01_dwi_wf.patch2self_denoise")
    assert node.inputs.parameters == specs["patch2self"].defaults()
    assert node.inputs.seed == 4 and node.inputs.omp_nthreads == 2 and node.n_procs == 2
    load = workflow.get_node("sub_01_dwi_wf.load_run")
    assert load.inputs.bval_files[0].endswith("sub-01_dwi.bval")


def test_gpu_nodes_ask_a_batch_plugin_for_a_gpu(tmp_path):
    specs = load_all()
    config = _config(tmp_path, ["patch2self", "mppca"], plugin="SLURM",
                     gpu_plugin_args={"sbatch_args": "--gres=gpu:1"})
    run = _run(tmp_path, "sub-01/dwi/sub-01_dwi.nii.gz", "dwi")
    workflow = init_participant_wf("01", [Job([run])], [specs["patch2self"], specs["mppca"]], config, device="cuda",
                                   failure_dir="", versions={})
    gpu = workflow.get_node("sub_01_dwi_wf.patch2self_denoise")
    cpu = workflow.get_node("sub_01_dwi_wf.mppca_denoise")
    assert gpu.plugin_args == {"sbatch_args": "--gres=gpu:1", "overwrite": True} and gpu.inputs.use_gpu
    assert not cpu.plugin_args and cpu.inputs.device == "cpu"


def test_a_job_of_echoes_is_read_once_and_written_run_by_run(tmp_path):
    """Three echoes: one load and one method node for the job, then each echo its own outputs."""
    specs = load_all()
    config = _config(tmp_path, ["mppca"], {"echoes": "joint"})
    runs = [_run(tmp_path, f"sub-01/func/sub-01_task-rest_echo-{e}_bold.nii.gz", "bold") for e in (1, 2, 3)]
    job = Job(runs, "echoes", (30, 30, 30))
    assert job.label == "sub-01_task-rest_bold"
    workflow = init_participant_wf("01", [job], [specs["mppca"]], config, device="cpu",
                                   failure_dir=str(tmp_path / "f"), versions={})
    nodes = sorted(n.split(".", 1)[1] for n in workflow.list_node_names())
    per_run = [f"mppca_{k}{i}" for i in range(3) for k in ("run", "report_run", "sink_run", "report_sink_run")]
    assert nodes == sorted(["load_run", "mppca_denoise"] + per_run)
    denoise = workflow.get_node("sub_01_task_rest_bold_wf.mppca_denoise")
    assert denoise.inputs.members == [30, 30, 30] and denoise.inputs.job == "echoes"
    assert [Path(p).name for p in denoise.inputs.reference_files] == [r.path.name for r in runs]
    sinks = [workflow.get_node(f"sub_01_task_rest_bold_wf.mppca_sink_run{i}") for i in range(3)]
    assert [sink.inputs.source_relpath for sink in sinks] == [run.relpath for run in runs]
