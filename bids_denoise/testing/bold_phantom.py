"""A synthetic BOLD fMRI run with a known noise-free signal, task activation and physiology.

An ellipsoidal brain (grey matter rim, white matter, CSF core) with smooth coil shading, imaged
with a gradient-echo series at one or more echo times: ``S(x, t) = S0(x) (1 + p(x, t))
exp(-TE R2*(x, t))`` where ``R2* = 1 / T2*`` drops slightly in the active region while the task is
on (the BOLD effect) and ``p`` is a spatially smooth, slowly varying physiological fluctuation
(signal that a denoiser should keep). The complex image has a smooth spatial phase background
that drifts slowly over the run; complex Gaussian thermal noise (real and imaginary parts
independent, same sigma at every echo) is added and the magnitude taken, so the magnitude noise
is Rician where the signal is low. Used by the NORDIC tests and ``benchmarks/bold.py``.

References
----------
.. [1] Glover G.H. Deconvolution of impulse response in event-related BOLD fMRI.
       NeuroImage 9 (1999) 416-429 (the double-gamma response; SPM's canonical parameters:
       peak gamma of shape 6, undershoot gamma of shape 16 scaled 1/6).
.. [2] Gudbjartsson H., Patz S. The Rician distribution of noisy MRI data. Magn Reson Med 34
       (1995) 910-914.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from bids_denoise.testing.phantom import head_coordinates


@dataclass
class BoldPhantom:
    """Output of :func:`make_bold_phantom`. Per-echo series are lists (one entry per echo).

    Attributes
    ----------
    clean : list of ndarray (X, Y, Z, T), float32
        Noise-free magnitude (task response and physiology included).
    magnitude : list of ndarray (X, Y, Z, T), float32
        Noisy magnitude, ``|clean * exp(i phase_true) + noise|``.
    phase : list of ndarray (X, Y, Z, T), float32, or None
        Noisy phase in radians (-pi..pi); None when ``complex_data=False``.
    true_phase : ndarray (X, Y, Z, T), float32
        The noise-free phase (background plus its slow drift), the same at every echo.
    physiology : list of ndarray (X, Y, Z, T), float32
        The physiological part of ``clean`` in intensity units: ``clean`` minus the same series
        made without physiology.
    physiology_fraction : ndarray (X, Y, Z, T), float32
        The fractional physiological modulation ``p``.
    mask : ndarray (X, Y, Z) of bool
        The brain.
    active : ndarray (X, Y, Z) of bool
        The voxels that respond to the task.
    regressor : ndarray (T,)
        The block design convolved with the canonical double-gamma response, sampled at each
        volume, peak 1.
    echo_times : ndarray (E,)
        Seconds.
    t2star : ndarray (X, Y, Z)
        Seconds (0 outside the brain).
    s0 : ndarray (X, Y, Z)
    noise_sigma : float
        Standard deviation of the real and of the imaginary noise.
    tr : float
    affine : ndarray (4, 4)
    """

    clean: list
    magnitude: list
    phase: list | None
    true_phase: np.ndarray
    physiology: list
    physiology_fraction: np.ndarray
    mask: np.ndarray
    active: np.ndarray
    regressor: np.ndarray
    echo_times: np.ndarray
    t2star: np.ndarray
    s0: np.ndarray
    noise_sigma: float
    tr: float
    affine: np.ndarray


def double_gamma_hrf(tr: float, duration: float = 32.0) -> np.ndarray:
    """SPM's canonical haemodynamic response sampled every ``tr`` seconds, peak 1."""
    t = np.arange(0.0, duration, tr)

    def gamma(shape):
        return t ** (shape - 1) * np.exp(-t) / math.gamma(shape)

    response = gamma(6.0) - gamma(16.0) / 6.0
    return response / response.max()


