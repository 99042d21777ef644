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
#: A phase whose largest magnitude is at most pi times this is in radians.
_TOLERANCE = 1.0 + 1e-4


def phase_units(phases, requested="auto") -> str:
    """The units of phase images: ``"radians"`` or ``"scanner"`` (-4096..4096).

    ``requested`` ``auto``: radians if no value exceeds pi, scanner units if none exceeds 4096;
    anything else is an :class:`UnsuitableDataError`.
    """
    if requested in ("radians", "scanner"):
        return requested
    if requested != "auto":
        raise ValueError(f"phase_units must be 'auto', 'radians' or 'scanner', not {requested!r}")
    phases = phases if isinstance(phases, (list, tuple)) else [phases]
    largest = max(float(np.max(np.abs(p))) if np.size(p) else 0.0 for p in phases)
    if largest <= np.pi * _TOLERANCE:
        return "radians"
    if largest <= SCANNER_RANGE * _TOLERANCE:
        return "scanner"
    raise UnsuitableDataError(f"phase values up to {largest:g} are neither radians (pi) nor scanner units (4096)")


def in_radians(phase, units) -> np.ndarray:
    """The phase in radians (float64)."""
    phase = np.asarray(phase, dtype=np.float64)
    return phase * (np.pi / SCANNER_RANGE) if units == "scanner" else phase


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
