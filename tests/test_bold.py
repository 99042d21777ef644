"""BOLD runs through the app: selection, MP-PCA on the time series, maps, report, raw layout."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from bids_denoise.bids import find_validator, validate_dataset
from bids_denoise.cli import main
from bids_denoise.testing.phantom import add_bold_run
from tests.conftest import assert_figure, rmse, tree_digest

SELECT = ("--participant-label", "01", "--session-label", "post", "--skip-bids-validation", "--methods", "mppca")


def run_app(raw, tmp_path, *args, out="out"):
    return main([str(raw), str(tmp_path / out), "participant", "-w", str(tmp_path / f"work_{out}"),
                 *SELECT, *map(str, args)])


@pytest.fixture
def bold_dataset(dataset):
    raw, _ = dataset
    relpath, truth, active = add_bold_run(raw, "01", "post", seed=4)
    return raw, relpath, truth, active


def test_a_bold_run_is_denoised_with_its_maps_metadata_and_report(bold_dataset, tmp_path, capsys):
    raw, relpath, truth, active = bold_dataset
    before = tree_digest(raw)
    assert run_app(raw, tmp_path) == 0, capsys.readouterr().err
    assert tree_digest(raw) == before
    out = tmp_path / "out"
    stem = relpath.replace("_bold.nii.gz", "")
    denoised = out / f"{stem}_desc-mppca_bold.nii.gz"
    source = nib.load(raw / relpath)
    assert nib.load(denoised).shape == source.shape
    signal = nib.load(truth).get_fdata()
    brain = signal[..., 0] > 0
    assert rmse(nib.load(denoised).get_fdata(), signal, brain) < rmse(source.get_fdata(), signal, brain)
    sidecar = json.loads((out / f"{stem}_desc-mppca_bold.json").read_text())
    assert sidecar["RepetitionTime"] == 2.0 and sidecar["TaskName"] == "rest" and len(sidecar["SliceTiming"]) == 8
    assert sidecar["QC"]["TSNRMedianAfter"] > sidecar["QC"]["TSNRMedianBefore"]
    configuration = sidecar["Provenance"]["Details"]["configuration"]  # BOLD's auto: dwidenoise's mode, demeaned
    assert (configuration["aggregate"], configuration["shrinkage"], configuration["demean"],
            configuration["noise_floor"]) == ("gaussian", "hard", "time", "none")
    assert sidecar["Provenance"]["Details"]["extent"] == [3, 3, 3]
    assert sidecar["Provenance"]["Parameters"]["aggregate"] == "auto"
    for name in ("noise", "rank", "edf"):
        assert nib.load(out / f"{stem}_desc-mppca_stat-{name}_boldmap.nii.gz").shape == source.shape[:3]
    # the effective degrees of freedom: the kept components and the window's average course, far below T
    edf = nib.load(out / f"{stem}_desc-mppca_stat-edf_boldmap.nii.gz").get_fdata()
    rank = nib.load(out / f"{stem}_desc-mppca_stat-rank_boldmap.nii.gz").get_fdata()
    np.testing.assert_allclose(edf[brain], rank[brain] + 1, rtol=1e-5)
    assert 1 < np.median(edf[brain]) < source.shape[3] / 2
    assert sidecar["QC"]["EffectiveDOFMedian"] == pytest.approx(np.median(edf[brain]), rel=0.2)
    assert any("temporal degrees of freedom" in warning for warning in sidecar["Warnings"])
    figures = out / "sub-01" / "figures"
    name = (raw / relpath).name.replace("_bold.nii.gz", "")
    for kind in ("tsnr", "carpet", "noisemap", "mosaic"):
        assert_figure(figures / f"{name}_desc-mppca_{kind}.png")
    assert "Carpet plots" in (out / "sub-01.html").read_text()
    if find_validator():
        n_errors, errors = validate_dataset(out)
        assert n_errors == 0, errors


def test_phase_images_are_not_runs_and_a_3d_bold_is_refused(bold_dataset, tmp_path, capsys):
    raw, relpath, _, _ = bold_dataset
    magnitude = raw / relpath.replace("_bold", "_part-mag_bold")
    (raw / relpath).rename(magnitude)
    (raw / relpath.replace(".nii.gz", ".json")).rename(magnitude.with_name(magnitude.name.replace(".nii.gz",
                                                                                                  ".json")))
    image = nib.load(magnitude)
    nib.save(nib.Nifti1Image(np.zeros(image.shape, np.float32), image.affine),
             raw / relpath.replace("_bold", "_part-phase_bold"))
    assert run_app(raw, tmp_path) == 0, capsys.readouterr().err
    written = sorted(p.name for p in (tmp_path / "out").rglob("*_desc-mppca_bold.nii.gz"))
    assert written == [magnitude.name.replace("_bold.nii.gz", "_desc-mppca_bold.nii.gz")]

    nib.save(nib.Nifti1Image(image.get_fdata()[..., 0].astype(np.float32), image.affine), magnitude)
    code = run_app(raw, tmp_path, out="out3d")
    err = capsys.readouterr().err
    assert code == 65 and "expected a 4D series" in err and magnitude.name in err


def test_raw_layout_gives_fmriprep_the_denoised_bold(bold_dataset, tmp_path, capsys):
    collect_data = pytest.importorskip("niworkflows.utils.bids").collect_data
    raw, relpath, _, _ = bold_dataset
    assert run_app(raw, tmp_path, "--output-layout", "bids") == 0, capsys.readouterr().err
    out = tmp_path / "out"
    data, _ = collect_data(str(out), "01", session_id="post", bids_validate=False)
    assert data["bold"] == [str(out / relpath)]
    assert not np.array_equal(nib.load(out / relpath).get_fdata(), nib.load(raw / relpath).get_fdata())
    metadata = json.loads((out / relpath.replace(".nii.gz", ".json")).read_text())
    assert metadata["RepetitionTime"] == 2.0 and "Denoising" not in metadata  # nothing the next pipeline does not know


@pytest.fixture
def multiecho_dataset(dataset):
    from bids_denoise.testing.bold_phantom import make_bold_phantom, write_bold_run

    raw, _ = dataset
    phantom = make_bold_phantom((16, 16, 8), 40, snr=15, n_echoes=3, complex_data=True, seed=2)
    return raw, phantom, write_bold_run(raw, phantom, "01", "post")


def test_echoes_of_a_complex_run_are_denoised_together_and_written_echo_by_echo(multiecho_dataset, tmp_path,
                                                                                 capsys):
    raw, phantom, relpaths = multiecho_dataset
    before = tree_digest(raw)
    assert run_app(raw, tmp_path) == 0, capsys.readouterr().err
    assert tree_digest(raw) == before
    out = tmp_path / "out"
    assert not list(out.rglob("*part-phase_desc-*"))  # a phase image is not a run of its own
    for echo, relpath in enumerate(relpaths):
        stem = relpath.replace("_bold.nii.gz", "")
        noisy_error = rmse(phantom.magnitude[echo], phantom.clean[echo], phantom.mask)
        for method in ("mppca",):
            image = nib.load(out / f"{stem}_desc-{method}_bold.nii.gz")
            assert image.shape == phantom.magnitude[echo].shape
            assert rmse(image.get_fdata(), phantom.clean[echo], phantom.mask) < 0.35 * noisy_error, (echo, method)
            sidecar = json.loads((out / f"{stem}_desc-{method}_bold.json").read_text())
            assert sidecar["EchoTime"] == pytest.approx(phantom.echo_times[echo])
            job = sidecar["Provenance"]["Details"]["job"]
            # MP-PCA takes the echoes one by one (its default: measured better on BOLD)
            assert job["kind"] == "echoes" and not job["together"]
            assert job["volumes"] == [40, 40, 40]
            assert set(sidecar["Provenance"]["InputDigests"]) >= {
                name.replace("part-mag", part) for name in map(lambda r: r.split("/")[-1], relpaths)
                for part in ("part-mag", "part-phase")}
            noise = nib.load(out / f"{stem}_desc-{method}_stat-noise_boldmap.nii.gz").get_fdata()
            assert noise.ndim == 3 and np.isfinite(noise).all() and (noise > 0).mean() > 0.5
        mppca = json.loads((out / f"{stem}_desc-mppca_bold.json").read_text())
        runs = mppca["Provenance"]["Details"]["runs"]
        # BOLD's auto: the magnitude denoised at the noise level the phase's imaginary channel measures
        assert [run["configuration"]["complex"] for run in runs] == [False] * 3
        assert [run["configuration"]["noise_source"] for run in runs] == ["given"] * 3
        assert all("imaginary" in run["noise_source"] for run in runs), runs[0]
        assert not any("phase image was not used" in warning for warning in mppca.get("Warnings", []))
    if find_validator():
        n_errors, errors = validate_dataset(out)
        assert n_errors == 0, errors


def test_echoes_together_as_complex_data_or_the_magnitude_alone_on_request(multiecho_dataset, tmp_path, capsys):
    raw, phantom, relpaths = multiecho_dataset
    code = run_app(raw, tmp_path, "--mppca-echoes", "joint", "--mppca-phase", "use")
    assert code == 0, capsys.readouterr().err
    stem = relpaths[1].replace("_bold.nii.gz", "")
    mppca = json.loads((tmp_path / "out" / f"{stem}_desc-mppca_bold.json").read_text())["Provenance"]["Details"]
    assert mppca["job"]["together"] and mppca["configuration"]["complex"]
    assert mppca["configuration"]["noise_floor"] == "none"
    noisy_error = rmse(phantom.magnitude[1], phantom.clean[1], phantom.mask)
    image = nib.load(tmp_path / "out" / f"{stem}_desc-mppca_bold.nii.gz").get_fdata()
    assert rmse(image, phantom.clean[1], phantom.mask) < 0.5 * noisy_error
    code = run_app(raw, tmp_path, "--mppca-phase", "ignore", out="magnitude")
    assert code == 0, capsys.readouterr().err
    sidecar = json.loads((tmp_path / "magnitude" / f"{stem}_desc-mppca_bold.json").read_text())
    assert [run["configuration"]["complex"] for run in sidecar["Provenance"]["Details"]["runs"]] == [False] * 3
    assert any("phase image was not used" in warning for warning in sidecar["Warnings"])


def test_bad_complex_and_multi_echo_input_is_refused_one_line_each(multiecho_dataset, tmp_path, capsys):
    """A phase image without its magnitude, a phase of another shape, echoes on different grids: each
    one line naming the file, exit 65, every other run done."""
    raw, phantom, relpaths = multiecho_dataset
    func = raw / relpaths[0].rsplit("/", 1)[0]
    # another task: its magnitude is gone, its phase is left
    for part in ("mag", "phase"):
        for ext in (".nii.gz", ".json"):
            source = func / f"sub-01_ses-post_task-rest_echo-1_part-{part}_bold{ext}"
            (func / source.name.replace("task-rest_echo-1", "task-lonely")).write_bytes(source.read_bytes())
    (func / "sub-01_ses-post_task-lonely_part-mag_bold.nii.gz").unlink()
    # a third task whose phase is cropped
    for part in ("mag", "phase"):
        source = func / f"sub-01_ses-post_task-rest_echo-1_part-{part}_bold.nii.gz"
        image = nib.load(source)
        data = image.get_fdata()[:, :-1] if part == "phase" else image.get_fdata()
        nib.save(nib.Nifti1Image(data.astype(np.float32), image.affine),
                 func / source.name.replace("task-rest_echo-1", "task-cropped"))
    code = run_app(raw, tmp_path)
    err = capsys.readouterr().err
    assert code == 65, err
    lines = [line for line in err.splitlines() if line.startswith("bids-denoise: error:")]
    assert any("task-lonely_part-phase_bold.nii.gz: a phase image without its magnitude" in line for line in lines)
    assert any("task-cropped_part-phase_bold.nii.gz: a phase image of shape" in line for line in lines)
    out = tmp_path / "out"
    for relpath in relpaths:  # the good run was done
        assert (out / relpath.replace("_bold.nii.gz", "_desc-mppca_bold.nii.gz")).exists()
    assert not list(out.rglob("*task-lonely*")) and not list(out.rglob("*task-cropped*"))

    # echoes on different grids
    second = raw / relpaths[1]
    image = nib.load(second)
    nib.save(nib.Nifti1Image(image.get_fdata()[:, :-2].astype(np.float32), image.affine), second)
    phase = raw / relpaths[1].replace("part-mag", "part-phase")
    nib.save(nib.Nifti1Image(nib.load(phase).get_fdata()[:, :-2].astype(np.float32), image.affine), phase)
    code = run_app(raw, tmp_path, out="grids")
    err = capsys.readouterr().err
    assert code == 65 and f"{second}: this echo's grid (16x14x8) differs from echo 1's (16x16x8" in err
    assert not list((tmp_path / "grids").rglob("*task-rest*desc-mppca_bold.nii.gz"))


def test_phase_units_come_from_the_values_or_the_sidecar_and_an_unknown_range_is_refused(dataset, tmp_path, capsys):
    """The same complex run with its phase in radians, degrees, scanner units 0..4095 (where radians, or a
    signed range, used to be assumed) gives the same result of MP-PCA on the complex series; a range that fits no unit is one line
    naming the phase file (exit 65); a sidecar's Units is what the values are read in."""
    from bids_denoise.testing.bold_phantom import make_bold_phantom, write_bold_run

    raw, _ = dataset
    phantom = make_bold_phantom((16, 16, 8), 30, snr=15, complex_data=True, seed=4)
    (relpath,) = write_bold_run(raw, phantom, "01", "post")
    phase_path = raw / relpath.replace("part-mag", "part-phase")
    sidecar = phase_path.with_name(phase_path.name.replace(".nii.gz", ".json"))
    metadata = json.loads(sidecar.read_text())
    assert metadata["Units"] == "rad"
    sidecar.write_text(json.dumps(dict(metadata, Units="arbitrary")))  # the values say what they are
    image = nib.load(phase_path)
    radians = image.get_fdata()
    stored = {"radians": radians, "degrees": np.degrees(radians),
              "unsigned": np.mod(radians, 2 * np.pi) * 4096 / (2 * np.pi)}
    results = {}
    for name, values in stored.items():
        nib.save(nib.Nifti1Image(values.astype(np.float32), image.affine), phase_path)
        code = run_app(raw, tmp_path, "--mppca-phase", "use", out=f"out_{name}")
        assert code == 0, capsys.readouterr().err
        (output,) = (tmp_path / f"out_{name}").rglob("*_desc-mppca_bold.nii.gz")
        results[name] = nib.load(output).get_fdata()
    for name in ("degrees", "unsigned"):
        assert np.allclose(results[name], results["radians"], rtol=1e-4, atol=1e-3), name
    nib.save(nib.Nifti1Image((radians * 3000).astype(np.float32), image.affine), phase_path)
    code = run_app(raw, tmp_path, "--mppca-phase", "use", out="out_unknown")
    err = capsys.readouterr().err
    assert code == 65 and f"{phase_path}: phase values from" in err and "no units known here" in err, err
    sidecar.write_text(json.dumps(dict(metadata, Units="rad")))
    code = run_app(raw, tmp_path, "--mppca-phase", "use", out="out_stated")
    err = capsys.readouterr().err
    assert code == 65 and "its sidecar says the phase is in radians, but its values span" in err, err
