"""Self-calibrated median filter that can say no.

A median filter denoises well where the image is flat and blurs where it is not.
This method decides from the data alone how much of it to use, and may decide
to use none:

1. **Candidates.** For every radius ``r`` in ``radii``: the ordinary median over
   the ``(2r+1)^3`` cube (``"median"``) and the Noise2Self donut median, the same
   cube without its centre (``"donut-median"``, J-invariant [1]_). Edges are
   replicated (``mode="nearest"``), which puts copies of a face voxel in its
   own donut: the risk estimate below counts them.
2. **Blend.** A filter ``g`` is never written as is: each voxel gets
   ``out = w * g(x) + (1 - w) * x``. For a J-invariant ``g`` (the donut), noise
   of variance ``s`` independent between voxels, and ``A`` the filter's true
   error, ``E(g - x)^2 = A + s`` [1]_, and the blend's risk
   ``w^2 A + (1 - w)^2 s`` is least at ``w = s / E(g - x)^2``. The ordinary
   median is not J-invariant: Stein's lemma [2]_ adds its divergence ``d`` (the
   fraction of voxels where the centre *is* the median) and gives
   ``w = s (1 - d) / E(g - x)^2``, the donut's rule when ``d = 0``. The
   expectation ``E(g - x)^2`` is estimated in the 3x3x3 neighbourhood of each
   voxel, so the weight falls where the filter meets structure (edges) and
   rises in flat regions: the local (adaptive) Wiener filter of Lee [3]_ with a
   median in place of the local mean.
3. **Risk.** The risk of each candidate's blended output is Stein's unbiased
   risk estimate (SURE) [2]_, exact for this estimator: its divergence includes
   the median's selection of the centre voxel, the neighbours' medians that
   selected it, and the dependence of the local weight on the voxel itself
   (in quantised data a tie with the centre counts as a selection, which
   overstates the risk a little). The identity's risk is ``s``. For the donut
   at ``w = 1`` the estimate is the Noise2Self loss minus ``s`` [1]_.
4. **Choice.** The candidate with the least estimated risk is written, unless
   it lowers the risk below the identity's by less than ``min_gain`` (a
   fraction of ``s``): then the data are returned unchanged. With a noiseless
   image the noise estimate is (almost) zero, every weight (almost) zero, and
   the identity wins.

The noise variance ``s`` is the Donoho-Johnstone estimate [4]_: the median
absolute value of the finest-scale Haar wavelet detail coefficients (the
high-pass along every axis: a mixed third difference over disjoint 2x2x2
blocks) divided by ``0.6745``. The high-pass removes smooth signal (anything
constant along one axis gives exactly zero) and the median ignores the few
coefficients that straddle an edge, so it measures the noise, not the anatomy.
Blocks that hold an exact zero (a zero-filled background, and the blocks on
its edge) are left out: they carry no noise, or a jump to zero. The estimate
need not be exact: with ``w = c w*`` the blend's risk stays below the
identity's for any ``0 < c < 2``, so a noise estimate up to ``sqrt(2)`` times
too large still does no harm.

SURE assumes Gaussian noise. Magnitude (Rician) data have less variance in the
background than in the brain; the pooled median lies between the two, which
errs on the side of a smaller weight in the brain. Their mean is not the
noise-free signal where the signal is low (the Rician floor): the risk that is
estimated, and lowered, is the error about that mean.

**The profile-guided median of a series** (``guide="auto"`` for a series of 8
or more volumes, e.g. DWI). Filtering each volume alone mixes tissues where a
boundary runs through the window: every volume's PSNR rises, but a model fitted
across volumes (the diffusion tensor) inherits a bias they share, and FA error
in boundary white matter rises above the noisy input's. The series knows better
which neighbours share a voxel's signal: for volume ``v``, a neighbour is kept
when its mean squared difference from the voxel over the *other* volumes is what
noise alone gives (within ``guide_threshold`` standard deviations, see
:class:`bids_denoise.methods.core.neighbours.ProfileGuide`). The median over the kept neighbours, the voxel left out, is a
function of the other voxels of volume ``v`` and of the other volumes only: it is
J-invariant [1]_, its Noise2Self loss ``E(g - x)^2 = A + s`` is exact, and each
volume is blended with one weight ``s / E``. The noise variance ``s`` is the
median of MP-PCA's noise map of the series [5]_ (the Haar estimate reads fine
anatomy as noise where the image is small or detailed), and the radius (1 or 2)
is the one of least estimated risk. A J-invariant filter on noise independent
between voxels has ``E >= s``; where the calibration finds ``E`` well below
``s`` (``MIN_ENERGY_RATIO``), neighbouring voxels share their noise
(interpolated or smoothed data, as in MRtrix3's test series) and the median says
no: the input is returned unchanged.

Otherwise a 4D series is filtered volume by volume in 3D. The radius and the filter form
are calibrated once for the run, on up to ``calibration_volumes`` volumes spread
over it; the noise variance is pooled over the same volumes (a scanner's noise
level is the same in every volume); the local weights are computed in every
volume, so a b0 (more contrast, smaller weights) and a diffusion-weighted volume
each get theirs.

The risk is the error of each volume. A model fitted across volumes (the
diffusion tensor) averages the noise of many volumes but not a bias they share:
where a tissue boundary runs through the window the median mixes the tissues,
and on a phantom with sharp boundaries FA error in boundary white matter rises
while it falls in deeper white matter (``tests/methods/test_median.py``).

The method is homogeneous: ``median_denoise(c * x)`` is ``c`` times
``median_denoise(x)``. It works on the data divided by a power of two that
brings the largest magnitude into [1, 2), which changes no digit, so squares of
values near 1e-30 or 1e30 neither underflow nor overflow.

References
----------
.. [1] Batson J., Royer L. Noise2Self: Blind Denoising by Self-Supervision.
   ICML 2019, PMLR 97:524-533.
.. [2] Stein C. M. Estimation of the Mean of a Multivariate Normal Distribution.
   Ann. Statist. 9(6):1135-1151, 1981.
.. [3] Lee J.-S. Digital Image Enhancement and Noise Filtering by Use of Local
   Statistics. IEEE Trans. PAMI 2(2):165-168, 1980.
.. [4] Donoho D. L., Johnstone I. M. Ideal spatial adaptation by wavelet
   shrinkage. Biometrika 81(3):425-455, 1994.
.. [5] Veraart J., Novikov D. S., Christiaens D., Ades-aron B., Sijbers J.,
   Fieremans E. Denoising of diffusion MRI using random matrix theory.
   NeuroImage 142:394-406, 2016.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from bids_denoise.methods.core.errors import UnsuitableDataError
from bids_denoise.methods.core.neighbours import ProfileGuide, neighbourhood_counts, neighbourhood_mean, shift_slices
from bids_denoise.methods.core.noise import estimate_series_noise, image_noise_variance
from bids_denoise.methods.core.options import Options, auto_or, option, positive, resolve_options

#: The filter forms, by the name recorded in the details.
FORMS = ("median", "donut-median")
#: Radius of the neighbourhood in which the local blend weight is estimated (3x3x3).
BLEND_WINDOW = 1
#: A series needs this many volumes for the profile guide (``guide="auto"``).
GUIDE_MIN_VOLUMES = 8
#: The profile-guided median's largest candidate radius (5x5x5).
GUIDED_MAX_RADIUS = 2
#: The least ``E / s`` (mean squared change of a J-invariant filter over the noise variance) that is
#: consistent with noise independent between voxels (``E >= s`` then); below it the neighbours share
#: their noise (interpolated, resampled or smoothed data) or ``s`` is overestimated, the risk
#: estimate is void and the profile-guided median says no.
MIN_ENERGY_RATIO = 0.8


def _ndimage():
    from scipy import ndimage  # imported late: methods/ imports with numpy and torch alone

    return ndimage


@dataclass
class MedianResult:
    """The denoised image and what the calibration found.

    Attributes
    ----------
    denoised : ndarray, float32
        Same shape as the input (3D image or 4D series).
    details : dict
        JSON-able: ``radius``, ``filter`` (``"median"``, ``"donut-median"`` or
        ``"identity"``), ``blend_weight`` (mean local weight over all voxels
        written), ``blend_weights`` (the same per volume), ``noise_sigma`` (in
        the data's units) and ``calibration`` (see :func:`median_denoise`).
    """

    denoised: np.ndarray
    details: dict


def _radius(text):
    """``auto`` or a radius of at least 1 voxel."""
    return auto_or(positive(int))(text)


@dataclass(frozen=True)
class MedianOptions(Options):
    """The options of :func:`median_denoise`.

    Attributes
    ----------
    radius : "auto" or int
        ``"auto"`` chooses among ``radii``; an integer >= 1 fixes the radius
        (the filter form, the identity and the blend weights are still chosen).
    radii : sequence of int
        Candidate radii for ``"auto"``.
    calibration_volumes : int
        At most this many volumes, spread evenly over a series, calibrate the run.
    min_gain : float
        The least fraction of the noise variance the chosen filter must be
        estimated to remove; below it the identity is written.
    guide : {"auto", "profile", "none"}
        ``"profile"``: the median of a series takes, for each voxel and volume,
        only the neighbours whose signal in the *other* volumes matches the
        voxel's (see "The profile-guided median of a series" in the module
        notes); ``"none"``: every neighbour, volume by volume; ``"auto"``:
        ``"profile"`` for a series of at least ``GUIDE_MIN_VOLUMES`` volumes.
    guide_threshold : float
        A neighbour is kept when its profile distance is below this many of
        its standard deviations under the same signal.
    """

    radius: int | str = option("auto", "filter radius in voxels, or auto (calibrated)", parse=_radius)
    radii: tuple = option((1, 2, 3), "candidate radii of auto", app=False)
    calibration_volumes: int = option(8, "volumes that calibrate a series", parse=positive(int), app=False)
    min_gain: float = option(0.02, "least estimated risk reduction (a fraction of the noise variance) for filtering "
                                   "to be kept")
    guide: str = option("auto", "series: take only the neighbours whose signal in the other volumes matches the "
                                "voxel's (profile), every neighbour volume by volume (none), or profile for series "
                                "of 8 or more volumes (auto)", choices=("auto", "profile", "none"))
    guide_threshold: float = option(3.0, "a neighbour is kept when its profile distance is below this many "
                                         "standard deviations", parse=positive(float))

    def check(self):
        radii = [int(self.radius)] if self.radius != "auto" else [int(r) for r in self.radii]
        if not radii or min(radii) < 1:
            raise ValueError(f"radii must be integers >= 1, got {radii}")
        if int(self.calibration_volumes) < 1:
            raise ValueError(f"calibration_volumes must be >= 1, got {self.calibration_volumes}")


def median_denoise(data, options: MedianOptions | None = None, **changes) -> MedianResult:
    """Denoise with a median filter blended with the input, or return the input unchanged.

    Parameters
    ----------
    data : ndarray
        A 3D image or a 4D series (volumes along the last axis), finite values.
    options : MedianOptions, optional
        The method's options; keyword ``changes`` replace single options (``median_denoise(x, radius=2)``).

    Returns
    -------
    MedianResult
        ``details["calibration"]`` holds ``parameter`` (``"radius"``),
        ``thetas`` (the candidate radii), ``losses`` (per radius, the least
        estimated risk of the two forms: mean squared error per voxel in the
        data's units squared), ``best`` (the radius with the least loss, the one
        written unless the identity is), ``risks`` (per form, the estimated risk
        per radius), ``identity_risk`` (the noise variance), ``noise_sigma``,
        ``gain`` (the best candidate's estimated risk reduction as a fraction of
        the identity's), ``min_gain``, ``filter``, ``blend_weight`` (mean local
        weight on the calibration volumes, 0 for the identity), ``blend_window``
        and ``volumes`` (the calibration volumes' indices).

    Raises
    ------
    UnsuitableDataError
        Data that are not a 3D image or 4D series, or not finite.
    """
    options = resolve_options(MedianOptions, options, changes)
    data = np.asarray(data)
    if data.ndim not in (3, 4) or data.size == 0:
        raise UnsuitableDataError(f"the median filter needs a 3D image or a 4D series, got shape {data.shape}")
    if not np.all(np.isfinite(data)):
        raise UnsuitableDataError("the median filter needs finite intensities (the image holds NaN or infinity)")
    thetas = [int(options.radius)] if options.radius != "auto" else [int(r) for r in options.radii]
    calibration_volumes, min_gain, guide = options.calibration_volumes, options.min_gain, options.guide
    series = data if data.ndim == 4 else data[..., None]
    n_volumes = series.shape[3]
    picks = [int(v) for v in np.unique(np.linspace(0, n_volumes - 1, min(int(calibration_volumes), n_volumes))
                                       .round().astype(int))]
    guided = guide == "profile" or (guide == "auto" and data.ndim == 4 and n_volumes >= GUIDE_MIN_VOLUMES)
    if guided and (data.ndim != 4 or n_volumes < 3):
        raise UnsuitableDataError(f"the profile-guided median needs a series of 3 or more volumes, got shape "
                                  f"{data.shape}")

    largest = float(np.max(np.abs(series)))
    exponent = int(np.frexp(largest)[1]) if largest > 0 else 0  # largest * 2**-exponent in [0.5, 1)
    if guided:
        denoised, details = _guided_denoise(np.ldexp(series, -exponent, dtype=np.float64), thetas, picks,
                                            min_gain, float(options.guide_threshold), exponent)
        return MedianResult(denoised, details)

    def volume(v):
        return np.ldexp(series[..., v].astype(np.float64), -exponent)  # exact

    calibration_set = [volume(v) for v in picks]
    variance = image_noise_variance(calibration_set)
    risks = {form: [] for form in FORMS}
    weights = {form: [] for form in FORMS}
    for r in thetas:
        for form in FORMS:
            fits = [sure_blend(x, _filter(x, r, form), variance, donut=form == "donut-median") for x in calibration_set]
            risks[form].append(float(np.mean([fit.risk for fit in fits])))
            weights[form].append(float(np.mean([fit.weights.mean() for fit in fits])))
    losses = [min(risks[form][i] for form in FORMS) for i in range(len(thetas))]
    best = int(np.argmin(losses))
    form = min(FORMS, key=lambda f: risks[f][best])
    gain = 1.0 - losses[best] / variance if variance > 0 else 0.0
    if not gain >= min_gain:
        form = "identity"

    scale2 = 4.0**exponent  # risks are squares: back to the data's units
    sigma = float(np.ldexp(np.sqrt(variance), exponent))
    calibration = {
        "parameter": "radius",
        "thetas": thetas,
        "losses": [loss * scale2 for loss in losses],
        "best": thetas[best],
        "risks": {f: [risk * scale2 for risk in risks[f]] for f in FORMS},
        "identity_risk": variance * scale2,
        "noise_sigma": sigma,
        "gain": float(gain),
        "min_gain": float(min_gain),
        "filter": form,
        "blend_weight": 0.0 if form == "identity" else weights[form][best],
        "blend_window": BLEND_WINDOW,
        "volumes": picks,
    }

    if form == "identity":
        denoised = series.astype(np.float32)
        volume_weights = [0.0] * n_volumes
    else:
        denoised = np.empty(series.shape, dtype=np.float32)
        volume_weights = []
        for v in range(n_volumes):
            x = volume(v)
            filtered = _filter(x, thetas[best], form)
            w = local_weights(x, filtered, variance, donut=form == "donut-median")
            denoised[..., v] = np.ldexp(x + w * (filtered - x), exponent)
            volume_weights.append(float(w.mean()))
    details = {
        "radius": thetas[best],
        "filter": form,
        "blend_weight": float(np.mean(volume_weights)),
        "blend_weights": [round(w, 6) for w in volume_weights],
        "noise_sigma": sigma,
        "calibration": calibration,
    }
    return MedianResult(denoised if data.ndim == 4 else denoised[..., 0], details)


# --- the pieces -------------------------------------------------------------------------------


def _filter(image, radius, form):
    """The median over the (2r+1)^3 cube, with (``"median"``) or without (``"donut-median"``) its centre."""
    footprint = np.ones((2 * radius + 1,) * image.ndim, dtype=bool)
    if form == "donut-median":
        footprint[(radius,) * image.ndim] = False
    return _ndimage().median_filter(image, footprint=footprint, mode="nearest")


def _selected(image, filtered, *, donut):
    """Where the filter's output is the centre voxel itself (its derivative there is 1).

    The ordinary median selects the centre wherever ``g == x``. The donut never
    holds the centre, except on the image's faces, where edge replication puts
    copies of it in the window: a coincidental tie inside is not a selection.
    """
    selected = filtered == image
    if donut:
        on_face = np.zeros(image.shape, dtype=bool)
        for axis, n in enumerate(image.shape):
            index = np.arange(n)
            on_face |= ((index == 0) | (index == n - 1)).reshape([-1 if a == axis else 1 for a in range(image.ndim)])
        selected &= on_face
    return selected


def local_weights(image, filtered, variance, *, donut=False):
    """The blend weight of each voxel: ``min(1, s (1 - d) / local mean of (g - x)^2)``.

    Parameters
    ----------
    image, filtered : ndarray
        ``x`` and ``g(x)``.
    variance : float
        The noise variance ``s``.
    donut : bool
        ``g`` excludes the centre; ``d`` is the mean of :func:`_selected`.

    Returns
    -------
    ndarray
        Weights in [0, 1]; 1 where the filter changes nothing in the neighbourhood.
    """
    return _weights(image, filtered, variance, _selected(image, filtered, donut=donut))[0]


def _weights(image, filtered, variance, selected):
    """The local weights, the residual ``g - x``, its local mean square, and where the weight is not clipped."""
    residual = filtered - image
    energy = neighbourhood_mean(residual * residual, BLEND_WINDOW)
    numerator = variance * (1.0 - float(np.mean(selected)))
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(energy > 0, numerator / energy, np.inf)
    return np.minimum(ratio, 1.0), residual, energy, ratio < 1.0


@dataclass
class Blend:
    """One candidate on one image: its local weights and its estimated risk (per voxel)."""

    weights: np.ndarray
    risk: float


def sure_blend(image, filtered, variance, *, donut=False) -> Blend:
    """Local blend of ``filtered`` with ``image`` and its Stein unbiased risk estimate.

    With ``e = g - x``, ``E`` the local mean of ``e^2``, ``w = min(1, s (1 - d) / E)``
    and ``out = x + w e``, SURE is the mean over voxels of
    ``(w e)^2 - s + 2 s d out_i / d x_i`` with
    ``d out_i / d x_i = 1 + w (g'_i - 1) + e_i d w_i / d x_i``: ``g'_i`` is 1 where
    the median selected ``x_i`` (or one of its replicated copies at a face),
    ``d w_i / d x_i = -(w_i / E_i) d E_i / d x_i`` where the weight is not clipped,
    and ``d E_i / d x_i = (2 / n_i) (e_i (g'_i - 1) + sum over neighbours j of
    e_j [g_j == x_i])`` (a neighbour's median moves with ``x_i`` when it selected it).

    Parameters
    ----------
    image, filtered : ndarray
        ``x`` and the median-filtered ``g(x)``.
    variance : float
        The noise variance ``s``.
    donut : bool
        ``g`` excludes the centre (see :func:`_selected`).

    Returns
    -------
    Blend
    """
    selected = _selected(image, filtered, donut=donut)
    weights, residual, energy, free = _weights(image, filtered, variance, selected)
    if variance == 0:
        return Blend(np.zeros(image.shape), 0.0)
    own = selected.astype(np.float64)
    # sum over the neighbours j of e_j [g_j == x_i]: the neighbours' medians that selected x_i
    neighbours = np.zeros(image.shape)
    for offset in itertools.product(range(-BLEND_WINDOW, BLEND_WINDOW + 1), repeat=image.ndim):
        if not any(offset):
            continue
        destination, source = shift_slices(image, offset)
        neighbours[destination] += residual[source] * (filtered[source] == image[destination])
    d_energy = 2.0 / neighbourhood_counts(image.shape, BLEND_WINDOW) * (residual * (own - 1.0) + neighbours)
    with np.errstate(divide="ignore", invalid="ignore"):
        d_weight = np.where(free, -weights / energy * d_energy, 0.0)
    divergence = 1.0 + weights * (own - 1.0) + residual * d_weight
    sure = (weights * residual) ** 2 - variance + 2.0 * variance * divergence
    return Blend(weights, float(np.mean(sure)))


# --- the profile-guided median of a series ----------------------------------------------------


def _series_noise_variance(series, picks):
    """Noise variance of a (scaled) series and its source: the median over voxels of MP-PCA's noise map
    [5]_ (the Haar estimate reads fine anatomy as noise on small or finely detailed images: 1.6 times
    MP-PCA's sigma on MRtrix3's test series), or the Haar estimate of the calibration volumes ``picks``
    where MP-PCA cannot run (:func:`bids_denoise.methods.core.noise.estimate_series_noise`)."""
    estimate = estimate_series_noise(series, volumes=picks)
    if estimate.source == "haar":
        return float(estimate.variance.flat[0]), "haar"
    sigma = np.sqrt(estimate.variance).astype(np.float32)  # exact: MP-PCA's float32 noise map, squared
    return float(np.median(sigma[sigma > 0]) ** 2), "mppca"


def _guided_median(guide, v):
    """The donut median of volume ``v`` over the neighbours ``guide`` keeps, and where none is kept (slab by slab
    of x-planes: the neighbours of the whole volume are never held at once)."""
    image = guide.series[..., v]
    filtered, none = np.empty(image.shape), np.empty(image.shape, dtype=bool)
    for rows in guide.slabs:
        neighbours, keep = guide.neighbours(v, rows)
        ordered = np.sort(np.where(keep, neighbours, np.inf), axis=0)
        count = keep.sum(axis=0)
        low = np.take_along_axis(ordered, np.maximum(count - 1, 0)[None] // 2, axis=0)[0]
        high = np.take_along_axis(ordered, (count // 2)[None], axis=0)[0]
        none[rows] = count == 0
        filtered[rows] = np.where(none[rows], image[rows], 0.5 * (low + np.where(none[rows], 0.0, high)))
    return filtered, none


def _guided_blend(image, filtered, none, variance):
    """The volume's blend weight (one per volume), the blend's risk per voxel and ``E / s``.

    Exact for a J-invariant filter and noise independent between voxels: ``w = min(1, s / E)``
    with ``E`` the mean of ``(g - x)^2`` where a neighbour was kept, risk ``s (1 - s / E)`` there
    (``E - s`` when ``w = 1``) and ``s`` elsewhere. Such a filter has ``E = A + s >= s``; an ``E``
    well below ``s`` says the premise is false (see :data:`MIN_ENERGY_RATIO`).
    """
    used = ~none
    if variance == 0 or not used.any():
        return 0.0, variance, np.inf
    energy = float(np.mean((filtered[used] - image[used]) ** 2))
    if energy <= 0:
        return 0.0, variance, 0.0
    weight = min(1.0, variance / energy)
    risk = variance * (1.0 - variance / energy) if weight < 1 else energy - variance
    share = float(np.mean(used))
    return weight, share * risk + (1.0 - share) * variance, energy / variance


def _guided_denoise(series, thetas, picks, min_gain, threshold, exponent):
    """The profile-guided donut median of a series, blended per volume; see :func:`median_denoise`."""
    variance, estimator = _series_noise_variance(series, picks)
    thetas = [r for r in thetas if r <= GUIDED_MAX_RADIUS] or [min(thetas)]
    risks, ratios, guide = [], [], None
    for r in thetas:
        guide = None  # one radius's neighbour distances in memory at a time
        guide = ProfileGuide(series, variance, r, threshold)
        fits = [_guided_blend(series[..., v], *_guided_median(guide, v), variance) for v in picks]
        risks.append(float(np.mean([risk for _, risk, _ in fits])))
        ratios.append(float(np.median([ratio for _, _, ratio in fits])))
    best = int(np.argmin(risks))
    gain = 1.0 - risks[best] / variance if variance > 0 else 0.0
    consistent = ratios[best] >= MIN_ENERGY_RATIO
    chosen = "guided-donut-median" if gain >= min_gain and consistent else "identity"
    radius = thetas[best]
    denoised = series.astype(np.float32, copy=True)
    volume_weights = [0.0] * series.shape[3]
    if chosen != "identity":
        if guide.radius != radius:
            guide = None
            guide = ProfileGuide(series, variance, radius, threshold)
        for v in range(series.shape[3]):
            filtered, none = _guided_median(guide, v)
            weight, _, ratio = _guided_blend(series[..., v], filtered, none, variance)
            weight = weight if ratio >= MIN_ENERGY_RATIO else 0.0
            denoised[..., v] = series[..., v] + weight * (filtered - series[..., v])
            volume_weights[v] = weight
    scale2 = 4.0**exponent
    sigma = float(np.ldexp(np.sqrt(variance), exponent))
    calibration = {
        "parameter": "radius",
        "thetas": thetas,
        "losses": [risk * scale2 for risk in risks],
        "best": radius,
        "identity_risk": variance * scale2,
        "noise_sigma": sigma,
        "noise_estimate": estimator,
        "gain": float(gain),
        "min_gain": float(min_gain),
        "energy_ratio": ratios[best],
        "noise_independent": bool(consistent),
        "filter": chosen,
        "guide": "profile",
        "guide_threshold": float(threshold),
        "volumes": [int(v) for v in picks],
    }
    details = {
        "radius": radius,
        "filter": chosen,
        "guide": "profile",
        "blend_weight": float(np.mean(volume_weights)),
        "blend_weights": [round(float(w), 6) for w in volume_weights],
        "noise_sigma": sigma,
        "calibration": calibration,
    }
    del guide  # its neighbour distances: the largest array here
    return np.ldexp(denoised, exponent, out=denoised), details  # in place, exact (a power of two)
