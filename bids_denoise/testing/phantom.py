"""Realistic synthetic diffusion data with a known noise-free signal.

A head-shaped phantom: an ellipsoidal brain with white matter (anisotropic
tensors whose fibres bend across the image), grey matter and CSF (isotropic),
imaged with b0s and one or more shells, plus Rician noise. Used by the tests,
the benchmarks and ``make demo``: because the clean signal is known, they can
assert that denoising lowered the error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np


@dataclass
class Phantom:
    signal: np.ndarray  # (X, Y, Z, V) noise-free magnitude
    noisy: np.ndarray  # (X, Y, Z, V) with Rician noise
    bvals: np.ndarray
    bvecs: np.ndarray  # (3, V)
    affine: np.ndarray
    mask: np.ndarray  # the brain
    phase: np.ndarray | None = None  # (X, Y, Z, V) noisy phase in radians, for a complex phantom


def head_coordinates(shape):
    """Voxel coordinates in [-1, 1] per axis, and the normalised radius of the phantoms' ellipsoidal head."""
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"), axis=-1)
    return grid, np.sqrt(((grid / np.array([0.85, 0.9, 0.85])) ** 2).sum(-1))


def gradient_directions(count: int, rng) -> np.ndarray:
    """Nearly uniform unit vectors on the sphere (Fibonacci lattice, randomly rotated)."""
    index = np.arange(count) + 0.5
    polar = np.arccos(1 - index / count)  # upper hemisphere
    azimuth = np.pi * (1 + 5**0.5) * index
    directions = np.stack([np.cos(azimuth) * np.sin(polar), np.sin(azimuth) * np.sin(polar), np.cos(polar)])
    rotation, _ = np.linalg.qr(rng.standard_normal((3, 3)))
    return rotation @ directions


def make_phantom(shape=(24, 24, 14), *, n_b0=3, shells=((1000.0, 24),), noise_sigma=0.05,
                 voxel_size=2.0, seed=0, gradient_seed=None, complex_phase=False) -> Phantom:
    """Simulate a DWI series.

    Parameters
    ----------
    shape : tuple of 3 int
    n_b0 : int
        Number of b0 volumes (interleaved at the start and through the series).
    shells : sequence of (b-value, number of directions)
    noise_sigma : float
        Noise standard deviation relative to the brain's b0 signal (S0 = 1000).
    seed : int
        Seed of the noise (and of the gradient table unless ``gradient_seed``).
    gradient_seed : int, optional
        Seed of the gradient table, so runs can share one bval/bvec.
    complex_phase : bool
        Give the signal a smooth phase that changes from volume to volume (a static field, plus each
        volume's own linear and quadratic terms, as motion during diffusion encoding makes) and return
        the noisy phase too (``Phantom.phase``, radians); the noise draws are the same as without it.
    """
    rng = np.random.default_rng(seed)
    gradient_rng = np.random.default_rng(seed if gradient_seed is None else gradient_seed)
    grid, radius = head_coordinates(shape)
    brain = radius < 1.0
    csf = brain & (radius < 0.25)
    white = brain & ~csf & (radius < 0.75)

    bvals = [0.0] * n_b0
    bvecs = [np.zeros(3)] * n_b0
    for bvalue, count in shells:
        directions = gradient_directions(count, gradient_rng)
        # scanners write slightly different b-values within a shell
        bvals += list(bvalue + gradient_rng.choice([-5.0, 0.0, 5.0], size=count))
        bvecs += list(directions.T)
    order = np.r_[0, gradient_rng.permutation(np.arange(1, len(bvals)))]
    bvals = np.array(bvals)[order]
    bvecs = np.array(bvecs)[order].T

    # fibre direction bends with position: a smooth, realistic orientation field
    angle = np.pi * 0.5 * grid[..., 1] + 0.3 * grid[..., 2]
    fibre = np.stack([np.cos(angle), np.sin(angle), 0.2 * grid[..., 0]], axis=-1)
    fibre /= np.linalg.norm(fibre, axis=-1, keepdims=True)
    axial, radial = 1.7e-3, 0.3e-3
    projection = np.einsum("xyzc,cv->xyzv", fibre, bvecs)
    white_signal = np.exp(-bvals * (radial + (axial - radial) * projection**2))
    s0 = np.where(csf, 1500.0, np.where(white, 1000.0, 1100.0)) * brain
    diffusivity = np.where(csf, 3.0e-3, 0.8e-3)[..., None]
    attenuation = np.where(white[..., None], white_signal, np.exp(-bvals * diffusivity))
    smooth = 1.0 + 0.1 * np.cos(3 * grid[..., 0]) * np.cos(2 * grid[..., 1])  # coil shading
    signal = (s0 * smooth)[..., None] * attenuation
    sigma = noise_sigma * 1000.0
    real, imaginary = signal + rng.normal(0, sigma, signal.shape), rng.normal(0, sigma, signal.shape)
    phase = None
    if complex_phase:
        phase_rng = np.random.default_rng([seed, 1])
        field = 1.2 * grid[..., 0] * grid[..., 1] + 0.8 * grid[..., 2] ** 2  # static: B0 and coil phase
        terms = phase_rng.normal(0, 1.0, (len(bvals), 4))  # per volume: offset, tilts, curvature
        angle = (field[..., None] + terms[:, 0] * np.pi + np.einsum("xyzc,vc->xyzv", grid[..., :2], terms[:, 1:3])
                 + terms[:, 3] * (grid[..., 0:1] ** 2 + grid[..., 1:2] ** 2) * 0.5)
        rotation = np.exp(1j * angle)
        values = signal * rotation + (real - signal) + 1j * imaginary
        noisy, phase = np.abs(values), np.angle(values).astype(np.float32)
    else:
        noisy = np.sqrt(real**2 + imaginary**2)
    affine = np.diag([voxel_size] * 3 + [1.0])
    affine[:3, 3] = -voxel_size * (np.array(shape) - 1) / 2
    return Phantom(signal.astype(np.float32), noisy.astype(np.float32), bvals, bvecs, affine, brain, phase)


