"""A brain mask from the b0 volumes, for methods that fit inside the brain.

Otsu's threshold on the mean b0 (of the mean of all volumes when there is no
b0), closed, hole-filled and reduced to its largest connected component: the
usual quick DWI mask (cf. DIPY's ``median_otsu``), good enough to choose the
voxels a fit uses; it is not a segmentation.
"""

from __future__ import annotations

import numpy as np


def otsu_threshold(values, bins=256) -> float:
    """Otsu's threshold of a set of values."""
    values = np.asarray(values, dtype=float).ravel()
    counts, edges = np.histogram(values, bins=bins)
    centres = 0.5 * (edges[:-1] + edges[1:])
    weight_low = np.cumsum(counts)
    weight_high = weight_low[-1] - weight_low
    mean_low = np.cumsum(counts * centres) / np.maximum(weight_low, 1)
    total = (counts * centres).sum()
    mean_high = (total - np.cumsum(counts * centres)) / np.maximum(weight_high, 1)
    between = weight_low * weight_high * (mean_low - mean_high) ** 2
    return float(centres[int(np.argmax(between))])


def b0_brain_mask(data, bvals, *, b0_threshold=50.0) -> np.ndarray:
    """Boolean brain mask (X, Y, Z) from a DWI series.

    Empty where there is nothing to threshold (a flat image, or one of a few voxels): the methods
    that take a mask refuse an empty one (UnsuitableDataError); a caller may fit without a mask.
    Scale-invariant (a threshold on a histogram of the data's own range).
    """
    from scipy import ndimage

    bvals = np.asarray(bvals, dtype=float).ravel()
    b0 = bvals <= b0_threshold
    reference = data[..., b0].mean(axis=3) if b0.any() else data.mean(axis=3)
    reference = ndimage.median_filter(reference, size=3)
    mask = reference > otsu_threshold(reference)
    mask = ndimage.binary_closing(mask, iterations=2)
    mask = ndimage.binary_fill_holes(mask)
    labels, count = ndimage.label(mask)
    if count > 1:
        sizes = ndimage.sum(mask, labels, index=np.arange(1, count + 1))
        mask = labels == (1 + int(np.argmax(sizes)))
    return mask


def tissue_mask(data, bvals, *, b0_threshold=50.0) -> np.ndarray:
    """:func:`b0_brain_mask`, or every voxel with signal where the field of view has no background.

    On a crop inside the head (no air in the field), Otsu's threshold splits tissue from CSF instead of the
    head from the air and the b0 mask keeps only the CSF. That is seen from the two classes: with air in the
    field the lower class sits near zero (well under a quarter of the upper class's mean); without, it is
    tissue, and the whole field is kept but for voxels under half that class's mean (dropouts, padding).
    """
    bvals = np.asarray(bvals, dtype=float).ravel()
    b0 = bvals <= b0_threshold
    reference = data[..., b0].mean(axis=3) if b0.any() else data.mean(axis=3)
    values = reference[np.isfinite(reference)]
    if values.size:
        threshold = otsu_threshold(values)
        low, high = values[values <= threshold], values[values > threshold]
        if low.size and high.size and low.mean() > 0.25 * high.mean():
            return np.isfinite(reference) & (reference > 0.5 * low.mean())
    return b0_brain_mask(data, bvals, b0_threshold=b0_threshold)
