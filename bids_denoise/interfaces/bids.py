"""Interfaces at the edges of the graph: loading a run once, writing derivatives.

:class:`LoadRun` reads and checks the raw run once and hands the checked arrays
to every method and report node of the run. :class:`DerivativesSink` and
:class:`ReportSink` are the only nodes that write into OUTPUT_DIR, at paths the
output layout (:mod:`bids_denoise.outputs`) gives.
"""

from __future__ import annotations

import logging
from pathlib import Path

from nipype.interfaces.base import Directory, File, TraitedSpec, isdefined, traits

from bids_denoise.interfaces.failures import RecordedInputSpec, RecordedInterface

LOGGER = logging.getLogger("bids_denoise")


class LoadRunInputSpec(RecordedInputSpec):
    in_file = File(exists=True, mandatory=True, desc="4D DWI series, or a 3D anatomical image")
    bval_file = File(exists=True, desc="FSL-style b-values (DWI)")
    bvec_file = File(exists=True, desc="FSL-style b-vectors (DWI)")
    modality = traits.Enum("dwi", "anat", usedefault=True)


class LoadRunOutputSpec(TraitedSpec):
    data_file = File(exists=True, desc="the checked voxel data (.npy, float32 or float64)")
    gradients_file = File(exists=True, desc="bvals and bvecs (.npz), DWI only")
    digests = traits.Dict(desc="SHA-256 of the raw files, by file name")
    warnings = traits.List(traits.Str, desc="what is odd about the run (zero image, odd b-vectors ...)")


class LoadRun(RecordedInterface):
    """Read a run once and check it: a finite 4D series with matching bval/bvec, or a finite 3D image."""

    input_spec = LoadRunInputSpec
    output_spec = LoadRunOutputSpec

    def _run(self, runtime):
        import numpy as np

        from bids_denoise.io import load_run, run_warnings, sha256_of

        gradients = [self.inputs.bval_file, self.inputs.bvec_file]
        gradients = [path if isdefined(path) else None for path in gradients]
        _, data, bvals, bvecs = load_run(self.inputs.in_file, *gradients, modality=self.inputs.modality)
        cwd = Path(runtime.cwd)
        np.save(cwd / "data.npy", data)
        self._results["data_file"] = str(cwd / "data.npy")
        if bvals is not None:
            np.savez(cwd / "gradients.npz", bvals=bvals, bvecs=bvecs)
            self._results["gradients_file"] = str(cwd / "gradients.npz")
        self._results["warnings"] = run_warnings(data, bvals, bvecs)
        self._results["digests"] = {Path(path).name: sha256_of(path)
                                    for path in [self.inputs.in_file] + gradients if path}
        return runtime


class SinkInputSpec(RecordedInputSpec):
    output_dir = Directory(mandatory=True, desc="OUTPUT_DIR")
    source_relpath = traits.Str(mandatory=True, desc="the raw file's path relative to BIDS_DIR")
    method = traits.Str(mandatory=True)
    derivatives = traits.List(traits.Dict, mandatory=True, desc="the method node's outputs")


class DerivativesSinkInputSpec(SinkInputSpec):
    source_metadata = traits.Dict(usedefault=True, desc="the raw file's sidecar metadata (inheritance resolved)")
    bval_file = File(exists=True, desc="DWI only")
    bvec_file = File(exists=True, desc="DWI only")
    provenance = traits.Dict(mandatory=True)
    input_digests = traits.Dict(usedefault=True, desc="SHA-256 of the raw files")
    input_warnings = traits.List(traits.Str, usedefault=True, desc="what LoadRun found odd about the run")
    command_line = traits.Str("", usedefault=True)
    versions = traits.Dict(usedefault=True, desc="software versions")


class SinkOutputSpec(TraitedSpec):
    out_files = traits.List(File(exists=True))


