"""Running on SLURM: Nipype's SLURM plugin and the array script, against a real controller."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bids_denoise.cli import main
from tests.cluster.slurm import Cluster, available

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slurm


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = available()
    if reason:
        pytest.skip(f"no SLURM here: {reason}")
    running = Cluster(tmp_path_factory.mktemp("slurm")).start()
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(running.conf)
    yield running
    running.stop()
    if previous is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = previous


def denoised_arrays(out: Path):
    return {
        path.relative_to(out): np.asanyarray(nib.load(path).dataobj)
        for path in sorted(out.rglob("*_desc-*.nii.gz"))
    }


#: what one DWI run gives with ``--methods patch2self mppca``
WRITTEN = ("desc-patch2self_dwi", "desc-mppca_dwi", "desc-mppca_stat-noise_dwimap", "desc-mppca_stat-rank_dwimap",
           "desc-mppca_stat-removed_dwimap")


def written_per_run(arrays) -> dict:
    """How many of each kind of output the denoised arrays hold."""
    kinds = {}
    for path in arrays:
        kind = "desc-" + path.name.split("_desc-")[-1].removesuffix(".nii.gz")
        kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


def local_run(raw, out, work, *labels):
    code = main([str(raw), str(out), "participant", "--participant-label", *labels, "--session-label", "post",
                 "--methods", "patch2self", "mppca", "-w", str(work), "--skip-bids-validation"])
    assert code == 0


def test_nipype_slurm_plugin(cluster, dataset, tmp_path, capsys):
    raw, _ = dataset
    out = tmp_path / "out"
    code = main([str(raw), str(out), "participant", "--participant-label", "01", "--session-label", "post",
                 "--methods", "patch2self", "mppca", "-w", str(tmp_path / "work"), "--skip-bids-validation",
                 "--plugin", "SLURM", "--plugin-args",
                 '{"sbatch_args": "-c 1 --mem=1G", "gpu_sbatch_args": "--gres=gpu:1", "poll_sleep_duration": 0.5}',
                 "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    batch_scripts = list((tmp_path / "work").rglob("batchscript_*.sh"))
    assert batch_scripts, "nodes were not submitted to SLURM"
    reference = tmp_path / "reference"
    local_run(raw, reference, tmp_path / "work_local", "01")
    ours, expected = denoised_arrays(out), denoised_arrays(reference)
    assert ours.keys() == expected.keys() and written_per_run(ours) == dict.fromkeys(WRITTEN, 1)
    for key in ours:
        assert np.array_equal(ours[key], expected[key]), key


def test_array_script_then_group(cluster, dataset, tmp_path):
    raw, _ = dataset
    out = tmp_path / "out"
    env = dict(cluster.env, BIDS_DENOISE_CMD=f"{sys.executable} -m bids_denoise", PARTICIPANTS="01 02",
               SBATCH_ARGS="-c 1 --mem=2G", GROUP_SBATCH_ARGS="-c 1 --mem=1G", WORK_ROOT=str(tmp_path / "scratch"))
    submitted = subprocess.run(
        ["bash", str(ROOT / "scripts" / "slurm_array.sh"), str(raw), str(out), "--session-label", "post",
         "--methods", "patch2self", "mppca", "--skip-bids-validation"],
        env=env, capture_output=True, text=True, timeout=60,
    )
    assert submitted.returncode == 0, submitted.stderr
    assert "array job" in submitted.stdout
    cluster.wait_for_jobs(timeout=600)
    logs = "\n".join(p.read_text() for p in (out / "logs" / "slurm").glob("*.out"))
    table = out / "group.tsv"
    assert table.exists(), logs
    assert len(table.read_text().splitlines()) == 1 + 2 * 2
    assert (out / "group.html").exists()
    reference = tmp_path / "reference"
    local_run(raw, reference, tmp_path / "work_local", "01", "02")
    ours, expected = denoised_arrays(out), denoised_arrays(reference)
    assert ours.keys() == expected.keys() and written_per_run(ours) == dict.fromkeys(WRITTEN, 2)
    for key in ours:
        assert np.array_equal(ours[key], expected[key]), key
    # each array task made its work directory under WORK_ROOT and removed it when it ended
    assert (tmp_path / "scratch").is_dir() and not any((tmp_path / "scratch").iterdir())
