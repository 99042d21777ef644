"""Sliding windows over a 3D grid: their default size, their positions, sums over them, and slabs.

Shared by the local low-rank methods (MP-PCA, NORDIC) and by the noise-floor correction of an
estimated noise map. Nothing here decomposes anything.
"""

from __future__ import annotations

import numpy as np


def default_extent(n_volumes: int, shape) -> tuple:
    """MRtrix3's default window: smallest odd e with e**3 >= n_volumes, capped by the image."""
    edge = 1
    while edge**3 < n_volumes:
        edge += 2
    return tuple(min(edge, _largest_odd(size)) for size in shape)


def _largest_odd(size: int) -> int:
    return size if size % 2 else size - 1


def slabs(shape, nbytes):
    """Slices along x whose float64 copies of a (X, Y, Z, V) array take at most a sixteenth of
    ``nbytes`` (the series' size) and 16 MiB: the temporaries of slab-wise passes stay a fraction of
    the input whatever its size."""
    per_x = max(1, int(np.prod(shape[1:])) * 8)
    step = max(1, min(16 * 2**20, nbytes // 16) // per_x)
    return [slice(start, start + step) for start in range(0, shape[0], step)]



def window_means(values, extent) -> np.ndarray:
    """Mean of a (X, Y, Z) map over every window position: (X - ex + 1, Y - ey + 1, Z - ez + 1), by
    cumulative sums in float64."""
    total = np.pad(np.asarray(values, dtype=np.float64), [(1, 0)] * 3)
    for axis in range(3):
        np.cumsum(total, axis=axis, out=total)
    ex, ey, ez = extent
    sums = (
        total[ex:, ey:, ez:] - total[:-ex, ey:, ez:] - total[ex:, :-ey, ez:] - total[ex:, ey:, :-ez]
        + total[:-ex, :-ey, ez:] + total[:-ex, ey:, :-ez] + total[ex:, :-ey, :-ez] - total[:-ex, :-ey, :-ez]
    )
    return np.maximum(sums, 0.0) / float(ex * ey * ez)



def centred_window_means(values, extent) -> np.ndarray:
    """Mean of a (X, Y, Z) map over each voxel's window (centred, shifted inside at the border)."""
    means = window_means(values, extent)
    index = [
        np.clip(np.arange(size) - edge // 2, 0, size - edge) for size, edge in zip(values.shape, extent)
    ]
    return means[np.ix_(*index)]



def strided_positions(count: int, stride: int) -> np.ndarray:
    positions = np.arange(0, count, stride)
    if positions[-1] != count - 1:
        positions = np.append(positions, count - 1)
    return positions


def gaussian_weights(extent, width) -> np.ndarray:
    """Weights of a window's voxels (in the window's x, y, z order) for Gaussian aggregation: 1 at the
    window's centre, ``exp(-d^2 / 2 s^2)`` per axis with ``s = width * extent``."""
    axes = []
    for edge in extent:
        offset = np.arange(edge) - (edge - 1) / 2.0
        axes.append(np.exp(-0.5 * (offset / (width * edge)) ** 2))
    return np.einsum("i,j,k->ijk", *axes).ravel()

