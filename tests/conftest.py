"""Shared fixtures: phantom data made in a few lines, the MRtrix3 reference data."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("NIPYPE_NO_ET", "1")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def mrtrix_data():
    folder = SHARED_DATA / "mrtrix3"
    if not (folder / "dwi.nii.gz").exists():
        pytest.skip("../shared/data/mrtrix3 is not present (a user's clone)")
    return folder


@pytest.fixture
def phantom():
    from bids_denoise.testing.phantom import make_phantom

    return make_phantom((16, 16, 10), n_b0=3, shells=((1000.0, 24),), noise_sigma=0.04, seed=3)


@pytest.fixture(scope="session")
def dataset_template(tmp_path_factory):
    """Two subjects, two sessions, two runs in the first session, root-level bval/bvec."""
    from bids_denoise.testing.phantom import make_bids_dataset

    root = tmp_path_factory.mktemp("template") / "ds"
    truths = make_bids_dataset(root, shape=(14, 14, 8), shells=((1000.0, 16),), n_b0=2)
    return root, truths


@pytest.fixture
def dataset(dataset_template, tmp_path):
    """A private, writable copy of the phantom dataset."""
    root, truths = dataset_template
    copy = tmp_path / "ds"
    shutil.copytree(root, copy)
    return copy, truths


def tree_digest(root: Path) -> dict:
    """SHA-256 of every file under root (to prove an input was not modified)."""
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def rmse(a, b, mask=None):
    diff = np.asarray(a, float) - np.asarray(b, float)
    if mask is not None:
        diff = diff[mask]
    return float(np.sqrt(np.mean(diff**2)))


def assert_figure(path, min_side=100):
    """``path`` is a PNG figure with something drawn on it: readable, at least ``min_side`` pixels a side, and
    more than a few distinct colours (a blank or failed figure has one or two)."""
    from matplotlib import image

    pixels = image.imread(str(path))
    assert pixels.ndim == 3 and min(pixels.shape[:2]) >= min_side, f"{path}: {pixels.shape}"
    colours = np.unique(pixels.reshape(-1, pixels.shape[2]), axis=0)
    assert len(colours) > 16, f"{path}: {len(colours)} distinct colours: nothing drawn"
