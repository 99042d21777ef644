"""MP-PCA: Marchenko-Pastur principal component denoising, with noise and rank maps.

For each voxel, the voxels-by-volumes matrix of a small window around it is
decomposed; its eigenvalues that fit the Marchenko-Pastur distribution of pure
noise are discarded, their mean gives the noise variance, and the voxel is
rebuilt from the remaining (signal) components (Veraart et al. 2016). The noise
level is estimated as in MRtrix3 3.0 ``dwidenoise`` with the estimator of
Cordero-Grande et al. 2019 (``Exp2``, default) or Veraart's (``Exp1``).

Behaviour matches ``dwidenoise`` 3.0.8: the default window is the smallest odd
isotropic extent whose cube holds at least as many voxels as there are volumes
(capped at the image size); at the image border the window is shifted to stay
inside the image; only the centre voxel is reconstructed; voxels outside the
mask are zero. ``aggregate="overcomplete"`` instead reconstructs every voxel of
every window and averages them with weights ``1 / (1 + rank)``, as DIPY's
``mppca`` does, optionally on a strided grid of windows (each voxel still
covered) for speed.

Options beyond both peers (each off by default, so the default output is the one above):
``shrinkage="frobenius"`` weights the signal components by the optimal shrinker
of Gavish & Donoho for the Frobenius loss instead of keeping them whole;
``aggregate="gaussian"`` averages every window's reconstruction with Gaussian
weights centred on the window; ``noise_sigma`` takes a known noise level (a
map or one value) for the threshold instead of estimating it;
``noise_floor="koay"`` removes the Rician / noncentral-chi bias of magnitude
data after denoising (:mod:`bids_denoise.methods.noise_floor`); and
``demean="shell"`` removes each voxel's mean within each b-value shell before
the PCA and adds it back after (as MRtrix3 ``dwidenoise2 -demean shells``);
``demean="time"`` (for BOLD) removes each voxel's temporal mean and keeps the
window's average fluctuation as one component of every window, in place of the
mean component through which ``dwidenoise`` spreads each voxel's noise over its
window.

The eigenproblems are solved by a small compiled solver (``_mppca_kernel.c``,
called through ctypes) where it was built, and by ``torch.linalg.eigh``
otherwise, with the same cut-offs and the same output to rounding. The solver
needs neither the whole spectrum nor all eigenvectors: eight windows' Gram
matrices are reduced to tridiagonal form together (the lanes of one vector
register); the Marchenko-Pastur scan needs the smallest eigenvalue and the
largest ones down to the cut-off, found by Sturm-sequence bisection finished by
Newton steps, while the sums over the noise eigenvalues come from the trace;
inverse iteration gives the signal eigenvectors alone. Windows next to each
other along z share all their z-planes but one, so each plane's Gram matrix is
formed once and the window's is summed from them.

References
----------
.. [1] Veraart J., Novikov D.S., Christiaens D., Ades-aron B., Sijbers J.,
       Fieremans E. Denoising of diffusion MRI using random matrix theory.
       NeuroImage 142 (2016) 394-406.
.. [2] Cordero-Grande L., Christiaens D., Hutter J., Price A.N., Hajnal J.V.
       Complex diffusion-weighted image estimation via matrix recovery under
       general noise models. NeuroImage 200 (2019) 391-404.
.. [3] Manjon J.V. et al. Diffusion weighted image denoising using overcomplete
       local PCA. PLoS One 8 (2013) e73021.
.. [4] Gavish M., Donoho D.L. Optimal shrinkage of singular values. IEEE
       Trans Inf Theory 63 (2017) 2137-2152.
.. [5] Koay C.G., Basser P.J. Analytically exact correction scheme for signal
       extraction from noisy magnitude MR signals. J Magn Reson 179 (2006)
       317-322.
.. [6] Marchenko V.A., Pastur L.A. Distribution of eigenvalues for some sets
       of random matrices. Math USSR-Sbornik 1 (1967) 457-483.
"""

from __future__ import annotations

import gc
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from bids_denoise.methods import _mppca_solver
from bids_denoise.methods._device import resolve_device
from bids_denoise.methods.errors import UnsuitableDataError
from bids_denoise.methods.networks import power_of_two_exponent
from bids_denoise.methods.noise_floor import remove_noise_floor, variance_factor_of_mean

#: Bytes of window data handled per batch (per worker thread).
BATCH_BYTES = 16 * 2**20
#: The fewest windows per batch (a multiple of the compiled solver's 8 lanes): larger batches share more
#: z-planes' Gram matrices, smaller ones hold less memory (64x64x32, 200 volumes, one thread: 64 took
#: 99 s and 2.4x the series in extra peak memory, 32 took 109 s and 2.1x, 16 took 137 s and 1.8x).
BATCH_MIN = 32

#: Fewest eigenvalues a window matrix must have (min(voxels, volumes)) for a Marchenko-Pastur
#: estimate: see :func:`_check_window_holds_estimate`.
MIN_EIGENVALUES = 4

#: Standard deviation of the Gaussian aggregation weights, as a fraction of the window's extent along
#: each axis (``aggregate="gaussian"``): 0.25 of a 5-voxel window is 1.25 voxels, so the window's
#: corners weigh 2% of its centre.
GAUSSIAN_WIDTH = 0.25

#: Fixed-point iterations of Koay & Basser's correction of an estimated noise map
#: (``noise_floor="koay"``): two or three bring the brain's sigma to its limit on the phantom.
KOAY_ITERATIONS = 3

SHRINKAGES = ("hard", "frobenius")
AGGREGATES = ("centre", "overcomplete", "gaussian")
NOISE_FLOORS = ("none", "koay")


@dataclass
class MPPCAResult:
    """Output of :func:`mppca`.

    Attributes
    ----------
    denoised : ndarray, shape (X, Y, Z, V)
    noise_sigma : ndarray, shape (X, Y, Z)
        Estimated noise standard deviation per voxel (0 where no noise
        component was found, and outside the mask). With ``noise_floor="koay"`` and the noise
        estimated: the Gaussian noise level after Koay & Basser's correction (see :func:`mppca`).
        With ``noise_sigma`` given: that noise level (broadcast to the image, 0 outside the mask).
    rank : ndarray, shape (X, Y, Z)
        Number of signal components kept (float for overcomplete and Gaussian averaging). With
        ``shrinkage="frobenius"``: the components whose shrunk weight is above zero.
    extent : tuple of int
        The window used.
    solver : str
        ``"tridiagonal"`` (the compiled solver) or ``"eigh"``: the one that ran.
    parameters : dict
        Every option that shapes the output, as resolved (for provenance): ``estimator``,
        ``aggregate``, ``stride`` (list), ``demean`` (False, True or ``"shell"``), ``shrinkage``,
        ``gaussian_width`` (None unless Gaussian aggregation), ``rank_weighting`` (None for
        ``aggregate="centre"``), ``noise_source`` (``"estimated"`` or ``"given"``),
        ``noise_floor``, ``n_coils`` (None unless the noise floor is removed), ``shells`` (the
        number of b-value shells demeaned, None unless ``demean="shell"``), ``precision``, ``solver``.
    """

    denoised: np.ndarray
    noise_sigma: np.ndarray
    rank: np.ndarray
    extent: tuple
    solver: str = "eigh"
    parameters: dict = field(default_factory=dict)


def kernel_available() -> bool:
    """Whether the compiled window solver can be used (built, and not disabled by
    ``BIDS_DENOISE_DISABLE_KERNEL``): ``solver="auto"`` then uses it on the CPU."""
    return _mppca_solver.available()


def default_extent(n_volumes: int, shape) -> tuple:
    """MRtrix3's default window: smallest odd e with e**3 >= n_volumes, capped by the image."""
    edge = 1
    while edge**3 < n_volumes:
        edge += 2
    return tuple(min(edge, _largest_odd(size)) for size in shape)


def _largest_odd(size: int) -> int:
    return size if size % 2 else size - 1