class DerivativesSink(RecordedInterface):
    """Write a method's image and maps with their sidecars (and bval/bvec), atomically."""

    input_spec = DerivativesSinkInputSpec
    output_spec = SinkOutputSpec

    def _run(self, runtime):
        from bids_denoise import __version__
        from bids_denoise.bids import CODE_URL, provenance_record
        from bids_denoise.io import copy_atomic, sha256_of, write_json
        from bids_denoise.outputs import OutputLayout, Source

        layout = OutputLayout(self.inputs.output_dir)
        source = Source.from_relpath(self.inputs.source_relpath)
        method = self.inputs.method
        provenance = dict(self.inputs.provenance, InputDigests=dict(self.inputs.input_digests),
                          CommandLine=self.inputs.command_line, SoftwareVersions=dict(self.inputs.versions))
        written, digests = [], []
        for item in self.inputs.derivatives:
            is_image = item["kind"] == "image"
            if is_image:
                destination = layout.image(source, method, extra=item["entities"])
            else:
                destination = layout.map(source, method, item["name"])
            copy_atomic(item["path"], destination)
            digest = sha256_of(destination)
            digests.append((str(destination.relative_to(layout.root)), digest))
            sidecar = dict(self.inputs.source_metadata) if is_image else {}
            sidecar.update(
                Description=item["description"],
                Sources=[source.uri],
                SkullStripped=False,
                GeneratedBy=[{"Name": "bids-denoise", "Version": __version__, "CodeURL": CODE_URL}],
                Provenance=dict(provenance, OutputDigest=digest),
            )
            if is_image:
                sidecar.update(item.get("sidecar", {}))
                warnings = list(self.inputs.input_warnings) + list(item.get("warnings", []))
                for warning in warnings:
                    LOGGER.warning("%s (%s): %s", source.label, method, warning)
                if warnings:
                    sidecar["Warnings"] = warnings
            write_json(sidecar, layout.sidecar(destination))
            written += [str(destination), str(layout.sidecar(destination))]
            if is_image and isdefined(self.inputs.bval_file):
                for raw, target in zip((self.inputs.bval_file, self.inputs.bvec_file),
                                       layout.gradients(source, method, extra=item["entities"])):
                    written.append(str(copy_atomic(raw, target)))
        main = next(item for item in self.inputs.derivatives if item["kind"] == "image")
        write_json(provenance_record(source, method, digests, provenance),
                   layout.prov_record(source, method, extra=main["entities"]))
        self._results["out_files"] = written
        return runtime


class ReportSinkInputSpec(SinkInputSpec):
    written = traits.List(File(exists=True), mandatory=True, desc="what the derivatives sink wrote (runs after it)")
    figures = traits.List(traits.Dict, desc="QC figures (kind, path)")
    qc_table = File(exists=True, desc="per-volume QC table")
    qc_summary = traits.Dict(desc="run-level QC numbers")
    warnings = traits.List(traits.Str, desc="figures that could not be made, and why")


class ReportSink(RecordedInterface):
    """Write a run's QC figures and table, and add the QC numbers to the main sidecar."""

    input_spec = ReportSinkInputSpec
    output_spec = SinkOutputSpec

    def _run(self, runtime):
        import json

        from bids_denoise.io import copy_atomic, write_json
        from bids_denoise.outputs import OutputLayout, Source

        layout = OutputLayout(self.inputs.output_dir)
        source = Source.from_relpath(self.inputs.source_relpath)
        method = self.inputs.method
        main = next(item for item in self.inputs.derivatives if item["kind"] == "image")
        written = []
        for figure in self.inputs.figures or []:
            target = layout.figure(source, method, figure["kind"], extra=main["entities"])
            written.append(str(copy_atomic(figure["path"], target)))
        if isdefined(self.inputs.qc_table):
            written.append(str(copy_atomic(self.inputs.qc_table, layout.qc_table(source, method))))
        sidecar_path = layout.sidecar(layout.image(source, method, extra=main["entities"]))
        sidecar = json.loads(sidecar_path.read_text())
        if self.inputs.qc_summary:
            sidecar["QC"] = dict(self.inputs.qc_summary)
        if self.inputs.figures:
            sidecar.setdefault("QC", {})["Figures"] = {figure["kind"]: figure["caption"]
                                                       for figure in self.inputs.figures}
        if self.inputs.warnings:
            sidecar["Warnings"] = list(dict.fromkeys(sidecar.get("Warnings", []) + list(self.inputs.warnings)))
        write_json(sidecar, sidecar_path)
        self._results["out_files"] = written
        return runtime
