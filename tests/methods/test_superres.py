"""WASA super-resolution: exact wavelets, shapes, geometry, bounded attention memory, training."""

from __future__ import annotations

import multiprocessing as mp

import numpy as np
import pytest
import torch

from bids_denoise.methods.core.errors import UnsuitableDataError
from bids_denoise.methods.superres import (
    WASA,
    _patch_shape,
    _training_pairs,
    degrade,
    haar_dwt,
    haar_iwt,
    super_resolve,
    upsampled_affine,
)


def test_iwt_inverts_dwt_exactly():
    x = torch.randn(2, 3, 10, 14, dtype=torch.float64)
    assert torch.allclose(haar_iwt(haar_dwt(x)), x, atol=1e-12)
    bands = haar_dwt(x)
    assert bands.shape == (2, 12, 5, 7)
    assert torch.allclose((bands**2).sum(), (x**2).sum())  # orthonormal: energy kept


@pytest.mark.parametrize("scale", [2, 4])
def test_output_shapes(scale):
    model = WASA(scale=scale, channels=8, n_blocks=1)
    assert model(torch.zeros(2, 1, 11, 13)).shape == (2, 1, 11 * scale, 13)


@pytest.mark.parametrize("scale", [2, 4])
def test_affine_keeps_the_image_in_place(scale):
    affine = np.array([[-1.2, 0.1, 0, 80], [0.05, 1.2, 0.2, -100], [0, -0.1, 3.0, -60], [0, 0, 0, 1.0]])
    shape = np.array([20, 24, 10])
    new = upsampled_affine(affine, 2, scale)
    new_shape = shape * np.array([1, 1, scale])
    for corner in np.ndindex(2, 2, 2):
        old_voxel = np.where(corner, shape - 0.5, -0.5)  # outer corners of the grid
        new_voxel = np.where(corner, new_shape - 0.5, -0.5)
        old_world = affine @ np.r_[old_voxel, 1]
        new_world = new @ np.r_[new_voxel, 1]
        assert np.linalg.norm(old_world - new_world) < 0.5 * np.min(np.linalg.norm(affine[:3, :3], axis=0))
    assert np.allclose(np.linalg.norm(new[:3, 2]), np.linalg.norm(affine[:3, 2]) / scale)


def test_degradation_averages_thick_slices():
    images = np.arange(2 * 3 * 8, dtype=float).reshape(2, 3, 8)
    low = degrade(images, 2, 1)
    assert low.shape == (2, 3, 4)
    assert np.allclose(low[..., 0], images[..., :2].mean(-1))


def _peak_forward(queue):
    torch.set_num_threads(1)
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    base = _status("VmRSS")
    with torch.no_grad():
        WASA(scale=2, channels=32, n_blocks=4)(torch.zeros(1, 1, 256, 256))
    queue.put((_status("VmHWM") - base) * 1024)


def _status(field):
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith(field + ":"))


def test_a_256_slice_runs_in_bounded_memory():
    """Full self-attention over 256x256 positions would need 17 GB of scores; ours stays under 1 GB."""
    context = mp.get_context("fork")
    queue = context.Queue()
    process = context.Process(target=_peak_forward, args=(queue,))
    process.start()
    peak = queue.get(timeout=120)
    process.join()
    assert peak < 1024**3


def small_volume():
    grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in (24, 24, 8)], indexing="ij")
    return (100 * (1.5 + np.sin(4 * grid[0]) * np.cos(3 * grid[1]) + grid[2])).astype(np.float32)


def test_training_lowers_the_loss_and_is_seeded():
    volume = small_volume()
    first, _ = super_resolve(volume, np.eye(4), axis=2, scale=2, channels=8, n_blocks=1, epochs=3,
                             steps_per_epoch=5, batch_size=4, patch=16, seed=3)
    losses = [epoch["train_loss"] for epoch in first.history["epochs"]]
    assert losses[-1] < losses[0]
    assert first.image.shape == (24, 24, 16)
    second, _ = super_resolve(volume, np.eye(4), axis=2, scale=2, channels=8, n_blocks=1, epochs=3,
                              steps_per_epoch=5, batch_size=4, patch=16, seed=3)
    assert np.array_equal(first.image, second.image)


@pytest.mark.parametrize("scale", [2, 4])
def test_image_smaller_than_the_patch_in_plane(scale):
    """31x38x16 (a small T1w): the two in-plane orientations clip the patch differently; one batch
    mixes both, so they must share a patch shape (np.stack of different shapes crashed here)."""
    volume = np.random.default_rng(0).uniform(0, 100, (31, 38, 16)).astype(np.float32)
    result, _ = super_resolve(volume, np.eye(4), axis=2, scale=scale, channels=4, n_blocks=1, epochs=1,
                              steps_per_epoch=2, batch_size=4, patch=48, seed=0)
    assert result.image.shape == (31, 38, 16 * scale)
    assert np.isfinite(result.image).all()
    assert result.history["epochs"]


def test_patch_shape_fits_both_orientations():
    pairs = _training_pairs(np.zeros((31, 38, 16), np.float32), 2, 2)
    rows, columns = _patch_shape(pairs, 48, 2)
    for low, high in pairs:
        assert rows <= low.shape[1] and columns <= low.shape[2]
        assert high.shape[1] == 2 * low.shape[1]
    assert (rows, columns) == (15, 31)


def test_too_narrow_an_image_is_unsuitable():
    with pytest.raises(UnsuitableDataError, match="in-plane size of at least 2"):
        super_resolve(np.ones((1, 1, 6), np.float32), np.eye(4), axis=2, scale=2, epochs=1)


def test_a_target_voxel_size_chooses_the_scale():
    """A 1x1x4 mm image asked for 1 mm gets x4 along its thick axis (the scale used to default to x2: 2 mm)."""
    from bids_denoise import registry
    from bids_denoise.contract import MethodInputs
    from bids_denoise.registry.wasa import scale_for

    assert (scale_for(4.0, 1.0), scale_for(3.0, 1.0), scale_for(2.0, 1.0), scale_for(1.0, 1.0)) == (4, 4, 2, None)
    spec = registry.load_all()["wasa"]
    rng = np.random.default_rng(0)
    image = (100 + 10 * rng.standard_normal((24, 24, 6))).astype(np.float32)
    affine = np.diag([1.0, 1.0, 4.0, 1.0])
    parameters = spec.parse({"target": "1", "epochs": "1", "steps_per_epoch": "2", "batch_size": "2"})
    result = spec.run(MethodInputs(data=image, affine=affine), parameters)
    assert np.allclose(np.linalg.norm(result.affine[:3, :3], axis=0), [1.0, 1.0, 1.0])
    assert result.image.shape == (24, 24, 24) and result.details["scales"] == [4]
    with pytest.raises(Exception, match="already at most 4 mm"):
        spec.run(MethodInputs(data=image, affine=affine), spec.parse({"target": "4"}))
