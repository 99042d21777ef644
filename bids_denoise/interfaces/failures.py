"""What a failing node leaves for the command line's summary: the run, the stage and the cause.

Nipype reports a failed node by a crash file and a RuntimeError that names
neither the run nor the cause. Each of our nodes records its failure as a small
JSON file in a folder the command line reads once the graph has run, so the
summary names the run, the method, the cause (the exception's last line) and
whether it was bad input (exit 65) or a full disk (exit 74).
"""

from __future__ import annotations

import errno
import json
import re
import traceback
from pathlib import Path

from nipype.interfaces.base import BaseInterfaceInputSpec, SimpleInterface, isdefined, traits

#: exception types that mean the input data cannot be processed (exit 65)
DATA_ERRORS = ("InputDataError", "UnsuitableDataError")


class RecordedInputSpec(BaseInterfaceInputSpec):
    failure_dir = traits.Str(nohash=True, desc="folder for failure records (read by the command line)")
    run_label = traits.Str(nohash=True, desc="the run, for the failure record")
    stage = traits.Str(nohash=True, desc="the method or step, for the failure record")


class RecordedInterface(SimpleInterface):
    """An interface whose failures are recorded for the command line (subclasses implement ``_run``)."""

    input_spec = RecordedInputSpec

    def _run(self, runtime):
        raise NotImplementedError

    def _run_interface(self, runtime):
        from bids_denoise.engine import die_with_parent

        die_with_parent()
        try:
            return self._run(runtime)
        except BaseException as err:
            if isdefined(self.inputs.failure_dir) and self.inputs.failure_dir:
                try:
                    record_failure(Path(self.inputs.failure_dir), self.inputs.run_label, self.inputs.stage, err)
                except OSError:  # e.g. the work directory's disk is full too: the crash file remains
                    pass
            raise


def record_failure(folder: Path, run_label: str, stage: str, err: BaseException) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    message = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
    record = {
        "run": run_label,
        "stage": stage,
        "type": type(err).__name__,
        "message": message,
        "data_error": type(err).__name__ in DATA_ERRORS,
        "disk_full": getattr(err, "errno", None) == errno.ENOSPC,
        "traceback": traceback.format_exception(err)[-3:],
    }
    path = folder / f"{re.sub(r'[^0-9A-Za-z_.-]', '_', run_label)}__{stage}.json"
    path.write_text(json.dumps(record, indent=1))
    return path


def read_failures(folder: Path) -> list[dict]:
    """The failure records in ``folder``, sorted by run and stage."""
    if not folder.is_dir():
        return []
    records = []
    for path in sorted(folder.glob("*.json")):
        try:
            records.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return records