def mppca(
    data,
    *,
    mask=None,
    extent=None,
    estimator="Exp2",
    aggregate="centre",
    stride=1,
    device="cpu",
    precision="float64",
    demean=False,
    solver="auto",
    out_dtype=np.float32,
    shrinkage="hard",
    gaussian_width=GAUSSIAN_WIDTH,
    rank_weighting=None,
    noise_sigma=None,
    noise_floor="none",
    n_coils=1,
    bvals=None,
    phase=None,
    phase_filter_width=10.0,
    phase_units="auto",
    _time_groups=None,
):
    """Denoise a 4D series with MP-PCA.

    Parameters
    ----------
    data : ndarray, shape (X, Y, Z, V)
    mask : ndarray of bool, shape (X, Y, Z), optional
        Voxels to denoise; the output is zero elsewhere (as ``dwidenoise``).
    extent : int or sequence of 3 odd int, optional
        Window size; default as ``dwidenoise`` (see :func:`default_extent`).
    estimator : {"Exp2", "Exp1"}, optional
        Noise estimator: Cordero-Grande (``Exp2``, default) or Veraart 2016. Unused where
        ``noise_sigma`` is given.
    aggregate : {"centre", "overcomplete", "gaussian"}, optional
        Rebuild the centre voxel of each voxel's window (``dwidenoise``, default); or every voxel of
        every window, averaged with weights 1/(1 + rank) (``overcomplete``, DIPY); or every voxel of
        every window averaged with Gaussian weights centred on the window's centre (``gaussian``,
        standard deviation ``gaussian_width`` times the extent along each axis), times 1/(1 + rank)
        where ``rank_weighting`` is on.
    stride : int or sequence of 3 int, optional
        Step between window positions for ``aggregate="overcomplete"`` or ``"gaussian"``, one for
        all axes or one per axis (default 1, every position). Larger steps are faster; every voxel
        is still covered.
    device : str, optional
        ``cpu`` (default), ``cuda``, ``cuda:N`` or ``auto``. On the CPU, batches
        of windows run on ``torch.get_num_threads()`` threads. The cost is one
        eigendecomposition of a small Gram matrix per window; torch's batched
        CUDA ``eigh`` did about 1,000 68x68 matrices a second on an H100 (a
        measurement reported to this project), fewer than one CPU core does, so
        the app runs MP-PCA on the CPU.
    precision : {"float64", "float32"}, optional
        Arithmetic of the eigendecompositions (default float64; ``dwidenoise``
        uses float32, whose rounding flips borderline noise/signal decisions).
    demean : {False, True, "shell", "time"}, optional
        ``True``: subtract each window's mean over its voxels before the PCA and add it back after
        (as DIPY's ``mppca``). ``"shell"``: subtract each voxel's mean over the volumes of each
        b-value shell (b0s one shell; ``bvals`` needed, shells as
        :func:`bids_denoise.methods.shells.cluster_shells`) before the PCA, as MRtrix3
        ``dwidenoise2 -demean shells``: the PCA then sees the ``V - S`` dimensions orthogonal to the
        ``S`` shell means (an orthonormal Helmert basis within each shell, so the noise stays white
        and the Marchenko-Pastur law applies with ``V - S`` volumes; no window demeaning). Unlike
        ``dwidenoise2``, the shell means added back are not the noisy ones (their noise,
        sigma / sqrt(volumes in the shell), would go back into every volume unfiltered, which cost
        more than the demeaning gained on the phantom) but those of a first pass over the whole
        series with the same options and window demeaning: two passes, about twice the time. A
        volume alone in its shell is its first-pass value. The noise and rank maps are the second
        pass's (the rank counts residual components, not the shell means). ``False`` (default):
        no demeaning, as ``dwidenoise``.
        ``"time"`` (BOLD): subtract each voxel's temporal mean (an orthonormal Helmert basis of the
        volume axis, as ``"shell"`` with one shell: the PCA sees ``V - 1`` volumes of white noise) and
        add the measured mean back after; in each window, besides the components above the
        Marchenko-Pastur edge, keep one more: the window's average fluctuation (each window voxel's
        series weighted by its temporal mean, the part outside the signal components). Without the
        demeaning, the largest component of a BOLD window is its mean image, and the centre voxel's
        share of it carries every window voxel's noise (about ``1 / n`` of each, ``n`` voxels): it is
        most of what ``dwidenoise`` leaks into neighbours. Its temporal part, the window's average
        fluctuation, is what keeps slow physiology and task signal that lie below the noise edge of a
        window; ``"time"`` keeps that course but fits each voxel's own amplitude on it. Measured on
        the BOLD phantom (``benchmarks/bold.py``): less neighbour leak and more physiology kept than
        ``dwidenoise`` at both noise levels. The rank map counts that course as a component, as
        ``dwidenoise``'s counts the mean.
    solver : {"auto", "tridiagonal", "eigh"}, optional
        How each window's Gram matrix is decomposed. ``tridiagonal``: the
        compiled solver of this package (Householder tridiagonalisation; by
        bisection only the eigenvalues the cut-off needs, the noise sums from
        the trace; inverse iteration for the signal eigenvectors only), float64
        on the CPU. ``eigh``: a full ``torch.linalg.eigh``. ``auto`` (default)
        takes ``tridiagonal`` where it applies (CPU, float64, extension built)
        and ``eigh`` otherwise. Both give the same cut-offs and the same signal
        subspaces to rounding, with ``noise_sigma`` too (the solver's
        ``mppca_signal_subspace_known``; an extension built before it makes
        ``auto`` fall back to ``eigh``). With ``shrinkage="frobenius"`` the
        compiled solver's signal eigenvalues are the Rayleigh quotients of its
        eigenvectors (equal to the eigenvalues to rounding).
    out_dtype : dtype, optional
    shrinkage : {"hard", "frobenius"}, optional
        ``hard`` (default): keep the signal components whole and drop the others (the
        Marchenko-Pastur cut, as ``dwidenoise`` and DIPY). ``frobenius``: weight each signal
        component by the optimal shrinker of Gavish & Donoho (2017) for the Frobenius loss,
        ``eta(y) = sqrt((y^2 - beta - 1)^2 - 4 beta) / y`` for ``y >= 1 + sqrt(beta)`` and 0 below,
        where ``y`` is the component's singular value over ``sigma sqrt(q)``, ``beta = r / q`` the
        window matrix's aspect ratio (``r`` the smaller and ``q`` the larger dimension, one less
        on the voxel side where windows are demeaned) and ``sigma`` the window's noise level
        (Marchenko-Pastur estimate, or ``noise_sigma``). See :func:`frobenius_shrinkage`.
    gaussian_width : float, optional
        Standard deviation of the Gaussian aggregation weights as a fraction of the extent along
        each axis (default ``GAUSSIAN_WIDTH`` = 0.25); used by ``aggregate="gaussian"`` only.
    rank_weighting : bool, optional
        Whether the window weights of overcomplete or Gaussian aggregation include 1/(1 + rank)
        (Manjon et al. 2013), the rank being the window's count of kept components. Default (None):
        on (DIPY's weights; with Gaussian weights too, where it measured slightly better on the
        phantom of ``benchmarks/mppca_quality.py``). Unused for ``aggregate="centre"``.
    noise_sigma : float or ndarray of shape (X, Y, Z), optional
        A known noise standard deviation (per real channel, the Gaussian sigma of magnitude data),
        one value or a map, in the units of ``data``: it fixes the threshold instead of the
        Marchenko-Pastur fit. A window's noise variance is the mean of ``noise_sigma**2`` over its
        voxels; scanning its Gram eigenvalues ``lambda_1 >= lambda_2 >= ...`` from the largest,
        component ``i`` is signal while ``lambda_i > sigma^2 (sqrt(q - i + 1) + sqrt(r - i + 1))^2``,
        the upper edge of the Marchenko-Pastur law of the ``(q - i + 1) x (r - i + 1)`` noise matrix
        left once the larger components are taken out (the dimension reduction of Cordero-Grande et
        al. 2019; for ``i = 1`` the classic edge ``sigma^2 q (1 + sqrt(r / q))^2``). The noise map
        returned is then ``noise_sigma`` itself. Default None: estimated, as ``dwidenoise``.
    noise_floor : {"none", "koay"}, optional
        ``koay``: after denoising, replace every value by the underlying signal whose
        noncentral-chi mean (2 ``n_coils`` degrees of freedom; Rician for one coil) it is, given the
        Gaussian noise level: removes the noise floor that magnitude data keep where the signal is
        low (Koay & Basser 2006; :func:`bids_denoise.methods.noise_floor.remove_noise_floor`).
        Values at or below the floor become 0; voxels whose noise level is 0 are left as they are.
        The noise level is ``noise_sigma`` where given; otherwise the Marchenko-Pastur map, which
        measures the spread of the magnitudes and so underestimates the Gaussian sigma where the
        signal is low, corrected by Koay & Basser's factor ``xi`` (``KOAY_ITERATIONS`` fixed-point
        iterations, ``xi`` averaged over each voxel's volumes and window): the noise map returned
        is then that corrected one. ``none`` (default): no correction, as ``dwidenoise`` and DIPY.
    n_coils : int, optional
        Receiver coils combined by root-sum-of-squares, for ``noise_floor="koay"`` (default 1,
        Rician; ``N`` gives a noncentral chi distribution with ``2N`` degrees of freedom). For
        SENSE/GRAPPA reconstructions with one effective channel, 1.
    bvals : array-like of shape (V,), optional
        b-values of the volumes, needed by ``demean="shell"`` and used by nothing else.
    phase : ndarray, shape (X, Y, Z, V), optional
        The phase of a complex series (``data`` its magnitude), in radians or scanner units
        (-4096..4096; see :func:`bids_denoise.methods.phase.phase_units`). Given: each volume's slowly
        varying phase is removed (:func:`bids_denoise.methods.phase.demodulate`, k-space window power
        ``phase_filter_width``), the real and imaginary parts, whose noise is Gaussian with no
        floor, are denoised side by side as one real series of ``2 V`` volumes with the options
        above, and the magnitude of the denoised complex values returned: the noise floor is
        removed at its source (its noise is removed before the magnitude is taken), so
        ``noise_floor`` must be ``"none"``. The demodulation leaves the signal nearly real, so it
        needs few components; what the phase estimate misses stays in the imaginary part and is
        kept (taking the real part alone, as Eichner et al. 2015, lost it on the phantoms where the
        phase varies within a few voxels). The noise map is the Gaussian sigma of each channel.
    phase_filter_width, phase_units :
        See ``phase``.

    Returns
    -------
    MPPCAResult

    Raises
    ------
    UnsuitableDataError
        Not a 4D series; fewer than ``MIN_EIGENVALUES`` (4) volumes; an image so small that the
        largest window it allows has fewer than 4 voxels (1x1x1 for a 2x2x2 image, the extents
        being odd), so that each window would have fewer than 4 eigenvalues and MP-PCA would
        return zeros or noise (see :func:`_check_window_holds_estimate`); or an ``extent``
        larger than the image; or an empty mask; or, with ``demean="shell"``, fewer than 4 volumes
        left once the shell means are taken out. A given ``extent`` of fewer than 4 voxels is a
        ``ValueError``, as are options out of range, a ``noise_sigma`` of the wrong shape or with
        negative or non-finite values, and ``demean="shell"`` without ``bvals`` of length V.

    Notes
    -----
    Scale-invariant: ``mppca(c * x)`` is ``c * mppca(x)`` (the noise map too) to rounding for any
    ``c`` (``noise_sigma``, if given, scaled by ``c`` as well). Data whose largest magnitude is
    outside [1e-6, 1e6] are divided by a power of two first and multiplied back after, which is
    exact; other data are computed on as given, so their output is unchanged to the bit.
    Deterministic: the same input and options give the same output to the bit, on any number of
    threads.
    """
    if phase is not None:
        return _complex_mppca(data, phase, phase_filter_width, phase_units, mask=mask, extent=extent,
                              estimator=estimator, aggregate=aggregate, stride=stride, device=device,
                              precision=precision, demean=demean, solver=solver, out_dtype=out_dtype,
                              shrinkage=shrinkage, gaussian_width=gaussian_width, rank_weighting=rank_weighting,
                              noise_sigma=noise_sigma, noise_floor=noise_floor, n_coils=n_coils, bvals=bvals)
    data = _check_series(data)
    if estimator not in ("Exp1", "Exp2"):
        raise ValueError(f"estimator must be 'Exp1' or 'Exp2', not {estimator!r}")
    if aggregate not in AGGREGATES:
        raise ValueError(f"aggregate must be one of {AGGREGATES}, not {aggregate!r}")
    if precision not in ("float64", "float32"):
        raise ValueError(f"precision must be 'float64' or 'float32', not {precision!r}")
    if shrinkage not in SHRINKAGES:
        raise ValueError(f"shrinkage must be one of {SHRINKAGES}, not {shrinkage!r}")
    if noise_floor not in NOISE_FLOORS:
        raise ValueError(f"noise_floor must be one of {NOISE_FLOORS}, not {noise_floor!r}")
    if isinstance(demean, str) and demean not in ("shell", "time"):
        raise ValueError(f"demean must be False, True, 'shell' or 'time', not {demean!r}")
    window_demean = not isinstance(demean, str) and bool(demean)
    if isinstance(n_coils, (bool, np.bool_)) or int(n_coils) != n_coils or n_coils < 1:
        raise ValueError(f"n_coils must be an integer >= 1, got {n_coils!r}")
    if aggregate == "gaussian" and not (np.isfinite(gaussian_width) and gaussian_width > 0):
        raise ValueError(f"gaussian_width must be a positive number, got {gaussian_width!r}")
    if rank_weighting is None:
        rank_weighting = True
    stride = tuple(int(step) for step in np.atleast_1d(stride))
    stride = stride * 3 if len(stride) == 1 else stride
    if len(stride) != 3 or min(stride) < 1:
        raise ValueError(f"stride must be one or three integers >= 1, got {stride}")
    shape = data.shape[:3]
    given = extent is not None
    shell_basis = None
    if demean == "shell":
        shell_basis = _ShellBasis.from_bvals(bvals, data.shape[3])
    elif demean == "time":  # one group (a magnitude series) or one per part (real, imaginary)
        groups = np.zeros(data.shape[3], dtype=int) if _time_groups is None else np.asarray(_time_groups)
        shell_basis = _ShellBasis(groups, mode="time")
    extent = _check_extent(extent, data.shape[3], shape)
    _check_window_holds_estimate(extent, data.shape, given)
    if shell_basis is not None:
        shell_basis.check_enough_volumes()
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != shape:
            raise ValueError(f"mask shape {mask.shape} does not match image shape {shape}")
        if not mask.any():  # the output would be all zeros
            raise UnsuitableDataError("MP-PCA: the mask is empty, no voxel to denoise")
    sigma_map = None if noise_sigma is None else _check_noise_sigma(noise_sigma, shape)
    device = resolve_device(device)
    dtype = {"float64": torch.float64, "float32": torch.float32}[precision]
    use_kernel = _use_compiled_solver(solver, device, dtype)
    if use_kernel and sigma_map is not None and not _mppca_solver.known_available():
        if solver == "tridiagonal":
            raise ValueError("solver='tridiagonal' with noise_sigma needs the compiled solver's "
                             "mppca_signal_subspace_known (rebuild the extension), or use solver='eigh'")
        use_kernel = False
    exponent = power_of_two_exponent(data)
    if exponent:
        data = np.ldexp(data, -exponent)  # exact: the same digits at any scale
        if sigma_map is not None:
            sigma_map = np.ldexp(sigma_map, -exponent)
    noise_variance = None if sigma_map is None else sigma_map.astype(np.float64) ** 2
    spatial = _gaussian_weights(extent, gaussian_width) if aggregate == "gaussian" else None

    def denoise(series, demean_windows, course_weights=None, out_volumes=None):
        windows = _WindowSolver(
            np.ascontiguousarray(series), extent, estimator == "Exp1", device, dtype, out_dtype,
            demean_windows, use_kernel, shrinkage=shrinkage, noise_variance=noise_variance,
            course_weights=course_weights,
        )
        if aggregate == "centre":
            return windows.centre_voxels(mask, out_volumes)
        return windows.overcomplete(mask, stride, spatial=spatial, rank_weighting=rank_weighting)

    if shell_basis is None:
        denoised, sigma, rank = denoise(data, window_demean)
    elif demean == "time":
        # the measured temporal means (their noise, sigma / sqrt(V), stays in its voxel); the window
        # weights of the average course are the voxels' overall means
        means = shell_basis.shell_means(data)
        residual = shell_basis.residual(data)
        n_volumes = data.shape[3]
        data = None  # not needed again: a converted copy goes now
        in_place = aggregate == "centre"  # the series rebuilt in the output's own memory
        denoised, sigma, rank = denoise(residual, False, course_weights=means.mean(axis=3),
                                        out_volumes=n_volumes if in_place else None)
        del residual
        if in_place:
            shell_basis.restore_in_place(denoised, means)
        else:
            denoised = shell_basis.restore(denoised, means, out_dtype)
        if mask is not None:
            denoised[~mask] = 0
    else:
        # the shell means of a first pass on the whole series (window means removed), then the PCA of
        # the residual: adding back the raw shell means would put their noise back unfiltered
        first, _, _ = denoise(data, True)
        shell_means = shell_basis.shell_means(first)
        del first
        denoised, sigma, rank = denoise(shell_basis.residual(data), False)
        denoised = shell_basis.restore(denoised, shell_means, out_dtype)
        if mask is not None:
            denoised[~mask] = 0
    if sigma_map is not None:
        sigma = np.broadcast_to(sigma_map, shape).astype(np.float32)
        if mask is not None:
            sigma[~mask] = 0
    if exponent:
        denoised, sigma = np.ldexp(denoised, exponent), np.ldexp(sigma, exponent)
    if noise_floor == "koay":
        if sigma_map is None:  # MP-PCA measured the spread of magnitudes: Koay & Basser's factor
            sigma = _gaussian_noise_level(denoised, sigma, extent, n_coils)
        _remove_floor_in_place(denoised, sigma, n_coils)
    solver_used = "tridiagonal" if use_kernel else "eigh"
    parameters = {
        "estimator": None if sigma_map is not None else estimator,
        "aggregate": aggregate,
        "stride": list(stride) if aggregate != "centre" else None,
        "demean": demean if shell_basis is not None else window_demean,
        "shrinkage": shrinkage,
        "gaussian_width": float(gaussian_width) if aggregate == "gaussian" else None,
        "rank_weighting": bool(rank_weighting) if aggregate != "centre" else None,
        "noise_source": "given" if sigma_map is not None else "estimated",
        "noise_floor": noise_floor,
        "n_coils": int(n_coils) if noise_floor != "none" else None,
        "shells": shell_basis.n_shells if demean == "shell" else None,
        "precision": precision,
        "solver": solver_used,
        "complex": False,
    }
    return MPPCAResult(
        denoised=denoised,
        noise_sigma=sigma,
        rank=rank,
        extent=extent,
        solver=solver_used,
        parameters=parameters,
    )


