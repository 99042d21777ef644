"""Interfaces at the edges of the graph: loading a run once, writing derivatives.

:class:`LoadRun` reads and checks the raw run once and hands the checked arrays
to every method and report node of the run. :class:`DerivativesSink` and
:class:`ReportSink` are the only nodes that write into OUTPUT_DIR, at paths the
output layout (:mod:`bids_denoise.outputs`) gives.
"""

from __future__ import annotations

import logging
from pathlib import Path

from nipype.interfaces.base import Directory, File, InputMultiObject, TraitedSpec, isdefined, traits

from bids_denoise.interfaces import records
from bids_denoise.interfaces.failures import RecordedInputSpec, RecordedInterface

LOGGER = logging.getLogger("bids_denoise")


class LoadRunInputSpec(RecordedInputSpec):
    in_files = InputMultiObject(File(exists=True), mandatory=True,
                                desc="the job's runs: a 4D series (DWI, BOLD; several: echoes or a session's runs, "
                                     "stacked), or a 3D anatomical image")
    bval_files = InputMultiObject(File(exists=True), desc="FSL-style b-values (DWI), one per run")
    bvec_files = InputMultiObject(File(exists=True), desc="FSL-style b-vectors (DWI), one per run")
    phase_files = InputMultiObject(File(exists=True), desc="the runs' part-phase images (complex data), one per run")
    phase_units = traits.List(traits.Str, desc="the units each phase image's sidecar states, or auto")
    modality = traits.Enum("dwi", "anat", "bold", usedefault=True)


class LoadRunOutputSpec(TraitedSpec):
    data_file = File(exists=True, desc="the checked voxel data (.npy, float32 or float64), the runs stacked")
    gradients_file = File(exists=True, desc="bvals and bvecs (.npz), DWI only")
    phase_file = File(exists=True, desc="the phase in radians (.npy), stacked as the data, for complex runs")
    digests = traits.Dict(desc="SHA-256 of the raw files, by file name")
    warnings = traits.List(traits.Str, desc="what is odd about the run (zero image, odd b-vectors ...)")


class LoadRun(RecordedInterface):
    """Read a job's runs once and check them: finite 4D series with matching bval/bvec (and phase), or a
    finite 3D image."""

    input_spec = LoadRunInputSpec
    output_spec = LoadRunOutputSpec

    def _run(self, runtime):
        import numpy as np

        from bids_denoise.io import load_job, run_warnings, sha256_of

        def given(name):
            value = getattr(self.inputs, name)
            return list(value) if isdefined(value) else []

        in_files, bval_files, bvec_files, phase_files = (given(name) for name in
                                                         ("in_files", "bval_files", "bvec_files", "phase_files"))
        data, bvals, bvecs, phase = load_job(in_files, bval_files or None, bvec_files or None, phase_files or None,
                                             modality=self.inputs.modality, phase_units=given("phase_units"))
        cwd = Path(runtime.cwd)
        np.save(cwd / "data.npy", data)
        self._results["data_file"] = str(cwd / "data.npy")
        if bvals is not None:
            np.savez(cwd / "gradients.npz", bvals=bvals, bvecs=bvecs)
            self._results["gradients_file"] = str(cwd / "gradients.npz")
        if phase is not None:
            np.save(cwd / "phase.npy", phase)
            self._results["phase_file"] = str(cwd / "phase.npy")
        self._results["warnings"] = run_warnings(data, bvals, bvecs)
        self._results["digests"] = {Path(path).name: sha256_of(path)
                                    for path in in_files + bval_files + bvec_files + phase_files}
        return runtime


def read_loaded_run(data_file, gradients_file):
    """What LoadRun wrote: the data, and the bvals and bvecs (None where it wrote no gradients)."""
    import numpy as np

    data, bvals, bvecs = np.load(data_file), None, None
    if isdefined(gradients_file):
        with np.load(gradients_file) as gradients:
            bvals, bvecs = gradients["bvals"], gradients["bvecs"]
    return data, bvals, bvecs


class SelectMemberInputSpec(RecordedInputSpec):
    data_file = File(exists=True, mandatory=True, desc="the job's stacked data (.npy) from LoadRun")
    gradients_file = File(exists=True, desc="the job's stacked bvals and bvecs (.npz), DWI only")
    derivatives = traits.List(traits.Dict, mandatory=True, desc="the method node's outputs, for every run")
    members = traits.List(traits.Int, mandatory=True, desc="volumes of each run of the job")
    index = traits.Int(mandatory=True, desc="which run")


class SelectMemberOutputSpec(TraitedSpec):
    data_file = File(exists=True, desc="this run's raw data (.npy)")
    gradients_file = File(exists=True, desc="this run's bvals and bvecs (.npz), DWI only")
    derivatives = traits.List(traits.Dict, desc="this run's image and maps")


