"""Self-supervised calibration of classical denoisers (Noise2Self, Batson & Royer 2019).

Any denoiser ``f_theta`` becomes J-invariant when it is fed the image with the
voxels of J replaced by the mean of their neighbours: its output on J then
never saw the input on J. The self-supervised loss ``||f_theta(x) - x||^2`` on J
is the true error plus a constant, so the ``theta`` with the least loss is the
best one, found without ground truth. The median filter's "donut" form (centre
excluded) is J-invariant by construction and needs no masking.

These are the generic tools (``grid_mask`` also serves the Noise2Self masker).
The app's median method, which also weighs the filter against no filtering,
is :mod:`bids_denoise.methods.median`.

References
----------
Batson J., Royer L. Noise2Self: Blind Denoising by Self-Supervision. ICML 2019,
PMLR 97:524-533.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def _ndimage():
    from scipy import ndimage  # imported late: methods/ imports with numpy and torch alone

    return ndimage


@dataclass
class Calibration:
    """The loss of each candidate parameter and the chosen one."""

    parameter: str
    thetas: list
    losses: list
    best: object

    def as_dict(self):
        return {"parameter": self.parameter, "thetas": [float(t) for t in self.thetas],
                "losses": [float(v) for v in self.losses], "best": float(self.best)}


def grid_mask(shape, width, phase):
    """Voxels whose coordinates modulo ``width`` equal the ``phase``-th combination."""
    offsets = np.unravel_index(phase, (width,) * len(shape))
    hidden = np.ones(shape, dtype=bool)
    for axis, offset in enumerate(offsets):
        index = (np.arange(shape[axis]) % width == offset).reshape([-1 if a == axis else 1 for a in range(len(shape))])
        hidden &= index
    return hidden


def neighbour_mean(image):
    """Mean of the 3^d - 1 neighbours of every voxel (centre excluded), edges replicated."""
    footprint = np.ones((3,) * image.ndim)
    footprint[(1,) * image.ndim] = 0
    return _ndimage().convolve(image, footprint / footprint.sum(), mode="nearest")


def j_invariant(denoiser, image, width=3):
    """The J-invariant version of ``denoiser``: each voxel from the pass that hid it."""
    image = np.asarray(image, dtype=np.float64)
    filled = neighbour_mean(image)
    result = np.empty_like(image)
    for phase in range(width**image.ndim):
        hidden = grid_mask(image.shape, width, phase)
        result[hidden] = denoiser(np.where(hidden, filled, image))[hidden]
    return result


def self_supervised_loss(denoiser, image, width=3):
    """||J-invariant f(x) - x||^2 / n: the true error plus the noise variance."""
    return float(np.mean((j_invariant(denoiser, image, width) - np.asarray(image, float)) ** 2))


def donut_median(image, radius):
    """Median over a cube of the given radius with the centre voxel excluded (J-invariant).

    The image is extended periodically (``mode="wrap"``): replicating the edge
    (``"nearest"``) or mirroring it would put copies of a face voxel into its
    own window, and the filter would no longer be J-invariant there. With
    ``wrap`` no voxel sees itself as long as every axis is longer than
    ``radius``.
    """
    size = 2 * int(radius) + 1
    footprint = np.ones((size,) * image.ndim, dtype=bool)
    footprint[(int(radius),) * image.ndim] = False
    return _ndimage().median_filter(np.asarray(image, float), footprint=footprint, mode="wrap")


def calibrate(denoiser_of, image, thetas, *, parameter="theta", width=3, already_j_invariant=False):
    """Pick the parameter of a classical denoiser with the least self-supervised loss.

    Parameters
    ----------
    denoiser_of : callable(theta) -> callable(image) -> image
    image : ndarray, or a list of ndarrays (losses are averaged: e.g. volumes of a run)
    thetas : sequence of candidate values
    already_j_invariant : bool
        The denoiser never looks at the centre voxel (e.g. the donut median).

    Returns
    -------
    Calibration
    """
    images = image if isinstance(image, (list, tuple)) else [image]
    losses = []
    for theta in thetas:
        denoiser = denoiser_of(theta)
        if already_j_invariant:
            loss = np.mean([np.mean((denoiser(x) - x) ** 2) for x in images])
        else:
            loss = np.mean([self_supervised_loss(denoiser, x, width) for x in images])
        losses.append(float(loss))
    best = thetas[int(np.argmin(losses))]
    return Calibration(parameter, list(thetas), losses, best)