def make_anatomical(shape=(24, 24, 16), *, noise_sigma=0.05, seed=0, voxel_size=1.5):
    """A T1w-like image (white > grey > CSF) with Rician noise: (signal, noisy, affine)."""
    rng = np.random.default_rng(seed)
    grid, radius = head_coordinates(shape)
    signal = np.select([radius < 0.25, radius < 0.75, radius < 1.0], [300.0, 1000.0, 650.0], 0.0)
    signal *= 1.0 + 0.1 * np.cos(3 * grid[..., 0]) * np.cos(2 * grid[..., 1])
    sigma = noise_sigma * 1000.0
    noisy = np.sqrt((signal + rng.normal(0, sigma, shape)) ** 2 + rng.normal(0, sigma, shape) ** 2)
    affine = np.diag([voxel_size] * 3 + [1.0])
    affine[:3, 3] = -voxel_size * (np.array(shape) - 1) / 2
    return signal.astype(np.float32), noisy.astype(np.float32), affine


def add_bold_run(root, subject="01", session=None, *, shape=(14, 14, 8), n_volumes=48, tr=2.0, snr=20.0,
                 seed=0, task="rest"):
    """Add a small BOLD run (a block design in one region, slow fluctuations, Gaussian noise) to a
    BIDS dataset; return (relpath, noise-free series path outside the dataset, active-region mask).

    For the app's tests: a realistic shape of data, not a validation phantom.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    signal, _, affine = make_anatomical(shape, noise_sigma=0.0, seed=seed, voxel_size=3.0)
    grid, _ = head_coordinates(shape)
    active = (np.linalg.norm(grid - np.array([0.35, 0.0, 0.0]), axis=-1) < 0.3) & (signal > 0)
    times = np.arange(n_volumes) * tr
    task_course = ((times // 20.0) % 2 == 1).astype(float)
    drift = 0.01 * np.sin(2 * np.pi * times / 90.0)
    series = signal[..., None] * (1.0 + drift + 0.03 * active[..., None] * task_course)
    sigma = signal[signal > 0].mean() / snr
    noisy = np.abs(series + rng.normal(0, sigma, series.shape))
    folder = f"sub-{subject}" + (f"/ses-{session}" if session else "") + "/func"
    name = f"sub-{subject}" + (f"_ses-{session}" if session else "") + f"_task-{task}_bold"
    (root / folder).mkdir(parents=True, exist_ok=True)
    path = root / folder / f"{name}.nii.gz"
    _save(noisy, affine, path)
    image = nib.load(path)
    image.header.set_zooms(tuple(image.header.get_zooms()[:3]) + (tr,))
    nib.save(image, path)
    (root / folder / f"{name}.json").write_text(json.dumps(
        {"RepetitionTime": tr, "TaskName": task, "EchoTime": 0.03,
         "SliceTiming": [i * tr / shape[2] for i in range(shape[2])]}, indent=2))
    truth = root.parent / f"{root.name}_truth" / f"{name}_signal.nii.gz"
    truth.parent.mkdir(parents=True, exist_ok=True)
    _save(series, affine, truth)
    return f"{folder}/{name}.nii.gz", truth, active


def _save(array, affine, path, dtype=np.float32):
    image = nib.Nifti1Image(np.asarray(array, dtype=dtype), affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm", "sec")
    nib.save(image, str(path))


def make_bids_dataset(root, *, subjects=("01", "02"), sessions=("pre", "post"), runs_in_first_session=2,
                      shape=(20, 20, 12), shells=((1000.0, 20),), n_b0=3, noise_sigma=0.05, seed=0,
                      truth_dir=None, anat_shape=(24, 24, 16)):
    """Write a small BIDS dataset of phantom DWI runs; return {relpath: clean signal path}.

    bval/bvec and the acquisition JSON live at the dataset root (``dwi.bval``,
    ``dwi.bvec``, ``dwi.json``) and apply to every run by inheritance, as in
    the public example dataset ds114. Each session also has a T1w image
    (``anat_shape``; None for none). The noise-free signals are written to
    ``truth_dir`` (default: ``<root>_truth``), outside the dataset.
    """
    root = Path(root)
    truth_dir = Path(truth_dir) if truth_dir else root.parent / f"{root.name}_truth"
    root.mkdir(parents=True, exist_ok=True)
    truth_dir.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(json.dumps(
        {"Name": "bids-denoise phantom", "BIDSVersion": "1.10.0", "DatasetType": "raw",
         "License": "CC0", "Authors": ["bids-denoise"]}, indent=2))
    (root / "README").write_text("Synthetic diffusion phantom made by bids_denoise.testing.phantom.\n")
    (root / "participants.tsv").write_text("participant_id\n" + "".join(f"sub-{s}\n" for s in subjects))
    (root / "participants.json").write_text(json.dumps({"participant_id": {"Description": "label"}}))
    (root / "dwi.json").write_text(json.dumps(
        {"PhaseEncodingDirection": "j-", "TotalReadoutTime": 0.05, "EchoTime": 0.089,
         "RepetitionTime": 3.2, "MagneticFieldStrength": 3, "Manufacturer": "Phantom"}, indent=2))
    truths = {}
    counter = 0
    for subject in subjects:
        for index, session in enumerate(sessions or [None]):
            if anat_shape:
                folder = f"sub-{subject}" + (f"/ses-{session}" if session else "") + "/anat"
                name = f"sub-{subject}" + (f"_ses-{session}" if session else "") + "_T1w"
                (root / folder).mkdir(parents=True, exist_ok=True)
                signal, noisy, affine = make_anatomical(anat_shape, noise_sigma=noise_sigma, seed=seed * 1000 + 500 + counter)
                _save(np.round(noisy).astype(np.int16), affine, root / folder / f"{name}.nii.gz", dtype=np.int16)
                truth = truth_dir / f"{name}_signal.nii.gz"
                _save(signal, affine, truth)
                truths[f"{folder}/{name}.nii.gz"] = truth
            n_runs = runs_in_first_session if index == 0 else 1
            for run in range(1, n_runs + 1):
                phantom = make_phantom(shape, n_b0=n_b0, shells=shells, noise_sigma=noise_sigma,
                                       seed=seed * 1000 + counter, gradient_seed=seed)
                counter += 1
                folder = f"sub-{subject}" + (f"/ses-{session}" if session else "") + "/dwi"
                name = f"sub-{subject}" + (f"_ses-{session}" if session else "")
                name += "_acq-multiband" + (f"_run-{run}" if n_runs > 1 else "") + "_dwi"
                (root / folder).mkdir(parents=True, exist_ok=True)
                _save(np.round(phantom.noisy).astype(np.int16), phantom.affine, root / folder / f"{name}.nii.gz",
                      dtype=np.int16)
                truth = truth_dir / f"{name}_signal.nii.gz"
                _save(phantom.signal, phantom.affine, truth)
                truths[f"{folder}/{name}.nii.gz"] = truth
                bvals, bvecs = phantom.bvals, phantom.bvecs
    np.savetxt(root / "dwi.bval", np.round(bvals)[None, :], fmt="%d")
    np.savetxt(root / "dwi.bvec", bvecs, fmt="%.6f")
    return truths
