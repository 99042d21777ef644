"""3D anatomical phantoms (T1w- and FLAIR-like) from two generators, with a low-contrast lesion to keep.

``mni``: the tissue of nilearn's MNI152 2009 template (shipped with nilearn, 1 mm): the T1w contrast is the
template itself, the FLAIR contrast a mixture of its grey- and white-matter probability maps (CSF suppressed,
grey above white). ``synthetic``: a head built here from nothing but geometry (a folded cortical ribbon over
white matter, ventricles, a textured white matter), independent of any real brain. Both are cut to a
central block (a slab of axial slices), get a spherical lesion in white matter (hypointense in T1w,
hyperintense in FLAIR, a fraction of the white matter's signal) and Rician noise at ``snr`` = the mean
brain signal over sigma.

:func:`anatomical_scores` scores a denoised image: PSNR and SSIM in the brain, the lesion's contrast
against a shell of white matter around it, and the grey/white edge contrast (white and grey matter within
2 voxels of each other), each kept as a fraction of the noise-free image's (1 = kept; blurring lowers
both; noise does not bias either).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

GENERATORS = ("mni", "synthetic")
CONTRASTS = ("T1w", "FLAIR")

# tissue intensities (relative): white, grey, CSF; the lesion's change as a fraction of white matter
_FLAIR = (0.62, 0.85, 0.08)
_T1W = (0.85, 0.55, 0.20)
_LESION = {"T1w": -0.15, "FLAIR": +0.20}


@dataclass
class AnatomicalPhantom:
    signal: np.ndarray  # noise-free, float32
    noisy: np.ndarray  # Rician, float32
    brain: np.ndarray  # bool
    lesion: np.ndarray  # bool
    lesion_shell: np.ndarray  # bool: white matter around the lesion
    white_edge: np.ndarray  # bool: white matter within 2 voxels of grey matter
    grey_edge: np.ndarray  # bool: grey matter within 2 voxels of white matter
    sigma: float
    generator: str
    contrast: str


def _block(shape, full_shape):
    starts = [(f - s) // 2 for s, f in zip(shape, full_shape)]
    return tuple(slice(a, a + s) for a, s in zip(starts, shape))


@functools.lru_cache(maxsize=1)
def _mni_templates():
    """nilearn's MNI152 2009 T1, grey- and white-matter maps at 1 mm, read once (read-only arrays)."""
    from nilearn import datasets

    images = (datasets.load_mni152_template(resolution=1), datasets.load_mni152_gm_template(resolution=1),
              datasets.load_mni152_wm_template(resolution=1))
    arrays = tuple(image.get_fdata() for image in images)
    for array in arrays:
        array.setflags(write=False)
    return arrays


def _mni_tissue(shape):
    t1, grey, white = _mni_templates()
    block = _block(shape, t1.shape)
    t1, grey, white = t1[block], grey[block], white[block]
    brain = t1 > 0.05
    csf = np.clip(brain - grey - white, 0, 1) * brain
    return t1, grey, white, csf, brain


def _synthetic_tissue(shape, seed):
    rng = np.random.default_rng([seed, 7])
    axes = [np.linspace(-1, 1, n) * (n / max(shape)) for n in shape]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    radius = np.sqrt((x / 0.92) ** 2 + (y / 1.0) ** 2 + (z / 0.85) ** 2)
    theta, phi = np.arctan2(y, x), np.arctan2(z, np.hypot(x, y))
    pattern = np.sin(14 * theta + 2 * np.sin(3 * phi)) * np.cos(9 * phi)
    folds = 0.07 * pattern  # gyri
    outer = 0.86 + 0.5 * folds
    white_edge = 0.72 + folds
    smooth = ndimage.gaussian_filter
    white = smooth((radius < white_edge).astype(float), 0.7)
    inside = smooth((radius < outer).astype(float), 0.7)
    ventricles = smooth(((((x - 0.12) / 0.07) ** 2 + (y / 0.25) ** 2 + (z / 0.12) ** 2 < 1)
                         | (((x + 0.12) / 0.07) ** 2 + (y / 0.25) ** 2 + (z / 0.12) ** 2 < 1)).astype(float), 0.7)
    sulci = np.clip(-pattern - 0.6, 0, None) * 4  # CSF in sulci
    white = np.clip(white - ventricles, 0, 1)
    grey = np.clip(inside - white - ventricles, 0, 1) * (1 - np.clip(sulci * (radius > white_edge), 0, 1))
    csf = np.clip(inside - white - grey, 0, 1)
    brain = inside > 0.5
    texture = 1.0 + 0.04 * smooth(rng.normal(size=shape), 1.5) / 0.1  # about 4% smooth texture
    t1 = (_T1W[0] * white + _T1W[1] * grey + _T1W[2] * csf) * texture
    return t1, grey, white, csf, brain


