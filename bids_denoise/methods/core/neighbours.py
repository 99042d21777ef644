"""Neighbourhoods of a voxel in a 3D grid: their offsets, shifted copies, in-image means, and which
neighbours share a voxel's signal across a series (:class:`ProfileGuide`).

Shared by the filters that average or take medians over neighbours (the calibrated median, the
self-supervised blends). Edges are either left out of a mean (:func:`neighbourhood_mean`: no voxel is
counted twice) or replicated (:func:`shifted`), as each function says.
"""

from __future__ import annotations

import itertools

import numpy as np


def _ndimage():
    from scipy import ndimage  # imported late: methods/ imports with numpy and torch alone

    return ndimage


def offsets(radius):
    """The offsets of a voxel's neighbours in its (2r+1)^3 cube, the voxel itself left out."""
    return [o for o in itertools.product(range(-radius, radius + 1), repeat=3) if any(o)]


def shifted(image, offset):
    """``image[i + offset]`` over the first three axes, edges replicated."""
    index = [np.clip(np.arange(n) + o, 0, n - 1) for o, n in zip(offset, image.shape[:3])]
    return image[np.ix_(*index)] if image.ndim == 3 else image[np.ix_(*index, np.arange(image.shape[3]))]


def shift_slices(array, offset):
    """Slices (destination, source) so that ``out[destination] = array[source]`` is ``array[i + offset]``
    where ``i + offset`` lies inside the array (no edge replicated)."""
    destination, source = [], []
    for o, n in zip(offset, array.shape):
        destination.append(slice(max(0, -o), n - max(0, o)))
        source.append(slice(max(0, o), n - max(0, -o)))
    return tuple(destination), tuple(source)


def neighbourhood_counts(shape, radius=1):
    """Number of in-image voxels in each voxel's (2r+1)^3 neighbourhood."""
    counts = np.ones(shape)
    for axis, n in enumerate(shape):
        index = np.arange(n)
        per_axis = np.minimum(index, radius) + np.minimum(n - 1 - index, radius) + 1
        counts = counts * per_axis.reshape([-1 if a == axis else 1 for a in range(len(shape))])
    return counts


def neighbourhood_mean(values, radius=1):
    """Mean of ``values`` over each voxel's in-image (2r+1)^3 neighbourhood (no replicated edges)."""
    size = 2 * radius + 1
    total = _ndimage().uniform_filter(values, size=size, mode="constant", cval=0.0) * size**values.ndim
    return total / neighbourhood_counts(values.shape, radius)


class ProfileGuide:
    """Which neighbours of each voxel share its signal across the other volumes of the series.

    For a neighbour ``j`` of voxel ``i`` and a volume ``v``, the profile distance is the mean over
    the other volumes ``u != v`` of ``(x_ju - x_iu)^2 / (2 s) - 1``: about 0 (standard deviation
    ``sqrt(2 / (V - 1))``) where the two voxels have the same signal, and the squared signal
    difference in units of ``2 s`` otherwise. ``j`` is kept for volume ``v`` when the distance is
    below ``threshold * sqrt(2 / (V - 1))``. Leaving volume ``v`` out makes the choice independent of
    the noise of volume ``v``: a filter of the kept neighbours is J-invariant.

    Parameters
    ----------
    series : ndarray, shape (X, Y, Z, V)
    variance : float
        The noise variance ``s``.
    radius : int
        The neighbourhood is the (2r+1)^3 cube (edges replicated).
    threshold : float
    """

    #: bytes of temporaries per slab of x-planes (the distances of one slab, its neighbours in one volume)
    SLAB_BYTES = 64 * 2**20

    def __init__(self, series, variance, radius, threshold):
        self.series, self.radius, self.offsets = series, radius, offsets(radius)
        n_volumes = series.shape[3]
        plane = int(np.prod(series.shape[1:3]))
        per_plane = plane * 8 * max(3 * n_volumes, 4 * len(self.offsets))
        step = max(1, self.SLAB_BYTES // per_plane)
        self.slabs = [slice(start, min(start + step, series.shape[0])) for start in range(0, series.shape[0], step)]
        # float32: one series' worth for 26 offsets at 13 volumes and more (a sum of squares compared with a limit
        # far above float32's rounding)
        self.total = np.empty((len(self.offsets),) + series.shape[:3], dtype=np.float32)
        for rows in self.slabs:
            block = series[rows]
            for k, offset in enumerate(self.offsets):
                difference = self._shifted(series, offset, rows) - block
                self.total[k, rows] = np.einsum("...v,...v->...", difference, difference)
        self.limit = (1.0 + threshold * np.sqrt(2.0 / (n_volumes - 1))) * 2.0 * variance * (n_volumes - 1)

    @staticmethod
    def _shifted(array, offset, rows):
        """``array[i + offset]`` for the x-planes ``rows`` (edges replicated), over the first three axes."""
        index = [np.clip(np.arange(rows.start, rows.stop) + offset[0], 0, array.shape[0] - 1)]
        index += [np.clip(np.arange(n) + o, 0, n - 1) for o, n in zip(offset[1:], array.shape[1:3])]
        return array[np.ix_(*index)] if array.ndim == 3 else array[np.ix_(*index, np.arange(array.shape[3]))]

    def neighbours(self, v, rows=slice(None)):
        """Volume ``v``'s neighbours of the voxels of x-planes ``rows``, (n_offsets, x, Y, Z), and which of them
        are kept."""
        image = self.series[..., v]
        rows = slice(*rows.indices(image.shape[0]))
        values = np.stack([self._shifted(image, o, rows) for o in self.offsets])
        keep = (self.total[:, rows] - (values - image[rows]) ** 2) < self.limit
        return values, keep
