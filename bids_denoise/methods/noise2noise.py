"""Noise2Noise for diffusion MRI: pairs of independent measurements of the same signal.

A network trained to map one noisy measurement to another, independent noisy
measurement of the *same* signal learns to remove the noise, with no clean data
(Lehtinen et al. 2018): the expected loss is the error against the signal plus
the target's noise variance. In a diffusion run, measurements of the same
signal are:

* **repeats** (default): volumes of one shell whose gradient directions are
  within ``max_angle`` degrees of each other (``g`` and ``-g`` are the same
  direction), and the b0 volumes among themselves;
* **a second run** with the same gradient table (``repeat=``): each volume is
  paired with the same volume of the other series.

Volumes with no repeat are passed through unchanged. A run with no repeated
measurement at all is returned unchanged, with a warning: the method says no
rather than train on pairs whose signals differ.

``pairing="nearest"`` pairs each volume with the nearest-direction volume of
its shell, as earlier versions did. Those are *not* measurements of the same
signal: the network learns the average of neighbouring directions, flattens
the angular contrast and biases FA (measured on the phantom in
``benchmarks/learned.py``); it is there for comparison, not as a default.

**Do no harm.** The output for a volume is ``a f(x_v) + (1 - a) x_v``, with
``a`` the weight that best predicts the partner ``x_w``:
``a = <f - x_v, x_w - x_v> / |f - x_v|^2`` (clipped to [0, 1]). Because
``x_w`` is independent of ``x_v``, ``E|g - x_w|^2`` is ``g``'s error against
the signal plus a constant: the weight minimises the error without ground truth,
and ``a = 0`` keeps the input. Such per-volume risks miss a bias that all
volumes share (a 2D network smooths each volume where fibres bend, which
flattens the angular contrast, and FA, while lowering every volume's error):
a guard scales all weights down until the angular contrast the output loses,
measured against the partners, is paid for by the noise it removes
(:func:`bids_denoise.methods.core.calibrate.angular_contrast`,
:func:`bids_denoise.methods.core.calibrate.contrast_cap`); 0 returns the input.

Training and inference work on 2D slices at native resolution (the network pads
and crops internally; nothing is resampled, repeated or truncated), optionally
2.5D with neighbouring slices as extra channels.

References
----------
.. [1] Lehtinen J. et al. Noise2Noise: Learning Image Restoration without Clean
       Data. ICML 2018.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from bids_denoise.methods.core.calibrate import CONTRAST_RATE, angular_contrast, contrast_cap, signal_to_noise
from bids_denoise.methods.core.device import resolve_device
from bids_denoise.methods.core.errors import UnsuitableDataError
from bids_denoise.methods.core.networks import (
    TrainingOptions,
    UNet,
    from_slices,
    neighbour_stack,
    predict_in_batches,
    psnr,
    seed_everything,
    ssim,
    to_slices,
    train_or_reuse,
)
from bids_denoise.methods.core.options import option, positive, resolve_options
from bids_denoise.methods.core.scaling import IntensityScale
from bids_denoise.methods.core.shells import cluster_shells

LOGGER = logging.getLogger(__name__)


#: Pairings of :func:`pair_volumes`.
PAIRINGS = ("repeats", "nearest")


@dataclass(frozen=True)
class Noise2NoiseOptions(TrainingOptions):
    """The options of :func:`noise2noise` (the training budget: :class:`TrainingOptions`).

    Attributes
    ----------
    pairing : {"repeats", "nearest"}
        How volumes of the run are paired (see :func:`pair_volumes`); ignored with a ``repeat``
        series.
    max_angle : float
        Largest angle in degrees between repeats of one direction.
    slice_axis : {0, 1, 2}
        Axis of the 2D slices (default 2, the usual slice axis).
    context : int
        Neighbouring slices on each side given as extra channels (2.5D); 0 = 2D.
    b0_threshold, shell_tolerance : float
        Shells as :func:`bids_denoise.methods.core.shells.cluster_shells`.
    blend : bool
        Blend each paired volume with the input by the weight that best predicts its partner
        (default); False writes the network's output as is.
    width, depth : int
        The U-Net's channels at its first level and its number of downsamplings.
    validation_fraction : float
        Share of slice positions held out for early stopping.
    """

    pairing: str = option("repeats", "pair repeated measurements (repeats: b0s, directions within max_angle) or "
                                     "each volume with the nearest direction of its shell (nearest: biases FA)",
                          choices=PAIRINGS)
    max_angle: float = option(5.0, "largest angle in degrees between repeats of one gradient direction",
                              parse=positive(float))
    slice_axis: int = option(2, "axis of the 2D slices", choices=(0, 1, 2))
    context: int = option(0, "neighbouring slices on each side as extra channels (2.5D); 0 = 2D")
    shell_tolerance: float = option(100.0, "b-value gap that separates shells", parse=positive(float))
    b0_threshold: float = option(50.0, "largest b-value of a b0", app=False)
    blend: bool = option(True, "blend each volume with the input by the weight that best predicts its partner",
                         app=False)
    width: int = option(24, "channels of the U-Net's first level", app=False)
    depth: int = option(2, "downsamplings of the U-Net", app=False)
    validation_fraction: float = option(0.1, "share of slice positions held out for early stopping", app=False)


@dataclass
class Noise2NoiseResult:
    """Output of :func:`noise2noise`.

    ``passed_through`` lists the volumes returned unchanged: with no partner to train on or be
    judged against (no repeat, alone in their shell). ``blend_weights`` holds each volume's weight
    of the network's output (0 for those passed through). ``warnings`` says what a user should know
    (no repeated measurement: the input returned unchanged).
    """

    denoised: np.ndarray
    pairs: list  # (volume, partner, angle in degrees)
    passed_through: list
    history: dict
    pair_psnr: float
    pair_ssim: float
    state_dict: dict | None
    pairing: str = "repeats"
    blend_weights: list = field(default_factory=list)
    warnings: list = field(default_factory=list)
    #: the guard: the scale of the blend weights kept, and the angular contrast the output keeps per shell
    guard: dict = field(default_factory=dict)


def _unit_directions(bvecs):
    directions = np.asarray(bvecs, dtype=float).reshape(3, -1)
    return directions / np.maximum(np.linalg.norm(directions, axis=0), 1e-12)


def pair_volumes(bvals, bvecs, *, pairing="repeats", max_angle=5.0, b0_threshold=50.0, shell_tolerance=100.0):
    """Pairs of volumes that measure the same signal (or, with ``pairing="nearest"``, nearly).

    Parameters
    ----------
    bvals : (V,) array
    bvecs : (3, V) array
        Directions; g and -g are the same diffusion direction.
    pairing : {"repeats", "nearest"}
        ``repeats``: each volume with the next volume (in acquisition order, cyclically) of its
        group of repeats: the b0s, or volumes of one shell within ``max_angle`` degrees of each
        other (groups are the connected sets of that relation). ``nearest``: each volume of a shell
        with the nearest other direction of its shell, however far; b0s with b0s.
    max_angle : float
        Largest angle in degrees between two repeats of one direction.

    Returns
    -------
    pairs : list of (volume, partner, angle_deg)
        Angles are 0 for b0 pairs.
    single : list of int
        Volumes with no partner (passed through unchanged).
    """
    if pairing not in PAIRINGS:
        raise ValueError(f"pairing must be one of {PAIRINGS}, got {pairing!r}")
    directions = _unit_directions(bvecs)
    shells = cluster_shells(bvals, b0_threshold=b0_threshold, tolerance=shell_tolerance)
    pairs, single = [], []
    for label in np.unique(shells):
        members = np.flatnonzero(shells == label)
        if members.size == 1:
            single.append(int(members[0]))
            continue
        if label == 0:
            for position, volume in enumerate(members):
                pairs.append((int(volume), int(members[(position + 1) % members.size]), 0.0))
            continue
        cosine = np.clip(np.abs(directions[:, members].T @ directions[:, members]), 0.0, 1.0)
        angles = np.degrees(np.arccos(cosine))
        np.fill_diagonal(angles, np.inf)
        if pairing == "nearest":
            for position, volume in enumerate(members):
                nearest = int(np.argmin(angles[position]))
                pairs.append((int(volume), int(members[nearest]), round(float(angles[position, nearest]), 3)))
            continue
        for group in _groups(angles <= max_angle):
            if len(group) == 1:
                single.append(int(members[group[0]]))
                continue
            for position, index in enumerate(group):
                partner = group[(position + 1) % len(group)]
                pairs.append((int(members[index]), int(members[partner]), round(float(angles[index, partner]), 3)))
    return sorted(pairs), sorted(single)


def _groups(adjacent):
    """Connected components of a symmetric boolean adjacency matrix, each sorted."""
    unseen, groups = set(range(adjacent.shape[0])), []
    while unseen:
        stack, group = [min(unseen)], set()
        while stack:
            node = stack.pop()
            if node in group:
                continue
            group.add(node)
            stack.extend(int(n) for n in np.flatnonzero(adjacent[node]) if n not in group)
        unseen -= group
        groups.append(sorted(group))
    return groups


def pair_blend_weight(output, data, partner) -> float:
    """The weight ``a`` for which ``a output + (1 - a) data`` best predicts the independent ``partner``."""
    step = np.asarray(output, np.float64) - np.asarray(data, np.float64)
    gain = float(np.sum(step * (np.asarray(partner, np.float64) - np.asarray(data, np.float64))))
    norm = float(np.sum(step**2))
    return float(np.clip(gain / norm, 0.0, 1.0)) if norm > 0 else 0.0


def noise2noise(data, bvals, bvecs, options: Noise2NoiseOptions | None = None, *, repeat=None, seed=0, device="cpu",
                state_dict=None, **changes) -> Noise2NoiseResult:
    """Denoise a DWI series with Noise2Noise trained on pairs of its measurements of the same signal.

    Parameters
    ----------
    data : ndarray (X, Y, Z, V)
    bvals : (V,), bvecs : (3, V)
    options : Noise2NoiseOptions, optional
        The method's options (default: :class:`Noise2NoiseOptions`'s); keyword ``changes`` replace
        single options, e.g. ``noise2noise(data, bvals, bvecs, pairing="nearest", epochs=5)``.
    repeat : ndarray (X, Y, Z, V), optional
        A second series with the same gradient table (another run): volume ``v`` of ``data`` is
        paired with volume ``v`` of ``repeat`` and the other way round. ``data`` alone is denoised.
    seed : int
    device : str
    state_dict : dict, optional
        Trained weights to reuse (no training then).

    Returns
    -------
    Noise2NoiseResult
        Volumes with no partner are passed through unchanged (``passed_through``); with no pair at
        all the input is returned unchanged and ``warnings`` says why.

    Raises
    ------
    UnsuitableDataError
        Not a 4D series, or a ``repeat`` of another shape.

    Notes
    -----
    Any image size works: the U-Net pads each slice to a multiple of ``2**depth`` and crops
    back. Scale-invariant: the data are divided by a robust maximum (:class:`IntensityScale`)
    before the network sees them, and multiplied back.
    """
    options = resolve_options(Noise2NoiseOptions, options, changes)
    pairing, slice_axis, context, blend = options.pairing, options.slice_axis, options.context, options.blend
    b0_threshold, shell_tolerance, batch_size = options.b0_threshold, options.shell_tolerance, options.batch_size
    data = np.asarray(data, dtype=np.float32)
    if data.ndim != 4:
        raise UnsuitableDataError(f"Noise2Noise needs a 4D series, got an image of shape {data.shape}")
    n_volumes = data.shape[3]
    if repeat is not None:
        repeat = np.asarray(repeat, dtype=np.float32)
        if repeat.shape != data.shape:
            raise UnsuitableDataError(f"the repeated series has shape {repeat.shape}, the run {data.shape}")
        # volume v of the run and volume v of the repeat (index n_volumes + v) measure the same signal
        pairs = [(v, n_volumes + v, 0.0) for v in range(n_volumes)] + [(n_volumes + v, v, 0.0)
                                                                       for v in range(n_volumes)]
        single, pairing = [], "second run"
    else:
        pairs, single = pair_volumes(bvals, bvecs, pairing=pairing, max_angle=options.max_angle,
                                     b0_threshold=b0_threshold, shell_tolerance=shell_tolerance)
    if not pairs:
        return Noise2NoiseResult(
            denoised=data.copy(), pairs=[], passed_through=list(range(n_volumes)), history={}, pair_psnr=float("nan"),
            pair_ssim=float("nan"), state_dict=None, pairing=pairing, blend_weights=[0.0] * n_volumes,
            warnings=["no repeated measurement in the run (no two b0s, no direction repeated within "
                      f"{options.max_angle:g} degrees in a shell): Noise2Noise has no pair to train on and returned "
                      "the input unchanged"])
    device = resolve_device(device)
    generator = seed_everything(seed)
    both = data if repeat is None else np.concatenate([data, repeat], axis=3)
    scale = IntensityScale.fit(data)
    normalised = scale.forward(both)
    slices = [neighbour_stack(to_slices(normalised[..., v], slice_axis), context) for v in range(both.shape[3])]
    n_slices = slices[0].shape[0]
    rng = np.random.default_rng(seed)
    positions = rng.permutation(n_slices)
    n_val = max(1, int(round(options.validation_fraction * n_slices))) if n_slices > 2 else 0
    val_positions, train_positions = positions[:n_val], positions[n_val:] if n_val else positions
    pair_array = np.array([(a, b) for a, b, _ in pairs])
    centre = context

    def batch_at(pair_index, position):
        source, target = pair_array[pair_index]
        inputs = slices[source][position]
        targets = slices[target][position][centre : centre + 1]
        return torch.from_numpy(np.ascontiguousarray(inputs)), torch.from_numpy(np.ascontiguousarray(targets))

    def sample_batch(gen, size):
        pair_index = torch.randint(len(pair_array), (size,), generator=gen).numpy()
        position = train_positions[torch.randint(len(train_positions), (size,), generator=gen).numpy()]
        items = [batch_at(p, s) for p, s in zip(pair_index, position)]
        return torch.stack([i for i, _ in items]), torch.stack([t for _, t in items])

    def loss_fn(model, inputs, targets):
        return torch.mean((model(inputs) - targets) ** 2)

    validation = []
    val_rng = np.random.default_rng(seed + 1)
    for position in val_positions:
        chosen = val_rng.choice(len(pair_array), size=min(8, len(pair_array)), replace=False)
        items = [batch_at(p, position) for p in chosen]
        validation.append((torch.stack([i for i, _ in items]), torch.stack([t for _, t in items])))

    model = UNet(dims=2, in_channels=2 * context + 1, out_channels=1, width=options.width, depth=options.depth)
    history = train_or_reuse(model, state_dict, sample_batch, loss_fn,
                             validation or [sample_batch(generator, batch_size)], budget=options.budget, device=device,
                             generator=generator, label="noise2noise")

    partner_of = {a: b for a, b, _ in pairs if a < n_volumes}
    network = normalised[..., :n_volumes].copy()
    weights = np.zeros(n_volumes)
    for volume, partner in sorted(partner_of.items()):
        predicted = predict_in_batches(model, slices[volume], device, batch_size=max(batch_size, 8))[:, 0]
        network[..., volume] = from_slices(predicted, slice_axis)
        weights[volume] = (pair_blend_weight(network[..., volume], normalised[..., volume],
                                             normalised[..., partner]) if blend else 1.0)
    series = normalised[..., :n_volumes]

    def blended_at(factor):
        return series + (factor * weights) * (network - series)

    guard = {"scale": 1.0}
    if blend:
        from bids_denoise.methods.core.masking import b0_brain_mask

        mask = b0_brain_mask(series, np.asarray(bvals, float), b0_threshold=b0_threshold)
        mask = mask if mask.any() else np.ones(series.shape[:3], dtype=bool)
        shells = cluster_shells(bvals, b0_threshold=b0_threshold, tolerance=shell_tolerance)
        partner_series = normalised[..., [partner_of.get(v, v) for v in range(n_volumes)]]
        contrast = angular_contrast(network, series, shells, 0.0, mask, partner=partner_series)
        paired = sorted(partner_of)
        # the noise variance from the pairs: half the mean squared difference of two measurements
        variance = float(np.mean([np.mean((series[..., v][mask] - partner_series[..., v][mask]) ** 2) / 2
                                  for v in paired]))
        gains = [(0.0, 0.0, 0.0)] * n_volumes
        for v in paired:
            step = network[..., v][mask] - series[..., v][mask]
            towards = partner_series[..., v][mask] - series[..., v][mask]
            gains[v] = (float(weights[v]), float(np.mean(step * towards)) / max(variance, 1e-30),
                        float(np.mean(step**2)) / max(variance, 1e-30))
        snr = signal_to_noise(series, bvals, variance, mask, b0_threshold)
        # at half the rate of the J-invariant methods: a 2D network's loss of contrast is local (where
        # fibres bend), and a shell-wide share of it understated its FA bias on the phantom
        cap = contrast_cap(contrast, {int(label): [gains[v] for v in np.flatnonzero(shells == label)]
                                      for label in np.unique(shells)}, snr, rate=CONTRAST_RATE / 2)
        guard = {"scale": cap, "angular_contrast": contrast, "snr": round(snr, 3)}
    guard_scale = guard["scale"]
    weights = weights * guard_scale
    denoised = data.copy()  # volumes with no weight keep their values to the bit
    changed = np.flatnonzero(weights > 0)
    denoised[..., changed] = scale.inverse(blended_at(1.0)[..., changed])
    # how well the output of a volume predicts its partner (the Noise2Noise figure of merit)
    scored = sorted(partner_of.items())[:16]
    scores = [(psnr(normalised[..., b], scale.forward(denoised[..., a])),
               ssim(normalised[..., b], scale.forward(denoised[..., a]))) for a, b in scored]
    warnings = []
    if blend and guard_scale == 0.0:
        warnings.append("the network's output flattened the angular contrast: the input was returned unchanged")
    if single and repeat is None:
        warnings.append(f"volumes {single} have no repeated measurement ({pairing} pairing): passed through unchanged")
    return Noise2NoiseResult(
        denoised=denoised, pairs=[p for p in pairs if p[0] < n_volumes], passed_through=single, history=history,
        pair_psnr=round(float(np.mean([s[0] for s in scores])), 3),
        pair_ssim=round(float(np.mean([s[1] for s in scores])), 4),
        state_dict={k: v.cpu() for k, v in model.state_dict().items()}, pairing=pairing,
        blend_weights=[round(float(w), 4) for w in weights], warnings=warnings,
        guard=guard,
    )