def _complex_mppca(magnitude, phase, phase_filter_width, phase_units, **options):
    """MP-PCA of a phase-demodulated complex series: its real and imaginary parts side by side as the
    volumes of one real series (each with Gaussian noise of the receiver's sigma, no floor), the
    magnitude of the denoised complex values returned."""
    from bids_denoise.methods.phase import demodulate

    if options["noise_floor"] != "none":
        raise ValueError("a complex series has no noise floor to remove: give noise_floor='none' with a phase")
    magnitude = _check_series(magnitude)
    values, _, units = demodulate(magnitude, phase, width=phase_filter_width, units=phase_units)
    dtype = np.float64 if magnitude.dtype == np.float64 else np.float32
    stacked = np.concatenate([values.real, values.imag], axis=3).astype(dtype)
    del values
    if options.get("bvals") is not None:
        options["bvals"] = np.concatenate([np.asarray(options["bvals"])] * 2)
    if options.get("demean") == "time":  # the real and the imaginary part each have their own mean
        options["_time_groups"] = np.repeat([0, 1], magnitude.shape[3])
    result = mppca(stacked, **options)
    n_volumes = magnitude.shape[3]
    result.denoised = np.hypot(result.denoised[..., :n_volumes], result.denoised[..., n_volumes:])
    result.parameters.update(complex=True, phase_units=units, phase_filter_width=float(phase_filter_width))
    return result


