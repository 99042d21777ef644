"""Patch PCA: Marchenko-Pastur PCA of a single 3D image's patches (T1w, T2w, FLAIR).

A 3D image has no volume axis for MP-PCA to decompose. Its small patches give it one: each voxel's
``(2 r + 1)^3`` neighbourhood is read as a vector (27 values for ``r = 1``), so the image becomes a
series of 27 shifted copies of itself. In a window of voxels around each position, the
voxels-by-patch-values matrix is decomposed by the local-PCA engine of
:mod:`bids_denoise.methods.core.localpca`, exactly as MP-PCA decomposes a DWI window: the eigenvalues
that fit the Marchenko-Pastur law are noise, their mean the noise variance, and the window is rebuilt
from the remaining components (a brain's patches lie near a few-dimensional subspace: edges, flat
tissue). Every window's rebuilt patches are averaged with Gaussian weights, and each voxel is the mean of
the 27 patch values that cover it (Manjon et al. 2013 [1]_).

That first pass rounds a small lesion and an edge off: it rebuilds each voxel from few components. A
second pass, as Manjon et al. 2015 [2]_ (their prefiltered rotationally invariant non-local means), goes
back to the noisy image: each voxel becomes a weighted mean of the noisy voxels within ``guide_radius``
whose first-pass values are close to its own, ``w = exp(-(g_i - g_j)^2 / (k sigma_i)^2)`` with ``k`` the
``guide_strength`` and ``sigma`` the first pass's noise map; the mean is taken of the squared magnitudes
less ``2 sigma^2``, which removes the Rician noise floor of a magnitude image. The first pass decides
what is alike, the noisy image gives the values, so a lesion's voxels average among themselves.

Nothing is learned and nothing is tuned per image: the threshold comes from random-matrix theory and
the noise level the window estimates itself (the noise map is returned). Neighbouring patches share
voxels, so a window's samples are not independent as the law assumes; at SNR 10 the noise map was
within 4 % of the true sigma on both generators of ``benchmarks/anatomical.py`` (MNI152-template T1w:
75.3 against 75.0; synthetic-head FLAIR: 62.7 against 65.3).

References
----------
.. [1] Manjon J.V., Coupe P., Concha L., Buades A., Collins D.L., Robles M. Diffusion weighted image
       denoising using overcomplete local PCA. PLoS One 8 (2013) e73021.
.. [2] Manjon J.V., Coupe P., Buades A. MRI noise estimation and denoising using non-local PCA. Medical
       Image Analysis 22 (2015) 35-47.
.. [3] Veraart J., Novikov D.S., Christiaens D., Ades-aron B., Sijbers J., Fieremans E. Denoising of
       diffusion MRI using random matrix theory. NeuroImage 142 (2016) 394-406.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from bids_denoise.methods.core.errors import UnsuitableDataError
from bids_denoise.methods.core.localpca import local_pca
from bids_denoise.methods.core.options import Options, option, positive, resolve_options


def _odd_extent(text):
    value = int(text)
    if value < 3 or value % 2 == 0:
        raise ValueError(f"the window must be an odd number of voxels, at least 3, not {text!r}")
    return value


def _guide_radius(text):
    value = int(text)
    if not 0 <= value <= 5:
        raise ValueError(f"the search radius must be 0 (no second pass) to 5 voxels, not {text!r}")
    return value


def _radius(text):
    value = int(text)
    if value not in (1, 2):
        raise ValueError(f"the patch radius must be 1 (3x3x3 patches) or 2 (5x5x5), not {text!r}")
    return value


@dataclass(frozen=True)
class PatchPCAOptions(Options):
    """The options of :func:`patch_pca`.

    The figures below are first measurements on ``benchmarks/anatomical.py``'s phantoms (96x112x40),
    MNI152-template T1w and synthetic-head FLAIR at SNR 10 (and MNI T1w at SNR 5 where said).

    Attributes
    ----------
    patch_radius : {1, 2}
        Patches of ``2 r + 1`` voxels a side: 27 values (default) or 125 (first pass only: 13-40x the time
        with windows of 7 or 5, and +0.1 / -0.3 dB on MNI T1w / synthetic FLAIR).
    extent : int
        The window's side in voxels (odd; default 5: 125 patches for 27 values). Larger windows average
        more and keep less: 7 lost 0.65 dB (MNI T1w) and 1.16 dB (synthetic FLAIR) in the first pass.
    guide_radius : int
        The second pass's search radius (default 3: 7x7x7 neighbours; 0 skips the pass). The pass raised
        the lesion contrast kept from 0.87 to 0.92 (MNI T1w) and from 0.90 to 0.95 (synthetic FLAIR), and
        PSNR by 0.27 and 0.61 dB (MNI T1w at SNR 5: 1.36 dB); radius 2 gave about 0.5 dB less on both.
    guide_strength : float
        ``k`` of the weights (default 0.5). At radius 2 on MNI T1w (SNR 5, 10) and synthetic FLAIR: 0.3
        kept the lesion whole (0.90-1.09 of its contrast) and lost 1.1-1.3 dB against 0.5; 0.8 gained
        0.3-1.0 dB and gave back most of the lesion contrast the pass wins (0.60-0.91 kept against
        0.72-1.03).
    """

    patch_radius: int = option(1, "patch radius in voxels: 1 (3x3x3 patches) or 2 (5x5x5)", parse=_radius)
    extent: int = option(5, "the side of the window of patches decomposed together (odd, voxels)",
                         parse=_odd_extent)
    guide_radius: int = option(3, "the second pass's search radius in voxels (0: no second pass)",
                               parse=_guide_radius)
    guide_strength: float = option(0.5, "the second pass's weight width as a multiple of the noise level: larger "
                                        "averages more and keeps less contrast", parse=positive(float))


@dataclass
class PatchPCAResult:
    denoised: np.ndarray  # float32, the image's shape
    noise_sigma: np.ndarray  # float32 map (X, Y, Z)
    rank: np.ndarray  # float32 map: signal components kept per voxel (window-averaged)
    options: PatchPCAOptions


def _shifts(radius, shape):
    """For each offset of a ``(2 r + 1)^3`` neighbourhood (x slowest), the slices of an array padded by
    ``radius`` on every side that hold an image of ``shape`` moved by that offset."""
    span = range(2 * radius + 1)
    return [(slice(a, a + shape[0]), slice(b, b + shape[1]), slice(c, c + shape[2]))
            for a in span for b in span for c in span]


def patch_stack(image, radius) -> np.ndarray:
    """``(X, Y, Z, (2 r + 1)^3)`` float32: channel ``k`` at voxel ``v`` is the image at ``v + offset_k``
    (reflected at the border)."""
    padded = np.pad(image.astype(np.float32, copy=False), radius, mode="reflect")
    shifts = _shifts(radius, image.shape)
    stack = np.empty(image.shape + (len(shifts),), dtype=np.float32)
    for k, where in enumerate(shifts):
        stack[..., k] = padded[where]
    return stack


def fold_patches(stack, radius) -> np.ndarray:
    """The inverse of :func:`patch_stack` for a rebuilt stack: each voxel the mean of the patch values that
    cover it (float32)."""
    shape = stack.shape[:3]
    padded_shape = tuple(n + 2 * radius for n in shape)
    total = np.zeros(padded_shape, dtype=np.float64)
    count = np.zeros(padded_shape, dtype=np.float64)
    for k, where in enumerate(_shifts(radius, shape)):
        total[where] += stack[..., k]
        count[where] += 1
    inner = tuple(slice(radius, radius + n) for n in shape)
    return (total[inner] / count[inner]).astype(np.float32)


def guided_mean(noisy, guide, sigma, radius, strength) -> np.ndarray:
    """Each voxel the mean of the noisy voxels within ``radius`` weighted by ``exp(-(g_i - g_j)^2 / (k
    sigma_i)^2)``, of the squared magnitudes less ``2 sigma_i^2`` (the Rician floor), square-rooted (float32)."""
    x = torch.from_numpy(np.asarray(noisy, dtype=np.float64))
    g = torch.from_numpy(np.asarray(guide, dtype=np.float64))
    variance = torch.from_numpy(np.asarray(sigma, dtype=np.float64)) ** 2
    width = (strength**2 * variance).clamp_min(torch.finfo(torch.float64).tiny)
    pad = (radius,) * 6
    x_pad = torch.nn.functional.pad((x * x)[None, None], pad, mode="replicate")[0, 0]
    g_pad = torch.nn.functional.pad(g[None, None], pad, mode="replicate")[0, 0]
    total, weights = torch.zeros_like(x), torch.zeros_like(x)
    for where in _shifts(radius, x.shape):
        weight = torch.exp(-((g - g_pad[where]) ** 2) / width)
        total += weight * x_pad[where]
        weights += weight
    return torch.sqrt((total / weights - 2 * variance).clamp_min(0)).to(torch.float32).numpy()


def patch_pca(image, options: PatchPCAOptions | None = None, *, mask=None, device="cpu", **changes) -> PatchPCAResult:
    """Denoise a 3D image by Marchenko-Pastur PCA of its patches.

    Parameters
    ----------
    image : ndarray (X, Y, Z), or (X, Y, Z, 1)
        A magnitude or real image.
    options : PatchPCAOptions, optional
        ``patch_radius``, ``extent``, ``guide_radius`` and ``guide_strength`` (keywords override).
    mask : ndarray of bool, optional
        Voxels to denoise (default all); the others are zero in the output.

    Returns
    -------
    PatchPCAResult
        The denoised image (float32), the noise map and the rank map.
    """
    options = resolve_options(PatchPCAOptions, options, changes)
    image = np.asarray(image)
    if image.ndim == 4 and image.shape[3] == 1:
        image = image[..., 0]
    if image.ndim != 3:
        raise UnsuitableDataError(f"patch PCA denoises a 3D image, not an array of shape {image.shape}")
    if not np.all(np.isfinite(image)):
        raise UnsuitableDataError("patch PCA: the image holds NaN or infinite values")
    small = [n for n in image.shape if n < options.extent]
    if small:
        raise UnsuitableDataError(f"patch PCA: an image of shape {image.shape} is smaller than its "
                                  f"{options.extent}-voxel window")
    stack = patch_stack(image, options.patch_radius)
    extent = (options.extent,) * 3
    result = local_pca(stack, extent=extent, aggregate="gaussian", demean=True, mask=None, device=device)
    del stack
    denoised = fold_patches(result.denoised, options.patch_radius)
    sigma, rank = result.noise_sigma.astype(np.float32), result.rank.astype(np.float32)
    if options.guide_radius:
        denoised = guided_mean(image, denoised, sigma, options.guide_radius, options.guide_strength)
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != image.shape:
            raise ValueError(f"mask shape {mask.shape} does not match image shape {image.shape}")
        denoised[~mask], sigma[~mask], rank[~mask] = 0, 0, 0
    return PatchPCAResult(denoised, sigma, rank, options)
