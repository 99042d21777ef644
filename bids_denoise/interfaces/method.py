"""The one node that runs any registered method on a loaded run."""

from __future__ import annotations

import os
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from nipype.interfaces.base import File, InputMultiObject, TraitedSpec, isdefined, traits

from bids_denoise.contract import split_volumes
from bids_denoise.interfaces import records
from bids_denoise.interfaces.failures import RecordedInputSpec, RecordedInterface
from bids_denoise.interfaces.records import Derivative


class RunMethodInputSpec(RecordedInputSpec):
    method = traits.Str(mandatory=True, desc="a registered method's name")
    parameters = traits.Dict(mandatory=True, desc="the method's parameter values (parsed)")
    data_file = File(exists=True, mandatory=True, desc="the checked voxel data (.npy) from LoadRun")
    gradients_file = File(exists=True, desc="bvals and bvecs (.npz), DWI only")
    phase_file = File(exists=True, desc="the phase (.npy) of complex runs, from LoadRun")
    reference_files = InputMultiObject(File(exists=True), mandatory=True,
                                       desc="the raw image of each run of the job (header and grid of its outputs)")
    image_files = traits.Dict(traits.Str, File(exists=True),
                              desc="files of the method's image parameters, by parameter name: the node loads "
                                   "and checks them, and its cache hashes their content (a changed file reruns it)")
    members = traits.List(traits.Int, desc="volumes of each run of a job of several runs")
    job = traits.Enum("run", "echoes", "session", usedefault=True, desc="what the job's runs are")
    device = traits.Str("cpu", usedefault=True, desc="torch device: cpu, cuda, cuda:N")
    use_gpu = traits.Bool(False, usedefault=True, desc="tells Nipype this node holds a GPU")
    seed = traits.Int(0, usedefault=True, desc="seed for every random choice")
    evaluate = traits.Bool(False, usedefault=True, desc="score the method on the run (leak-free; folds rerun it)")
    omp_nthreads = traits.Int(1, usedefault=True, desc="BLAS/torch threads for this node")


class RunMethodOutputSpec(TraitedSpec):
    derivatives = traits.List(traits.Dict, desc="the image and maps: path, kind, name, entities, description")
    provenance = traits.Dict(desc="method, parameters, details, device, seed, timings")


