"""The one node that runs any registered method on a loaded run."""

from __future__ import annotations

import os
import time
from datetime import datetime, timezone
from pathlib import Path

from nipype.interfaces.base import File, TraitedSpec, traits

from bids_denoise.interfaces.failures import RecordedInputSpec, RecordedInterface


class RunMethodInputSpec(RecordedInputSpec):
    method = traits.Str(mandatory=True, desc="a registered method's name")
    parameters = traits.Dict(mandatory=True, desc="the method's parameter values (parsed)")
    data_file = File(exists=True, mandatory=True, desc="the checked voxel data (.npy) from LoadRun")
    gradients_file = File(exists=True, desc="bvals and bvecs (.npz), DWI only")
    reference_file = File(exists=True, mandatory=True, desc="the raw image (header and grid of the outputs)")
    device = traits.Str("cpu", usedefault=True, desc="torch device: cpu, cuda, cuda:N")
    use_gpu = traits.Bool(False, usedefault=True, desc="tells Nipype this node holds a GPU")
    seed = traits.Int(0, usedefault=True, desc="seed for every random choice")
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
        import numpy as np
        import torch
        from threadpoolctl import threadpool_limits

        from bids_denoise import registry
        from bids_denoise.contract import MethodInputs
        from bids_denoise.interfaces.bids import read_loaded_run
        from bids_denoise.io import save_nifti
        from bids_denoise.methods._device import device_description, resolve_device
        from bids_denoise.methods.errors import UnsuitableDataError

        spec = registry.load_all()[self.inputs.method]
        parameters = spec.parse(dict(self.inputs.parameters))
        reference = nib.load(self.inputs.reference_file)
        data, bvals, bvecs = read_loaded_run(self.inputs.data_file, self.inputs.gradients_file)
        inputs = MethodInputs(data=data, affine=reference.affine, device=resolve_device(self.inputs.device),
                              seed=self.inputs.seed, bvals=bvals, bvecs=bvecs, work_dir=Path(runtime.cwd))
        torch.manual_seed(self.inputs.seed)
        np.random.seed(self.inputs.seed % 2**32)
        started, clock = datetime.now(timezone.utc), time.perf_counter()
        previous_threads = torch.get_num_threads()
        torch.set_num_threads(self.inputs.omp_nthreads)
        try:
            with threadpool_limits(self.inputs.omp_nthreads):
                result = spec.run(inputs, parameters)
        except UnsuitableDataError as err:  # name the file: the method cannot
            raise UnsuitableDataError(f"{self.inputs.reference_file}: {err}") from None
        finally:
            torch.set_num_threads(previous_threads)
        duration = time.perf_counter() - clock

        cwd = Path(runtime.cwd)
        image_path = save_nifti(result.image, reference, cwd / "image.nii.gz", affine=result.affine)
        derivatives = [{"path": str(image_path), "kind": "image", "name": "image", "entities": dict(result.entities),
                        "description": result.description, "sidecar": dict(result.sidecar),
                        "warnings": list(result.warnings)}]
        for name, output_map in result.maps.items():
            path = save_nifti(output_map.array, reference, cwd / f"map-{name}.nii.gz")
            derivatives.append({"path": str(path), "kind": "map", "name": name, "entities": {"stat": name},
                                "description": output_map.description, "summary_key": output_map.summary_key})
        details = dict(result.details)
        if result.tables:
            details["tables"] = result.tables
        self._results["derivatives"] = derivatives
        self._results["provenance"] = {
            "Method": spec.name,
            "Parameters": _jsonable(parameters),
            "Details": details,
            "Seed": self.inputs.seed,
            "Device": device_description(inputs.device),
            "Threads": self.inputs.omp_nthreads,
            "StartTime": started.isoformat(),
            "EndTime": datetime.now(timezone.utc).isoformat(),
            "DurationSeconds": round(duration, 3),
            "Host": os.uname().nodename,
        }
        return runtime


def _jsonable(parameters: dict) -> dict:
    return {key: list(value) if isinstance(value, tuple) else value for key, value in parameters.items()}
