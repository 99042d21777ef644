"""Phase images: their units, and the slowly varying phase removed before complex denoising.

A complex image ``m exp(i phi)`` whose slowly varying phase (from B0 inhomogeneity, coil
sensitivities, motion during diffusion encoding) is taken out becomes nearly real: the signal sits
in the real channel and the imaginary channel holds noise. Its real part has Gaussian noise of the
receiver's standard deviation and no Rician noise floor, so denoising it (and reporting its
magnitude) removes the floor at its source (Eichner et al. 2015; Moeller et al. 2021).

The imaginary channel also measures the receiver's noise level directly (:func:`noise_level`), with
no signal to tell it from, which the spread of magnitudes can only estimate.

The slow phase is the angle of a low-pass filtered copy of each volume's complex image, slice by
slice: the in-plane k-space window ``cos(pi f)**(2 w)`` along each axis (NORDIC's Tukey/Hann window
raised to the power ``w``; ``w = 10`` is a Gaussian of about 2.2 voxels' standard deviation in image
space).

References
----------
.. [1] Eichner C., Cauley S.F., Cohen-Adad J., Moller H.E., Turner R., Setsompop K., Wald L.L. Real
       diffusion-weighted MRI enabling true signal averaging and increasing diffusion contrast.
       NeuroImage 122 (2015) 373-384.
.. [2] Moeller S. et al. NOise reduction with DIstribution Corrected (NORDIC) PCA in dMRI with
       complex-valued parameter-free locally low-rank processing. NeuroImage 226 (2021) 117539.
"""

from __future__ import annotations

import numpy as np

from bids_denoise.methods.core.errors import UnsuitableDataError

#: Siemens scanner units: -4096..4095 stand for -pi..pi.
SCANNER_RANGE = 4096.0
#: The units a phase image may be stored in, with the span of one full turn (2 pi) in each.
TURNS = {"radians": 2 * np.pi, "degrees": 360.0, "scanner": 2 * SCANNER_RANGE, "scanner-unsigned": SCANNER_RANGE}
#: Relative slack on the ranges (rounding of stored values).
_TOLERANCE = 1.0 + 1e-4


def phase_units(phases, requested="auto") -> str:
    """The units of phase images, from ``requested`` or (``auto``) from the range of their values.

    A phase wraps: stored over a full turn, its values span 2 pi in radians (-pi..pi or 0..2 pi), 360 in
    degrees (-180..180 or 0..360), 8192 in Siemens' signed scanner units (-4096..4095) or 4096 in their
    unsigned form (0..4095). The range tells them apart: values within a turn of radians are radians;
    a span beyond 2 pi within -180..360 is degrees; beyond 360, within -4096..4096, scanner units (unsigned
    where no value is negative). Anything else is an :class:`UnsuitableDataError` that gives the range
    seen (a sidecar's ``Units`` can say what the values cannot).
    """
    if requested in TURNS:
        return requested
    if requested != "auto":
        raise ValueError(f"phase_units must be 'auto' or one of {', '.join(TURNS)}, not {requested!r}")
    phases = phases if isinstance(phases, (list, tuple)) else [phases]
    low = min(float(np.min(p)) if np.size(p) else 0.0 for p in phases)
    high = max(float(np.max(p)) if np.size(p) else 0.0 for p in phases)
    span, t = high - low, _TOLERANCE
    if low >= -np.pi * t and high <= 2 * np.pi * t and span <= 2 * np.pi * t:
        return "radians"
    if low >= -180.0 * t and high <= 360.0 * t and span <= 360.0 * t:
        return "degrees"
    if low >= -SCANNER_RANGE * t and high <= SCANNER_RANGE * t:
        return "scanner-unsigned" if low >= 0 else "scanner"
    raise UnsuitableDataError(
        f"phase values from {low:g} to {high:g} are in no units known here (radians -pi..pi or 0..2pi, degrees, "
        "scanner units -4096..4095 or 0..4095): give the phase image's Units in its sidecar")


def in_radians(phase, units) -> np.ndarray:
    """The phase in radians (float64): a full turn of ``units`` (:data:`TURNS`) is 2 pi."""
    phase = np.asarray(phase, dtype=np.float64)
    return phase if units == "radians" else phase * (2 * np.pi / TURNS[units])


def slow_phase(values, width) -> np.ndarray:
    """Angle of each volume's complex image (X, Y, Z[, T]) low-pass filtered in-plane, slice by slice,
    with the k-space window ``cos(pi fx)**(2 w) * cos(pi fy)**(2 w)``."""
    nx, ny = values.shape[:2]
    window_x = np.cos(np.pi * np.fft.fftfreq(nx)) ** (2.0 * width)
    window_y = np.cos(np.pi * np.fft.fftfreq(ny)) ** (2.0 * width)
    window = window_x[:, None] * window_y[None, :]
    window = window.reshape(window.shape + (1,) * (values.ndim - 2))
    smooth = np.fft.ifft2(np.fft.fft2(values, axes=(0, 1)) * window, axes=(0, 1))
    return np.angle(smooth)


def demodulate(magnitude, phase, *, width=10.0, units="auto"):
    """The complex series with its slowly varying phase removed.

    Parameters
    ----------
    magnitude, phase : ndarray (X, Y, Z, T)
        ``phase`` in radians or scanner units (see :func:`phase_units`).
    width : float
        Power of the k-space window (larger is smoother); 0 removes the whole phase.

    Returns
    -------
    values : complex128 ndarray
        ``magnitude exp(i (phase - slow))``: nearly real where the signal is.
    slow : float64 ndarray
        The slow phase removed, in radians.
    units : str
        The phase's units, as found.
    """
    magnitude, phase = np.asarray(magnitude), np.asarray(phase)
    if magnitude.shape != phase.shape:
        raise UnsuitableDataError(f"phase of shape {phase.shape} does not match the magnitude {magnitude.shape}")
    if not np.all(np.isfinite(phase)):
        raise UnsuitableDataError("the phase has NaN or infinite values")
    units = phase_units(phase, units)
    values = np.asarray(magnitude, dtype=np.float64) * np.exp(1j * in_radians(phase, units))
    slow = slow_phase(values, width)
    return values * np.exp(-1j * slow), slow, units


def noise_level(magnitude, phase, *, width=10.0, units="auto") -> np.ndarray:
    """The thermal noise standard deviation per voxel, from the imaginary part of the demodulated series.

    With the slowly varying phase removed (:func:`demodulate`), the imaginary channel holds the noise
    of one receiver channel and what the slow phase missed, which changes slowly over time: the
    root mean square of its successive differences over ``sqrt(2)`` is the Gaussian sigma, with
    slow drifts cancelled.

    Parameters
    ----------
    magnitude, phase : ndarray (X, Y, Z, T), T >= 2
    width, units :
        As :func:`demodulate`.

    Returns
    -------
    ndarray (X, Y, Z), float64
    """
    if np.ndim(magnitude) != 4 or np.shape(magnitude)[3] < 2:
        raise UnsuitableDataError("a noise level from the phase needs a series of at least 2 volumes")
    values, _, _ = demodulate(magnitude, phase, width=width, units=units)
    imaginary = values.imag
    del values
    return np.sqrt(np.mean(np.diff(imaginary, axis=3) ** 2, axis=3) / 2.0)
