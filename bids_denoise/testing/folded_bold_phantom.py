"""A second BOLD phantom generator: a folded cortical ribbon, jittered blocks and a receive bias.

Built to judge BOLD denoising on data it was not tuned to (``bids_denoise.testing.bold_phantom`` is the
other generator): two hemispheres with a folded surface and a midline gap, a cortical ribbon about 2.5
voxels thick, ventricles, white matter, a surface-coil-like receive bias (0.75-1.25); four activation
patches of different radii (1.5-4 voxels) and amplitudes lying in the ribbon and a one-voxel-thick strip
on its outer layer (laminar-like); jittered blocks (12-16 s on, 12-24 s off) at TR 1.5 s; physiology
(four smooth maps times three slow courses, 0.01-0.08 Hz, and a respiratory one at 0.28 Hz, 1 % SD)
orthogonal to the task regressor (a chance correlation of physiology with the task is a confound of the
analysis model, not of the denoiser); a quadratic scanner drift of up to 1 %; a smooth background phase
that drifts slowly; complex Gaussian thermal noise, the same sigma at every echo (magnitude Rician at
low signal). The geometry is the same for every seed; the seed draws the physiology and the noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from bids_denoise.testing.bold_phantom import double_gamma_hrf


@dataclass
class FoldedPhantom:
    """Per-echo lists as :class:`bids_denoise.testing.bold_phantom.BoldPhantom`; ``grey`` the ribbon (no
    ventricles), ``events`` the blocks as (onset, duration) seconds, ``activation`` the response map."""

    clean: list
    magnitude: list
    phase: list
    mask: np.ndarray
    grey: np.ndarray
    active: np.ndarray
    activation: np.ndarray
    regressor: np.ndarray
    events: list
    echo_times: np.ndarray
    noise_sigma: float
    tr: float
    affine: np.ndarray


def _smooth(rng, shape, width):
    field = ndimage.gaussian_filter(rng.standard_normal(shape), width, mode="wrap")
    field -= field.mean()
    return field / max(field.std(), 1e-12)


def events_regressor(events, n_volumes, tr) -> np.ndarray:
    """Blocks ``[(onset, duration), ...]`` convolved with SPM's canonical response on a 0.05 s grid, sampled
    at each volume, peak 1."""
    dt = 0.05
    fine_t = np.arange(0.0, n_volumes * tr, dt)
    box = np.zeros_like(fine_t)
    for onset, duration in events:
        box[(fine_t >= onset) & (fine_t < onset + duration)] = 1.0
    fine = np.convolve(box, double_gamma_hrf(dt))[: fine_t.size] * dt
    sampled = np.interp(np.arange(n_volumes) * tr, fine_t, fine)
    return sampled / sampled.max()


def make_folded_phantom(shape=(36, 42, 26), n_volumes=160, tr=1.5, *, snr=15.0, n_echoes=1, seed=0,
                        bold_change=0.04, physiology_change=0.01, voxel_size=2.0) -> FoldedPhantom:
    """The folded phantom; ``bold_change`` 0 gives a null run (same geometry, physiology and noise).

    ``snr``: the mean clean brain signal of the first echo over the noise sigma (the noisy input's tSNR is
    close to it).
    """
    rng = np.random.default_rng(seed + 1000)
    geometry = np.random.default_rng(7)  # the same geometry for every seed
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"), axis=-1)
    x, y, z = grid[..., 0], grid[..., 1], grid[..., 2]
    theta = np.arctan2(y, z)
    phi = np.arctan2(x, np.sqrt(y**2 + z**2))
    fold = 0.07 * np.sin(7 * theta + 1.3) * np.cos(5 * phi) + 0.04 * np.sin(11 * theta) * np.sin(3 * phi + 0.5)
    brain = np.zeros(shape, bool)
    for centre in (-0.42, 0.42):  # two hemispheres
        radius = np.sqrt(((x - centre) / 0.44) ** 2 + (y / 0.85) ** 2 + (z / 0.8) ** 2)
        brain |= radius < 1.0 + fold
    brain &= np.abs(x) > 0.03  # the midline gap
    depth = ndimage.distance_transform_edt(brain)
    ribbon = brain & (depth <= 2.5)
    ventricles = brain & (np.sqrt(((np.abs(x) - 0.15) / 0.1) ** 2 + ((y - 0.05) / 0.35) ** 2
                                  + ((z + 0.05) / 0.12) ** 2) < 1)
    white = brain & ~ribbon & ~ventricles
    bias = 0.75 + 0.5 * np.exp(-((y + 1.1) ** 2 + (z - 0.8) ** 2) / 1.2)
    s0 = np.where(ventricles, 1.4, np.where(white, 0.9, 1.0)) * bias * brain
    t2star = np.where(ventricles, 0.2, np.where(white, 0.040, 0.046))

    # activation: four patches centred on ribbon voxels at least 14 voxels apart, and a thin strip
    coords = np.argwhere(ribbon)
    index = np.indices(shape).transpose(1, 2, 3, 0)
    patches = ((0.55, 3.0), (1.0, 2.0), (0.7, 4.0), (0.8, 1.5))  # (amplitude, radius in voxels)
    centres = []
    while len(centres) < len(patches):
        candidate = coords[geometry.integers(len(coords))]
        if all(np.linalg.norm(candidate - other) > 14 for other in centres):
            centres.append(candidate)
    activation = np.zeros(shape)
    for (amplitude, radius), centre in zip(patches, centres):
        distance = np.linalg.norm(index - centre, axis=-1)
        activation = np.maximum(activation, amplitude * np.clip(1.0 - (distance / (radius + 1.0)) ** 2, 0, 1)
                                * (distance <= radius))
    strip_centre = coords[geometry.integers(len(coords))]
    while any(np.linalg.norm(strip_centre - other) < 12 for other in centres):
        strip_centre = coords[geometry.integers(len(coords))]
    strip = ribbon & (depth <= 1.0) & (np.linalg.norm(index - strip_centre, axis=-1) <= 5)
    activation = np.maximum(activation, 0.9 * strip) * ribbon
    active = activation > 0.05
    activation = activation * active

    events, onset = [], 14.0
    while True:
        duration = float(geometry.choice([12.0, 14.0, 16.0]))
        if onset + duration > n_volumes * tr - 6:
            break
        events.append((onset, duration))
        onset += duration + float(geometry.uniform(12.0, 24.0))
    regressor = events_regressor(events, n_volumes, tr)
    delta_r2 = -(bold_change / 0.030) * activation[..., None] * regressor  # the change at TE 30 ms

    times = np.arange(n_volumes) * tr
    maps = [_smooth(rng, shape, 4.0) for _ in range(4)]
    courses = []
    for _ in range(3):
        course = sum(np.sin(2 * np.pi * rng.uniform(0.01, 0.08) * times + rng.uniform(0, 2 * np.pi))
                     for _ in range(4))
        courses.append(course)
    courses.append(np.sin(2 * np.pi * 0.28 * times + rng.uniform(0, 2 * np.pi)))  # respiration
    task = regressor - regressor.mean()
    courses = [course - task * (task @ course) / (task @ task) for course in courses]
    courses = [course / course.std() for course in courses]
    physiology = sum(m[..., None] * c for m, c in zip(maps, courses))
    physiology *= physiology_change / max(physiology[brain].std(), 1e-12)
    drift = 0.01 * (0.5 + 0.5 * _smooth(rng, shape, 6.0))[..., None] * (times / times[-1] - 0.5) ** 2 * 4

    background = 2.2 * x - 1.0 * y + 0.6 * z - 1.2 * x * z + 0.8 * y**2
    true_phase = background[..., None] + 0.3 * np.sin(2 * np.pi * times / (n_volumes * tr)) * (1 + y[..., None])
    rotation = np.exp(1j * true_phase)
    echo_times = np.array([0.030]) if n_echoes == 1 else np.linspace(0.014, 0.056, n_echoes)
    base_r2 = np.where(brain, 1.0 / t2star, 0.0)[..., None]
    clean = [s0[..., None] * np.exp(-te * (base_r2 + delta_r2)) * (1 + physiology + drift) * 1000.0
             for te in echo_times]
    sigma = float(clean[0][brain].mean() / snr)
    magnitude, phase = [], []
    for series in clean:
        noisy = series * rotation + sigma * (rng.standard_normal(series.shape) + 1j * rng.standard_normal(series.shape))
        magnitude.append(np.abs(noisy).astype(np.float32))
        phase.append(np.angle(noisy).astype(np.float32))
    return FoldedPhantom(clean=[c.astype(np.float32) for c in clean], magnitude=magnitude, phase=phase, mask=brain,
                         grey=ribbon & ~ventricles, active=active, activation=activation, regressor=regressor,
                         events=events, echo_times=echo_times, noise_sigma=sigma, tr=tr,
                         affine=np.diag([voxel_size] * 3 + [1.0]))