def _slabs(shape, nbytes):
    """Slices along x whose float64 copies of a (X, Y, Z, V) array take at most a sixteenth of
    ``nbytes`` (the series' size) and 16 MiB: the temporaries of slab-wise passes stay a fraction of
    the input whatever its size."""
    per_x = max(1, int(np.prod(shape[1:])) * 8)
    step = max(1, min(16 * 2**20, nbytes // 16) // per_x)
    return [slice(start, start + step) for start in range(0, shape[0], step)]


def _remove_floor_in_place(denoised, sigma, n_coils):
    """:func:`remove_noise_floor` over slabs along x (its float64 temporaries stay small)."""
    for part in _slabs(denoised.shape, denoised.nbytes):
        denoised[part] = remove_noise_floor(denoised[part], sigma[part], n_coils, out_dtype=denoised.dtype)


def _gaussian_noise_level(denoised, magnitude_sigma, extent, n_coils, iterations=KOAY_ITERATIONS):
    """The Gaussian noise level behind a noise map measured on magnitude data.

    MP-PCA's estimate is the spread of the magnitudes in the window, ``sigma^2 * mean(xi(theta))``
    with ``xi`` Koay & Basser's correction factor (:func:`noise_floor.variance_factor`; below 1 where
    the signal is low: 0.43 for pure Rician noise). Fixed-point iteration from ``sigma =
    magnitude_sigma``: the signal ``A`` of every value given ``sigma`` (floor removed), ``xi`` of
    ``A / sigma`` averaged over each voxel's volumes and then over the (border-shifted) window
    centred on it, ``sigma = magnitude_sigma / sqrt(mean xi)``. Voxels whose map is 0 stay 0 (and are
    left out of the window averages).
    """
    measured = np.asarray(magnitude_sigma, dtype=np.float64)
    valid = measured > 0
    count = _centred_window_means(valid.astype(np.float64), extent)
    sigma = measured.copy()
    slabs = _slabs(denoised.shape, denoised.nbytes)
    for _ in range(iterations):
        xi = np.ones(measured.shape)
        for part in slabs:
            safe = np.where(valid[part], sigma[part], 1.0)[..., None]
            xi[part] = variance_factor_of_mean(denoised[part] / safe, n_coils).mean(axis=-1)
        average = _centred_window_means(np.where(valid, xi, 0.0), extent) / np.maximum(count, 1e-12)
        sigma = np.where(valid, measured / np.sqrt(np.clip(average, 1e-3, 1.0)), 0.0)
    return sigma.astype(np.float32)


def _centred_window_means(values, extent) -> np.ndarray:
    """Mean of a (X, Y, Z) map over each voxel's window (centred, shifted inside at the border)."""
    means = _window_means(values, extent)
    index = [
        np.clip(np.arange(size) - edge // 2, 0, size - edge) for size, edge in zip(values.shape, extent)
    ]
    return means[np.ix_(*index)]


def _check_noise_sigma(noise_sigma, shape) -> np.ndarray:
    """A given noise level as a float64 (X, Y, Z) map (a scalar broadcast), checked."""
    sigma = np.asarray(noise_sigma, dtype=np.float64)
    if sigma.ndim == 0:
        sigma = np.full(shape, float(sigma))
    elif sigma.shape != tuple(shape):
        raise ValueError(f"noise_sigma must be one value or a map of the image's shape {tuple(shape)}, "
                         f"got shape {sigma.shape}")
    if not np.all(np.isfinite(sigma)) or np.any(sigma < 0):
        raise ValueError("noise_sigma must be finite and >= 0 everywhere")
    return sigma


def _gaussian_weights(extent, width) -> np.ndarray:
    """Weights of a window's voxels (in the window's x, y, z order) for Gaussian aggregation: 1 at the
    window's centre, ``exp(-d^2 / 2 s^2)`` per axis with ``s = width * extent``."""
    axes = []
    for edge in extent:
        offset = np.arange(edge) - (edge - 1) / 2.0
        axes.append(np.exp(-0.5 * (offset / (width * edge)) ** 2))
    return np.einsum("i,j,k->ijk", *axes).ravel()


class _ShellBasis:
    """Per-voxel, per-shell demeaning as an orthonormal change of basis of the volume axis.

    With ``S`` shells, the volume space splits into the ``S`` shell-mean directions (each shell's
    indicator) and their ``V - S``-dimensional complement, spanned by Helmert contrasts within each
    shell (orthonormal, exact, no decomposition involved). A voxel's series ``x`` is its shell means
    plus ``(x Q) Q'``; the PCA runs on ``x Q`` (``V - S`` columns), whose noise is as white as
    ``x``'s, and the means are added back after.
    """

    def __init__(self, labels, mode="shell"):
        self.labels = labels
        self.mode = mode  # "shell" (b-value shells) or "time" (one group, or real and imaginary parts)
        columns = []
        for label in np.unique(labels):
            members = np.flatnonzero(labels == label)
            for j in range(1, members.size):
                column = np.zeros(labels.size)
                column[members[:j]] = 1.0
                column[members[j]] = -float(j)
                columns.append(column / np.sqrt(j * (j + 1.0)))
        self.n_shells = int(np.unique(labels).size)
        self.basis = np.stack(columns, axis=1) if columns else np.zeros((labels.size, 0))

    @classmethod
    def from_bvals(cls, bvals, n_volumes):
        from bids_denoise.methods.shells import cluster_shells

        if bvals is None:
            raise ValueError("demean='shell' needs the b-values (bvals)")
        bvals = np.asarray(bvals, dtype=np.float64).ravel()
        if bvals.size != n_volumes or not np.all(np.isfinite(bvals)):
            raise ValueError(f"bvals must hold one finite b-value per volume ({n_volumes}), got {bvals.size}")
        return cls(cluster_shells(bvals))

    def check_enough_volumes(self):
        if self.basis.shape[1] < MIN_EIGENVALUES:
            raise UnsuitableDataError(
                f"MP-PCA with demean={self.mode!r}: {self.labels.size} volumes in {self.n_shells} "
                f"{'shells' if self.mode == 'shell' else 'group(s)'} leave "
                f"{self.basis.shape[1]} dimensions once their means are removed, fewer than "
                f"{MIN_EIGENVALUES}"
            )

    def residual(self, data):
        """``x Q`` for every voxel: (X, Y, Z, V - S), in the data's dtype."""
        out = np.empty(data.shape[:3] + (self.basis.shape[1],), dtype=data.dtype)
        for part in _slabs(data.shape, data.nbytes):
            out[part] = data[part].astype(np.float64) @ self.basis
        return out

    def shell_means(self, data):
        """Each voxel's mean over the volumes of each shell: (X, Y, Z, S), float64."""
        members = np.stack([self.labels == label for label in np.unique(self.labels)], axis=1).astype(np.float64)
        weights = members / members.sum(axis=0)
        out = np.empty(data.shape[:3] + (self.n_shells,))
        for part in _slabs(data.shape, data.nbytes):
            out[part] = data[part].astype(np.float64) @ weights
        return out

    def restore_in_place(self, series, shell_means):
        """As :meth:`restore` where ``series`` (X, Y, Z, V) holds the residual in its first ``V - S``
        volumes: the full series is written over it, slab by slab."""
        kept = self.basis.shape[1]
        for part in _slabs(series.shape, series.nbytes):
            series[part] = self._restored(series[part][..., :kept], shell_means[part])

    def restore(self, residual, shell_means, out_dtype):
        """``shell_means`` (X, Y, Z, S) spread over their volumes plus the residual mapped back: (X, Y, Z, V)."""
        out = np.empty(residual.shape[:3] + (self.labels.size,), dtype=out_dtype)
        for part in _slabs(out.shape, out.nbytes):
            out[part] = self._restored(residual[part], shell_means[part])
        return out

    def _restored(self, residual, shell_means):
        """One slab's series, float64: its shell means over their volumes plus its residual mapped back."""
        shells = np.searchsorted(np.unique(self.labels), self.labels)
        return shell_means[..., shells] + residual.astype(np.float64) @ self.basis.T


def _check_series(data) -> np.ndarray:
    """The series as float32 or float64; UnsuitableDataError where it is no 4D series of enough volumes."""
    data = np.asarray(data)
    if data.ndim != 4:
        raise UnsuitableDataError(f"MP-PCA needs a 4D series, got an image of shape {data.shape}")
    if data.shape[3] < MIN_EIGENVALUES:
        raise UnsuitableDataError(
            f"MP-PCA needs at least {MIN_EIGENVALUES} volumes (one eigenvalue each for the "
            f"Marchenko-Pastur noise estimate), got {data.shape[3]}"
        )
    if data.dtype not in (np.float32, np.float64):
        data = data.astype(np.float32)
    return data


def _check_window_holds_estimate(extent, data_shape, given):
    """Refuse a window whose matrix has fewer than MIN_EIGENVALUES eigenvalues.

    A window of n voxels and V volumes has min(n, V) eigenvalues. The cut-off counts the
    smallest as noise whatever it is, so a one-voxel window is all noise and its voxel is
    rebuilt as zero; with two or three the noise level is the mean of one or two eigenvalues,
    no fit of a distribution. Where the image caps the default window (a 2x2x2 image allows
    only 1x1x1: odd extents within the image), MP-PCA would return zeros or noise dressed up as
    a denoised series: it raises UnsuitableDataError instead (ValueError for a given extent
    that is too small for any image).
    """
    n_voxels = int(np.prod(extent))
    if min(n_voxels, data_shape[3]) >= MIN_EIGENVALUES:
        return
    window = "x".join(str(edge) for edge in extent)
    holds = f"{window} ({n_voxels} voxel{'s' if n_voxels > 1 else ''})"
    needs = f"the Marchenko-Pastur noise estimate needs at least {MIN_EIGENVALUES} eigenvalues per window"
    if given:
        raise ValueError(f"MP-PCA extent {holds} is too small: {needs}")
    image = "x".join(str(size) for size in data_shape[:3])
    raise UnsuitableDataError(
        f"the image ({image} voxels) is smaller than the MP-PCA window needs: the largest window it "
        f"allows is {holds}, and {needs}"
    )


def _use_compiled_solver(solver, device, dtype) -> bool:
    """Whether the compiled solver runs: ``tridiagonal`` or ``auto`` where it applies."""
    if solver not in ("auto", "tridiagonal", "eigh"):
        raise ValueError(f"solver must be 'auto', 'tridiagonal' or 'eigh', not {solver!r}")
    applies = device.type == "cpu" and dtype == torch.float64 and kernel_available()
    if solver == "tridiagonal" and not applies:
        reason = _mppca_solver.unavailable_reason() or "it is available"
        raise ValueError(
            "solver='tridiagonal' needs device='cpu', precision='float64' and the compiled extension "
            f"({reason}; device {device.type}, precision {str(dtype).replace('torch.', '')})"
        )
    return applies and solver != "eigh"


def _check_extent(extent, n_volumes, shape):
    if extent is None:
        return default_extent(n_volumes, shape)
    extent = tuple(int(e) for e in np.atleast_1d(extent))
    if len(extent) == 1:
        extent = extent * 3
    if len(extent) != 3:
        raise ValueError("extent must be one odd number or three")
    for edge, size in zip(extent, shape):
        if edge < 1 or edge % 2 == 0:
            raise ValueError(f"extent must be odd numbers, got {extent}")
        if edge > size:
            raise UnsuitableDataError(
                f"the MP-PCA window asked for, extent {extent}, exceeds the image size {tuple(shape)}"
            )
    return extent


def marchenko_pastur_cutoff(eigenvalues, n_volumes, n_voxels, exp1=False):
    """Number of noise components and noise variance from ascending eigenvalues.

    Parameters
    ----------
    eigenvalues : torch.Tensor, shape (B, r)
        Eigenvalues of each window's Gram matrix, ascending.
    n_volumes, n_voxels : int
        The window matrix is n_volumes x n_voxels.
    exp1 : bool
        Veraart's estimator instead of Cordero-Grande's.

    Returns
    -------
    n_noise : torch.Tensor of int64, shape (B,)
    sigma2 : torch.Tensor, shape (B,)
        0 where no noise component was found (as ``dwidenoise``).
    """
    r = eigenvalues.shape[1]
    q = max(n_volumes, n_voxels)
    lam = eigenvalues.to(torch.float64)
    # values at the rounding level of the largest eigenvalue count as zero (the compiled solver uses
    # the same rule), so rank-deficient windows do not hinge on the sign of round-off
    negligible = r * torch.finfo(torch.float64).eps * lam.abs().amax(dim=1, keepdim=True)
    lam = torch.where(lam > negligible, lam, torch.zeros_like(lam)) / q
    count = torch.arange(1, r + 1, dtype=torch.float64, device=lam.device)
    if exp1:
        gamma = count / q
    else:
        gamma = count / (q - (r - count))
    cumulative = torch.cumsum(lam, dim=1)
    sigsq1 = cumulative / count
    sigsq2 = (lam - lam[:, :1]) / (4.0 * torch.sqrt(gamma))
    is_noise = sigsq2 < sigsq1
    # the cut-off is the last p at which the noise condition holds
    last = torch.where(is_noise, count.to(torch.int64), torch.zeros_like(is_noise, dtype=torch.int64))
    n_noise = last.max(dim=1).values
    index = (n_noise - 1).clamp_min(0).unsqueeze(1)
    sigma2 = torch.where(n_noise > 0, sigsq1.gather(1, index)[:, 0], torch.zeros_like(n_noise, dtype=torch.float64))
    return n_noise, sigma2


def known_sigma_cutoff(eigenvalues, sigma2, q, r):
    """Number of noise components of each window where the noise variance is known.

    Scanning the eigenvalues from the largest, ``lambda_1 >= lambda_2 >= ...``, component ``i`` is
    signal while ``lambda_i > sigma2 * (sqrt(q - i + 1) + sqrt(r - i + 1))**2``: the upper edge of
    the Marchenko-Pastur law (Marchenko & Pastur 1967) of the noise matrix that is left,
    ``(q - i + 1) x (r - i + 1)``, once the ``i - 1`` larger components are taken out (Cordero-Grande
    et al. 2019). For ``i = 1`` this is the classic edge ``sigma2 * q * (1 + sqrt(r / q))**2``.

    Parameters
    ----------
    eigenvalues : torch.Tensor, shape (B, m)
        Eigenvalues of each window's Gram matrix (the window matrix times its transpose, not divided
        by anything), ascending; only the last ``r`` are considered (``m >= r``).
    sigma2 : torch.Tensor, shape (B,)
        Noise variance per matrix entry of each window.
    q, r : int
        The larger and the smaller dimension of the window matrix, after demeaning (one fewer voxel
        where the window mean is removed).

    Returns
    -------
    n_noise : torch.Tensor of int64, shape (B,)
        ``m - k`` with ``k`` the signal count; 0 where every component is signal (the convention of
        :func:`marchenko_pastur_cutoff`: the window is kept whole).
    """
    m = eigenvalues.shape[1]
    descending = torch.flip(eigenvalues[:, m - r :], dims=(1,)).to(torch.float64)
    i = torch.arange(r, dtype=torch.float64, device=eigenvalues.device)  # i - 1
    edge = (torch.sqrt(q - i) + torch.sqrt(r - i)) ** 2
    above = descending > sigma2.to(torch.float64)[:, None] * edge[None, :]
    k = torch.cumprod(above.to(torch.int64), dim=1).sum(dim=1)
    return torch.where(k >= m, torch.zeros_like(k), m - k)


def frobenius_shrinkage(eigenvalues, sigma2, q, r):
    """Gavish & Donoho's optimal shrinkage for the Frobenius loss, as a weight on each component.

    A window matrix ``Y = X + Z`` (``q x r`` after transposing, ``Z`` white noise of variance
    ``sigma2``) with singular values ``s_i`` (``s_i**2`` the Gram eigenvalues) is best approximated in
    Frobenius norm, asymptotically, by ``sum_i eta(y_i) sigma sqrt(q) u_i v_i'`` with
    ``y_i = s_i / (sigma sqrt(q))``, ``beta = r / q`` and

    ``eta(y) = sqrt((y**2 - beta - 1)**2 - 4 beta) / y`` for ``y >= 1 + sqrt(beta)``, 0 below

    (Gavish & Donoho 2017, eq. 7). Each component is thus kept with the weight
    ``eta(y_i) / y_i = sqrt((t - beta - 1)**2 - 4 beta) / t``, ``t = s_i**2 / (q sigma2)``, between 0
    (at the bulk edge) and 1 (far above it).

    Parameters
    ----------
    eigenvalues : torch.Tensor, shape (B, k)
        Gram eigenvalues ``s_i**2`` of the components to weigh.
    sigma2 : torch.Tensor, shape (B,)
        Noise variance per matrix entry; where it is 0 (no noise found) every weight is 1.
    q, r : int
        The larger and the smaller dimension of the window matrix.

    Returns
    -------
    torch.Tensor of float64, shape (B, k)
        Weights in [0, 1].

    References
    ----------
    Gavish M., Donoho D.L. Optimal shrinkage of singular values. IEEE Trans Inf Theory 63 (2017)
    2137-2152.
    """
    beta = r / q
    sigma2 = sigma2.to(torch.float64)[:, None]
    noisy = sigma2 > 0
    t = eigenvalues.to(torch.float64) / (q * torch.where(noisy, sigma2, torch.ones_like(sigma2)))
    above = t > (1.0 + beta**0.5) ** 2
    safe = torch.where(above, t, torch.ones_like(t))
    weight = torch.sqrt(torch.clamp((safe - beta - 1.0) ** 2 - 4.0 * beta, min=0.0)) / safe
    weight = torch.where(above, weight, torch.zeros_like(weight))
    return torch.where(noisy, weight, torch.ones_like(weight))


class _WindowSolver:
    """Window extraction, eigendecomposition and reconstruction, in batches.

    The series stays in its own dtype (float32 usually); each batch of windows
    is converted to the compute precision on its own, so memory stays near the
    input plus the output.
    """

    def __init__(self, data, extent, exp1, device, dtype, out_dtype, demean=False, use_kernel=False,
                 shrinkage="hard", noise_variance=None, course_weights=None):
        self.data = data
        self.shape = data.shape[:3]
        self.n_volumes = data.shape[3]
        self.extent = extent
        self.n_voxels = int(np.prod(extent))
        self.rank_limit = min(self.n_volumes, self.n_voxels)
        self.exp1 = exp1
        self.device = device
        self.dtype = dtype
        self.out_dtype = out_dtype
        self.demean = demean
        self.use_kernel = use_kernel
        self.shrinkage = shrinkage
        # the window matrix's dimensions for the noise model: removing the window mean leaves one
        # voxel fewer of independent noise
        rows = self.n_voxels - 1 if demean else self.n_voxels
        self.q_noise = max(rows, self.n_volumes)
        self.r_noise = min(rows, self.n_volumes)
        # a given noise variance map: its mean over each window position, (X-ex+1, Y-ey+1, Z-ez+1)
        self.window_variance = None if noise_variance is None else _window_means(noise_variance, extent)
        # the windows are rebuilt in the output's precision where the compiled solver runs (float32
        # output: float32 products, no float64 copy of the window data); eigh's path stays in the
        # compute precision throughout, as the reference
        self.rebuild_dtype = (
            torch.float32 if use_kernel and np.dtype(out_dtype) == np.float32 else dtype
        )
        self.threads = max(1, torch.get_num_threads())
        # windows[a, b, c] is the (ex, ey, ez, V) window whose corner is (a, b, c); the volumes stay
        # innermost, so gathering a window copies contiguous runs of V values
        self.windows = np.lib.stride_tricks.sliding_window_view(data, extent, axis=(0, 1, 2)).transpose(
            0, 1, 2, 4, 5, 6, 3
        )
        # demean="time": each window voxel's weight in the window's average course, (.., ex, ey, ez)
        self.course_windows = None if course_weights is None else np.lib.stride_tricks.sliding_window_view(
            np.asarray(course_weights, dtype=np.float64), extent)
        if use_kernel and self.n_volumes <= self.n_voxels:
            # (X - ex + 1, Y - ey + 1, Z, ex, ey, V): the z-planes of the windows
            self.plane_view = np.lib.stride_tricks.sliding_window_view(
                data, extent[:2], axis=(0, 1)
            ).transpose(0, 1, 2, 4, 5, 3)
        itemsize = torch.finfo(dtype).bits // 8
        bytes_per_window = itemsize * (3 * self.n_volumes * self.n_voxels + 3 * min(self.n_volumes, self.n_voxels) ** 2)
        # batches of about BATCH_BYTES, smaller for small inputs so that the buffers of all worker
        # threads stay a fraction of the input (peak memory about the input plus the output)
        budget = min(BATCH_BYTES, data.nbytes // 4)  # independent of the thread count: same sums
        self.batch = max(BATCH_MIN, budget // bytes_per_window)  # fewer, larger batches scale better on threads
        if device.type == "cuda":
            self.batch *= 16

    def _decompose(self, corners):
        """Window matrices, voxels by volumes (B, n, V); signal eigenvectors of the smaller Gram
        matrix (B, r, k), k the batch's largest signal count, zero columns where a window has
        fewer; n_noise, sigma2, the window means (B, 1, V) or None; the weight of each signal
        column (B, k) or None (hard cut: the columns kept whole); the count of kept
        components (B,); ``matrix @ signal`` (B, n, k) where it was formed, else None; and the
        window's average course (B, V), a unit vector orthogonal to the signal components (counted in
        the kept components), where the solver has course weights (``demean="time"``), else None."""
        block = self.windows[corners[:, 0], corners[:, 1], corners[:, 2]]
        matrix = torch.from_numpy(block.reshape(len(corners), self.n_voxels, self.n_volumes))
        from_planes = self.use_kernel and self.n_volumes <= self.n_voxels
        matrix = matrix.to(self.device, self.rebuild_dtype if from_planes else self.dtype)
        mean = None
        if self.demean:
            mean = matrix.mean(dim=1, keepdim=True)
            matrix.sub_(mean)  # a fresh copy: fancy indexing above never returns a view
        if from_planes:  # the window matrix is only needed to rebuild the windows
            eigenvectors, n_noise, sigma2 = self._signal_subspace_from_planes(corners)
        elif self.use_kernel:  # each window's Gram matrix is its one part
            eigenvectors, n_noise, sigma2 = self._signal_subspace(
                self._gram(matrix), None, np.arange(len(corners))[:, None], corners
            )
        elif self.window_variance is not None:
            eigenvalues, eigenvectors = torch.linalg.eigh(self._gram(matrix))
            variance = self.window_variance[corners[:, 0], corners[:, 1], corners[:, 2]]
            sigma2 = torch.from_numpy(variance).to(self.device, torch.float64)
            n_noise = known_sigma_cutoff(eigenvalues, sigma2, self.q_noise, self.r_noise)
        else:
            eigenvalues, eigenvectors = torch.linalg.eigh(self._gram(matrix))
            n_noise, sigma2 = marchenko_pastur_cutoff(
                eigenvalues, self.n_volumes, self.n_voxels, self.exp1
            )
        r = self.rank_limit
        k = max(1, r - int(n_noise.min()))  # the batch's largest signal count
        if self.use_kernel:  # signal vectors as rows, zero rows past a window's own count
            signal = eigenvectors[:, :k, :].transpose(1, 2).to(matrix.dtype)
            keep = torch.arange(k, device=self.device).unsqueeze(0) < (r - n_noise).unsqueeze(1)
        else:  # ascending columns: the signal ones are the last r - n_noise, zero the others
            keep = torch.arange(r - k, r, device=self.device).unsqueeze(0) >= n_noise.unsqueeze(1)
            signal = eigenvectors[:, :, r - k :].to(matrix.dtype) * keep.unsqueeze(1).to(matrix.dtype)
        n_signal = r - n_noise
        gain = projected = None
        if self.shrinkage == "frobenius":
            if self.use_kernel:  # Rayleigh quotients of the eigenvectors: the eigenvalues to rounding
                if self.n_volumes <= self.n_voxels:
                    projected = matrix @ signal  # (B, n, k), reused by the overcomplete rebuild
                    values = (projected.to(torch.float64) ** 2).sum(dim=1)
                else:
                    values = ((signal.transpose(1, 2) @ matrix).to(torch.float64) ** 2).sum(dim=2)
            else:
                values = eigenvalues[:, r - k :]
            gain = frobenius_shrinkage(values, sigma2, self.q_noise, self.r_noise) * keep.to(torch.float64)
            # a window without a noise component is kept whole (the compiled solver returns the
            # identity there, not eigenvectors)
            gain = torch.where((n_noise == 0)[:, None], keep.to(torch.float64), gain)
            n_signal = (gain > 0).sum(dim=1)
        course = None
        if self.course_windows is not None:
            course = self._average_course(corners, matrix, signal, n_noise)
            n_signal = n_signal + (course.abs().sum(dim=1) > 0).to(n_signal.dtype)
        return matrix, signal, n_noise, sigma2, mean, gain, n_signal, projected, course

    def _average_course(self, corners, matrix, signal, n_noise):
        """The window's average fluctuation, ``sum_j w_j y_j`` over its voxels' (demeaned) series
        ``y_j`` with weights ``w_j`` their temporal means, less its part in the span of the signal
        components, as a unit vector (B, V); zero where nothing is left (a window whose components are
        all signal spans every series of its voxels: the solvers may return any basis of it there)."""
        weights = torch.from_numpy(
            self.course_windows[corners[:, 0], corners[:, 1], corners[:, 2]].reshape(len(corners), -1)
        ).to(self.device, torch.float64)
        # the weighted sum over the window's voxels in the matrix's own precision (float32 where the
        # compiled solver rebuilds in float32: no float64 copy of the window data); the rest in float64
        course = (weights.to(matrix.dtype).unsqueeze(1) @ matrix)[:, 0, :].to(torch.float64)  # (B, V)
        if self.n_volumes <= self.n_voxels:  # signal: temporal vectors as columns (B, V, k)
            basis = signal.to(torch.float64)
        else:  # spatial vectors: their temporal counterparts, orthogonal already, normalised
            basis = (matrix.transpose(1, 2) @ signal).to(torch.float64)
            basis = basis / basis.norm(dim=1, keepdim=True).clamp_min(1e-300)
        course = course - (basis @ (basis.transpose(1, 2) @ course.unsqueeze(2)))[..., 0]
        norm = course.norm(dim=1, keepdim=True)
        scale = matrix.abs().amax(dim=(1, 2)).to(torch.float64).unsqueeze(1) * weights.abs().sum(dim=1, keepdim=True)
        # nothing left above rounding (a window of constant series): no course
        tolerance = 1e-9 if matrix.dtype == torch.float64 else 1e-5  # above the rounding of the weighted sum
        left = (norm > tolerance * scale.clamp_min(1e-300)) & (n_noise > 0).unsqueeze(1)
        course = torch.where(left, course / norm.clamp_min(1e-300), torch.zeros_like(course))
        return course.to(matrix.dtype)

    def _gram(self, matrix):
        """The smaller Gram matrix of each (B, n, V) window matrix: (B, r, r)."""
        if self.n_volumes <= self.n_voxels:
            return matrix.transpose(1, 2) @ matrix
        return matrix @ matrix.transpose(1, 2)

    def _signal_subspace_from_planes(self, corners):
        """The compiled solver on Gram matrices summed from those of the windows' z-planes.

        Windows along z share all their planes but one: each plane's (volumes x volumes) Gram
        matrix is formed once per batch and the solver adds up a window's ``ez`` of them (and
        removes the window mean from the plane sums), about ``ez`` times fewer products than one
        Gram matrix per window.
        """
        ny, nz = self.plane_view.shape[1], self.shape[2]
        depth = self.extent[2]
        ids = ((corners[:, 0] * ny + corners[:, 1]) * nz + corners[:, 2])[:, None] + np.arange(depth)
        planes, index = np.unique(ids, return_inverse=True)
        a, rest = np.divmod(planes, ny * nz)
        b, z = np.divmod(rest, nz)
        rows = torch.from_numpy(
            self.plane_view[a, b, z].reshape(len(planes), -1, self.n_volumes)
        ).to(self.device, self.dtype)
        parts = rows.transpose(1, 2) @ rows
        sums = rows.sum(dim=1) if self.demean else None
        return self._signal_subspace(parts, sums, index.reshape(len(corners), depth), corners)

    def _signal_subspace(self, parts, part_sums, part_index, corners):
        """The compiled solver (:func:`_mppca_solver.signal_subspace`, the cut-off rule of
        :func:`marchenko_pastur_cutoff`): signal eigenvectors as rows of a (B, r, r) array (only the
        first k rows are set, k the batch's largest signal count; zero rows past a window's own),
        n_noise and sigma2. Window w's Gram matrix is the sum of ``parts[part_index[w]]``, less the
        mean's outer product where ``part_sums`` is given. With a given noise map, each window's
        noise variance goes with it (the cut-off of :func:`known_sigma_cutoff`)."""
        known = None
        if self.window_variance is not None:
            known = np.ascontiguousarray(self.window_variance[corners[:, 0], corners[:, 1], corners[:, 2]])
        return _mppca_solver.signal_subspace(
            parts.contiguous(),
            None if part_sums is None else part_sums.contiguous(),
            np.ascontiguousarray(part_index, dtype=np.int64),
            n_voxels=self.n_voxels,
            q=max(self.n_volumes, self.n_voxels),
            exp1=self.exp1,
            known_sigma2=known,
            noise_shape=None if known is None else (self.q_noise, self.r_noise),
        )

    def _run_batches(self, solve, count, apply=None):
        """Run ``solve(start)`` for every batch on ``self.threads`` worker threads.

        ``apply`` receives each batch's result in batch order, in this thread,
        so overlapping accumulations add up in the same order whatever the
        thread count (bit-identical results). Each worker keeps torch at one
        intra-op thread: threading inside one small eigendecomposition costs
        more than it gains; threads across batches scale.
        """
        apply = apply or (lambda payload: None)
        starts = list(range(0, count, self.batch))
        # the batches create only short-lived tensors: cyclic garbage collection would walk the
        # interpreter's whole object graph again and again (a few % of the run)
        collecting = gc.isenabled()
        gc.disable()
        try:
            self._run_starts(solve, starts, apply)
        finally:
            if collecting:
                gc.enable()

    def _run_starts(self, solve, starts, apply):
        if self.threads <= 1 or self.device.type == "cuda":
            for start in starts:
                apply(solve(start))
            return
        previous = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with ThreadPoolExecutor(self.threads) as pool:
                pending = []
                for start in starts:
                    pending.append(pool.submit(solve, start))
                    if len(pending) > self.threads:  # bound the results held in memory
                        apply(pending.pop(0).result())
                for future in pending:
                    apply(future.result())
        finally:
            torch.set_num_threads(previous)

    def _corner_of(self, coordinates):
        half = np.array(self.extent) // 2
        upper = np.array(self.shape) - np.array(self.extent)
        return np.clip(coordinates - half, 0, upper)

    def centre_voxels(self, mask, out_volumes=None):
        """dwidenoise's mode: each voxel rebuilt from its own (border-shifted) window.

        Voxels near the border share one window (it is shifted, not padded): each
        distinct window is decomposed once.
        """
        shape, n_volumes = self.shape, self.n_volumes
        # out_volumes: room for the series the caller will rebuild in place (demean="time": one volume
        # more than the demeaned series); the denoised volumes are the first n_volumes
        denoised = np.zeros(shape + (out_volumes or n_volumes,), dtype=self.out_dtype)
        sigma = np.zeros(shape, dtype=np.float32)
        rank = np.zeros(shape, dtype=np.int16)
        targets = np.flatnonzero(mask.ravel()) if mask is not None else np.arange(np.prod(shape))
        coordinates = np.stack(np.unravel_index(targets, shape), axis=1)
        corners = self._corner_of(coordinates)
        local = coordinates - corners
        centres = (local[:, 0] * self.extent[1] + local[:, 1]) * self.extent[2] + local[:, 2]
        corner_ids, window_of_target = np.unique(
            np.ravel_multi_index(corners.T, shape), return_inverse=True
        )
        order = np.argsort(window_of_target, kind="stable")
        first_target = np.searchsorted(window_of_target[order], np.arange(corner_ids.size + 1))
        unique_corners = np.stack(np.unravel_index(corner_ids, shape), axis=1)
        r = min(n_volumes, self.n_voxels)

        def solve(start):
            stop = min(start + self.batch, corner_ids.size)
            matrix, vectors, n_noise, sigma2, mean, gain, n_signal, _, course = self._decompose(
                unique_corners[start:stop])
            batch_targets = order[first_target[start] : first_target[stop]]
            which = torch.from_numpy(window_of_target[batch_targets] - start).to(self.device)
            centre = torch.from_numpy(centres[batch_targets]).to(self.device)
            vectors_t = vectors[which]  # (T, r, k), noise columns zero
            gain_t = None if gain is None else gain[which].to(matrix.dtype)  # (T, k)
            column = matrix[which, centre, :]  # (T, V): the centre voxels' own series
            if n_volumes <= self.n_voxels:
                coefficients = (vectors_t.transpose(1, 2) @ column.unsqueeze(2))[..., 0]
                if gain_t is not None:
                    coefficients = coefficients * gain_t
                rebuilt = (vectors_t @ coefficients.unsqueeze(2))[..., 0]
            else:
                at_centre = vectors_t[torch.arange(len(which)), centre]
                if gain_t is not None:
                    at_centre = at_centre * gain_t
                weights = vectors_t @ at_centre.unsqueeze(2)
                rebuilt = (matrix[which].transpose(1, 2) @ weights)[..., 0]
            if course is not None:  # the centre voxel's own amplitude on the window's average course
                course_t = course[which]
                rebuilt = rebuilt + (column * course_t).sum(dim=1, keepdim=True) * course_t
            if mean is not None:
                rebuilt = rebuilt + mean[which, 0, :]
            # each target voxel belongs to one batch: the writes never overlap
            index = np.unravel_index(targets[batch_targets], shape)
            denoised[index + (slice(0, n_volumes),)] = rebuilt.cpu().numpy()
            sigma[index] = torch.sqrt(sigma2)[which].cpu().numpy()
            rank[index] = n_signal[which].cpu().numpy()

        self._run_batches(solve, corner_ids.size)
        return denoised, sigma, rank

    def overcomplete(self, mask, stride, spatial=None, rank_weighting=True):
        """DIPY's mode: every voxel of every window rebuilt, averaged with weights 1/(1 + rank)
        (``rank_weighting``), times ``spatial[i]`` for the window's voxel i where given (Gaussian
        aggregation)."""
        shape, n_volumes = self.shape, self.n_volumes
        positions = [
            _strided_positions(size - edge + 1, step)
            for size, edge, step in zip(shape, self.extent, stride)
        ]
        grid = np.stack(np.meshgrid(*positions, indexing="ij"), axis=-1).reshape(-1, 3)
        # linear offsets of a window's voxels from its corner, in the window's (x, y, z) order
        offsets = np.ravel_multi_index(
            np.meshgrid(*[np.arange(e) for e in self.extent], indexing="ij"), shape
        ).ravel()
        if mask is not None:
            covered = np.lib.stride_tricks.sliding_window_view(mask, self.extent).any(axis=(3, 4, 5))
            grid = grid[covered[grid[:, 0], grid[:, 1], grid[:, 2]]]
        n_total = int(np.prod(shape))
        # float32 sums of the rebuilt series (at most a few hundred terms per voxel); float64 sums
        # of the weights and of the weighted noise level and rank
        accumulated = torch.zeros(n_total, n_volumes, dtype=torch.float32, device=self.device)
        statistics = torch.zeros(n_total, 3, dtype=torch.float64, device=self.device)
        r = min(n_volumes, self.n_voxels)

        spatial_t = None if spatial is None else torch.from_numpy(np.asarray(spatial, np.float64)).to(self.device)

        def solve(start):
            corners = grid[start : start + self.batch]
            matrix, signal, n_noise, sigma2, mean, gain, n_signal, projected, course = self._decompose(corners)
            if rank_weighting:
                theta = 1.0 / (1.0 + n_signal.to(torch.float64))  # (B,)
            else:
                theta = torch.ones(len(corners), dtype=torch.float64, device=self.device)
            if gain is None:
                weighted = signal * theta[:, None, None].to(matrix.dtype)
            else:
                weighted = signal * (gain * theta[:, None])[:, None, :].to(matrix.dtype)
            # the rebuilt windows, voxels by volumes (B, n, V): rows go straight to the accumulator
            if n_volumes <= self.n_voxels:
                rebuilt = (matrix @ signal if projected is None else projected) @ weighted.transpose(1, 2)
            else:
                rebuilt = weighted @ (signal.transpose(1, 2) @ matrix)
            if course is not None:
                along = (matrix @ course.unsqueeze(2)) * theta[:, None, None].to(matrix.dtype)  # (B, n, 1)
                rebuilt.add_(along @ course.unsqueeze(1))
            if mean is not None:
                rebuilt.add_(mean * theta[:, None, None].to(matrix.dtype))
            if spatial_t is not None:
                rebuilt.mul_(spatial_t.to(rebuilt.dtype)[None, :, None])
            voxels = np.ravel_multi_index(corners.T, shape)[:, None] + offsets[None, :]
            index = torch.from_numpy(voxels.ravel()).to(self.device)
            values = rebuilt.reshape(-1, n_volumes).to(torch.float32)
            per_window = torch.stack([theta, theta * torch.sqrt(sigma2), theta * n_signal], dim=1)
            if spatial_t is None:
                return index, values, per_window.repeat_interleave(self.n_voxels, dim=0)
            return index, values, (per_window[:, None, :] * spatial_t[None, :, None]).reshape(-1, 3)

        def accumulate(payload):
            index, values, per_voxel = payload
            accumulated.index_add_(0, index, values)
            statistics.index_add_(0, index, per_voxel)

        self._run_batches(solve, len(grid), accumulate)
        safe = statistics[:, 0].clamp_min(1e-300)
        accumulated /= safe[:, None].to(torch.float32)
        denoised = accumulated.cpu().numpy().reshape(shape + (n_volumes,)).astype(self.out_dtype, copy=False)
        sigma = (statistics[:, 1] / safe).cpu().numpy().reshape(shape).astype(np.float32)
        rank = (statistics[:, 2] / safe).cpu().numpy().reshape(shape).astype(np.float32)
        if mask is not None:
            denoised[~mask] = 0
            sigma[~mask] = 0
            rank[~mask] = 0
        return denoised, sigma, rank


def _window_means(values, extent) -> np.ndarray:
    """Mean of a (X, Y, Z) map over every window position: (X - ex + 1, Y - ey + 1, Z - ez + 1), by
    cumulative sums in float64."""
    total = np.pad(np.asarray(values, dtype=np.float64), [(1, 0)] * 3)
    for axis in range(3):
        np.cumsum(total, axis=axis, out=total)
    ex, ey, ez = extent
    sums = (
        total[ex:, ey:, ez:] - total[:-ex, ey:, ez:] - total[ex:, :-ey, ez:] - total[ex:, ey:, :-ez]
        + total[:-ex, :-ey, ez:] + total[:-ex, ey:, :-ez] + total[ex:, :-ey, :-ez] - total[:-ex, :-ey, :-ez]
    )
    return np.maximum(sums, 0.0) / float(ex * ey * ez)


def _strided_positions(count: int, stride: int) -> np.ndarray:
    positions = np.arange(0, count, stride)
    if positions[-1] != count - 1:
        positions = np.append(positions, count - 1)
    return positions
