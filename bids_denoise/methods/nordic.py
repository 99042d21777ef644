"""NORDIC: locally low-rank denoising of fMRI with a hard threshold set by the thermal noise.

Written from the papers' description (the reference code is MATLAB under a non-profit licence and
was not used). Each overlapping patch of voxels is arranged as a voxels-by-volumes (Casorati)
matrix; its singular values below the largest singular value expected from thermal noise alone are
set to zero and the matrix is rebuilt from the others (Moeller et al. 2021). The patch holds about
``patch_ratio`` (11) times as many voxels as there are volumes. Overlapping patches (by default a
step of half the patch edge) are averaged with equal weights; every voxel is covered.

The threshold is ``sigma * s_max`` where ``s_max`` is the mean largest singular value of
``MC_DRAWS`` matrices of the patch's size filled with Gaussian noise of unit standard deviation per
real channel (complex when the phase is given), drawn from a generator seeded by ``seed``: the
Monte-Carlo edge NORDIC uses, close to the Marchenko-Pastur edge ``sqrt(m) + sqrt(n)`` (times
``sqrt(2)`` for complex data). ``sigma``, the thermal noise standard deviation per real channel,
comes from

* noise-only volumes at the end of the series (``noise_volumes=N``, as NORDIC's noise scan): the
  root mean square of their values in the patch over ``sqrt(2)`` (complex noise, or its magnitude,
  Rayleigh distributed, have ``E|z|^2 = 2 sigma^2``); the volumes are then dropped from the output;
* a given level (``noise_sigma``: one value, or a noise map whose division leaves unit noise);
* a g-factor map (``gfactor``, unitless: the spatial profile of the noise that parallel imaging
  leaves): the data are divided by it before and multiplied by it after (NORDIC's g-factor
  normalisation), and the level of the normalised data comes from the noise volumes, a given
  value, or the data;
* otherwise, the data: the Marchenko-Pastur fit of the patch's eigenvalues (Veraart et al. 2016
  with Cordero-Grande et al. 2019's estimator, :func:`bids_denoise.methods.core.randmat.marchenko_pastur_cutoff`).

With a phase the data are complex. Per volume and per slice, the slowly varying phase is estimated
as the angle of a low-pass-filtered copy of the complex image (k-space window
``cos(pi f)**(2 w)`` along each in-plane axis, ``w = phase_filter_width``: NORDIC's Tukey/Hann
window raised to the power ``w``, a Gaussian of about 2.2 voxels' standard deviation in image space
for ``w = 10``) and removed (the data multiplied by ``exp(-i phase)``) before denoising, and
restored after; the signal is then nearly real and its noise in the imaginary channel is removed
too, so the magnitude keeps less Rician bias. Magnitude-only data are denoised as real values (the
output may go slightly below zero where the signal is near zero: nothing is clipped).

Several echoes are denoised jointly by default: each patch's matrix holds the volumes of every echo
side by side (and the patch is sized for the echoes' total volume count).

References
----------
.. [1] Moeller S., Pisharady P.K., Ramanna S., Lenglet C., Wu X., Dowdle L., Yacoub E., Ugurbil K.,
       Akcakaya M. NOise reduction with DIstribution Corrected (NORDIC) PCA in dMRI with complex-valued
       parameter-free locally low-rank processing. NeuroImage 226 (2021) 117539.
.. [2] Vizioli L., Moeller S., Dowdle L., Akcakaya M., De Martino F., Yacoub E., Ugurbil K. Lowering
       the thermal noise barrier in functional brain mapping with magnetic resonance imaging. Nat
       Commun 12 (2021) 5181.
.. [3] Veraart J., Novikov D.S., Christiaens D., Ades-aron B., Sijbers J., Fieremans E. Denoising of
       diffusion MRI using random matrix theory. NeuroImage 142 (2016) 394-406.
.. [4] Cordero-Grande L., Christiaens D., Hutter J., Price A.N., Hajnal J.V. Complex
       diffusion-weighted image estimation via matrix recovery under general noise models.
       NeuroImage 200 (2019) 391-404.
.. [5] Marchenko V.A., Pastur L.A. Distribution of eigenvalues for some sets of random matrices.
       Math USSR-Sbornik 1 (1967) 457-483.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from bids_denoise.methods.core.errors import UnsuitableDataError
from bids_denoise.methods.core.options import Options, integers, option, positive, resolve_options
from bids_denoise.methods.core.phase import in_radians, slow_phase
from bids_denoise.methods.core.phase import phase_units as phase_units_of
from bids_denoise.methods.core.randmat import marchenko_pastur_cutoff
from bids_denoise.methods.core.scaling import power_of_two_exponent

#: Fewest volumes (per echo, noise volumes excluded) NORDIC takes: below this the patch's matrix
#: has too few singular values to tell noise from signal.
MIN_VOLUMES = 10

#: Gaussian matrices drawn for the Monte-Carlo threshold.
MC_DRAWS = 10

#: Patches per batch (each a voxels x volumes matrix).
BATCH_PATCHES = 16


@dataclass(frozen=True)
class NordicOptions(Options):
    """The options of :func:`nordic` (the defaults are NORDIC's).

    Attributes
    ----------
    patch_ratio : float, optional
        Voxels per volume in a patch (default 11, as NORDIC): the patch edge is the smallest integer
        ``e`` with ``e**3 >= patch_ratio * volumes`` (the volumes of all echoes when joint), capped by
        the image size on each axis. Unused where ``patch`` is given.
    patch : int or sequence of 3 int, optional
        Patch edge(s), capped by the image size.
    step : int or sequence of 3 int, optional
        Distance between patch positions; default half the patch edge (at least 1).
    noise_volumes : int, optional
        The last ``noise_volumes`` volumes (of each echo) are noise-only scans: they set the
        noise level and are dropped from the output.
    phase_filter_width : float, optional
        Power ``w`` of the in-plane k-space window of the phase estimate (default 10; larger is
        smoother). 0 removes the whole phase (the data become their magnitude).
    phase_units : {"auto", "radians", "degrees", "scanner", "scanner-unsigned"}, optional
        ``auto`` (default): from the values' range
        (:func:`bids_denoise.methods.core.phase.phase_units`).
    joint : bool, optional
        Several echoes: decompose them together (default) or one by one.
    """

    patch_ratio: float = option(11.0, "voxels per volume in a patch (NORDIC's 11:1)", parse=positive(float))
    patch: int | tuple | None = option(None, "patch edge(s), capped by the image", app=False)
    step: int | tuple | None = option(None, "distance between patch positions (default half the edge)", app=False)
    noise_volumes: int = option(0, "the last N volumes are noise scans: they set the threshold and are dropped "
                                   "from the output", parse=integers(minimum=0))
    phase_filter_width: float = option(10.0, "smoothness of the slowly varying phase removed from complex runs "
                                             "(k-space window power)", parse=positive(float))
    phase_units: str = option("auto", "units of the phase", choices=("auto", "radians", "degrees", "scanner",
                                                                           "scanner-unsigned"), app=False)
    joint: bool = option(True, "several echoes: one decomposition (true) or one each (false)", app=False)


@dataclass
class NordicResult:
    """Output of :func:`nordic`.

    Attributes
    ----------
    denoised : ndarray (X, Y, Z, T - noise_volumes), float32, or a list of them (one per echo)
        Denoised magnitude.
    phase : ndarray or list of ndarray, or None
        Denoised phase in radians (-pi..pi), shaped as ``denoised``; None for magnitude-only input.
    noise_sigma : ndarray (X, Y, Z), float32
        Thermal noise standard deviation per real channel that set the threshold, in the input's
        units, averaged over the patches that cover each voxel (times the noise map where one was
        given). For echoes denoised one by one, the mean over echoes.
    rank : ndarray (X, Y, Z), float32
        Components kept, averaged over the patches that cover each voxel (mean over echoes where
        denoised one by one).
    details : dict
        ``patch`` (edges), ``step``, ``threshold_source`` (``"marchenko-pastur"``,
        ``"noise volumes"`` or ``"given"``), ``noise_map`` (whether a map normalised the data),
        ``phase_units`` (``"radians"``, ``"scanner"`` or None), ``dropped_volumes`` (noise
        volumes removed from the end of each echo), ``joint``, ``n_echoes``, ``complex``,
        ``mc_edge`` (the Monte-Carlo largest singular value of unit noise, per patch matrix),
        ``phase_filter_width``, ``seed``, ``scale_exponent``.
    """

    denoised: object
    phase: object
    noise_sigma: np.ndarray
    rank: np.ndarray
    details: dict = field(default_factory=dict)


def nordic(magnitude, phase=None, options: NordicOptions | None = None, *, noise_sigma=None, gfactor=None, seed=0,
           **changes) -> NordicResult:
    """Denoise an fMRI series (magnitude, or magnitude and phase) with NORDIC.

    Parameters
    ----------
    magnitude : ndarray (X, Y, Z, T), or a list of them (echoes, same shape)
    phase : ndarray (X, Y, Z, T), or a list of them matching ``magnitude``, optional
        In radians, or in scanner units (-4096..4096, converted by ``pi / 4096``): see
        ``options.phase_units``. Given: the data are complex and the slowly varying phase is removed
        before denoising (see the module docstring).
    options : NordicOptions, optional
        The method's options; keyword ``changes`` replace single options (``nordic(m, patch_ratio=8)``).
    noise_sigma : float or ndarray (X, Y, Z), optional
        The known thermal noise standard deviation per real channel, in the input's units: one value,
        or a map (the data are divided by it before denoising and multiplied by it after, which leaves
        unit noise). Cannot be combined with ``options.noise_volumes``, which measure it.
    gfactor : ndarray (X, Y, Z), optional
        A g-factor map (unitless, positive): the data are divided by it before denoising and multiplied
        by it after; the noise level of the normalised data is measured (noise volumes or the data)
        unless ``noise_sigma`` gives it as one value.
    seed : int, optional
        Seed of the Monte-Carlo threshold.

    Returns
    -------
    NordicResult

    Raises
    ------
    UnsuitableDataError
        Fewer than ``MIN_VOLUMES`` volumes left after the noise volumes, shapes that differ, a phase
        in no known units, a noise map with values that are not positive.
    """
    options = resolve_options(NordicOptions, options, changes)
    noise_volumes = int(options.noise_volumes)
    multi = isinstance(magnitude, (list, tuple))
    magnitudes = [np.asarray(m) for m in (magnitude if multi else [magnitude])]
    if phase is None:
        phases = None
    else:
        phases = [np.asarray(p) for p in (phase if isinstance(phase, (list, tuple)) else [phase])]
    _check_inputs(magnitudes, phases, noise_volumes)
    if noise_sigma is not None and noise_volumes:
        raise ValueError("give either noise_sigma or noise_volumes (both set the noise level), not both")
    if noise_sigma is not None and np.ndim(noise_sigma) > 0 and gfactor is not None:
        raise ValueError("a noise map already holds the g-factor: give noise_sigma as one value with gfactor")
    if len(magnitudes) > 1 and not options.joint:
        parts = [
            nordic(m, None if phases is None else phases[e], options, noise_sigma=noise_sigma, gfactor=gfactor,
                   seed=seed)
            for e, m in enumerate(magnitudes)
        ]
        details = dict(parts[0].details)
        details.update(joint=False, n_echoes=len(parts))
        return NordicResult(
            denoised=[p.denoised for p in parts],
            phase=None if phases is None else [p.phase for p in parts],
            noise_sigma=np.mean([p.noise_sigma for p in parts], axis=0).astype(np.float32),
            rank=np.mean([p.rank for p in parts], axis=0).astype(np.float32),
            details=details,
        )

    units = None
    if phases is not None:
        units = phase_units_of(phases, options.phase_units)
    shape = magnitudes[0].shape[:3]
    n_total = magnitudes[0].shape[3]
    n_keep = n_total - noise_volumes

    exponent = max(power_of_two_exponent(m) for m in magnitudes)
    # the map the data are divided by (a noise map: unit noise after; a g-factor map: uniform noise)
    divisor, given_sigma = None, None
    if noise_sigma is not None and np.ndim(noise_sigma) == 0:
        given_sigma = math.ldexp(float(noise_sigma), -exponent)
        if not given_sigma > 0 or not math.isfinite(given_sigma):
            raise UnsuitableDataError("the noise level given is not a positive finite number")
    elif noise_sigma is not None:
        divisor = _checked_map(np.ldexp(np.asarray(noise_sigma, dtype=np.float64), -exponent), shape, "noise map")
        given_sigma = 1.0
    if gfactor is not None:
        divisor = _checked_map(np.asarray(gfactor, dtype=np.float64), shape, "g-factor map")

    is_complex = phases is not None
    series, background, noise = [], [], []
    for e, m in enumerate(magnitudes):
        values = np.ldexp(np.asarray(m, dtype=np.float64), -exponent)
        if is_complex:
            values = values * np.exp(1j * in_radians(phases[e], units))
            slow = slow_phase(values, options.phase_filter_width)
            values = values * np.exp(-1j * slow)
            background.append(slow[..., :n_keep])
        if divisor is not None:
            values = values / divisor[..., None]
        series.append(values[..., :n_keep])
        noise.append(values[..., n_keep:])
    data = np.concatenate(series, axis=3)
    noise_data = np.concatenate(noise, axis=3) if noise_volumes else None

    n_columns = data.shape[3]
    edges = _patch_edges(options.patch, options.patch_ratio, n_columns, shape)
    steps = _steps(options.step, edges)
    n_voxels = int(np.prod(edges))
    if min(n_voxels, n_columns) < MIN_VOLUMES:
        raise UnsuitableDataError(
            f"a {'x'.join(map(str, edges))} patch of {n_columns} volumes is too small for NORDIC "
            f"(needs at least {MIN_VOLUMES} voxels and volumes)")

    if noise_data is not None:
        source = "noise volumes"
    elif given_sigma is not None:
        source = "given"
    else:
        source = "marchenko-pastur"
    edge_value = monte_carlo_edge(n_voxels, n_columns, is_complex, seed)

    denoised, sigma_map, rank_map = _denoise_patches(
        data, noise_data, edges, steps, edge_value, is_complex, source, given_sigma)

    if divisor is not None:
        denoised = denoised * divisor[..., None]
        sigma_map = sigma_map * divisor
    outputs, out_phases = [], []
    for e in range(len(magnitudes)):
        part = denoised[..., e * n_keep:(e + 1) * n_keep]
        if is_complex:
            part = part * np.exp(1j * background[e])
            out_phases.append(np.angle(part).astype(np.float32))
            part = np.abs(part)
        else:
            part = part.real
        outputs.append(np.ldexp(part, exponent).astype(np.float32))
    details = {
        "patch": list(edges),
        "step": list(steps),
        "threshold_source": source,
        "noise_map": noise_sigma is not None and np.ndim(noise_sigma) > 0,
        "gfactor_map": gfactor is not None,
        "phase_units": units,
        "dropped_volumes": int(noise_volumes),
        "joint": bool(options.joint) if len(magnitudes) > 1 else True,
        "n_echoes": len(magnitudes),
        "complex": is_complex,
        "mc_edge": float(edge_value),
        "phase_filter_width": options.phase_filter_width,
        "seed": seed,
        "scale_exponent": int(exponent),
    }
    return NordicResult(
        denoised=outputs if multi else outputs[0],
        phase=(out_phases if multi else out_phases[0]) if is_complex else None,
        noise_sigma=np.ldexp(sigma_map, exponent).astype(np.float32),
        rank=rank_map.astype(np.float32),
        details=details,
    )


def _checked_map(values, shape, what):
    """A positive, finite (X, Y, Z) map of the image's shape, or UnsuitableDataError saying what is wrong."""
    if values.shape != tuple(shape):
        raise UnsuitableDataError(f"{what} of shape {values.shape} does not match the image {tuple(shape)}")
    if not np.all(np.isfinite(values)) or not np.all(values > 0):
        raise UnsuitableDataError(f"{what} has values that are not positive and finite")
    return values


def _check_inputs(magnitudes, phases, noise_volumes):
    if not magnitudes:
        raise UnsuitableDataError("no echo given")
    first = magnitudes[0].shape
    for m in magnitudes:
        if m.ndim != 4:
            raise UnsuitableDataError(f"NORDIC needs 4D series (X, Y, Z, T), got {m.ndim}D")
        if m.shape != first:
            raise UnsuitableDataError(f"echoes have different shapes: {first} and {m.shape}")
        if not np.all(np.isfinite(m)):
            raise UnsuitableDataError("the magnitude has NaN or infinite values")
    if phases is not None:
        if len(phases) != len(magnitudes):
            raise UnsuitableDataError(f"{len(phases)} phase series for {len(magnitudes)} magnitude series")
        for p in phases:
            if p.shape != first:
                raise UnsuitableDataError(f"phase of shape {p.shape} does not match the magnitude {first}")
            if not np.all(np.isfinite(p)):
                raise UnsuitableDataError("the phase has NaN or infinite values")
    noise_volumes = int(noise_volumes)
    if noise_volumes < 0:
        raise ValueError("noise_volumes must be 0 or more")
    if first[3] - noise_volumes < MIN_VOLUMES:
        raise UnsuitableDataError(
            f"{first[3] - noise_volumes} volumes (after {noise_volumes} noise volumes) are too few for "
            f"NORDIC (at least {MIN_VOLUMES})")


def _patch_edges(patch, ratio, n_columns, shape):
    if patch is None:
        if not ratio > 0:
            raise ValueError("patch_ratio must be positive")
        edge = 1
        while edge**3 < ratio * n_columns:
            edge += 1
        edges = (edge,) * 3
    else:
        edges = tuple(int(e) for e in np.broadcast_to(np.asarray(patch), (3,)))
        if min(edges) < 1:
            raise ValueError("patch edges must be positive")
    return tuple(min(e, s) for e, s in zip(edges, shape))


def _steps(step, edges):
    if step is None:
        return tuple(max(1, e // 2) for e in edges)
    steps = tuple(int(s) for s in np.broadcast_to(np.asarray(step), (3,)))
    if min(steps) < 1:
        raise ValueError("step must be positive")
    return steps


def _positions(size, edge, step):
    """Patch starts from 0 by ``step``, plus the last one flush with the border: all covered."""
    last = size - edge
    positions = list(range(0, last + 1, step))
    if positions[-1] != last:
        positions.append(last)
    return positions


def monte_carlo_edge(n_rows, n_columns, is_complex, seed=0, draws=MC_DRAWS) -> float:
    """Mean largest singular value of ``draws`` ``n_rows x n_columns`` matrices of Gaussian noise
    with unit standard deviation per real channel (real and imaginary parts independent where
    ``is_complex``), drawn from a generator seeded by ``seed``: the threshold of unit noise.

    Close to the Marchenko-Pastur edge ``sqrt(n_rows) + sqrt(n_columns)`` (times ``sqrt(2)`` for
    complex noise); the simulation also counts its finite-size excess, as NORDIC does."""
    generator = torch.Generator().manual_seed(int(seed))
    total = 0.0
    for _ in range(draws):
        sample = torch.randn(n_rows, n_columns, generator=generator, dtype=torch.float64)
        if is_complex:
            sample = torch.complex(sample, torch.randn(n_rows, n_columns, generator=generator, dtype=torch.float64))
        total += float(torch.linalg.matrix_norm(sample, ord=2))
    return total / draws


def _denoise_patches(data, noise_data, edges, steps, edge_value, is_complex, source, given_sigma):
    """Hard-threshold every patch's matrix and average the overlapping reconstructions."""
    shape = data.shape[:3]
    n_columns = data.shape[3]
    corners = np.stack(np.meshgrid(*[_positions(s, e, t) for s, e, t in zip(shape, edges, steps)],
                                   indexing="ij"), axis=-1).reshape(-1, 3)
    offsets = np.ravel_multi_index(np.meshgrid(*[np.arange(e) for e in edges], indexing="ij"), shape).ravel()
    n_voxels = offsets.size
    flat = torch.from_numpy(np.ascontiguousarray(data.reshape(-1, n_columns)))
    noise_flat = None if noise_data is None else torch.from_numpy(
        np.ascontiguousarray(noise_data.reshape(-1, noise_data.shape[3])))
    accumulated = torch.zeros_like(flat)
    counts = torch.zeros(flat.shape[0], dtype=torch.float64)
    sigma_sum = torch.zeros(flat.shape[0], dtype=torch.float64)
    rank_sum = torch.zeros(flat.shape[0], dtype=torch.float64)
    channels = 2.0 if is_complex else 1.0
    tall = n_columns <= n_voxels
    for start in range(0, len(corners), BATCH_PATCHES):
        batch = corners[start:start + BATCH_PATCHES]
        index = torch.from_numpy(np.ravel_multi_index(batch.T, shape)[:, None] + offsets[None, :])
        matrix = flat[index]  # (B, n_voxels, n_columns)
        gram = matrix.mH @ matrix if tall else matrix @ matrix.mH
        eigenvalues, vectors = torch.linalg.eigh(gram)  # ascending
        if source == "noise volumes":
            sigma2 = (noise_flat[index].abs() ** 2).mean(dim=(1, 2)) / 2.0
        elif source == "given":
            sigma2 = torch.full((len(batch),), float(given_sigma) ** 2, dtype=torch.float64)
        else:
            _, variance = marchenko_pastur_cutoff(eigenvalues.real, n_columns, n_voxels)
            sigma2 = variance / channels
        threshold = sigma2 * edge_value**2
        keep = eigenvalues.real > threshold[:, None]
        kept = vectors * keep[:, None, :].to(vectors.dtype)
        if tall:
            rebuilt = (matrix @ kept) @ kept.mH
        else:
            rebuilt = kept @ (kept.mH @ matrix)
        flat_index = index.reshape(-1)
        accumulated.index_add_(0, flat_index, rebuilt.reshape(-1, n_columns))
        ones = torch.ones(len(batch), n_voxels, dtype=torch.float64)
        counts.index_add_(0, flat_index, ones.reshape(-1))
        sigma_sum.index_add_(0, flat_index, (ones * torch.sqrt(sigma2)[:, None]).reshape(-1))
        rank_sum.index_add_(0, flat_index, (ones * keep.sum(dim=1)[:, None]).reshape(-1))
    accumulated /= counts[:, None].to(accumulated.dtype)
    denoised = accumulated.numpy().reshape(data.shape)
    return denoised, (sigma_sum / counts).numpy().reshape(shape), (rank_sum / counts).numpy().reshape(shape)