def make_anatomical_phantom(generator="mni", contrast="T1w", *, shape=(96, 112, 40), snr=10.0, seed=0,
                            lesion_radius=3.0) -> AnatomicalPhantom:
    """One phantom: ``generator`` in :data:`GENERATORS`, ``contrast`` in :data:`CONTRASTS`."""
    if generator not in GENERATORS or contrast not in CONTRASTS:
        raise ValueError(f"generator must be one of {GENERATORS}, contrast one of {CONTRASTS}")
    t1, grey, white, csf, brain = _mni_tissue(shape) if generator == "mni" else _synthetic_tissue(shape, seed)
    if contrast == "T1w":
        signal = t1.astype(float)
    else:
        signal = _FLAIR[0] * white + _FLAIR[1] * grey + _FLAIR[2] * csf
    signal = signal * brain
    # the lesion: centred in the deepest white matter of the central slab
    core = ndimage.distance_transform_edt(white > 0.9)
    centre = np.unravel_index(int(np.argmax(core)), core.shape)
    grid = np.indices(shape)
    distance = np.sqrt(sum((g - c) ** 2 for g, c in zip(grid, centre)))
    lesion = distance <= lesion_radius
    profile = np.clip(lesion_radius + 0.5 - distance, 0, 1)  # a partial-volume rim
    white_level = float(np.median(signal[white > 0.9]))
    signal = signal + _LESION[contrast] * white_level * profile
    shell = (distance > lesion_radius + 1) & (distance <= lesion_radius + 3) & (white > 0.9)
    white_core, grey_core = (white > 0.7) & brain, (grey > 0.7) & brain
    white_edge = white_core & ndimage.binary_dilation(grey_core, iterations=2)
    grey_edge = grey_core & ndimage.binary_dilation(white_core, iterations=2)
    signal = (signal * 1000.0).astype(np.float32)
    sigma = float(signal[brain].mean() / snr)
    rng = np.random.default_rng(seed)
    noisy = np.sqrt((signal + rng.normal(0, sigma, shape)) ** 2 + rng.normal(0, sigma, shape) ** 2)
    return AnatomicalPhantom(signal, noisy.astype(np.float32), brain, lesion, shell, white_edge, grey_edge, sigma,
                             generator, contrast)


def _contrast(image, a, b):
    return float(image[a].mean() - image[b].mean())


def ssim_map(truth, out, peak, size=7) -> np.ndarray:
    """Structural similarity per voxel (Wang et al. 2004) over ``size``-voxel cubes, as scikit-image's
    ``structural_similarity`` with its defaults (uniform window, K1 = 0.01, K2 = 0.03, sample covariances)."""
    mean = functools.partial(ndimage.uniform_filter, size=size, mode="reflect")
    correction = size**3 / (size**3 - 1)
    mu_x, mu_y = mean(truth), mean(out)
    var_x = (mean(truth * truth) - mu_x**2) * correction
    var_y = (mean(out * out) - mu_y**2) * correction
    cov = (mean(truth * out) - mu_x * mu_y) * correction
    c1, c2 = (0.01 * peak) ** 2, (0.03 * peak) ** 2
    return ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))


def anatomical_scores(out, phantom: AnatomicalPhantom) -> dict[str, float]:
    """PSNR (dB) and SSIM in the brain; lesion and grey/white edge contrast kept (fraction of the truth's)."""
    truth, brain = phantom.signal.astype(np.float64), phantom.brain
    out = np.asarray(out, dtype=np.float64)
    peak = float(truth[brain].max())
    mse = float(np.mean((out[brain] - truth[brain]) ** 2))
    similarity = ssim_map(truth, out, peak)
    return {
        "psnr": 10 * np.log10(peak**2 / mse),
        "ssim": float(similarity[brain].mean()),
        "lesion": _contrast(out, phantom.lesion, phantom.lesion_shell)
        / _contrast(truth, phantom.lesion, phantom.lesion_shell),
        "edge": _contrast(out, phantom.white_edge, phantom.grey_edge)
        / _contrast(truth, phantom.white_edge, phantom.grey_edge),
    }
