"""The run configuration: built by the CLI, saved beside the log, loaded to reproduce a run."""

from __future__ import annotations

import json
from dataclasses import fields

import nibabel as nib
import numpy as np
import pytest

from bids_denoise.cli import build_config, build_parser
from bids_denoise.cli.parser import parse_command_line
from bids_denoise.cli.run import _main as cli_main_inner
from bids_denoise.config import SECTIONS, RunConfig
from bids_denoise.machine import available_cpus
from bids_denoise.registry import load_all

#: a command line that sets every restorable option to something other than its default
EVERY_OPTION = [
    "--participant-label", "01", "02", "--session-label", "pre", "--skip-bids-validation",
    "--output-layout", "bids", "--copy-mode", "symlink", "--carry-over", "selected",
    "--methods", "mppca", "--super-resolution", "wasa", "--device", "cpu", "--seed", "3",
    "--nprocs", "1", "--mem-gb", "5.5", "--omp-nthreads", str(min(2, available_cpus())), "--stop-on-first-crash",
    "--plugin", "Linear", "--plugin-args", '{"gpu_sbatch_args": "--gres=gpu:1"}',
    "--mppca-extent", "5,3,1", "--mppca-estimator", "Exp1", "--mppca-noise-map", "4.5",
    "--wasa-scale", "4",
]


def configure(argv, tmp_path, methods):
    args = parse_command_line(["/data", str(tmp_path / "out"), "participant", "-w", str(tmp_path / "w"), *argv],
                              methods)
    return build_config(args, methods, "bids-denoise ...")


def test_round_trip_of_every_option(tmp_path):
    """Saved, loaded and read back through the parser, every option comes back; the command line still wins."""
    methods = load_all()
    (tmp_path / "filters.json").write_text('{"dwi": {"acquisition": "mb"}}')
    config = configure(EVERY_OPTION + ["--bids-filter-file", str(tmp_path / "filters.json")], tmp_path, methods)
    assert config.workflow.parameters["mppca"]["extent"] == [5, 3, 1]
    assert config.workflow.parameters["mppca"]["aggregate"] == "auto"  # defaults recorded too
    path = config.save(tmp_path / "config.json")
    assert RunConfig.load(path).to_dict() == config.to_dict()

    again = configure(["--config-file", str(path)], tmp_path, methods)
    first, second = config.to_dict(), again.to_dict()
    for section in SECTIONS:
        for key in first[section]:
            if key == "command_line":
                continue
            assert second[section][key] == first[section][key], f"{section}.{key} was not restored"
    # each field of each section was checked above: the test fails when a field is added but not restored
    assert {f.name for s in SECTIONS.values() for f in fields(s)} == {k for s in first.values() for k in s}

    overridden = configure(["--config-file", str(path), "--seed", "9", "--output-layout", "derivatives",
                            "--mppca-estimator", "Exp2"], tmp_path, methods)
    assert overridden.workflow.seed == 9 and overridden.execution.output_layout == "derivatives"
    assert overridden.workflow.parameters["mppca"]["estimator"] == "Exp2"
    assert overridden.workflow.parameters["mppca"]["extent"] == [5, 3, 1]  # from the file


@pytest.mark.parametrize("change, message", [
    (lambda c: c["workflow"].update(methods=["mppca", "bogus"]), "invalid choice: 'bogus'"),
    (lambda c: c["workflow"].update(methods="mppca"), "workflow.methods must be a list"),
    (lambda c: c["workflow"]["parameters"]["mppca"].update(estimator="Exp9"), "--mppca-estimator"),
    (lambda c: c["workflow"]["parameters"]["mppca"].update(extent="big"), "--mppca-extent"),
    (lambda c: c["workflow"]["parameters"]["mppca"].update(noise_map=-1.0), "above zero"),
    (lambda c: c["workflow"]["parameters"]["mppca"].update(noise_map=float("inf")), "above zero"),
    (lambda c: c["workflow"]["parameters"].update(bogus={}), "unknown method 'bogus'"),
    (lambda c: c["workflow"]["parameters"]["mppca"].update(bogus=1), "unknown parameter(s) bogus"),
    (lambda c: c.update(extras={}), "unknown section(s) extras"),
    (lambda c: c["nipype"].update(nprocs="many"), "--nprocs"),
    (lambda c: c["execution"].update(output_layout="zip"), "--output-layout"),
    (lambda c: c["execution"].update(bids_filters={"dwi": {"subject": "02"}}), "subject is not allowed"),
    (lambda c: c["execution"].update(bids_filters=["dwi"]), "must be a JSON object"),
])
def test_a_bad_configuration_file_is_one_line_and_exit_64(tmp_path, capsys, change, message):
    methods = load_all()
    config = configure(["--methods", "mppca"], tmp_path, methods).to_dict()
    change(config)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    with pytest.raises(SystemExit) as exit_info:
        configure(["--config-file", str(path)], tmp_path, methods)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 64
    assert len(err.splitlines()) == 1 and str(path) in err and message in err, err


def test_a_file_that_is_no_configuration_is_one_line_and_exit_64(tmp_path, capsys):
    for content in ("{not json", "[1, 2]"):
        path = tmp_path / "config.json"
        path.write_text(content)
        with pytest.raises(SystemExit) as exit_info:
            configure(["--config-file", str(path)], tmp_path, load_all())
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 64 and len(err.splitlines()) == 1 and str(path) in err, err


def test_the_parser_defaults_are_the_configuration_defaults(tmp_path):
    """A run without options records the parser's defaults, and a config built from nothing agrees."""
    methods = load_all()
    config = configure([], tmp_path, methods)
    assert config.execution.output_layout == "derivatives" and config.workflow.seed == 0
    parser = build_parser(methods)
    assert config.execution.copy_mode == parser.get_default("copy_mode")
    assert config.execution.carry_over == parser.get_default("carry_over")


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
                           "-w", str(tmp_path / "w2")])
    assert code == 0, capsys.readouterr().err
    (a,) = first.rglob("*_desc-mppca_dwi.nii.gz")
    (b,) = second.rglob("*_desc-mppca_dwi.nii.gz")
    assert a.relative_to(first) == b.relative_to(second)  # same selection (labels from the file)
    assert np.array_equal(nib.load(a).get_fdata(), nib.load(b).get_fdata())
    sidecar = json.loads(b.with_name(b.name.replace(".nii.gz", ".json")).read_text())
    assert sidecar["Provenance"]["Parameters"]["extent"] == 3
