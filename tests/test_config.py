"""The run configuration: built by the CLI, saved beside the log, loaded to reproduce a run."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np

from bids_denoise.cli import _main as cli_main_inner
from bids_denoise.cli import build_config, build_parser
from bids_denoise.config import RunConfig
from bids_denoise.registry import load_all


def test_round_trip(tmp_path):
    methods = load_all()
    args = build_parser(methods).parse_args(
        ["/data", str(tmp_path / "out"), "participant", "--methods", "mppca", "--mppca-extent", "5,3,1",
         "--seed", "3", "--participant-label", "01"])
    config = build_config(args, methods, "bids-denoise ...")
    assert config.workflow.parameters["mppca"]["extent"] == [5, 3, 1]
    assert config.workflow.parameters["mppca"]["estimator"] == "Exp2"  # defaults recorded too
    path = config.save(tmp_path / "config.json")
    loaded = RunConfig.load(path)
    assert loaded.to_dict() == config.to_dict()
    assert loaded.execution.bids_dir.is_absolute() and loaded.workflow.seed == 3
    assert json.loads(path.read_text())["nipype"]["plugin"] == "MultiProc"


def test_a_saved_configuration_reproduces_the_run(dataset, tmp_path, capsys):
    raw, _ = dataset
    first, second = tmp_path / "first", tmp_path / "second"
    code = cli_main_inner([str(raw), str(first), "participant", "--participant-label", "01", "--session-label",
                           "post", "--methods", "mppca", "--mppca-extent", "3", "--mppca-estimator", "Exp1",
                           "-w", str(tmp_path / "w1"), "--skip-bids-validation"])
    assert code == 0, capsys.readouterr().err
    (saved,) = (first / "sub-01" / "log").glob("*_config.json")
    assert json.loads(saved.read_text())["workflow"]["parameters"]["mppca"]["estimator"] == "Exp1"
    code = cli_main_inner([str(raw), str(second), "participant", "--config-file", str(saved),
                           "-w", str(tmp_path / "w2"), "--skip-bids-validation"])
    assert code == 0, capsys.readouterr().err
    (a,) = first.rglob("*_desc-mppca_dwi.nii.gz")
    (b,) = second.rglob("*_desc-mppca_dwi.nii.gz")
    assert a.relative_to(first) == b.relative_to(second)  # same selection (labels from the file)
    assert np.array_equal(nib.load(a).get_fdata(), nib.load(b).get_fdata())
    sidecar = json.loads(b.with_name(b.name.replace(".nii.gz", ".json")).read_text())
    assert sidecar["Provenance"]["Parameters"]["extent"] == 3