class RunMethod(RecordedInterface):
    """Run one registered method: arrays in (loaded once by LoadRun), NIfTI files out in the node's folder."""

    input_spec = RunMethodInputSpec
    output_spec = RunMethodOutputSpec

    def _run(self, runtime):
        import nibabel as nib
        import torch
        from threadpoolctl import threadpool_limits

        from bids_denoise import registry
        from bids_denoise.contract import MethodInputs
        from bids_denoise.interfaces.bids import read_loaded_run
        from bids_denoise.io import save_nifti, sha256_of
        from bids_denoise.methods.core.device import device_description, resolve_device
        from bids_denoise.methods.core.errors import UnsuitableDataError

        spec = registry.load_all()[self.inputs.method]
        recorded = spec.parse(dict(self.inputs.parameters))  # image parameters as their file names
        parameters = dict(recorded)
        references = [nib.load(path) for path in self.inputs.reference_files]
        parameter_files = {}
        for param in spec.image_params:  # loaded and checked here, handed to the method as arrays
            path = self.inputs.image_files.get(param.name) if isdefined(self.inputs.image_files) else None
            if path is not None:
                parameters[param.name] = param.load(path, references[0])
                parameter_files[param.name] = {"File": str(path), "SHA256": sha256_of(path)}
        data, bvals, bvecs = read_loaded_run(self.inputs.data_file, self.inputs.gradients_file)
        phase = np.load(self.inputs.phase_file) if isdefined(self.inputs.phase_file) else None
        members = tuple(self.inputs.members) if len(self.inputs.members) > 1 else ()
        job = MethodInputs(data=data, affine=references[0].affine, device=resolve_device(self.inputs.device),
                           seed=self.inputs.seed, bvals=bvals, bvecs=bvecs, work_dir=Path(runtime.cwd),
                           phase=phase if spec.takes_phase else None, members=members,
                           job=self.inputs.job if members else "run")
        notes = []
        if phase is not None and not spec.takes_phase:
            notes.append(f"the phase image was not used: {spec.title} denoises the magnitude")
        if members and job.job not in spec.joint_kinds(parameters):  # the method takes one run at a time
            jobs = [_member(job, index) for index in range(len(members))]
        else:
            jobs = [job]
        torch.manual_seed(self.inputs.seed)
        np.random.seed(self.inputs.seed % 2**32)
        started, clock = datetime.now(timezone.utc), time.perf_counter()
        previous_threads = torch.get_num_threads()
        torch.set_num_threads(self.inputs.omp_nthreads)
        try:
            with threadpool_limits(self.inputs.omp_nthreads):
                results = [spec.run(inputs, parameters) for inputs in jobs]
                duration = time.perf_counter() - clock
                evaluation = (evaluate_job(spec, parameters, jobs, results, runtime.cwd) if self.inputs.evaluate
                              else None)
        except UnsuitableDataError as err:  # name the file: the method cannot
            raise UnsuitableDataError(f"{self.inputs.reference_files[0]}: {err}") from None
        finally:
            torch.set_num_threads(previous_threads)

        cwd = Path(runtime.cwd)
        derivatives = []
        for index, (result, images) in enumerate(_images_by_run(results, job)):
            for member, image in images:
                path = save_nifti(image, references[member], cwd / f"image-{member}.nii.gz", affine=result.affine)
                derivatives.append(Derivative(str(path), "image", "image", result.description, member=member,
                                              entities=dict(result.entities), sidecar=dict(result.sidecar),
                                              warnings=notes + list(result.warnings)))
            shared = len(results) == 1  # one result for the whole job: its maps are every run's
            for name, output_map in result.maps.items():
                if output_map.per_run and shared:
                    arrays = [(member, output_map.array[..., member]) for member in range(output_map.array.shape[3])]
                else:
                    arrays = [(None if shared else index, output_map.array)]
                for member, array in arrays:
                    number = index if member is None else member
                    path = save_nifti(array, references[number], cwd / f"map-{name}-{number}.nii.gz")
                    derivatives.append(Derivative(str(path), "map", name, output_map.description, member=member,
                                                  entities={"stat": name}, summary_key=output_map.summary_key))
        details = dict(results[0].details) if len(results) == 1 else {"runs": [dict(r.details) for r in results]}
        tables = {key: rows for result in results for key, rows in result.tables.items()}
        if tables:
            details["tables"] = tables
        if members:
            details["job"] = {"kind": job.job, "runs": [Path(path).name for path in self.inputs.reference_files],
                              "volumes": list(members), "together": len(results) == 1}
        self._results["derivatives"] = records.write(derivatives)
        self._results["provenance"] = {
            "Method": spec.name,
            "Parameters": _jsonable(recorded),
            **({"ParameterFiles": parameter_files} if parameter_files else {}),
            "Details": details,
            "Seed": self.inputs.seed,
            "Device": device_description(job.device),
            "Threads": self.inputs.omp_nthreads,
            "StartTime": started.isoformat(),
            "EndTime": datetime.now(timezone.utc).isoformat(),
            "DurationSeconds": round(duration, 3),
            **({"Evaluation": evaluation} if evaluation else {}),
            "Host": os.uname().nodename,
        }
        return runtime


def evaluate_job(spec, parameters, jobs, results, work_dir) -> dict:
    """The leak-free score of ``spec`` on each run of the job (:mod:`bids_denoise.evaluate`): the method reruns on
    each fold's remaining volumes; for DWI also the change of white-matter FA from the raw run to the output."""
    from dataclasses import replace

    from bids_denoise import evaluate

    scores = []
    for number, (inputs, result) in enumerate(zip(jobs, results)):
        if not inputs.is_series:
            scores.append({"note": "an image, not a series: nothing to hold out"})
            continue
        if inputs.members:
            scores.append({"note": f"not scored: its {inputs.job} are denoised together"})
            continue
        folder = Path(work_dir) / f"evaluation-{number}"
        folder.mkdir(exist_ok=True)
        score = evaluate.score_job(lambda part, folder=folder: spec.run(replace(part, work_dir=folder), parameters).image,
                                   inputs)
        fa = evaluate.fa_change(inputs.data, result.image, inputs.bvals, inputs.bvecs) \
            if inputs.bvals is not None and result.image.shape == inputs.data.shape else {}
        scores.append(dict(score.as_dict(), helps=score.helps, **fa))
    return scores[0] if len(scores) == 1 else {"runs": scores}


def _member(job, index):
    """One run of a job of several, as the inputs of a method that takes one run at a time."""
    from dataclasses import replace

    def part(array):
        return split_volumes(array, job.member_volumes)[index]

    return replace(job, data=part(job.data), phase=part(job.phase), bvals=part(job.bvals), bvecs=part(job.bvecs),
                   members=(), job="run")


def _images_by_run(results, job):
    """Each result with its images, by the run they belong to: one result per run, or one for the job
    cut at its runs' boundaries (the result's ``member_volumes`` where its volumes are not the input's)."""
    if len(results) > 1 or not job.members:
        return [(result, [(index, result.image)]) for index, result in enumerate(results)]
    result = results[0]
    parts = split_volumes(result.image, result.member_volumes or job.member_volumes)
    return [(result, list(enumerate(parts)))]


def _jsonable(parameters: dict) -> dict:
    return {key: list(value) if isinstance(value, tuple) else value for key, value in parameters.items()}
