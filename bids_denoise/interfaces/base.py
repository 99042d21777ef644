"""The interface every denoising method node is built on.

A method interface loads the run, calls its pure function from
``bids_denoise.methods``, saves the arrays in the node's folder and returns
their paths with a provenance record. Subclasses implement only ``_denoise``.
"""

from __future__ import annotations

import os
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)

from bids_denoise.io import load_dwi_run, load_nifti, save_nifti, sha256_of


class MethodInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="4D DWI series, or a 3D anatomical image")
    bval_file = File(exists=True, desc="FSL-style b-values (DWI)")
    bvec_file = File(exists=True, desc="FSL-style b-vectors (DWI)")
    mask_file = File(exists=True, desc="brain mask (3D)")
    parameters = traits.Dict(mandatory=True, desc="method parameter values")
    device = traits.Str("cpu", usedefault=True, desc="torch device: cpu, cuda, cuda:N")
    use_gpu = traits.Bool(False, usedefault=True, desc="tells Nipype this node holds a GPU")
    seed = traits.Int(0, usedefault=True, desc="seed for every random choice")
    omp_nthreads = traits.Int(1, usedefault=True, desc="BLAS/torch threads for this node")


class MethodOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="denoised series")
    derivatives = traits.List(traits.Dict, desc="every output: path, suffix, entities, description")
    provenance = traits.Dict(desc="method, parameters, device, timings, digests")


class MethodInterface(SimpleInterface):
    """Base class: subclasses set ``method_name`` and implement ``_denoise``."""

    input_spec = MethodInputSpec
    output_spec = MethodOutputSpec
    method_name = ""
    #: set by a method whose output lies on a new grid (super-resolution)
    _output_affine = None
    #: extra BIDS entities and sidecar fields of the main output
    _output_entities: dict = {}
    _output_sidecar: dict = {}

    def _denoise(self, data, bvals, bvecs, mask, parameters, device):
        """Return (denoised array, {name: (array, suffix, entities, description)}, details).

        For anatomical images ``data`` is 3D and ``bvals``/``bvecs`` are None.
        """
        raise NotImplementedError

    def _run_interface(self, runtime):
        import torch
        from threadpoolctl import threadpool_limits

        from bids_denoise.methods._device import device_description, resolve_device

        has_gradients = isdefined(self.inputs.bval_file) and isdefined(self.inputs.bvec_file)
        if has_gradients:
            image, data, bvals, bvecs = load_dwi_run(
                self.inputs.in_file, self.inputs.bval_file, self.inputs.bvec_file
            )
        else:
            image, data = load_nifti(self.inputs.in_file)
            data, bvals, bvecs = (data[..., 0] if data.ndim == 4 else data), None, None
        mask = None
        if self.inputs.mask_file:
            _, mask_data = load_nifti(self.inputs.mask_file, ndim=3)
            mask = mask_data > 0
        device = resolve_device(self.inputs.device)
        self._cwd = runtime.cwd
        self._reference_affine = image.affine
        torch.manual_seed(self.inputs.seed)
        np.random.seed(self.inputs.seed % 2**32)
        started = datetime.now(timezone.utc)
        clock = time.perf_counter()
        previous_threads = torch.get_num_threads()
        torch.set_num_threads(self.inputs.omp_nthreads)
        try:
            with threadpool_limits(self.inputs.omp_nthreads):
                denoised, extras, details = self._denoise(
                    data, bvals, bvecs, mask, dict(self.inputs.parameters), device
                )
        finally:
            torch.set_num_threads(previous_threads)
        duration = time.perf_counter() - clock
        ended = datetime.now(timezone.utc)

        cwd = Path(runtime.cwd)
        out_file = save_nifti(denoised, image, cwd / f"{self.method_name}_denoised.nii.gz",
                              affine=self._output_affine)
        derivatives = [
            {"path": str(out_file), "suffix": "dwi", "entities": dict(self._output_entities), "kind": "denoised",
             "description": details.pop("_description", None)
             or f"{'DWI series' if has_gradients else 'Image'} denoised with {self.method_name}",
             "sidecar": dict(self._output_sidecar)}
        ]
        for name, (array, suffix, entities, description) in extras.items():
            path = save_nifti(array, image, cwd / f"{self.method_name}_{name}.nii.gz")
            derivatives.append(
                {"path": str(path), "suffix": suffix, "entities": entities, "kind": name,
                 "description": description}
            )
        self._results["out_file"] = str(out_file)
        self._results["derivatives"] = derivatives
        self._results["provenance"] = {
            "Method": self.method_name,
            "Parameters": dict(self.inputs.parameters),
            "Details": details,
            "Seed": self.inputs.seed,
            "Device": device_description(device),
            "Threads": self.inputs.omp_nthreads,
            "StartTime": started.isoformat(),
            "EndTime": ended.isoformat(),
            "DurationSeconds": round(duration, 3),
            "InputDigests": {
                Path(path).name: sha256_of(path)
                for path in (self.inputs.in_file, self.inputs.bval_file, self.inputs.bvec_file)
                if isdefined(path)
            },
            "Host": os.uname().nodename,
        }
        return runtime