class SelectMember(RecordedInterface):
    """One run of a job of several: its raw volumes and its outputs, for its report and its sinks."""

    input_spec = SelectMemberInputSpec
    output_spec = SelectMemberOutputSpec

    def _run(self, runtime):
        import numpy as np

        from bids_denoise.contract import split_volumes

        index, members = self.inputs.index, list(self.inputs.members)
        data, bvals, bvecs = read_loaded_run(self.inputs.data_file, self.inputs.gradients_file)
        cwd = Path(runtime.cwd)
        np.save(cwd / "data.npy", split_volumes(data, members)[index])
        self._results["data_file"] = str(cwd / "data.npy")
        if bvals is not None:
            np.savez(cwd / "gradients.npz", bvals=split_volumes(bvals, members)[index],
                     bvecs=split_volumes(bvecs, members)[index])
            self._results["gradients_file"] = str(cwd / "gradients.npz")
        self._results["derivatives"] = records.write(records.of_run(records.read(self.inputs.derivatives), index))
        return runtime


class SinkInputSpec(RecordedInputSpec):
    output_dir = Directory(mandatory=True, desc="OUTPUT_DIR")
    layout_kind = traits.Enum("derivatives", "bids", usedefault=True, desc="the output layout")
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


class _Sink(RecordedInterface):
    """What both sinks start from: the output layout, the source run, the method's main output."""

    output_spec = SinkOutputSpec

    def _target(self):
        from bids_denoise.outputs import Source, layout_for

        layout = layout_for(self.inputs.output_dir, self.inputs.layout_kind)
        derivatives = records.read(self.inputs.derivatives)
        return layout, Source.from_relpath(self.inputs.source_relpath), derivatives, records.main_image(derivatives)


class DerivativesSink(_Sink):
    """Write a method's image and maps with their sidecars (and bval/bvec), atomically."""

    input_spec = DerivativesSinkInputSpec

    def _run(self, runtime):
        from bids_denoise.io import copy_atomic, place_image, sha256_of, write_json
        from bids_denoise.provenance import generated_by, provenance_record

        layout, source, derivatives, main = self._target()
        method = main.entities.get("desc", self.inputs.method)  # auto writes the method it chose
        digests = dict(self.inputs.input_digests)  # the run's files and the image parameters' files
        digests.update({Path(item["File"]).name: item["SHA256"]
                        for item in self.inputs.provenance.get("ParameterFiles", {}).values()})
        provenance = dict(self.inputs.provenance, InputDigests=digests,
                          CommandLine=self.inputs.command_line, SoftwareVersions=dict(self.inputs.versions))
        written, digests = [], []
        for item in derivatives:
            is_image = item.is_image
            if is_image:
                destination = layout.image(source, method, extra=item.entities)
            else:
                destination = layout.map(source, method, item.name)
            place_image(item.path, destination)
            digest = sha256_of(destination)
            digests.append((layout.relpath(destination), digest))
            raw_sidecar = layout.raw_sidecar(source, extra=item.entities) if is_image else None
            sidecar = dict(self.inputs.source_metadata) if is_image and raw_sidecar is None else {}
            sidecar.update(
                Description=item.description,
                Sources=[source.uri],
                SkullStripped=False,
                GeneratedBy=[generated_by()],
                Provenance=dict(provenance, OutputDigest=digest),
            )
            if is_image:
                sidecar.update(item.sidecar)
                warnings = list(self.inputs.input_warnings) + list(item.warnings)
                for warning in warnings:
                    LOGGER.warning("%s (%s): %s", source.label, method, warning)
                if warnings:
                    sidecar["Warnings"] = warnings
            record = layout.record(source, method, extra=item.entities) if is_image else layout.sidecar(destination)
            if raw_sidecar is not None:
                # the raw layout: the run keeps its metadata under its raw name (what the next pipeline reads:
                # nothing it does not know), and the record of what was done goes beside the maps
                sidecar["Image"] = f"bids::{layout.relpath(destination)}"
                write_json(dict(self.inputs.source_metadata), raw_sidecar)
                written.append(str(raw_sidecar))
            write_json(sidecar, record)
            written += [str(destination), str(record)]
            gradients = layout.gradients(source, method, extra=item.entities) if is_image else None
            if gradients and isdefined(self.inputs.bval_file):
                for raw, target in zip((self.inputs.bval_file, self.inputs.bvec_file), gradients):
                    written.append(str(copy_atomic(raw, target)))
        write_json(provenance_record(source, method, digests, provenance),
                   layout.prov_record(source, method, extra=main.entities))
        self._results["out_files"] = written
        return runtime


class ReportSinkInputSpec(SinkInputSpec):
    written = traits.List(File(exists=True), mandatory=True, desc="what the derivatives sink wrote (runs after it)")
    figures = traits.List(traits.Dict, desc="QC figures (kind, path)")
    qc_table = File(exists=True, desc="per-volume QC table")
    qc_summary = traits.Dict(desc="run-level QC numbers")
    warnings = traits.List(traits.Str, desc="figures that could not be made, and why")


class ReportSink(_Sink):
    """Write a run's QC figures and table, and add the QC numbers to the main sidecar."""

    input_spec = ReportSinkInputSpec

    def _run(self, runtime):
        import json

        from bids_denoise.io import copy_atomic, write_json

        layout, source, _, main = self._target()
        method = main.entities.get("desc", self.inputs.method)
        written = []
        for figure in self.inputs.figures or []:
            target = layout.figure(source, method, figure["kind"], extra=main.entities)
            written.append(str(copy_atomic(figure["path"], target)))
        if isdefined(self.inputs.qc_table):
            written.append(str(copy_atomic(self.inputs.qc_table, layout.qc_table(source, method))))
        sidecar_path = layout.record(source, method, extra=main.entities)
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
