"""The leak-free score on the user's own data, ``--evaluate`` and ``--methods auto``."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from bids_denoise import evaluate, registry
from bids_denoise.cli import main
from bids_denoise.contract import MethodInputs
from bids_denoise.methods.mppca import mppca
from bids_denoise.testing.phantom import make_phantom


@pytest.fixture(scope="module")
def noisy_dwi():
    return make_phantom((18, 20, 12), n_b0=4, shells=((1000.0, 24), (2000.0, 24)), noise_sigma=0.1, seed=2)


def test_the_dwi_score_tells_help_from_harm_and_never_shows_the_held_out_volumes(noisy_dwi):
    phantom = noisy_dwi
    seen = []

    def identity(data, bvals, bvecs):
        seen.append(data.shape[3])
        return data

    plain = evaluate.dwi_score(identity, phantom.noisy, phantom.bvals, phantom.bvecs)
    folds = evaluate.cross_validation_folds(phantom.bvals)
    assert sorted(seen) == sorted(phantom.bvals.size - fold.size for fold in folds)  # a fold is never seen
    assert plain.r2 == plain.r2_without and not plain.helps
    helped = evaluate.dwi_score(lambda d, b, g: mppca(d, aggregate="overcomplete", demean=True).denoised,
                                phantom.noisy, phantom.bvals, phantom.bvecs)
    assert helped.helps and helped.r2 > plain.r2 + 0.05
    blurred = evaluate.dwi_score(lambda d, b, g: ndimage.gaussian_filter(d, (2, 2, 2, 0)), phantom.noisy,
                                 phantom.bvals, phantom.bvecs)
    assert not blurred.helps and blurred.rmse > plain.rmse


def test_the_bold_score_tells_help_from_harm():
    from bids_denoise.testing.bold_phantom import make_bold_phantom

    phantom = make_bold_phantom((16, 16, 10), 60, snr=10.0, seed=3)
    series = phantom.magnitude[0]
    plain = evaluate.bold_score(lambda data: data, series)
    assert not plain.helps and plain.rmse == plain.rmse_without
    helped = evaluate.bold_score(lambda data: mppca(data, demean="time").denoised, series)
    assert helped.helps
    blurred = evaluate.bold_score(lambda data: ndimage.gaussian_filter(data, (3, 3, 3, 0)), series)
    assert blurred.rmse > helped.rmse


def test_fa_change_is_measured_in_white_matter(noisy_dwi):
    phantom = noisy_dwi
    same = evaluate.fa_change(phantom.noisy, phantom.noisy, phantom.bvals, phantom.bvecs)
    assert same["fa_change"] == 0 and 0.3 < same["fa_raw"] < 1
    flattened = np.repeat(phantom.noisy[..., :4].mean(axis=3, keepdims=True), phantom.bvals.size, axis=3) \
        * np.exp(-phantom.bvals * 0.0008)
    assert evaluate.fa_change(phantom.noisy, flattened, phantom.bvals, phantom.bvecs)["fa_change"] < -0.2


def test_auto_chooses_a_method_where_one_helps_and_none_where_none_does(noisy_dwi):
    spec = registry.load_all()["auto"]
    phantom = noisy_dwi
    result = spec.run(MethodInputs(data=phantom.noisy, affine=np.eye(4), bvals=phantom.bvals, bvecs=phantom.bvecs),
                      spec.parse({}))
    assert result.details["chosen"] != "none" and result.entities["desc"] in ("mppca", "patch2self", "median")
    rows = {row["method"]: row for row in result.details["scores"]}
    chosen = rows[result.details["chosen"]]
    assert all(chosen["rmse"] <= row["rmse"] for row in rows.values())
    # noise-free data: every candidate gives its input back (or within rounding): none is chosen
    clean = spec.run(MethodInputs(data=phantom.signal, affine=np.eye(4), bvals=phantom.bvals, bvecs=phantom.bvecs),
                     spec.parse({}))
    assert clean.details["chosen"] == "none" and clean.entities["desc"] == "none"
    assert np.array_equal(clean.image, phantom.signal)


def test_evaluate_and_auto_in_the_app(dataset, tmp_path, capsys):
    raw, _ = dataset
    select = ("--participant-label", "01", "--session-label", "post", "--skip-bids-validation")
    out = tmp_path / "out"
    code = main([str(raw), str(out), "participant", "-w", str(tmp_path / "w"), *select, "--methods", "auto"])
    assert code == 0, capsys.readouterr().err
    (sidecar,) = out.rglob("*_dwi.json")
    desc = sidecar.name.split("_desc-")[1].split("_")[0]
    provenance = json.loads(sidecar.read_text())["Provenance"]
    assert provenance["Method"] == "auto" and desc in ("mppca", "patch2self", "median", "none")
    assert {row["method"] for row in provenance["Details"]["scores"]} >= {"mppca", "none (the raw run)"}
    report = (out / "sub-01.html").read_text()
    assert report.index("<h2>Summary</h2>") < report.index('<h2 id="run-0">') and "chose " in report
    assert nib.load(sidecar.with_name(sidecar.name.replace(".json", ".nii.gz"))).shape[3] > 1

    scored = tmp_path / "scored"
    code = main([str(raw), str(scored), "participant", "-w", str(tmp_path / "w2"), *select, "--methods", "mppca",
                 "--evaluate"])
    assert code == 0, capsys.readouterr().err
    (sidecar,) = scored.rglob("*_desc-mppca_dwi.json")
    evaluation = json.loads(sidecar.read_text())["Provenance"]["Evaluation"]
    assert evaluation["folds"] == 5 and evaluation["helps"] and evaluation["r2"] > evaluation["r2_without"]
    assert evaluation["fa_change"] is not None
    assert "Held-out prediction" in (scored / "sub-01.html").read_text()

    code = main([str(raw), str(tmp_path / "x"), "participant", *select, "--methods", "auto", "mppca"])
    assert code == 64 and "--methods auto writes the method it chooses" in capsys.readouterr().err


def test_evaluate_and_auto_on_a_bold_run(dataset, tmp_path, capsys):
    """A BOLD run: --evaluate scores MP-PCA by the temporal split, auto writes its choice (or none) under its
    own desc with the table of scores."""
    from bids_denoise.testing.bold_phantom import make_bold_phantom, write_bold_run

    raw, _ = dataset
    phantom = make_bold_phantom((16, 16, 8), 40, snr=15, seed=5)
    (relpath,) = write_bold_run(raw, phantom, "01", "post")
    select = ("--participant-label", "01", "--session-label", "post", "--skip-bids-validation",
              "--bids-filter-file")
    filters = tmp_path / "filters.json"
    filters.write_text(json.dumps({"dwi": {"acquisition": "none"}}))  # the BOLD run alone
    out = tmp_path / "out"
    code = main([str(raw), str(out), "participant", "-w", str(tmp_path / "w"), *select, str(filters),
                 "--methods", "mppca", "--evaluate"])
    assert code == 0, capsys.readouterr().err
    (sidecar,) = out.rglob("*_desc-mppca_bold.json")
    evaluation = json.loads(sidecar.read_text())["Provenance"]["Evaluation"]
    assert evaluation["folds"] == 2 and "neighbours in time" in evaluation["model"]
    assert evaluation["helps"] == (evaluation["rmse"] < evaluation["rmse_without"] * 0.995)
    assert "fa_change" not in evaluation or evaluation["fa_change"] is None

    auto = tmp_path / "auto"
    code = main([str(raw), str(auto), "participant", "-w", str(tmp_path / "w2"), *select, str(filters),
                 "--methods", "auto"])
    assert code == 0, capsys.readouterr().err
    (sidecar,) = auto.rglob("*_bold.json")
    provenance = json.loads(sidecar.read_text())["Provenance"]
    desc = sidecar.name.split("_desc-")[1].split("_")[0]
    assert desc == ("mppca" if provenance["Details"]["chosen"] == "mppca" else "none")
    assert [row["method"] for row in provenance["Details"]["scores"]] == ["mppca", "none (the raw run)"]
    written = nib.load(sidecar.with_name(sidecar.name.replace(".json", ".nii.gz"))).get_fdata()
    if desc == "none":
        assert np.allclose(written, nib.load(raw / relpath).get_fdata())
