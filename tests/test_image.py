"""The image itself, built with podman and run as a user would run it (marker ``image``).

Skipped cleanly where podman is absent or unusable, or where the tests do not run as root (podman
here is used rootful). Podman needs two host adjustments on this kind of machine: the ``runc``
runtime (the default ``crun`` fails on hybrid cgroups) and higher ulimits, both set in a
``containers.conf`` given to every podman call through ``CONTAINERS_CONF``. The image is built by
``scripts/build_image.sh`` from a debootstrapped local base (no registry can be reached); podman's
layer cache keeps a rebuild quick while the base image stays.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bids_denoise.bids import find_validator, validate_dataset
from tests.conftest import rmse, tree_digest

ROOT = Path(__file__).resolve().parents[1]
TAG = "localhost/bids-denoise:ci"
USER = "4321:4321"
pytestmark = [pytest.mark.image, pytest.mark.timeout(3600)]  # the image build alone may take 30 minutes

CONTAINERS_CONF = """\
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
[engine]
runtime = "runc"
"""


@pytest.fixture(scope="module")
def podman_env(tmp_path_factory):
    if shutil.which("podman") is None:
        pytest.skip("podman is not installed")
    if os.geteuid() != 0:
        pytest.skip("the image test runs podman as root")
    if shutil.which("runc") is None:
        pytest.skip("the runc runtime is not installed")
    conf = tmp_path_factory.mktemp("podman") / "containers.conf"
    conf.write_text(CONTAINERS_CONF)
    env = dict(os.environ, CONTAINERS_CONF=str(conf))
    probe = subprocess.run(["podman", "info"], env=env, capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"podman is not usable here: {probe.stderr.strip().splitlines()[-1:]}")
    return env


@pytest.fixture(scope="module")
def image(podman_env):
    build = subprocess.run([str(ROOT / "scripts" / "build_image.sh"), TAG], env=podman_env, cwd=ROOT,
                           capture_output=True, text=True, timeout=1800)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    return TAG


def podman_run(env, *args, timeout=600):
    return subprocess.run(["podman", "run", "--rm", "--network", "none", "--user", USER,
                           "--read-only", "--tmpfs", "/tmp", *args],
                          env=env, capture_output=True, text=True, timeout=timeout)


def test_image_runs_the_app_as_a_user_would(image, podman_env, tmp_path):
    from bids_denoise.testing.phantom import make_bids_dataset

    version = podman_run(podman_env, image, "--version")
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == "bids-denoise 0.1.0"

    labels = json.loads(subprocess.run(["podman", "image", "inspect", image], env=podman_env,
                                       capture_output=True, text=True, check=True).stdout)[0]["Labels"]
    assert labels["org.opencontainers.image.version"] == "0.1.0"
    assert labels["org.opencontainers.image.licenses"] == "Apache-2.0"

    raw = tmp_path / "ds"
    truths = make_bids_dataset(raw, subjects=("01",), sessions=None, shape=(14, 14, 8),
                               shells=((1000.0, 16),), n_b0=2, anat_shape=None,
                               runs_in_first_session=1)
    out, work = tmp_path / "out", tmp_path / "work"
    for folder in (out, work):
        folder.mkdir()
        os.chown(folder, 4321, 4321)
    before = tree_digest(raw)
    mounts = ["-v", f"{raw}:/data:ro", "-v", f"{out}:/out", "-v", f"{work}:/work"]
    run = podman_run(podman_env, *mounts, image, "/data", "/out", "participant", "--participant-label",
                     "01", "--methods", "mppca", "-w", "/work", "--nprocs", "2")
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert tree_digest(raw) == before  # mounted read-only, and untouched

    (relpath, truth_path), = truths.items()
    folder = out / Path(relpath).parent
    stem = Path(relpath).name.replace("_dwi.nii.gz", "")
    image_path = folder / f"{stem}_desc-mppca_dwi.nii.gz"
    assert image_path.stat().st_uid == 4321  # written as the --user given
    denoised, source = nib.load(image_path), nib.load(raw / relpath)
    assert np.allclose(denoised.affine, source.affine)
    signal = nib.load(truth_path).get_fdata()
    brain = signal[..., 0] > 0
    assert rmse(denoised.get_fdata(), signal, brain) < 0.85 * rmse(source.get_fdata(), signal, brain)
    assert (folder / f"{stem}_desc-mppca_dwi.bval").read_text() == (raw / "dwi.bval").read_text()
    sidecar = json.loads((folder / f"{stem}_desc-mppca_dwi.json").read_text())
    assert sidecar["Provenance"]["Device"] == "cpu"
    assert sidecar["Provenance"]["Details"]["solver"] == "tridiagonal"  # compiled in the build stage
    assert sidecar["Provenance"]["InputDigests"][Path(relpath).name] == before[relpath]
    assert (folder / f"{stem}_desc-mppca_stat-noise_dwimap.nii.gz").exists()
    assert (out / "sub-01.html").exists()
    if find_validator():
        n_errors, lines = validate_dataset(out)
        assert n_errors == 0, lines

    # no GPU in this container: asking for CUDA fails at once and says how to expose one
    refused = podman_run(podman_env, *mounts, image, "/data", "/out", "participant", "--device", "cuda",
                         "-w", "/work")
    assert refused.returncode == 64
    assert "--gpus all" in refused.stderr and "--nv" in refused.stderr
