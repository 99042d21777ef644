"""A second diffusion phantom, from another generator: DIPY's multi-tensor simulation with crossing fibres.

:mod:`bids_denoise.testing.phantom` paints one tensor per voxel whose direction bends smoothly across an
ellipsoidal head. Defaults tuned on one phantom can fit its quirks; this one differs on purpose, so a default
is checked on both:

* geometry: a flattened superellipsoid brain with ventricles, a cortex ribbon folded by a sinusoid, and two
  white-matter bundles (along x and along y) that cross at 90 degrees in the centre and at 60 degrees where a
  third, oblique bundle meets the first;
* signal: DIPY's ``dipy.sims.voxel.multi_tensor`` (the standard multi-compartment model: each fibre an
  axially symmetric tensor, its fraction of the voxel), one call per distinct tissue mixture, with an
  isotropic free-water fraction that grows towards the ventricles and grey matter;
* acquisition: b=1000 and b=2500 shells with their own direction sets, b0s interleaved, a smooth receive
  bias, Rician noise.

DIPY is imported when a phantom is made (a test and benchmark dependency, not the app's).
"""

from __future__ import annotations

import numpy as np

from bids_denoise.testing.phantom import Phantom, gradient_directions

#: axial and radial diffusivities (mm^2/s) of a fibre, and the isotropic ones of grey matter and free water
FIBRE = (1.7e-3, 0.3e-3, 0.3e-3)
GREY = (0.8e-3, 0.8e-3, 0.8e-3)
WATER = (3.0e-3, 3.0e-3, 3.0e-3)


def make_multitensor_phantom(shape=(28, 32, 20), *, n_b0=5, shells=((1000.0, 30), (2500.0, 40)), snr=15.0,
                             seed=0) -> Phantom:
    """Simulate a DWI series of crossing fibres with DIPY's multi-tensor model.

    Parameters
    ----------
    shape : tuple of 3 int
    n_b0 : int
        b0 volumes, spread through the series.
    shells : sequence of (b-value, number of directions)
    snr : float
        S0 over the Gaussian noise sigma in white matter (S0 = 1000 there).
    seed : int
        Seed of the noise and the gradient table.

    Returns
    -------
    Phantom
        ``signal``, ``noisy`` (Rician), ``bvals``, ``bvecs`` (3, V), ``mask`` (the brain), 2 mm voxels.
    """
    from dipy.core.gradients import gradient_table
    from dipy.sims.voxel import multi_tensor

    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"), axis=-1)
    x, y, z = grid[..., 0], grid[..., 1], grid[..., 2]
    brain = (np.abs(x / 0.9) ** 3 + np.abs(y / 0.95) ** 3 + np.abs(z / 0.75) ** 3) < 1.0
    ventricles = brain & ((x / 0.18) ** 2 + (y / 0.35) ** 2 + (z / 0.3) ** 2 < 1.0) & (np.abs(x) > 0.05)
    depth = np.abs(x / 0.9) ** 3 + np.abs(y / 0.95) ** 3 + np.abs(z / 0.75) ** 3
    cortex = brain & ~ventricles & (depth > 0.55 + 0.12 * np.sin(9 * np.arctan2(y, x)))
    bundle_x = brain & ~ventricles & ~cortex & (np.abs(y) < 0.22) & (np.abs(z) < 0.45)
    bundle_y = brain & ~ventricles & ~cortex & (np.abs(x - 0.25) < 0.2) & (np.abs(z) < 0.45)
    oblique = brain & ~ventricles & ~cortex & (np.abs((x + y) / np.sqrt(2) + 0.35) < 0.15) & (np.abs(z) < 0.3)

    bvals, bvecs = [0.0] * n_b0, [np.zeros(3)] * n_b0
    for bvalue, count in shells:
        directions = gradient_directions(count, rng)
        bvals += list(bvalue + rng.uniform(-5, 5, count))
        bvecs += list(directions.T)
    order = np.argsort(np.r_[np.linspace(0, len(bvals), n_b0, endpoint=False), np.arange(n_b0, len(bvals))],
                      kind="stable")
    bvals, bvecs = np.asarray(bvals)[order], np.asarray(bvecs)[order]
    table = gradient_table(bvals, bvecs=bvecs, b0_threshold=50)

    # each voxel: its fibres (angles in degrees: polar, azimuth) with their fractions, and its free water
    signal = np.zeros(shape + (bvals.size,))
    mixtures = {}
    free_water = np.clip(0.35 - 0.5 * np.sqrt(x**2 + (y / 2) ** 2 + z**2), 0.0, 0.3)
    for index in zip(*np.nonzero(brain)):
        fibres = []
        if bundle_x[index]:
            fibres.append((90.0, 0.0))
        if bundle_y[index]:
            fibres.append((90.0, 90.0))
        if oblique[index]:
            fibres.append((90.0, 60.0 if bundle_x[index] else 135.0))
        water = round(float(free_water[index]), 2)
        if ventricles[index]:
            key = ("water",)
        elif cortex[index] or not fibres:
            key = ("grey", water)
        else:
            key = ("fibres", tuple(fibres), water)
        mixtures.setdefault(key, []).append(index)
    for key, voxels in mixtures.items():
        if key[0] == "water":
            evals, angles, fractions = [WATER], [(0.0, 0.0)], [100.0]
        elif key[0] == "grey":
            evals, angles, fractions = [GREY, WATER], [(0.0, 0.0)] * 2, [100.0 * (1 - key[1]), 100.0 * key[1]]
        else:
            fibres, water = key[1], key[2]
            share = 100.0 * (1 - water) / len(fibres)
            evals = [FIBRE] * len(fibres) + [WATER]
            angles, fractions = list(fibres) + [(0.0, 0.0)], [share] * len(fibres) + [100.0 * water]
        values, _ = multi_tensor(table, np.asarray(evals), S0=1000.0, angles=angles, fractions=fractions, snr=None)
        for index in voxels:
            signal[index] = values
    s0 = np.where(ventricles, 1800.0, np.where(cortex, 1200.0, 1000.0))
    signal *= (s0 / 1000.0)[..., None] * brain[..., None]
    bias = 1.0 + 0.15 * x - 0.1 * y * z  # a smooth receive field
    signal *= bias[..., None]
    sigma = 1000.0 / snr
    noisy = np.hypot(signal + rng.normal(0, sigma, signal.shape), rng.normal(0, sigma, signal.shape))
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    return Phantom(signal=signal.astype(np.float32), noisy=noisy.astype(np.float32), bvals=bvals, bvecs=bvecs.T,
                   affine=affine, mask=brain)
