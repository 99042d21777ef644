"""Interfaces at the edges of the graph: checking a run, writing derivatives.

:class:`DerivativesSink` is the only thing that writes into OUTPUT_DIR.
"""

from __future__ import annotations

from pathlib import Path

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    Directory,
    File,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)


class CheckRunInputSpec(BaseInterfaceInputSpec):
    in_file = File(mandatory=True, desc="4D DWI series, or a 3D anatomical image")
    bval_file = traits.Either(None, File, mandatory=True)
    bvec_file = traits.Either(None, File, mandatory=True)
    modality = traits.Enum("dwi", "anat", usedefault=True)


class CheckRunOutputSpec(TraitedSpec):
    in_file = File(exists=True)
    bval_file = File(exists=True)
    bvec_file = File(exists=True)
    n_volumes = traits.Int()


class CheckRun(SimpleInterface):
    """Load a run and check it: a 4D series with matching bval/bvec, or a 3D image (one-line error otherwise)."""

    input_spec = CheckRunInputSpec
    output_spec = CheckRunOutputSpec

    def _run_interface(self, runtime):
        from bids_denoise.io import check_run

        n_volumes = check_run(self.inputs.in_file, self.inputs.bval_file, self.inputs.bvec_file,
                              self.inputs.modality)
        self._results.update(in_file=self.inputs.in_file, n_volumes=n_volumes)
        if self.inputs.modality == "dwi":
            self._results.update(bval_file=self.inputs.bval_file, bvec_file=self.inputs.bvec_file)
        return runtime


class DerivativesSinkInputSpec(BaseInterfaceInputSpec):
    output_dir = Directory(mandatory=True, desc="the derivatives dataset (OUTPUT_DIR)")
    source_file = File(exists=True, mandatory=True, desc="the raw DWI file")
    source_relpath = traits.Str(mandatory=True, desc="raw file path relative to BIDS_DIR")
    source_metadata = traits.Dict(desc="the raw file's sidecar metadata (inheritance resolved)")
    bval_file = File(exists=True, desc="DWI only")
    bvec_file = File(exists=True, desc="DWI only")
    suffix = traits.Str("dwi", usedefault=True, desc="BIDS suffix of the source (dwi, T1w, T2w)")
    method = traits.Str(mandatory=True)
    derivatives = traits.List(traits.Dict, mandatory=True)
    provenance = traits.Dict(mandatory=True)
    command_line = traits.Str("", usedefault=True)
    versions = traits.Dict(desc="software versions")
    figures = traits.List(traits.Dict, desc="QC figures (kind, caption, path)")
    qc_table = File(exists=True, desc="per-volume QC table")
    qc_summary = traits.Dict(desc="run-level QC numbers")


class DerivativesSinkOutputSpec(TraitedSpec):
    out_files = traits.List(File(exists=True))


class DerivativesSink(SimpleInterface):
    """Write a method's outputs into OUTPUT_DIR with BIDS names and sidecars, atomically."""

    input_spec = DerivativesSinkInputSpec
    output_spec = DerivativesSinkOutputSpec

    def _run_interface(self, runtime):
        from bids_denoise import bids
        from bids_denoise.io import sha256_of, write_json

        output_dir = Path(self.inputs.output_dir)
        has_gradients = isdefined(self.inputs.bval_file) and isdefined(self.inputs.bvec_file)
        run = bids.Run(
            path=Path(self.inputs.source_file),
            bval=Path(self.inputs.bval_file) if has_gradients else None,
            bvec=Path(self.inputs.bvec_file) if has_gradients else None,
            entities={"_relpath": self.inputs.source_relpath},
            metadata=dict(self.inputs.source_metadata),
            suffix=self.inputs.suffix,
        )
        method = self.inputs.method
        provenance = dict(self.inputs.provenance)
        provenance["CommandLine"] = self.inputs.command_line
        provenance["SoftwareVersions"] = dict(self.inputs.versions)
        written, digests = [], []
        for item in self.inputs.derivatives:
            suffix = run.suffix if item["kind"] == "denoised" else item["suffix"]
            relpath = bids.derivative_relpath(run, method, suffix=suffix, extra=item["entities"])
            destination = output_dir / relpath
            bids.copy_atomic(Path(item["path"]), destination)
            digest = sha256_of(destination)
            digests.append((relpath, digest))
            sidecar = {}
            if item["kind"] == "denoised":
                sidecar.update(run.metadata)
            sidecar.update(
                {
                    "Description": item["description"],
                    "Sources": [bids.bids_uri(run)],
                    "SkullStripped": False,
                    "GeneratedBy": [{"Name": "bids-denoise", "Version": provenance["SoftwareVersions"].get("bids-denoise"),
                                     "CodeURL": bids.CODE_URL}],
                    "Provenance": dict(provenance, OutputDigest=digest),
                }
            )
            sidecar.update(item.get("sidecar", {}))
            if item["kind"] == "denoised" and self.inputs.qc_summary:
                sidecar["QC"] = dict(self.inputs.qc_summary)
            write_json(sidecar, destination.with_name(destination.name.replace(".nii.gz", ".json")))
            written.append(str(destination))
            if item["kind"] == "denoised" and has_gradients:
                for source, extension in ((self.inputs.bval_file, ".bval"), (self.inputs.bvec_file, ".bvec")):
                    target = output_dir / bids.derivative_relpath(run, method, extension=extension,
                                                                  extra=item["entities"])
                    bids.copy_atomic(Path(source), target)
                    written.append(str(target))
        subject_dir = output_dir / Path(self.inputs.source_relpath).parts[0]
        main_item = next(item for item in self.inputs.derivatives if item["kind"] == "denoised")
        stem = Path(bids.derivative_relpath(run, method, extra=main_item["entities"])).name.rsplit("_", 1)[0]
        for figure in self.inputs.figures or []:
            target = subject_dir / "figures" / f"{stem}_{figure['kind']}.png"
            bids.copy_atomic(Path(figure["path"]), target)
            written.append(str(target))
        if isdefined(self.inputs.qc_table):
            target = output_dir / bids.derivative_relpath(run, method, suffix="dwiqc", extension=".tsv")
            bids.copy_atomic(Path(self.inputs.qc_table), target)
            written.append(str(target))
        prov_path = output_dir / "prov" / f"{stem}_prov.jsonld"
        write_json(bids.provenance_record(run, method, digests, provenance), prov_path)
        self._results["out_files"] = written
        return runtime
