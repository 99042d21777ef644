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
data after denoising (:mod:`bids_denoise.methods.core.noise_floor`); and
``demean="shell"`` removes each voxel's mean within each b-value shell before
the PCA and adds it back after (as MRtrix3 ``dwidenoise2 -demean shells``);
``demean="time"`` (for BOLD) removes each voxel's temporal mean and keeps the
window's average fluctuation as one component of every window, in place of the
mean component through which ``dwidenoise`` spreads each voxel's noise over its
window.

The windows are decomposed by the local-PCA engine of :mod:`bids_denoise.methods.core.localpca`
(a compiled solver where it was built, torch's ``eigh`` otherwise, with the same output to rounding).

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

from dataclasses import dataclass, field

import numpy as np

from bids_denoise.methods.core.localpca import GAUSSIAN_WIDTH, VolumeBasis, check_series, local_pca
from bids_denoise.methods.core.noise_floor import gaussian_noise_level, remove_floor_in_place
from bids_denoise.methods.core.options import Options, integers, option, positive, resolve_options

SHRINKAGES = ("hard", "frobenius")
AGGREGATES = ("centre", "overcomplete", "gaussian")
NOISE_FLOORS = ("none", "koay")


def demean_mode(text):
    """``true``/``false`` (remove each window's mean or not), ``shell`` (per shell; DWI), ``time`` (each
    voxel's temporal mean; BOLD)."""
    from bids_denoise.methods.core.options import boolean

    value = str(text).strip().lower()
    return value if value in ("shell", "time") else boolean(text)


@dataclass(frozen=True)
class MPPCAOptions(Options):
    """The options of :func:`mppca`; the defaults are MRtrix3 ``dwidenoise`` 3.0.8's behaviour.

    Attributes
    ----------
    extent : int or sequence of 3 odd int, optional
        Window size; default as ``dwidenoise`` (see
        :func:`bids_denoise.methods.core.windows.default_extent`).
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
    precision : {"float64", "float32"}, optional
        Arithmetic of the eigendecompositions (default float64; ``dwidenoise``
        uses float32, whose rounding flips borderline noise/signal decisions).
    demean : {False, True, "shell", "time"}, optional
        ``True``: subtract each window's mean over its voxels before the PCA and add it back after
        (as DIPY's ``mppca``). ``"shell"``: subtract each voxel's mean over the volumes of each
        b-value shell (b0s one shell; ``bvals`` needed, shells as
        :func:`bids_denoise.methods.core.shells.cluster_shells`) before the PCA, as MRtrix3
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
    shrinkage : {"hard", "frobenius"}, optional
        ``hard`` (default): keep the signal components whole and drop the others (the
        Marchenko-Pastur cut, as ``dwidenoise`` and DIPY). ``frobenius``: weight each signal
        component by the optimal shrinker of Gavish & Donoho (2017) for the Frobenius loss,
        ``eta(y) = sqrt((y^2 - beta - 1)^2 - 4 beta) / y`` for ``y >= 1 + sqrt(beta)`` and 0 below,
        where ``y`` is the component's singular value over ``sigma sqrt(q)``, ``beta = r / q`` the
        window matrix's aspect ratio (``r`` the smaller and ``q`` the larger dimension, one less
        on the voxel side where windows are demeaned) and ``sigma`` the window's noise level
        (Marchenko-Pastur estimate, or ``noise_sigma``). See
        :func:`bids_denoise.methods.core.randmat.frobenius_shrinkage`.
    gaussian_width : float, optional
        Standard deviation of the Gaussian aggregation weights as a fraction of the extent along
        each axis (default ``GAUSSIAN_WIDTH`` = 0.25); used by ``aggregate="gaussian"`` only.
    rank_weighting : bool, optional
        Whether the window weights of overcomplete or Gaussian aggregation include 1/(1 + rank)
        (Manjon et al. 2013), the rank being the window's count of kept components. Default:
        on (DIPY's weights; with Gaussian weights too, where it measured slightly better on the
        phantom of ``benchmarks/mppca_quality.py``). Unused for ``aggregate="centre"``.
    noise_floor : {"none", "koay"}, optional
        ``koay``: after denoising, replace every value by the underlying signal whose
        noncentral-chi mean (2 ``n_coils`` degrees of freedom; Rician for one coil) it is, given the
        Gaussian noise level: removes the noise floor that magnitude data keep where the signal is
        low (Koay & Basser 2006; :func:`bids_denoise.methods.core.noise_floor.remove_noise_floor`).
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
    phase_filter_width : float, optional
        Smoothness of the slowly varying phase removed from a complex series (k-space window power).
    phase_units : {"auto", "radians", "degrees", "scanner", "scanner-unsigned"}, optional
        Units of ``phase`` (see :func:`bids_denoise.methods.core.phase.phase_units`).
    """

    extent: int | tuple | None = option(
        None, "window size: one odd number or 'x,y,z' (default: as dwidenoise)",
        parse=integers(minimum=1, allow_auto=True))
    estimator: str = option("Exp2", "noise estimator", choices=("Exp2", "Exp1"))
    aggregate: str = option(
        "centre", "rebuild the window centre (dwidenoise) or average all windows (DIPY), uniformly or with "
        "Gaussian weights", choices=AGGREGATES)
    stride: int | tuple = option(1, "window step for overcomplete/gaussian: one or 'x,y,z'",
                                 parse=integers(minimum=1))
    demean: bool | str = option(
        False, "remove each window's mean before the PCA (true, as DIPY), not (false, as dwidenoise), each "
        "shell's (shell), or each voxel's temporal mean with the window's average fluctuation kept (time: "
        "less noise spread into neighbours)", choices=(False, True, "shell", "time"), parse=demean_mode)
    shrinkage: str = option(
        "hard", "keep the signal components as they are (hard, as dwidenoise and DIPY) or shrink them "
        "optimally (frobenius, Gavish-Donoho)", choices=SHRINKAGES)
    noise_floor: str = option(
        "none", "remove the Rician/noncentral-chi noise floor with the noise map (koay) or not (none)",
        choices=NOISE_FLOORS)
    n_coils: int = option(1, "receive channels of a sum-of-squares magnitude (noncentral chi with 2N degrees "
                             "of freedom)", parse=positive(int))
    gaussian_width: float = option(GAUSSIAN_WIDTH, "Gaussian weights' sigma as a fraction of the window "
                                                   "(aggregate gaussian)", parse=positive(float))
    phase_filter_width: float = option(
        10.0, "smoothness of the slowly varying phase removed from complex runs (k-space window power)",
        parse=positive(float))
    rank_weighting: bool = option(True, "weigh each window by 1/(1 + rank) when averaging", app=False)
    precision: str = option("float64", "arithmetic of the eigendecompositions", choices=("float64", "float32"),
                            app=False)
    solver: str = option("auto", "window solver", choices=("auto", "tridiagonal", "eigh"), app=False)
    phase_units: str = option("auto", "units of the phase", choices=("auto", "radians", "degrees", "scanner",
                                                                           "scanner-unsigned"), app=False)

    def check(self):
        if isinstance(self.n_coils, (bool, np.bool_)) or int(self.n_coils) != self.n_coils or self.n_coils < 1:
            raise ValueError(f"n_coils must be an integer >= 1, got {self.n_coils!r}")
        if self.aggregate == "gaussian" and not (np.isfinite(self.gaussian_width) and self.gaussian_width > 0):
            raise ValueError(f"gaussian_width must be a positive number, got {self.gaussian_width!r}")
        if len(self.strides) != 3 or min(self.strides) < 1:
            raise ValueError(f"stride must be one or three integers >= 1, got {self.stride}")

    @property
    def strides(self) -> tuple:
        """The window step along each axis."""
        stride = tuple(int(step) for step in np.atleast_1d(self.stride))
        return stride * 3 if len(stride) == 1 else stride


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


def mppca(data, options: MPPCAOptions | None = None, *, mask=None, noise_sigma=None, bvals=None, phase=None,
          device="cpu", out_dtype=np.float32, **changes) -> MPPCAResult:
    """Denoise a 4D series with MP-PCA.

    Parameters
    ----------
    data : ndarray, shape (X, Y, Z, V)
    mask : ndarray of bool, shape (X, Y, Z), optional
        Voxels to denoise; the output is zero elsewhere (as ``dwidenoise``).
    options : MPPCAOptions, optional
        The method's options (default: ``dwidenoise``'s behaviour); keyword ``changes`` replace
        single options, e.g. ``mppca(data, aggregate="overcomplete")``.
    device : str, optional
        ``cpu`` (default), ``cuda``, ``cuda:N`` or ``auto``. On the CPU, batches
        of windows run on ``torch.get_num_threads()`` threads. The cost is one
        eigendecomposition of a small Gram matrix per window; torch's batched
        CUDA ``eigh`` did about 1,000 68x68 matrices a second on an H100 (a
        measurement reported to this project), fewer than one CPU core does, so
        the app runs MP-PCA on the CPU.
    out_dtype : dtype, optional
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
    bvals : array-like of shape (V,), optional
        b-values of the volumes, needed by ``demean="shell"`` and used by nothing else.
    phase : ndarray, shape (X, Y, Z, V), optional
        The phase of a complex series (``data`` its magnitude), in radians or scanner units
        (-4096..4096; see :func:`bids_denoise.methods.core.phase.phase_units`). Given: each volume's slowly
        varying phase is removed (:func:`bids_denoise.methods.core.phase.demodulate`, k-space window power
        ``phase_filter_width``), the real and imaginary parts, whose noise is Gaussian with no
        floor, are denoised side by side as one real series of ``2 V`` volumes with the options
        above, and the magnitude of the denoised complex values returned: the noise floor is
        removed at its source (its noise is removed before the magnitude is taken), so
        ``noise_floor`` must be ``"none"``. The demodulation leaves the signal nearly real, so it
        needs few components; what the phase estimate misses stays in the imaginary part and is
        kept (taking the real part alone, as Eichner et al. 2015, lost it on the phantoms where the
        phase varies within a few voxels). The noise map is the Gaussian sigma of each channel.

    Returns
    -------
    MPPCAResult

    Raises
    ------
    UnsuitableDataError
        Not a 4D series; fewer than ``MIN_EIGENVALUES`` (4) volumes; an image so small that the
        largest window it allows has fewer than 4 voxels (1x1x1 for a 2x2x2 image, the extents
        being odd), so that each window would have fewer than 4 eigenvalues and MP-PCA would
        return zeros or noise (see
        :func:`bids_denoise.methods.core.localpca.check_window_holds_estimate`); or an ``extent``
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
    options = resolve_options(MPPCAOptions, options, changes)
    if phase is not None:
        return _complex_mppca(data, phase, options, mask=mask, noise_sigma=noise_sigma, bvals=bvals,
                              device=device, out_dtype=out_dtype)
    return _real_mppca(data, options, mask=mask, noise_sigma=noise_sigma, bvals=bvals, device=device,
                       out_dtype=out_dtype)


def _real_mppca(data, options, *, mask, noise_sigma, bvals, device, out_dtype, time_groups=None) -> MPPCAResult:
    data = check_series(data)
    demean = options.demean
    basis = None
    if demean == "shell":
        basis = VolumeBasis.from_bvals(bvals, data.shape[3])
    elif demean == "time":  # one group (a magnitude series) or one per part (real, imaginary)
        basis = VolumeBasis.for_time(data.shape[3], time_groups)
    window_demean = not isinstance(demean, str) and bool(demean)
    result = local_pca(data, extent=options.extent, exp1=options.estimator == "Exp1", aggregate=options.aggregate,
                       stride=options.strides, demean=window_demean, basis=basis, shrinkage=options.shrinkage,
                       gaussian_width=options.gaussian_width, rank_weighting=options.rank_weighting,
                       noise_sigma=noise_sigma, mask=mask, device=device, precision=options.precision,
                       solver=options.solver, out_dtype=out_dtype)
    denoised, sigma = result.denoised, result.noise_sigma
    if options.noise_floor == "koay":
        if noise_sigma is None:  # MP-PCA measured the spread of magnitudes: Koay & Basser's factor
            sigma = gaussian_noise_level(denoised, sigma, result.extent, options.n_coils)
        remove_floor_in_place(denoised, sigma, options.n_coils)
    centre = options.aggregate == "centre"
    parameters = {
        "estimator": None if noise_sigma is not None else options.estimator,
        "aggregate": options.aggregate,
        "stride": None if centre else list(options.strides),
        "demean": demean if basis is not None else window_demean,
        "shrinkage": options.shrinkage,
        "gaussian_width": float(options.gaussian_width) if options.aggregate == "gaussian" else None,
        "rank_weighting": None if centre else bool(options.rank_weighting),
        "noise_source": "given" if noise_sigma is not None else "estimated",
        "noise_floor": options.noise_floor,
        "n_coils": int(options.n_coils) if options.noise_floor != "none" else None,
        "shells": basis.n_shells if demean == "shell" else None,
        "precision": options.precision,
        "solver": result.solver,
        "complex": False,
    }
    return MPPCAResult(denoised=denoised, noise_sigma=sigma, rank=result.rank, extent=result.extent,
                       solver=result.solver, parameters=parameters)


def _complex_mppca(magnitude, phase, options, *, bvals, **inputs) -> MPPCAResult:
    """MP-PCA of a phase-demodulated complex series: its real and imaginary parts side by side as the
    volumes of one real series (each with Gaussian noise of the receiver's sigma, no floor), the
    magnitude of the denoised complex values returned."""
    from bids_denoise.methods.core.phase import demodulate

    if options.noise_floor != "none":
        raise ValueError("a complex series has no noise floor to remove: give noise_floor='none' with a phase")
    magnitude = check_series(magnitude)
    values, _, units = demodulate(magnitude, phase, width=options.phase_filter_width, units=options.phase_units)
    dtype = np.float64 if magnitude.dtype == np.float64 else np.float32
    stacked = np.concatenate([values.real, values.imag], axis=3).astype(dtype)
    del values
    n_volumes = magnitude.shape[3]
    if bvals is not None:
        bvals = np.concatenate([np.asarray(bvals)] * 2)
    # demean="time": the real and the imaginary part each have their own mean
    result = _real_mppca(stacked, options, bvals=bvals, time_groups=np.repeat([0, 1], n_volumes), **inputs)
    result.denoised = np.hypot(result.denoised[..., :n_volumes], result.denoised[..., n_volumes:])
    result.parameters.update(complex=True, phase_units=units, phase_filter_width=float(options.phase_filter_width))
    return result
