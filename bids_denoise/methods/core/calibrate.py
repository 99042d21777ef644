"""Self-supervised calibration of classical denoisers (Noise2Self, Batson & Royer 2019).

Any denoiser ``f_theta`` becomes J-invariant when it is fed the image with the
voxels of J replaced by the mean of their neighbours: its output on J then
never saw the input on J. The self-supervised loss ``||f_theta(x) - x||^2`` on J
is the true error plus a constant, so the ``theta`` with the least loss is the
best one, found without ground truth. The median filter's "donut" form (centre
excluded) is J-invariant by construction and needs no masking.

These are the generic tools (``grid_mask`` also serves the Noise2Self masker).
The median method, which also weighs the filter against no filtering, is
:mod:`bids_denoise.methods.median`.

**A calibration that can say no.** A denoiser's output ``f`` is never written
as is by the learned methods: each volume gets ``g = a f + (1 - a) x``, with
the weight ``a`` chosen by the same self-supervised loss, and the identity
(``a = 0``) is one of the candidates. With ``s`` the noise variance,
``L = mean (f - x)^2`` and ``d`` the mean divergence of ``f`` (how much an
output voxel moves with its own input: 0 for a J-invariant ``f``), Stein's
unbiased risk estimate of the blend is

    R(a) = a^2 L + s - 2 s a (1 - d),

least at ``a = s (1 - d) / L`` (clipped to [0, 1]). For a J-invariant ``f``,
``L = A + s`` (``A`` its true error [1]_) and this is ``a = s / (A + s)``,
risk ``s A / (A + s)``: below both the identity's ``s`` and the filter's
``A``. For an ordinary (not J-invariant) output, such as a network's
unmasked pass, ``d`` is measured by a Monte-Carlo probe [2]_
(:func:`monte_carlo_divergence`), and the two outputs' risks are compared on
the same footing (:func:`choose_blend`). The noise variance comes from the
data (:mod:`bids_denoise.methods.core.noise`).

**A guard on the angular contrast.** Per-volume risks do not see a bias that
all volumes of a shell share: a spatial denoiser that smooths where fibres bend
flattens the differences between gradient directions, which lowers every
volume's squared error a little and biases FA a lot (FA's error grows with the
share of contrast lost even at small weights, while the noise it removes only
helps FA at second order). :func:`angular_contrast` estimates, without the
signal, the share of the angular contrast an output keeps, and
:func:`contrast_cap` the largest scale of the blend weights whose loss of it
the noise removed pays for (at a rate set by the SNR); the learned methods
scale their weights by it.

References
----------
.. [1] Batson J., Royer L. Noise2Self: Blind Denoising by Self-Supervision. ICML 2019,
   PMLR 97:524-533.
.. [2] Ramani S., Blu T., Unser M. Monte-Carlo SURE: a black-box optimization of
   regularization parameters for general denoising algorithms. IEEE Trans. Image
   Process. 17(9):1540-1554, 2008.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def _ndimage():
    from scipy import ndimage  # imported late: methods/ imports with numpy and torch alone

    return ndimage


@dataclass
class Calibration:
    """The loss of each candidate parameter and the chosen one."""

    parameter: str
    thetas: list
    losses: list
    best: object

    def as_dict(self):
        return {"parameter": self.parameter, "thetas": [float(t) for t in self.thetas],
                "losses": [float(v) for v in self.losses], "best": float(self.best)}


def grid_mask(shape, width, phase):
    """Voxels whose coordinates modulo ``width`` equal the ``phase``-th combination."""
    offsets = np.unravel_index(phase, (width,) * len(shape))
    hidden = np.ones(shape, dtype=bool)
    for axis, offset in enumerate(offsets):
        index = (np.arange(shape[axis]) % width == offset).reshape([-1 if a == axis else 1 for a in range(len(shape))])
        hidden &= index
    return hidden


def neighbour_mean(image):
    """Mean of the neighbours of every voxel that lie inside the image (centre excluded).

    Outside the image counts as absent, not as a copy of the edge: replicating the edge
    (``mode="nearest"``) would put a face voxel's own value into its fill, and a filter fed
    that fill would see the voxel it is to predict (no longer J-invariant at the border).
    """
    image = np.asarray(image, dtype=np.float64)
    footprint = np.ones((3,) * image.ndim)
    footprint[(1,) * image.ndim] = 0
    sums = _ndimage().convolve(image, footprint, mode="constant", cval=0.0)
    counts = _ndimage().convolve(np.ones(image.shape), footprint, mode="constant", cval=0.0)
    return sums / np.maximum(counts, 1.0)


def j_invariant(denoiser, image, width=3):
    """The J-invariant version of ``denoiser``: each voxel from the pass that hid it."""
    image = np.asarray(image, dtype=np.float64)
    filled = neighbour_mean(image)
    result = np.empty_like(image)
    for phase in range(width**image.ndim):
        hidden = grid_mask(image.shape, width, phase)
        result[hidden] = denoiser(np.where(hidden, filled, image))[hidden]
    return result


def self_supervised_loss(denoiser, image, width=3):
    """||J-invariant f(x) - x||^2 / n: the true error plus the noise variance."""
    return float(np.mean((j_invariant(denoiser, image, width) - np.asarray(image, float)) ** 2))


def donut_median(image, radius):
    """Median over a cube of the given radius with the centre voxel excluded (J-invariant).

    The image is extended periodically (``mode="wrap"``): replicating the edge
    (``"nearest"``) or mirroring it would put copies of a face voxel into its
    own window, and the filter would no longer be J-invariant there. With
    ``wrap`` no voxel sees itself as long as every axis is longer than
    ``radius``.
    """
    size = 2 * int(radius) + 1
    footprint = np.ones((size,) * image.ndim, dtype=bool)
    footprint[(int(radius),) * image.ndim] = False
    return _ndimage().median_filter(np.asarray(image, float), footprint=footprint, mode="wrap")


def calibrate(denoiser_of, image, thetas, *, parameter="theta", width=3, already_j_invariant=False):
    """Pick the parameter of a classical denoiser with the least self-supervised loss.

    Parameters
    ----------
    denoiser_of : callable(theta) -> callable(image) -> image
    image : ndarray, or a list of ndarrays (losses are averaged: e.g. volumes of a run)
    thetas : sequence of candidate values
    already_j_invariant : bool
        The denoiser never looks at the centre voxel (e.g. the donut median).

    Returns
    -------
    Calibration
    """
    images = image if isinstance(image, (list, tuple)) else [image]
    losses = []
    for theta in thetas:
        denoiser = denoiser_of(theta)
        if already_j_invariant:
            loss = np.mean([np.mean((denoiser(x) - x) ** 2) for x in images])
        else:
            loss = np.mean([self_supervised_loss(denoiser, x, width) for x in images])
        losses.append(float(loss))
    best = thetas[int(np.argmin(losses))]
    return Calibration(parameter, list(thetas), losses, best)


# --------------------------------------------------------------------------- blending with the input


@dataclass
class Blend:
    """The blend ``a f + (1 - a) x`` of one output with its input, and its estimated risk.

    ``risk`` and ``identity_risk`` (the noise variance ``s``) are mean squared errors per voxel
    against the noise-free signal, estimated without it; ``loss`` is ``mean (f - x)^2`` and
    ``divergence`` the mean divergence ``d`` of ``f``.
    """

    weight: float
    risk: float
    identity_risk: float
    loss: float
    divergence: float

    def as_dict(self):
        return {key: round(float(value), 6) for key, value in vars(self).items()}


def blend_weight(output, data, noise_variance, *, divergence=0.0) -> Blend:
    """The risk-minimising weight of ``output`` against ``data`` (see the module's docstring).

    Parameters
    ----------
    output, data : ndarray of the same shape
        The denoiser's output and its input (e.g. the brain voxels of one volume).
    noise_variance : float or ndarray of the shape of ``data``
        Variance of the noise of ``data`` (averaged when a map is given).
    divergence : float
        Mean divergence of the denoiser at ``data``: 0 for a J-invariant one.

    Returns
    -------
    Blend
        ``weight = clip(s (1 - d) / L, 0, 1)``; a weight of 0 is the identity.
    """
    output, data = np.asarray(output, np.float64), np.asarray(data, np.float64)
    s = float(np.mean(noise_variance))
    loss = float(np.mean((output - data) ** 2))
    d = float(divergence)
    weight = 0.0 if loss <= 0 or s <= 0 else float(np.clip(s * (1.0 - d) / loss, 0.0, 1.0))
    risk = weight**2 * loss + s - 2.0 * s * weight * (1.0 - d)
    return Blend(weight, risk, s, loss, d)


def choose_blend(candidates, data, noise_variance, *, min_gain=0.0):
    """The candidate output whose blend with ``data`` has the least estimated risk, or the identity.

    Parameters
    ----------
    candidates : dict of name to (output, divergence)
    data : ndarray
    noise_variance : float or ndarray
    min_gain : float
        A candidate must lower the risk below the identity's by more than this fraction of it.

    Returns
    -------
    name : str
        The chosen candidate, or ``"identity"``.
    blends : dict of name to Blend
        Every candidate's blend (the identity's risk is their ``identity_risk``).
    """
    blends = {name: blend_weight(output, data, noise_variance, divergence=divergence)
              for name, (output, divergence) in candidates.items()}
    best = min(blends, key=lambda name: blends[name].risk, default=None)
    if best is None or blends[best].risk >= blends[best].identity_risk * (1.0 - min_gain) or blends[best].weight == 0:
        return "identity", blends
    return best, blends


def monte_carlo_divergence(denoiser, image, epsilon, *, seed=0, axis=None):
    """Mean divergence of ``denoiser`` at ``image`` from one random probe (Ramani et al. 2008).

    ``d = mean(b * (f(x + epsilon b) - f(x))) / epsilon`` with ``b`` standard normal: the mean of
    ``d f_i / d x_i`` over voxels, unbiased for a smooth ``f``. With ``axis``, one mean per index
    along that axis (e.g. per volume of a series).
    """
    image = np.asarray(image, dtype=np.float32)
    probe = np.random.default_rng(seed).standard_normal(image.shape).astype(np.float32)
    moved = np.asarray(denoiser(image + np.float32(epsilon) * probe), np.float64)
    change = (moved - np.asarray(denoiser(image), np.float64)) * probe / float(epsilon)
    if axis is None:
        return float(change.mean())
    other = tuple(a for a in range(image.ndim) if a != axis % image.ndim)
    return change.mean(axis=other)


# --------------------------------------------------------------------------- a guard on the angular contrast


#: Angular contrast a blend may lose per unit of noise variance it removes, times the SNR
#: (see :func:`contrast_cap`).
CONTRAST_RATE = 1.0
#: Share of the angular contrast a blend may lose in any case (a bias of at most this share of FA).
CONTRAST_TOLERANCE = 0.005


def angular_contrast(output, data, shell_of_volume, noise_variance, mask, *, divergence=None, partner=None):
    """How much of the angular contrast ``output`` keeps, per diffusion-weighted shell.

    The angular contrast of a shell is each volume's deviation from the shell's mean at each voxel:
    what anisotropy (FA) is made of. ``c = <f_dev, s_dev> / |s_dev|^2`` is 1 for an output that
    keeps it and 0 for one that flattens it (e.g. smooths every volume alike where fibres bend).
    Estimated without the signal ``s``: for a J-invariant output ``<f_dev, x_dev>`` is
    ``<f_dev, s_dev>`` to within noise, and ``|s_dev|^2 = |x_dev|^2 - (N - 1) sum s`` (``N``
    volumes, ``s`` the noise variance per voxel); an output that sees its own voxel (divergence
    ``d`` per volume) adds ``d (1 - 1/N) sum s`` to the product, which is taken off. With a
    ``partner`` series (independent repeats of each volume), ``<f_dev, partner_dev>`` and
    ``<x_dev, partner_dev>`` need no noise term.

    Returns
    -------
    dict of shell label to c (shells with fewer than 2 volumes, and the b0s, are left out)
    """
    shell_of_volume = np.asarray(shell_of_volume)
    mask = np.asarray(mask, dtype=bool)
    noise = float(np.sum(np.broadcast_to(noise_variance, mask.shape)[mask]))
    result = {}
    for label in np.unique(shell_of_volume):
        volumes = np.flatnonzero(shell_of_volume == label)
        if label == 0 or volumes.size < 2:
            continue
        n = volumes.size

        def deviations(series):
            values = np.asarray(series, np.float64)[mask][:, volumes]
            return values - values.mean(axis=1, keepdims=True)

        f_dev, x_dev = deviations(output), deviations(data)
        if partner is not None:
            p_dev = deviations(partner)
            signal = float(np.sum(x_dev * p_dev))
            product = float(np.sum(f_dev * p_dev))
        else:
            signal = float(np.sum(x_dev**2)) - (n - 1) * noise
            product = float(np.sum(f_dev * x_dev))
            if divergence is not None:
                product -= float(np.sum(np.asarray(divergence)[volumes])) * (1 - 1 / n) * noise
        result[int(label)] = product / signal if signal > 0 else 1.0
    return result


def contrast_cap(contrast, shell_gains, snr, rate=CONTRAST_RATE, tolerance=CONTRAST_TOLERANCE) -> float:
    """The largest scale ``t`` of the blend weights whose loss of angular contrast its noise removal pays for.

    The error of DTI's FA has two parts: the noise (about ``FA_noise ~ 0.35 / SNR`` of the FA at
    SNR 10-30 on our phantom, falling as the square root of the noise variance left) and the bias
    of a flattened contrast (the share lost times the FA). A blend that removes a share ``g`` of the
    noise variance lowers the first by about ``g/2`` of it, so losing a share ``l`` of the contrast
    is paid for while ``l <= k g`` with ``k`` about ``0.35 / SNR / 2``. That reasoning is rough and
    errs on the side of caution: on the phantom at SNR 10-12, MP-PCA's default (``l / g`` about
    0.044), a Noise2Noise output (about 0.06) and P2S-Net's (about 0.09) all lowered the FA error,
    while Noise2Self outputs that lose 30-45% of the contrast raised it even at weights of a few
    percent. ``k = rate / snr`` with ``rate`` 1 (0.083 at SNR 12) is set from those measurements.
    A loss of at most ``tolerance`` of the contrast (0.5%: a bias of at most 0.5% of FA) is allowed
    in any case, so a small, safe share of an output that helps little is still used.

    Scaling every weight by ``t``, a shell loses ``t a_mean (1 - c)`` (``c`` from
    :func:`angular_contrast`) and removes ``g(t) = mean_v (2 t a_v p_v - t^2 a_v^2 q_v)`` of the
    noise variance, where volume ``v``'s estimated risk is ``s (1 - 2 a p + a^2 q)``: for a blend
    of a (J-invariant, or divergence ``d``) output with loss ``L``, ``p = 1 - d`` and ``q = L / s``.

    Parameters
    ----------
    contrast : dict of shell label to c
    shell_gains : dict of shell label to list of (a, p, q), one per volume
    snr : float
        The data's signal-to-noise ratio (e.g. the b0s' mean in the brain over the noise sigma).

    Returns
    -------
    float in [0, 1]
    """
    k = rate / max(float(snr), 1e-6)
    cap = 1.0
    for label, c in contrast.items():
        terms = np.asarray(shell_gains.get(label, []), dtype=np.float64).reshape(-1, 3)
        if not terms.size or c >= 1.0:
            continue
        a, p, q = terms.T
        lost = float(np.mean(a)) * (1.0 - c)
        linear, quadratic = float(np.mean(2 * a * p)), float(np.mean(a * a * q))
        if lost <= 0:
            continue
        # t lost <= k (t linear - t^2 quadratic)  <=>  t quadratic <= linear - lost / k
        room = linear - lost / k
        paid = 0.0 if room <= 0 else (1.0 if quadratic <= 0 else min(1.0, room / quadratic))
        cap = min(cap, max(paid, min(1.0, tolerance / lost)))
    return float(cap)


def signal_to_noise(series, bvals, noise_variance, mask, b0_threshold=50.0) -> float:
    """Mean of the b0s (of all volumes, where there is no b0) in ``mask`` over the noise sigma there."""
    series = np.asarray(series)
    b0 = np.asarray(bvals, dtype=float) <= b0_threshold if bvals is not None else np.zeros(series.shape[-1], bool)
    reference = series[..., b0] if b0.any() else series
    sigma = float(np.sqrt(np.mean(np.broadcast_to(noise_variance, mask.shape)[mask])))
    return float(np.mean(reference[mask])) / sigma if sigma > 0 else float("inf")