def block_regressor(n_volumes: int, tr: float, block_seconds: float = 20.0) -> np.ndarray:
    """Alternating off/on blocks of ``block_seconds``, convolved with :func:`double_gamma_hrf` and
    sampled at TR; peak 1. Computed on a 0.1 s grid so that any TR samples the same curve."""
    dt = 0.1
    fine_t = np.arange(0.0, n_volumes * tr, dt)
    boxcar = ((fine_t // block_seconds) % 2 == 1).astype(float)
    response = double_gamma_hrf(dt)
    fine = np.convolve(boxcar, response)[: fine_t.size] * dt
    sampled = np.interp(np.arange(n_volumes) * tr, fine_t, fine)
    return sampled / sampled.max()


def _smooth_field(rng, shape, width):
    """A zero-mean, unit-std random field, Gaussian-smoothed by ``width`` voxels (via FFT)."""
    field = rng.standard_normal(shape)
    spectrum = np.fft.fftn(field)
    frequencies = np.meshgrid(*[np.fft.fftfreq(n) for n in shape], indexing="ij")
    squared = sum(f**2 for f in frequencies)
    smooth = np.real(np.fft.ifftn(spectrum * np.exp(-2.0 * (np.pi * width) ** 2 * squared)))
    smooth -= smooth.mean()
    return smooth / max(smooth.std(), 1e-12)


def _slow_series(rng, n_volumes, tr, low=0.01, high=0.08, count=4):
    """A zero-mean, unit-std time course: a sum of sinusoids between ``low`` and ``high`` Hz."""
    t = np.arange(n_volumes) * tr
    series = sum(np.sin(2 * np.pi * rng.uniform(low, high) * t + rng.uniform(0, 2 * np.pi))
                 for _ in range(count))
    series = series - series.mean()
    return series / max(series.std(), 1e-12)


def make_bold_phantom(shape=(24, 24, 12), n_volumes=80, tr=2.0, *, snr=15.0, n_echoes=1,
                      complex_data=True, bold_change=0.05, physiology_change=0.01, seed=0,
                      voxel_size=2.5) -> BoldPhantom:
    """Simulate a BOLD fMRI run (see the module docstring).

    Parameters
    ----------
    shape : tuple of 3 int
    n_volumes : int
    tr : float
        Repetition time, seconds.
    snr : float
        Mean noise-free brain signal (first echo, over voxels and time) over the noise sigma.
    n_echoes : int
        1: TE = 30 ms. More: TE evenly spaced from 14 to 56 ms (3 echoes: 14, 35, 56 ms).
    complex_data : bool
        Whether the noisy phase is returned (the magnitude is Rician either way).
    bold_change : float
        Peak fractional signal increase at TE = 30 ms in the active region's centre while the task
        is on; made by a drop of R2* (``bold_change / 0.030`` per second at the peak), so it grows
        with TE.
    physiology_change : float
        Standard deviation of the fractional physiological modulation (TE-independent).
    seed : int
    voxel_size : float
        Millimetres (the affine only).
    """
    if n_volumes < 2:
        raise ValueError("a BOLD phantom needs at least 2 volumes")
    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in shape)
    grid, radius = head_coordinates(shape)
    brain = radius < 1.0
    csf = brain & (radius < 0.2)
    white = brain & ~csf & (radius < 0.65)
    shading = 1.0 + 0.1 * np.cos(3 * grid[..., 0]) * np.cos(2 * grid[..., 1])
    s0 = np.where(csf, 1.3, np.where(white, 0.95, 1.0)) * shading * brain
    t2star = np.where(csf, 0.120, np.where(white, 0.045, 0.050)) * brain

    # two active blobs in grey matter, one per hemisphere, with a graded response
    centres = [np.array([-0.45, 0.35, 0.2]), np.array([0.5, -0.3, -0.15])]
    activation = np.zeros(shape)
    for centre in centres:
        distance = np.sqrt((((grid - centre) / 0.28) ** 2).sum(-1))
        activation = np.maximum(activation, np.clip(1.25 - distance, 0.0, 1.0))
    activation *= brain & ~csf
    active = activation > 0.0

    regressor = block_regressor(n_volumes, tr)
    delta_r2 = -(bold_change / 0.030) * activation[..., None] * regressor  # (X, Y, Z, T), 1/s

    maps = [_smooth_field(rng, shape, 3.0) for _ in range(3)]
    courses = [_slow_series(rng, n_volumes, tr) for _ in range(3)]
    physiology_fraction = sum(m[..., None] * c for m, c in zip(maps, courses))
    physiology_fraction *= physiology_change / max(physiology_fraction[brain].std(), 1e-12)

    # smooth phase background (linear + quadratic, a few radians across the field of view) that
    # drifts slowly: a small extra gradient growing over the run
    background = 1.8 * grid[..., 0] - 1.2 * grid[..., 1] + 0.8 * grid[..., 2] + 1.5 * grid[..., 0] * grid[..., 1]
    drift = 0.4 * np.linspace(-1.0, 1.0, n_volumes)
    true_phase = background[..., None] + (0.5 + 0.5 * grid[..., 1:2]) * drift
    true_phase = np.angle(np.exp(1j * true_phase))

    echo_times = np.array([0.030]) if n_echoes == 1 else np.linspace(0.014, 0.056, n_echoes)
    base_r2 = np.where(brain, 1.0 / np.where(brain, t2star, 1.0), 0.0)[..., None]
    clean, physiology = [], []
    for te in echo_times:
        decay = s0[..., None] * np.exp(-te * (base_r2 + delta_r2))
        clean.append(decay * (1.0 + physiology_fraction))
        physiology.append(decay * physiology_fraction)
    sigma = float(clean[0][brain].mean() / snr)
    # intensities of a scanner's magnitude images (S0 about 1000)
    scale = 1000.0
    sigma *= scale
    magnitude, phase = [], []
    rotation = np.exp(1j * true_phase)
    for signal in clean:
        noisy = signal * scale * rotation + sigma * (
            rng.standard_normal(signal.shape) + 1j * rng.standard_normal(signal.shape))
        magnitude.append(np.abs(noisy).astype(np.float32))
        phase.append(np.angle(noisy).astype(np.float32))
    affine = np.diag([voxel_size] * 3 + [1.0])
    affine[:3, 3] = -voxel_size * (np.array(shape) - 1) / 2
    return BoldPhantom(
        clean=[(c * scale).astype(np.float32) for c in clean],
        magnitude=magnitude,
        phase=phase if complex_data else None,
        true_phase=true_phase.astype(np.float32),
        physiology=[(p * scale).astype(np.float32) for p in physiology],
        physiology_fraction=physiology_fraction.astype(np.float32),
        mask=brain,
        active=active,
        regressor=regressor,
        echo_times=echo_times,
        t2star=t2star,
        s0=s0 * scale,
        noise_sigma=sigma,
        tr=float(tr),
        affine=affine,
    )


# ---- measures on a phantom's output (tests and benchmarks/bold.py)


def task_t(series, phantom: BoldPhantom, voxels=None) -> np.ndarray:
    """OLS t-values of the task regressor (with an intercept; physiology not modelled) in ``voxels``
    (a boolean map; default the active region)."""
    voxels = phantom.active if voxels is None else voxels
    design = np.stack([phantom.regressor, np.ones_like(phantom.regressor)], axis=1)
    values = series[voxels].T.astype(np.float64)
    beta, *_ = np.linalg.lstsq(design, values, rcond=None)
    residual = values - design @ beta
    variance = np.maximum((residual**2).sum(axis=0) / (len(phantom.regressor) - 2), 1e-30)
    return beta[0] / np.sqrt(variance * np.linalg.inv(design.T @ design)[0, 0])


def physiology_kept(series, phantom: BoldPhantom, echo=0) -> float:
    """Share of the physiological signal kept: the least-squares coefficient of the output's
    fluctuations (each voxel's mean removed), less the rest of the noise-free signal, on the
    physiological signal's, over the brain. 1: kept whole; 0: removed (thermal noise left untouched
    is uncorrelated with it)."""
    mask = phantom.mask
    physiology = phantom.physiology[echo][mask].astype(np.float64)
    rest = phantom.clean[echo][mask] - physiology
    output = series[mask].astype(np.float64) - rest
    p = physiology - physiology.mean(axis=1, keepdims=True)
    o = output - output.mean(axis=1, keepdims=True)
    return float((o * p).sum() / (p**2).sum())


def neighbour_leak(series, phantom: BoldPhantom, echo=0, distance=1) -> float:
    """How much of a voxel's noise reaches its neighbours: the regression coefficient, over time, of
    the output error (output - truth) of the voxels ``distance`` away along each axis on the voxel's
    own noise (noisy - truth), divided by the voxel's own coefficient, averaged over the brain. 0 for
    a voxel-wise method; the ratio of the kernel's weights (0.29 at ``distance`` 1) for a Gaussian of
    1.5 voxels FWHM."""
    noise = (phantom.magnitude[echo] - phantom.clean[echo]).astype(np.float64)
    error = (series - phantom.clean[echo]).astype(np.float64)
    noise -= noise.mean(axis=-1, keepdims=True)
    error -= error.mean(axis=-1, keepdims=True)
    brain = phantom.mask
    power = np.maximum((noise**2).sum(axis=-1), 1e-30)
    own = ((error * noise).sum(axis=-1) / power)[brain].mean()
    if abs(own) < 1e-12:
        return 0.0
    neighbours = []
    for axis in range(3):
        for shift in (distance, -distance):
            both = brain & np.roll(brain, shift, axis=axis)
            neighbours.append(((np.roll(error, shift, axis=axis) * noise).sum(axis=-1) / power)[both].mean())
    return float(np.mean(neighbours) / own)


def write_bold_run(root, phantom: BoldPhantom, subject="01", session=None, task="rest") -> list[str]:
    """Write a BOLD phantom into a BIDS dataset: one image per echo (``echo-<n>`` where there are
    several), ``part-mag`` and ``part-phase`` images where it is complex, each with its sidecar
    (RepetitionTime, TaskName, EchoTime, SliceTiming). Returns the magnitude images' paths relative to
    ``root``, in echo order."""
    import json
    from pathlib import Path

    import nibabel as nib

    root = Path(root)
    folder = f"sub-{subject}" + (f"/ses-{session}" if session else "") + "/func"
    (root / folder).mkdir(parents=True, exist_ok=True)
    stem = f"sub-{subject}" + (f"_ses-{session}" if session else "") + f"_task-{task}"
    n_slices = phantom.clean[0].shape[2]
    written = []
    for echo, magnitude in enumerate(phantom.magnitude):
        name = stem + (f"_echo-{echo + 1}" if len(phantom.magnitude) > 1 else "")
        images = {"": magnitude}
        if phantom.phase is not None:
            images = {"_part-mag": magnitude, "_part-phase": phantom.phase[echo]}
        for part, array in images.items():
            path = root / folder / f"{name}{part}_bold.nii.gz"
            image = nib.Nifti1Image(np.asarray(array, dtype=np.float32), phantom.affine)
            image.set_qform(phantom.affine, code=1)
            image.set_sform(phantom.affine, code=1)
            image.header.set_xyzt_units("mm", "sec")
            image.header.set_zooms(tuple(image.header.get_zooms()[:3]) + (phantom.tr,))
            nib.save(image, str(path))
            metadata = {"RepetitionTime": phantom.tr, "TaskName": task,
                        "EchoTime": float(phantom.echo_times[echo]),
                        "SliceTiming": [i * phantom.tr / n_slices for i in range(n_slices)]}
            if part == "_part-phase":
                metadata["Units"] = "rad"
            path.with_name(path.name.replace(".nii.gz", ".json")).write_text(json.dumps(metadata, indent=2))
            if part != "_part-phase":
                written.append(str(path.relative_to(root)))
    return written
