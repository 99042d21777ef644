"""The BIDS-App contract: end to end on a phantom dataset, and every kind of bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import nibabel as nib
import numpy as np
import pytest

from bids_denoise.bids import find_validator, validate_dataset
from bids_denoise.cli import main
from tests.conftest import assert_figure, rmse, tree_digest


def run_app(*args):
    return main([str(a) for a in args])


def outputs(out: Path):
    return sorted(p for p in out.rglob("*") if p.is_file() and "log" not in p.parts)


def test_end_to_end(dataset, tmp_path, capsys):
    raw, truths = dataset
    truths = {relpath: truth for relpath, truth in truths.items() if "/dwi/" in relpath}
    out, work = tmp_path / "out", tmp_path / "work"
    before = tree_digest(raw)
    code = run_app(raw, out, "participant", "--methods", "patch2self", "mppca", "-w", work,
                   "--skip-bids-validation", "--nprocs", "2")
    assert code == 0, capsys.readouterr().err
    assert tree_digest(raw) == before  # the input is never modified

    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative"
    assert description["GeneratedBy"][0]["Name"] == "bids-denoise"
    # the source as a path relative to the output (no host path), which the BIDS URIs of the sidecars resolve by
    assert description["DatasetLinks"]["raw"] == os.path.relpath(raw.resolve(), out.resolve())
    assert (out / description["DatasetLinks"]["raw"] / "dataset_description.json").exists()

    for relpath, truth_path in truths.items():
        source = raw / relpath
        stem = source.name.replace("_dwi.nii.gz", "")
        folder = out / Path(relpath).parent
        for method in ("patch2self", "mppca"):
            image_path = folder / f"{stem}_desc-{method}_dwi.nii.gz"
            assert image_path.exists(), image_path
            image, reference = nib.load(image_path), nib.load(source)
            assert np.allclose(image.affine, reference.affine)
            assert image.header.get_zooms() == reference.header.get_zooms()
            assert int(image.header["sform_code"]) == int(reference.header["sform_code"])
            assert int(image.header["qform_code"]) == int(reference.header["qform_code"])
            assert image.get_data_dtype() == np.float32
            for extension in (".bval", ".bvec"):
                assert (folder / f"{stem}_desc-{method}_dwi{extension}").read_text() == \
                    (raw / f"dwi{extension}").read_text()
            sidecar = json.loads((folder / f"{stem}_desc-{method}_dwi.json").read_text())
            assert sidecar["PhaseEncodingDirection"] == "j-"  # inherited from the root dwi.json
            assert sidecar["TotalReadoutTime"] == 0.05
            assert sidecar["Sources"] == [f"bids:raw:{relpath}"]
            assert sidecar["SkullStripped"] is False
            provenance = sidecar["Provenance"]
            assert provenance["Method"] == method
            assert provenance["Seed"] == 0 and provenance["Device"] == "cpu"
            assert provenance["InputDigests"][source.name] == before[relpath]
            assert provenance["OutputDigest"] == tree_digest(folder)[image_path.name]
            assert "--methods patch2self mppca" in provenance["CommandLine"]
            assert provenance["SoftwareVersions"]["torch"] and provenance["SoftwareVersions"]["nipype"]
            signal = nib.load(truth_path).get_fdata()
            noisy = reference.get_fdata()
            brain = signal[..., 0] > 0
            assert rmse(image.get_fdata(), signal, brain) < 0.85 * rmse(noisy, signal, brain)
        noise_map = folder / f"{stem}_desc-mppca_stat-noise_dwimap.nii.gz"
        assert nib.load(noise_map).shape == nib.load(source).shape[:3]
        assert (folder / f"{stem}_desc-mppca_stat-rank_dwimap.json").exists()
    assert list((out / "prov").glob("*_prov.jsonld"))
    assert list((out / "sub-01" / "log").glob("*.log"))

    if find_validator():
        n_errors, lines = validate_dataset(out)
        assert n_errors == 0, lines

    # a second run with the same work dir recomputes nothing and gives identical outputs
    digests = {p: p.read_bytes() for p in outputs(out)}
    node_results = sorted(work.rglob("*_denoise/image-0.nii.gz"))
    assert len(node_results) == 2 * len(truths)  # one per run and method, cached in the work directory
    stamps = [p.stat().st_mtime_ns for p in node_results]
    code = run_app(raw, out, "participant", "--methods", "patch2self", "mppca", "-w", work,
                   "--skip-bids-validation", "--nprocs", "2")
    assert code == 0
    assert [p.stat().st_mtime_ns for p in node_results] == stamps
    assert {p: p.read_bytes() for p in outputs(out)} == digests

    check_report(out / "sub-01.html", out, expected_sections=2 * 3)
    citation = (out / "logs" / "CITATION.md").read_text()
    assert "Patch2Self [fadnavis2020]" in citation and "[veraart2016]" in citation
    assert "@article{corderogrande2019" in (out / "logs" / "CITATION.bib").read_text()
    qc_tables = sorted(out.rglob("*_desc-mppca_dwiqc.tsv"))
    assert len(qc_tables) == len(truths)
    assert qc_tables[0].read_text().startswith("volume\tbval\tshell\tresidual_rms\toutlier")


class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.sections = [], 0

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs)["src"])
        if tag == "h2":
            self.sections += 1


def check_report(page: Path, out: Path, expected_sections: int):
    """Every image the page references exists under OUTPUT_DIR and is a valid PNG."""
    parser = _Images()
    parser.feed(page.read_text())
    assert parser.sections >= expected_sections
    assert parser.images
    for source in parser.images:
        path = out / source
        assert path.exists(), source
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", source
    return parser


def test_group_after_separate_participant_jobs(dataset, tmp_path, capsys):
    raw, _ = dataset
    out = tmp_path / "out"
    for subject in ("01", "02"):
        code = run_app(raw, out, "participant", "--participant-label", subject, "--session-label", "post",
                       "--methods", "mppca", "-w", tmp_path / f"work{subject}", "--skip-bids-validation")
        assert code == 0, capsys.readouterr().err
    assert run_app(raw, out, "group") == 0
    table = (out / "group.tsv").read_text().splitlines()
    assert len(table) == 3
    header = table[0].split("\t")
    assert header[:5] == ["subject", "session", "acquisition", "run", "method"]
    rows = [dict(zip(header, line.split("\t"))) for line in table[1:]]
    assert {row["subject"] for row in rows} == {"01", "02"}
    assert all(float(row["noise_sigma"]) > 0 and float(row["residual_rms"]) > 0 for row in rows)
    check_report(out / "group.html", out, expected_sections=1)
    if find_validator():
        n_errors, lines = validate_dataset(out)
        assert n_errors == 0, lines


def test_report_renders_in_chromium(dataset, tmp_path, capsys):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("Chromium is not installed (.ci/run installs it)")
    raw, _ = dataset
    out = tmp_path / "out"
    code = run_app(raw, out, "participant", "--participant-label", "01", "--session-label", "post",
                   "--methods", "patch2self", "-w", tmp_path / "work", "--skip-bids-validation")
    assert code == 0, capsys.readouterr().err
    shot = tmp_path / "report.png"
    subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
         f"--screenshot={shot}", "--window-size=1000,1400", (out / "sub-01.html").as_uri()],
        check=True, capture_output=True, timeout=120,
    )
    pixels = plt.imread(shot)
    assert pixels.shape[0] >= 1000 and pixels.shape[1] >= 900
    assert pixels[..., :3].std() > 0.05  # not a blank page: text and figures were drawn


def test_filters_and_labels(dataset, tmp_path, capsys):
    raw, _ = dataset
    out = tmp_path / "out"
    filters = tmp_path / "filter.json"
    filters.write_text(json.dumps({"dwi": {"run": 2}}))
    code = run_app(raw, out, "participant", "--participant_label", "sub-02", "--session-label", "pre",
                   "--bids-filter-file", filters, "-w", tmp_path / "work", "--skip-bids-validation",
                   "--methods", "patch2self")
    assert code == 0, capsys.readouterr().err
    written = sorted(p.name for p in out.rglob("*_desc-patch2self_dwi.nii.gz"))
    assert written == ["sub-02_ses-pre_acq-multiband_run-2_desc-patch2self_dwi.nii.gz"]


def test_validation_runs_by_default(dataset, tmp_path):
    if not find_validator():
        pytest.skip("bids-validator-deno is not installed")
    raw, _ = dataset
    (raw / "sub-01" / "ses-pre" / "dwi" / "sub-01_ses-pre_bogus.txt").write_text("x")
    code = run_app(raw, tmp_path / "out", "participant", "-w", tmp_path / "work")
    assert code == 16


def expect_error(capsys, code, expected_code, *fragments):
    err = capsys.readouterr().err
    assert code == expected_code, err
    for fragment in fragments:
        assert fragment in err, err


def sha256(path):
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def dwi_of(raw, subject="01", session="pre", run=1):
    return raw / f"sub-{subject}" / f"ses-{session}" / "dwi" / f"sub-{subject}_ses-{session}_acq-multiband_run-{run}_dwi.nii.gz"


def run_one(raw, tmp_path, *extra):
    return run_app(raw, tmp_path / "out", "participant", "-w", tmp_path / "work", "--skip-bids-validation", *extra)


def test_missing_bids_dir(tmp_path, capsys):
    code = run_app(tmp_path / "nope", tmp_path / "out", "participant")
    expect_error(capsys, code, 66, "nope", "does not exist")


def test_not_bids(tmp_path, capsys):
    (tmp_path / "raw").mkdir()
    code = run_app(tmp_path / "raw", tmp_path / "out", "participant")
    expect_error(capsys, code, 16, "dataset_description.json")
    assert not (tmp_path / "out").exists()  # nothing is created for a run that cannot start


def test_output_inside_raw(dataset, capsys):
    raw, _ = dataset
    for output in (raw, raw / "sub-01" / "out"):
        code = run_app(raw, output, "participant", "--skip-bids-validation")
        expect_error(capsys, code, 64, "must not be BIDS_DIR or inside it")
    assert not (raw / "sub-01" / "out").exists()


def test_output_under_derivatives_is_allowed(dataset, tmp_path, capsys):
    raw, _ = dataset
    code = run_app(raw, raw / "derivatives" / "bids-denoise", "participant", "--participant-label", "01",
                   "--session-label", "post", "-w", tmp_path / "work", "--skip-bids-validation")
    assert code == 0, capsys.readouterr().err


def test_unknown_label_lists_existing(dataset, tmp_path, capsys):
    raw, _ = dataset
    code = run_one(raw, tmp_path, "--participant-label", "07")
    expect_error(capsys, code, 18, "07", "01, 02")
    assert not (tmp_path / "out" / "sub-07").exists()


@pytest.mark.parametrize("broken, fragments", [
    ("no_bval", ["no .bval file"]),
    ("bval_count", ["3 b-values for", "dwi.bval"]),
    ("bvec_rows", ["must have 3 rows"]),
    ("image_3d", ["expected a 4D series"]),
    ("nan", ["NaN or infinite"]),
    ("truncated", ["truncated or corrupt"]),
    ("empty", ["empty (0 bytes)"]),
])
def test_bad_run_is_reported_skipped_and_others_complete(dataset, tmp_path, capsys, broken, fragments):
    raw, _ = dataset
    target = dwi_of(raw)
    image = nib.load(target)
    if broken == "no_bval":
        sidecar = target.with_name(target.name.replace(".nii.gz", ".bvec"))
        np.savetxt(sidecar, np.loadtxt(raw / "dwi.bvec"))
        (raw / "dwi.bval").rename(raw / "unrelated.txt")
        (raw / "unrelated.txt").unlink()
        # every run lost its bval: all bad
    elif broken == "bval_count":
        (raw / "dwi.bval").write_text("0 1000 1000\n")
    elif broken == "bvec_rows":
        target.with_name(target.name.replace(".nii.gz", ".bvec")).write_text("1 0 0\n0 1 0\n")
    elif broken == "image_3d":
        nib.save(nib.Nifti1Image(image.get_fdata()[..., 0], image.affine), target)
    elif broken == "nan":
        data = image.get_fdata()
        data[3, 3, 3, 2] = np.nan
        nib.save(nib.Nifti1Image(data.astype(np.float32), image.affine), target)
    elif broken == "truncated":
        payload = target.read_bytes()
        target.write_bytes(payload[: len(payload) // 2])
    elif broken == "empty":
        target.write_bytes(b"")
    before = tree_digest(raw)
    code = run_one(raw, tmp_path, "--participant-label", "01")
    err = capsys.readouterr().err
    assert code == 65, err
    for fragment in fragments:
        assert fragment in err
    assert "skipped for bad input data" in err
    assert tree_digest(raw) == before
    out = tmp_path / "out"
    bad_stem = target.name.replace("_dwi.nii.gz", "")
    if broken in ("no_bval", "bval_count"):
        # the root-level bval is every DWI run's: no DWI run is left and none is written; the T1w images
        # (the default's patchpca) still complete
        assert not list(out.rglob("*_desc-*_dwi*")), sorted(out.rglob("*"))
        assert len(list(out.rglob("*_desc-patchpca_T1w.nii.gz"))) == 2
    else:
        assert not list(out.rglob(f"{bad_stem}_desc-*"))
        # the good runs of the participant still completed
        assert len(list(out.rglob("*_desc-mppca_dwi.nii.gz"))) == 2  # the default method


def test_stop_on_first_crash_writes_nothing(dataset, tmp_path, capsys):
    raw, _ = dataset
    dwi_of(raw).write_bytes(b"")
    code = run_one(raw, tmp_path, "--participant-label", "01", "--stop-on-first-crash")
    expect_error(capsys, code, 65, "empty (0 bytes)")
    assert not list((tmp_path / "out").rglob("*.nii.gz"))


def test_unwritable_output(dataset, tmp_path, capsys):
    raw, _ = dataset
    blocker = tmp_path / "file"
    blocker.write_text("")
    code = run_app(raw, blocker / "out", "participant", "--skip-bids-validation")
    expect_error(capsys, code, 73, "cannot create or write OUTPUT_DIR")


def test_cuda_requested_without_gpu(dataset, tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    raw, _ = dataset
    code = run_one(raw, tmp_path, "--device", "cuda")
    expect_error(capsys, code, 64, "no CUDA GPU")


def test_usage_errors(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["a", "b", "everything"])
    assert exit_info.value.code == 64
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert "bids-denoise" in capsys.readouterr().out
    for bad in ("0", "1,0,2"):
        with pytest.raises(SystemExit) as exit_info:
            main(["a", "b", "participant", "--mppca-stride", bad])
        assert exit_info.value.code == 64
        assert "--mppca-stride" in capsys.readouterr().err


def test_module_entry_point():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "bids_denoise", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("bids-denoise ")


def test_dipy_backend_and_plugin_file(dataset, tmp_path, capsys):
    pytest.importorskip("dipy")
    pytest.importorskip("sklearn")
    raw, _ = dataset
    plugin = tmp_path / "plugin.yml"
    plugin.write_text("plugin: Linear\nplugin_args: {}\n")
    code = run_one(raw, tmp_path, "--participant-label", "01", "--session-label", "post",
                   "--methods", "patch2self", "--patch2self-backend", "dipy", "--use-plugin", plugin)
    assert code == 0, capsys.readouterr().err
    (sidecar,) = (tmp_path / "out").rglob("*_desc-patch2self_dwi.json")
    provenance = json.loads(sidecar.read_text())["Provenance"]
    assert provenance["Parameters"]["backend"] == "dipy"
    assert provenance["Details"]["backend"] == "dipy version=3"


def test_mppca_defaults_options_and_noise_map(dataset, tmp_path, capsys):
    raw, truths = dataset
    select = ("--participant-label", "01", "--session-label", "post")
    assert run_one(raw, tmp_path, *select) == 0, capsys.readouterr().err  # the default: MP-PCA, best mode
    (sidecar,) = (tmp_path / "out").rglob("*_desc-mppca_dwi.json")
    configuration = json.loads(sidecar.read_text())["Provenance"]["Details"]["configuration"]
    assert (configuration["shrinkage"], configuration["noise_floor"], configuration["aggregate"]) == \
        ("hard", "koay", "overcomplete")
    (denoised,) = (tmp_path / "out").rglob("*_desc-mppca_dwi.nii.gz")
    relpath = str(denoised.relative_to(tmp_path / "out")).replace("_desc-mppca", "")
    signal, noisy = nib.load(truths[relpath]).get_fdata(), nib.load(raw / relpath).get_fdata()
    brain = signal[..., 0] > 0
    assert rmse(nib.load(denoised).get_fdata(), signal, brain) < 0.6 * rmse(noisy, signal, brain)

    # a given noise level instead of the estimate, as a number or a map (which must fit the run)
    affine = nib.load(raw / relpath).affine
    assert not np.allclose(affine, np.eye(4))
    sigma = np.full(noisy.shape[:3], 50.0, np.float32)
    maps = {"sigma.nii.gz": (sigma, affine), "sigma_bad.nii.gz": (sigma[:-1], affine),
            "sigma_grid.nii.gz": (sigma, np.eye(4)), "sigma_zero.nii.gz": (0 * sigma, affine),
            "sigma_negative.nii.gz": (sigma - 60, affine)}
    for name, (values, grid) in maps.items():
        nib.save(nib.Nifti1Image(values, grid), tmp_path / name)
    for value, expected, message in (
            ("50", 0, None), (tmp_path / "sigma.nii.gz", 0, None),
            (tmp_path / "sigma_bad.nii.gz", 65, "sigma_bad.nii.gz: a noise map of shape"),
            (tmp_path / "sigma_grid.nii.gz", 65, "sigma_grid.nii.gz: the noise map's affine differs from the run's"),
            (tmp_path / "sigma_zero.nii.gz", 65, "sigma_zero.nii.gz: the noise map is zero everywhere"),
            (tmp_path / "sigma_negative.nii.gz", 65, "sigma_negative.nii.gz: a noise map must be at least 0")):
        out = tmp_path / f"out_{Path(str(value)).name}"
        code = run_app(raw, out, "participant", "-w", tmp_path / "work_sigma", "--skip-bids-validation", *select,
                       "--methods", "mppca", "--mppca-noise-map", value)
        err = capsys.readouterr().err
        assert code == expected, err
        if expected:
            assert message in err and "Traceback" not in err
            assert not list(out.rglob("*_desc-mppca_dwi.nii.gz"))
        else:
            (sidecar,) = out.rglob("*_desc-mppca_dwi.json")
            provenance = json.loads(sidecar.read_text())["Provenance"]
            assert provenance["Details"]["configuration"]["noise_source"] == "given"
    # the map's digest is in the provenance; a changed file at the same path reruns the method node (the node's
    # cache hashes the file's content), an unchanged one does not
    out, given = tmp_path / "out_rerun", tmp_path / "sigma.nii.gz"

    def run():
        code = run_app(raw, out, "participant", "-w", tmp_path / "work_rerun", "--skip-bids-validation", *select,
                       "--methods", "mppca", "--mppca-noise-map", given)
        assert code == 0, capsys.readouterr().err
        (sidecar,) = out.rglob("*_desc-mppca_dwi.json")
        (image,) = out.rglob("*_desc-mppca_dwi.nii.gz")
        return json.loads(sidecar.read_text())["Provenance"], nib.load(image).get_fdata()

    first, before = run()
    assert first["ParameterFiles"]["noise_map"]["SHA256"] == sha256(given)
    assert first["InputDigests"]["sigma.nii.gz"] == sha256(given)
    cached, same = run()
    assert cached["StartTime"] == first["StartTime"] and np.array_equal(same, before)
    nib.save(nib.Nifti1Image(sigma * 3, affine), given)
    changed, stronger = run()
    assert changed["StartTime"] != first["StartTime"]
    assert changed["ParameterFiles"]["noise_map"]["SHA256"] == sha256(given)
    assert not np.array_equal(stronger, before)
    with pytest.raises(SystemExit) as exit_info:
        main([str(raw), str(tmp_path / "o"), "participant", "--mppca-noise-map", "missing.nii.gz"])
    assert exit_info.value.code == 64


def test_mppca_overcomplete_with_per_axis_stride(dataset, tmp_path, capsys):
    raw, _ = dataset
    code = run_one(raw, tmp_path, "--participant-label", "01", "--session-label", "post", "--methods", "mppca",
                   "--mppca-aggregate", "overcomplete", "--mppca-stride", "1,1,2", "--mppca-demean", "true",
                   "--mppca-extent", "3")
    assert code == 0, capsys.readouterr().err
    (sidecar,) = (tmp_path / "out").rglob("*_desc-mppca_dwi.json")
    provenance = json.loads(sidecar.read_text())["Provenance"]
    assert provenance["Parameters"]["stride"] == [1, 1, 2]
    assert provenance["Parameters"]["aggregate"] == "overcomplete" and provenance["Parameters"]["demean"] is True
    assert provenance["Device"] == "cpu"
    assert provenance["Details"]["solver"] == "tridiagonal"  # the compiled solver, built by the install
    (denoised,) = (tmp_path / "out").rglob("*_desc-mppca_dwi.nii.gz")
    # every voxel is covered by some window (demeaned: even a rank-0 window gives back its mean)
    assert np.all(np.abs(nib.load(denoised).get_fdata()).sum(-1) > 0)


def test_method_options_come_from_the_registry(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for option in ("--patch2self-patch-radius", "--patch2self-backend", "--mppca-extent", "--mppca-estimator"):
        assert option in text


def test_learned_and_calibrated_methods_in_the_app(dataset, tmp_path, capsys):
    raw, _ = dataset
    out = tmp_path / "out"
    code = run_one(raw, tmp_path, "--participant-label", "02", "--session-label", "post",
                   "--methods", "noise2noise", "noise2self", "median",
                   "--noise2noise-epochs", "2", "--noise2noise-steps-per-epoch", "3", "--noise2noise-batch-size", "4",
                   "--noise2self-epochs", "2", "--noise2self-steps-per-epoch", "3", "--noise2self-batch-size", "4",
                   "--seed", "7")
    assert code == 0, capsys.readouterr().err
    folder = out / "sub-02" / "ses-post" / "dwi"
    stem = "sub-02_ses-post_acq-multiband"
    n2n = json.loads((folder / f"{stem}_desc-noise2noise_dwi.json").read_text())["Provenance"]
    assert n2n["Parameters"]["epochs"] == 2 and n2n["Seed"] == 7
    # Noise2Noise trains on repeated measurements only: here the run's two b0s
    bvals = np.loadtxt(raw / "dwi.bval")
    pairs = n2n["Details"]["pairs"]
    assert pairs and all(bvals[pair["volume"]] == bvals[pair["partner"]] == 0 for pair in pairs)
    assert len(n2n["Details"]["history"]["epochs"]) == 2
    n2s_sidecar = json.loads((folder / f"{stem}_desc-noise2self_dwi.json").read_text())
    n2s = n2s_sidecar["Provenance"]
    assert n2s["Parameters"]["context"] == "series"
    # every figure of every method was made (Noise2Self's used to fail: KeyError 'thetas')
    for method in ("noise2noise", "noise2self", "median"):
        sidecar = json.loads((folder / f"{stem}_desc-{method}_dwi.json").read_text())
        assert not [w for w in sidecar.get("Warnings", []) if "could not be made" in w], (method, sidecar["Warnings"])
    assert len(n2s["Details"]["blend"]["blend_weights"]) == len(n2s["Details"]["blend"]["choices"])
    median = json.loads((folder / f"{stem}_desc-median_dwi.json").read_text())["Provenance"]["Details"]
    assert median["calibration"]["best"] == median["radius"]
    # a DWI series: the profile-guided median, radius 1 or 2
    assert median["guide"] == "profile" and len(median["calibration"]["losses"]) == 2
    figures = out / "sub-02" / "figures"
    assert_figure(figures / f"{stem}_desc-noise2noise_training.png")
    assert_figure(figures / f"{stem}_desc-median_calibration.png")
    assert_figure(figures / f"{stem}_desc-noise2self_blend.png")
    check_report(out / "sub-02.html", out, expected_sections=3)
    assert "Volume pairs used for training" in (out / "sub-02.html").read_text()
    assert "Noise2" in (out / "logs" / "CITATION.md").read_text()


def test_concurrent_participants_share_one_output_dir(dataset, tmp_path):
    raw, _ = dataset
    out = tmp_path / "out"
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "bids_denoise", str(raw), str(out), "participant", "--participant-label", label,
             "--session-label", "post", "-w", str(tmp_path / f"work{label}"), "--skip-bids-validation"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for label in ("01", "02")
    ]
    for process in processes:
        output, _ = process.communicate(timeout=600)
        assert process.returncode == 0, output
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative"
    lines = (out / ".bidsignore").read_text().splitlines()
    assert len(lines) == len(set(lines)) and "prov" in lines
    assert not list(out.rglob(".*.part*"))  # no temporary file left behind
    assert len(list(out.rglob("*_desc-mppca_dwi.nii.gz"))) == 2  # the default method
    if find_validator():
        n_errors, errors = validate_dataset(out)
        assert n_errors == 0, errors


def test_anatomical_images_with_the_methods_that_take_them(dataset, tmp_path, capsys):
    raw, truths = dataset
    out = tmp_path / "out"
    code = run_one(raw, tmp_path, "--participant-label", "01", "--session-label", "post",
                   "--methods", "median", "patch2self")
    assert code == 0, capsys.readouterr().err
    anat = out / "sub-01" / "ses-post" / "anat"
    (denoised,) = anat.glob("*_desc-median_T1w.nii.gz")
    assert denoised.name == "sub-01_ses-post_desc-median_T1w.nii.gz"
    assert not list(anat.glob("*patch2self*"))  # a DWI-only method is not run on anatomy
    assert not list(anat.glob("*.bval"))
    sidecar = json.loads(denoised.with_name(denoised.name.replace(".nii.gz", ".json")).read_text())
    assert sidecar["Provenance"]["Details"]["calibration"]["parameter"] == "radius"
    source = raw / "sub-01" / "ses-post" / "anat" / "sub-01_ses-post_T1w.nii.gz"
    signal = nib.load(truths["sub-01/ses-post/anat/sub-01_ses-post_T1w.nii.gz"]).get_fdata()
    assert nib.load(denoised).shape == nib.load(source).shape
    # inside homogeneous white matter the noise is gone; the phantom's thin grey-matter shell is
    # where a 3x3x3 median hurts (the report's residual shows it)
    from scipy import ndimage

    white = ndimage.binary_erosion(signal >= 900, iterations=2)
    assert white.sum() > 50
    noisy_error = rmse(nib.load(source).get_fdata(), signal, white)
    assert rmse(nib.load(denoised).get_fdata(), signal, white) < 0.5 * noisy_error
    parser = check_report(out / "sub-01.html", out, expected_sections=3)
    assert any("desc-median_calibration" in image for image in parser.images)
    assert "sub-01_ses-post_desc-median_T1w</h2>" in (out / "sub-01.html").read_text()
    if find_validator():
        n_errors, errors = validate_dataset(out)
        assert n_errors == 0, errors


def test_super_resolution_in_the_app(dataset, tmp_path, capsys):
    raw, _ = dataset
    out = tmp_path / "out"
    code = run_one(raw, tmp_path, "--participant-label", "01", "--session-label", "post", "--methods", "median",
                   "--super-resolution", "wasa", "--sr-scale", "2", "--sr-axes", "2",
                   "--wasa-epochs", "2", "--wasa-steps-per-epoch", "3", "--wasa-batch-size", "2")
    assert code == 0, capsys.readouterr().err
    anat_source = raw / "sub-01" / "ses-post" / "anat" / "sub-01_ses-post_T1w.nii.gz"
    anat = out / "sub-01" / "ses-post" / "anat" / "sub-01_ses-post_res-sr2_desc-wasa_T1w.nii.gz"
    dwi = out / "sub-01" / "ses-post" / "dwi" / "sub-01_ses-post_acq-multiband_res-sr2_desc-wasa_dwi.nii.gz"
    for result, source in ((anat, anat_source), (dwi, raw / "sub-01" / "ses-post" / "dwi" /
                                                  "sub-01_ses-post_acq-multiband_dwi.nii.gz")):
        before, after = nib.load(source), nib.load(result)
        assert after.shape[:3] == (before.shape[0], before.shape[1], 2 * before.shape[2])
        assert after.shape[3:] == before.shape[3:]
        assert np.isclose(after.header.get_zooms()[2], before.header.get_zooms()[2] / 2)
        # the outer corner of the grid stays where it was in scanner space
        corner_before = before.affine @ np.r_[np.array(before.shape[:3]) - 0.5, 1]
        corner_after = after.affine @ np.r_[np.array(after.shape[:3]) - 0.5, 1]
        assert np.allclose(corner_before, corner_after, atol=1e-4)
        sidecar = json.loads(result.with_name(result.name.replace(".nii.gz", ".json")).read_text())
        assert "sr2" in sidecar["Resolution"]
        assert sidecar["Provenance"]["Parameters"]["scale"] == 2
    assert (dwi.with_name(dwi.name.replace(".nii.gz", ".bval"))).read_text() == (raw / "dwi.bval").read_text()
    assert_figure(out / "sub-01" / "figures" / "sub-01_ses-post_res-sr2_desc-wasa_superres.png")
    check_report(out / "sub-01.html", out, expected_sections=4)
    if find_validator():
        n_errors, errors = validate_dataset(out)
        assert n_errors == 0, errors


def test_anatomical_images_get_patchpca_by_default_flair_included(dataset, tmp_path, capsys):
    """The default methods route 3D images (T1w, T2w, FLAIR) to patchpca: each image denoised closer to its
    noise-free signal, with its noise and rank maps and a sidecar that cites the method."""
    raw, truths = dataset
    anat = raw / "sub-01" / "ses-pre" / "anat"
    t1w = anat / "sub-01_ses-pre_T1w.nii.gz"
    flair = anat / "sub-01_ses-pre_FLAIR.nii.gz"
    shutil.copyfile(t1w, flair)
    before = tree_digest(raw)
    code = run_one(raw, tmp_path, "--participant-label", "01", "--session-label", "pre")
    assert code == 0, capsys.readouterr().err
    assert tree_digest(raw) == before
    out = tmp_path / "out" / "sub-01" / "ses-pre" / "anat"
    signal = nib.load(truths["sub-01/ses-pre/anat/sub-01_ses-pre_T1w.nii.gz"]).get_fdata()
    brain = signal > 0
    noisy = nib.load(t1w).get_fdata()
    for suffix in ("T1w", "FLAIR"):
        stem = f"sub-01_ses-pre_desc-patchpca_{suffix}"
        denoised = nib.load(out / f"{stem}.nii.gz").get_fdata()
        assert denoised.shape == noisy.shape
        assert rmse(denoised, signal, brain) < 0.8 * rmse(noisy, signal, brain)
        for name in ("noise", "rank"):
            assert (out / f"sub-01_ses-pre_desc-patchpca_stat-{name}_{suffix}map.nii.gz").exists()
        provenance = json.loads((out / f"{stem}.json").read_text())["Provenance"]
        assert provenance["Method"] == "patchpca"
        assert provenance["Parameters"]["guide_radius"] == 3
    assert "manjon2015" in (tmp_path / "out" / "logs" / "CITATION.bib").read_text()
