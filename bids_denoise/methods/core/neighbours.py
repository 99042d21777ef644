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

    def __init__(self, series, variance, radius, threshold):
        self.series, self.radius, self.offsets = series, radius, offsets(radius)
        n_volumes = series.shape[3]
        self.total = np.stack([np.sum((shifted(series, o) - series) ** 2, axis=3) for o in self.offsets])
        self.limit = (1.0 + threshold * np.sqrt(2.0 / (n_volumes - 1))) * 2.0 * variance * (n_volumes - 1)

    def neighbours(self, v):
        """Volume ``v``'s neighbours of every voxel, (n_offsets, X, Y, Z), and which of them are kept."""
        image = self.series[..., v]
        values = np.stack([shifted(image, o) for o in self.offsets])
        keep = (self.total - (values - image) ** 2) < self.limit
        return values, keep
