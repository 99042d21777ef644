"""Noise2Self: J-invariant networks trained on the noisy image itself.

If noise is independent across voxels and the signal is not, a function whose
output on a set J of voxels never looks at the input on J can be trained
against the noisy image itself: its self-supervised loss equals the supervised
loss plus a constant (Batson & Royer 2019). The :class:`Masker` hides a grid of
voxels (one of ``width**d`` phases), fills them (zeros, or the mean of their
neighbours), and the loss is taken on the hidden voxels only. J-invariant
inference runs every phase and takes each voxel from the pass that hid it.

Two contexts for DWI: ``volume`` (each volume on its own, a spatial blind spot)
and ``series`` (the other volumes of the same shell are extra input channels,
visible everywhere, while the target volume's masked voxels stay hidden; still
J-invariant because noise is independent across volumes). A volume alone in
its shell (a single b0, a lone b-value) has no partners: in the ``series``
context it is denoised in the ``volume`` context, and the result says so.
Images are processed as 2D slices.

**Do no harm.** The network's output is never written as is. For each volume
the calibration of :mod:`bids_denoise.methods.core.calibrate` weighs three
candidates by their estimated error: the input itself; the J-invariant output
blended with the input (``a = s / mean (f - x)^2``, ``s`` the noise variance
from MP-PCA's noise map, or the finest wavelet detail for an image); and the
ordinary, unmasked pass of the network (which sees the voxel it writes and is
often better [1]_) blended the same way, its risk from Stein's estimate with
the divergence measured by a Monte-Carlo probe. The least risk is written; the
input is kept where neither output lowers it. For a DWI series (b-vectors
given) a guard then scales every volume's weight down until the angular
contrast the output loses is paid for by the noise it removes
(:func:`bids_denoise.methods.core.calibrate.angular_contrast`,
:func:`bids_denoise.methods.core.calibrate.contrast_cap`): per-volume risks miss a
bias all volumes share, such as angular contrast flattened where fibres bend,
and FA's error grows with that loss even at small weights.

References
----------
.. [1] Batson J., Royer L. Noise2Self: Blind Denoising by Self-Supervision.
       ICML 2019.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.nn import functional as F

from bids_denoise.methods.core.calibrate import angular_contrast, choose_blend, contrast_cap, grid_mask, signal_to_noise
from bids_denoise.methods.core.device import resolve_device
from bids_denoise.methods.core.errors import UnsuitableDataError
from bids_denoise.methods.core.networks import (
    TrainingOptions,
    UNet,
    from_slices,
    seed_everything,
    to_slices,
    train_or_reuse,
)
from bids_denoise.methods.core.noise import image_noise_variance, series_noise_variance
from bids_denoise.methods.core.options import option, positive, resolve_options
from bids_denoise.methods.core.scaling import IntensityScale
from bids_denoise.methods.core.shells import cluster_shells


class Masker:
    """Grid masks of a given width in 2D or 3D, with ``zero`` or ``interpolate`` fill.

    Phase ``p`` hides the voxels whose coordinates, modulo ``width``, equal the
    ``p``-th combination; the ``width**dims`` phases cover every voxel exactly once.
    ``interpolate`` fills a hidden voxel with the mean of its visible neighbours.
    """

    def __init__(self, width=3, mode="interpolate", dims=2):
        if mode not in ("zero", "interpolate"):
            raise ValueError("mode must be 'zero' or 'interpolate'")
        self.width, self.mode, self.dims = int(width), mode, int(dims)
        self.n_phases = self.width**self.dims
        kernel = np.ones((3,) * self.dims, dtype=np.float32)
        kernel[(1,) * self.dims] = 0.0  # the centre is never looked at
        self.kernel = torch.from_numpy(kernel)[None, None]

    def mask(self, shape, phase, device=None):
        """Boolean mask (spatial shape) of phase ``phase``."""
        hidden = torch.from_numpy(grid_mask(tuple(shape), self.width, int(phase) % self.n_phases))
        return hidden.to(device) if device is not None else hidden

    def phases_hiding(self, shape) -> list:
        """The phases that hide at least one voxel of an image of ``shape``.

        All of them unless the image is narrower than ``width`` along some axis; a phase that
        hides nothing has no loss to train on (a mean over no voxels) and nothing to predict.
        """
        return [phase for phase in range(self.n_phases) if grid_mask(tuple(shape), self.width, phase).any()]

    def apply(self, images, phase):
        """Hide phase ``phase`` in (N, C, *spatial) images; return (masked images, mask)."""
        hidden = self.mask(images.shape[2:], phase, images.device)
        if self.mode == "zero":
            filled = torch.zeros_like(images)
        else:
            filled = self._visible_neighbour_mean(images, hidden)
        masked = torch.where(hidden, filled, images)
        return masked, hidden

    def _visible_neighbour_mean(self, images, hidden):
        """Mean of each voxel's neighbours that are visible and inside the image (0 where none is).

        Leaving out the hidden voxels and the outside keeps a hidden voxel's fill free of its own
        value at the border too, where padding by replication would copy it into its neighbours
        (on an image a voxel or two wide, into all of them) and break J-invariance.
        """
        conv = F.conv2d if self.dims == 2 else F.conv3d
        kernel = self.kernel.to(images.device, images.dtype)
        visible = (~hidden).to(images.dtype)
        count = conv(visible[None, None], kernel, padding=1)[0, 0]
        spatial = images.shape[2:]
        sums = conv((images * visible).reshape(-1, 1, *spatial), kernel, padding=1).reshape(images.shape)
        return sums / count.clamp_min(1.0)


def masked_loss(model, masker, target, extra, phase):
    """Mean squared error on the hidden voxels of channel 0 (the target image)."""
    masked_target, hidden = masker.apply(target, phase)
    inputs = masked_target if extra is None else torch.cat([masked_target, extra], dim=1)
    output = model(inputs)
    return torch.mean(((output - target)[:, :, hidden]) ** 2)


def j_invariant_predict(model, masker, target, extra=None):
    """Each voxel from the pass that hid it (one pass per phase that hides a voxel)."""
    result = torch.zeros_like(target)
    with torch.no_grad():
        for phase in masker.phases_hiding(target.shape[2:]):
            masked_target, hidden = masker.apply(target, phase)
            inputs = masked_target if extra is None else torch.cat([masked_target, extra], dim=1)
            output = model(inputs)
            result[:, :, hidden] = output[:, :, hidden]
    return result


@dataclass
class Noise2SelfResult:
    """Output of :func:`noise2self`.

    Attributes
    ----------
    denoised : ndarray, the shape of the input
    history : dict
        Training history of the main network.
    context : str
        The context the main network ran in: the one asked for, or ``"volume"`` where the
        ``series`` context was asked for but no volume had another volume in its shell.
    final_loss : float
        Last held-out loss of the main network.
    state_dict : dict
        Weights of the main network.
    volume_context_volumes : list of int
        Volumes denoised in the ``volume`` context although the ``series`` context was asked
        for: alone in their shell (a single b0, a lone b-value), they have no partner volumes.
    volume_context_history, volume_context_state_dict : dict or None
        Training history and weights of the network that denoised them, where it is not the main
        network (some volumes of the series had partners, these did not).
    """

    denoised: np.ndarray
    history: dict
    context: str
    final_loss: float
    state_dict: dict
    volume_context_volumes: list = field(default_factory=list)
    volume_context_history: dict | None = None
    volume_context_state_dict: dict | None = None
    #: per volume: the output written ("j-invariant", "single pass" or "identity"), its weight, and every
    #: candidate's blend (weight, estimated risk, noise variance, loss, divergence)
    choices: list = field(default_factory=list)
    blend_weights: list = field(default_factory=list)
    blends: list = field(default_factory=list)
    #: the guard: the scale of the blend weights kept, and the angular contrast the output keeps per shell
    guard: dict = field(default_factory=dict)


def _series_partners(bvals, b0_threshold, shell_tolerance, n_partners):
    """For each volume, up to ``n_partners`` other volumes of its shell (nearest in order).

    A volume alone in its shell gets none (an empty list).
    """
    shells = cluster_shells(bvals, b0_threshold=b0_threshold, tolerance=shell_tolerance)
    partners = []
    for volume, label in enumerate(shells):
        members = [m for m in np.flatnonzero(shells == label) if m != volume]
        members.sort(key=lambda m: abs(m - volume))
        chosen = members[:n_partners]
        while chosen and len(chosen) < n_partners:  # small shells: cycle, stays J-invariant
            chosen.append(chosen[len(chosen) % max(len(members), 1)])
        partners.append(chosen)
    return partners


@dataclass(frozen=True)
class Noise2SelfOptions(TrainingOptions):
    """The options of :func:`noise2self` (the training budget: :class:`TrainingOptions`).

    Attributes
    ----------
    context : {"volume", "series"}
        ``volume`` (default): each volume alone, a spatial blind spot. ``series``: the other volumes
        of the same shell are extra input channels (``bvals`` needed). In the ``series`` context, a
        volume alone in its shell (a single b0, a lone b-value) has no partners: it is denoised in
        the ``volume`` context by a second network trained on such volumes (under the same budget),
        and listed in ``volume_context_volumes``.
    mask_width : int
        Masker grid width (``mask_width**2`` phases on 2D slices). Slices narrower than
        ``mask_width`` work: only the phases that hide a voxel are used.
    fill : {"interpolate", "zero"}
        How the masked voxels are filled: the mean of their visible neighbours, or zeros.
    slice_axis : {0, 1, 2}
        Axis of the 2D slices.
    n_partners : int
        Other volumes of the shell given as channels in the ``series`` context.
    b0_threshold, shell_tolerance : float
        Shells as :func:`bids_denoise.methods.core.shells.cluster_shells`.
    net_width, depth : int
        The U-Net's channels at its first level and its number of downsamplings.
    j_invariant : bool
        J-invariant inference (default) or a single unmasked pass, when ``calibrate`` is False.
    calibrate : bool
        Per volume, write the least-risk of the input, the blended J-invariant output and the
        blended single-pass output (default; see the module's docstring). False: the network's
        output as ``j_invariant`` says.
    """

    context: str = option("volume", "each volume alone, or with other volumes of its shell as channels",
                          choices=("volume", "series"))
    mask_width: int = option(3, "masker grid width", parse=positive(int))
    fill: str = option("interpolate", "how masked voxels are filled", choices=("zero", "interpolate"))
    slice_axis: int = option(2, "axis of the 2D slices", choices=(0, 1, 2))
    n_partners: int = option(4, "other volumes of the shell as channels (series context)", app=False)
    b0_threshold: float = option(50.0, "largest b-value of a b0", app=False)
    shell_tolerance: float = option(100.0, "b-value gap that separates shells", app=False)
    net_width: int = option(24, "channels of the U-Net's first level", app=False)
    depth: int = option(2, "downsamplings of the U-Net", app=False)
    j_invariant: bool = option(True, "J-invariant inference (uncalibrated)", app=False)
    calibrate: bool = option(True, "per volume, the least-risk of the input and the blended outputs", app=False)


def noise2self(data, bvals=None, bvecs=None, options: Noise2SelfOptions | None = None, *, mask=None, seed=0,
               device="cpu", state_dict=None, volume_context_state_dict=None, **changes) -> Noise2SelfResult:
    """Denoise a 3D image or a 4D series with a J-invariant network trained on itself.

    Parameters
    ----------
    data : ndarray, (X, Y, Z) or (X, Y, Z, V)
    bvals : (V,) array, needed for ``context="series"``
    bvecs : (3, V) array, optional
        With ``bvals``, the calibration's tensor guard runs (see the module's docstring).
    options : Noise2SelfOptions, optional
        The method's options (default: :class:`Noise2SelfOptions`'s); keyword ``changes`` replace
        single options, e.g. ``noise2self(data, bvals, context="series", epochs=5)``.
    mask : ndarray of bool, optional
        Voxels over which the calibration is estimated (default: an automatic b0 brain mask for a
        DWI series, the whole image otherwise).
    seed : int
    device : str
    state_dict, volume_context_state_dict : dict, optional
        Trained weights to reuse (no training then): of the main network, and of the network of
        the volumes denoised in the volume context (see :class:`Noise2SelfResult`).

    Returns
    -------
    Noise2SelfResult

    Notes
    -----
    Scale-invariant: the data are divided by a robust maximum (:class:`IntensityScale`) before
    the networks see them, and multiplied back.
    """
    options = resolve_options(Noise2SelfOptions, options, changes)
    context, slice_axis = options.context, options.slice_axis
    data = np.asarray(data, dtype=np.float32)
    if data.ndim not in (3, 4):
        raise UnsuitableDataError(f"Noise2Self needs a 3D image or a 4D series, got shape {data.shape}")
    squeeze = data.ndim == 3
    series = data[..., None] if squeeze else data
    if context == "series" and (squeeze or bvals is None):
        raise ValueError("the series context needs a 4D series and its b-values")
    device = resolve_device(device)
    generator = seed_everything(seed)
    scale = IntensityScale.fit(series)
    normalised = scale.forward(series)
    # (V, n_slices, H, W)
    stack = np.stack([to_slices(normalised[..., v], slice_axis) for v in range(series.shape[3])])
    partners = (_series_partners(bvals, options.b0_threshold, options.shell_tolerance, options.n_partners)
                if context == "series" else None)
    alone = [] if partners is None else [v for v, chosen in enumerate(partners) if not chosen]
    with_partners = [v for v in range(stack.shape[0]) if v not in alone]
    fit = functools.partial(
        _fit_and_denoise, stack, Masker(options.mask_width, options.fill, dims=2), seed=seed, device=device,
        generator=generator, budget=options.budget, net_width=options.net_width, depth=options.depth,
        j_invariant=options.j_invariant,
    )
    fallback_volumes = alone
    if not with_partners:  # the series context, but no volume has a partner: the volume context for all
        context, partners, with_partners, fallback_volumes = "volume", None, alone, []
    main = fit(with_partners, partners, options.n_partners, state_dict, f"noise2self ({context})")
    fallback = None
    if fallback_volumes:
        fallback = fit(fallback_volumes, None, 0, volume_context_state_dict, "noise2self (volume, alone in shell)")
    denoised = np.empty_like(stack)
    for run in (main, fallback):
        if run is not None:
            denoised[run.volumes] = run.denoised
    result = np.stack([from_slices(denoised[v], slice_axis) for v in range(stack.shape[0])], axis=-1)
    choices, weights, blends, guard = [], [], [], {}
    if options.calibrate:
        single = np.empty_like(stack)
        probe_change = np.empty_like(stack)
        for run in (main, fallback):
            if run is not None:
                single[run.volumes], probe_change[run.volumes] = run.single_pass, run.probe_change
        single = np.stack([from_slices(single[v], slice_axis) for v in range(stack.shape[0])], axis=-1)
        probe_change = np.stack([from_slices(probe_change[v], slice_axis) for v in range(stack.shape[0])], axis=-1)
        calibration = _calibrated(normalised, result, single, probe_change, bvals, mask)
        result, choices, weights, blends = (calibration[k] for k in ("output", "choices", "weights", "blends"))
        if bvals is not None and bvecs is not None and not squeeze:
            shells = cluster_shells(bvals, b0_threshold=options.b0_threshold, tolerance=options.shell_tolerance)
            contrast = angular_contrast(calibration["chosen"], normalised, shells, calibration["variance"],
                                        calibration["mask"], divergence=calibration["divergence"])
            snr = signal_to_noise(normalised, bvals, calibration["variance"], calibration["mask"])
            cap = contrast_cap(contrast, {int(label): [calibration["gains"][v] for v in np.flatnonzero(shells == label)]
                                          for label in np.unique(shells)}, snr)
            result = normalised + cap * (result - normalised)
            weights = [round(w * cap, 4) for w in weights]
            choices = [c if cap > 0 else "identity" for c in choices]
            guard = {"scale": cap, "angular_contrast": contrast, "snr": round(snr, 3)}
    result = scale.inverse(result)
    if options.calibrate:  # volumes kept as they were keep their values to the bit
        for volume, choice in enumerate(choices):
            if choice == "identity" or weights[volume] == 0:
                result[..., volume] = series[..., volume]
    return Noise2SelfResult(
        denoised=result[..., 0] if squeeze else result,
        history=main.history, context=context, final_loss=main.final_loss, state_dict=main.state_dict,
        volume_context_volumes=alone,
        volume_context_history=None if fallback is None else fallback.history,
        volume_context_state_dict=None if fallback is None else fallback.state_dict,
        choices=choices, blend_weights=weights, blends=blends, guard=guard,
    )


#: Size of the Monte-Carlo probe that measures the single pass's divergence, relative to the data's scale.
PROBE_EPSILON = 1e-3


def _calibrated(series, j_invariant_output, single_pass, probe_change, bvals, mask) -> dict:
    """Per volume, the least-risk of the identity and the two blended outputs (normalised units).

    Returns a dict: ``output`` (the blends), ``choices``, ``weights``, ``blends`` (every candidate's,
    per volume), ``chosen`` (each volume's chosen output before the blend; the input where none),
    ``divergence`` (of the chosen output, per volume), ``gains`` (per volume, the ``(a, p, q)`` of
    :func:`bids_denoise.methods.core.calibrate.contrast_cap`), ``variance`` (noise map) and ``mask``.
    """
    if series.shape[3] >= 4:
        variance = series_noise_variance(series)
    else:
        variance = np.full(series.shape[:3], image_noise_variance([series[..., v] for v in range(series.shape[3])]))
    if mask is None:
        mask = np.ones(series.shape[:3], dtype=bool)
        if bvals is not None and series.shape[3] > 1:
            from bids_denoise.methods.core.masking import b0_brain_mask

            found = b0_brain_mask(series, np.asarray(bvals, float))
            mask = found if found.any() else mask
    mask = np.asarray(mask, dtype=bool)
    output, chosen = series.copy(), series.copy()
    choices, weights, blends, divergences, gains = [], [], [], [], []
    for volume in range(series.shape[3]):
        data = series[..., volume][mask]
        divergence = float(np.mean(probe_change[..., volume][mask]))
        candidates = {"j-invariant": (j_invariant_output[..., volume][mask], 0.0),
                      "single pass": (single_pass[..., volume][mask], divergence)}
        choice, found = choose_blend(candidates, data, variance[mask])
        weight = 0.0 if choice == "identity" else found[choice].weight
        if choice != "identity":
            source = j_invariant_output if choice == "j-invariant" else single_pass
            chosen[..., volume] = source[..., volume]
            output[..., volume] = weight * source[..., volume] + (1 - weight) * series[..., volume]
        choices.append(choice)
        weights.append(round(weight, 4))
        blends.append({name: blend.as_dict() for name, blend in found.items()})
        divergences.append(divergence if choice == "single pass" else 0.0)
        gains.append((0.0, 0.0, 0.0) if choice == "identity" else
                     (weight, 1.0 - found[choice].divergence, found[choice].loss / max(found[choice].identity_risk,
                                                                                          1e-30)))
    return {"output": output, "choices": choices, "weights": weights, "blends": blends, "chosen": chosen,
            "divergence": divergences, "gains": gains, "variance": variance, "mask": mask}


@dataclass
class _NetworkRun:
    """One network trained (or reused) on some volumes of the slice stack, and its output for them."""

    volumes: list
    denoised: np.ndarray  # (len(volumes), n_slices, H, W)
    history: dict
    final_loss: float
    state_dict: dict
    single_pass: np.ndarray  # the unmasked pass, same shape as denoised
    probe_change: np.ndarray  # probe * (single pass at x + eps probe - single pass at x) / eps, per voxel


class _SliceItems:
    """Training items of a network: (volume, slice position) pairs over its volumes, as tensors.

    Item ``i`` is slice ``i % n_slices`` of ``volumes[i // n_slices]``; with partners, the
    partner volumes' slices at the same position are the extra input channels.
    """

    def __init__(self, stack, volumes, partners):
        self.stack, self.volumes, self.partners = stack, list(volumes), partners
        self.n_slices = stack.shape[1]
        self.count = len(self.volumes) * self.n_slices

    def item(self, index):
        volume, position = divmod(int(index), self.n_slices)
        volume = self.volumes[volume]
        target = torch.from_numpy(np.ascontiguousarray(self.stack[volume, position][None]))
        extra = None
        if self.partners is not None:
            extra = torch.from_numpy(np.ascontiguousarray(self.stack[self.partners[volume], position]))
        return target, extra

    def gather(self, indices):
        items = [self.item(i) for i in indices]
        target = torch.stack([t for t, _ in items])
        extra = torch.stack([e for _, e in items]) if self.partners is not None else torch.zeros(0)
        return target, extra


def _fit_and_denoise(stack, masker, volumes, partners, n_partners, state_dict, label, *, seed, device, generator,
                     budget, net_width, depth, j_invariant) -> _NetworkRun:
    """Train one network on ``volumes`` of the (V, n_slices, H, W) stack (or load ``state_dict``),
    J-invariant on the target channel, and denoise those volumes with it."""
    items = _SliceItems(stack, volumes, partners)
    phases = masker.phases_hiding(stack.shape[2:])
    rng = np.random.default_rng(seed)
    held_out = rng.permutation(items.count)[: max(1, items.count // 10)]
    held = set(held_out.tolist())
    train_items = np.array([i for i in range(items.count) if i not in held] or list(held))

    def sample_batch(gen, size):
        indices = train_items[torch.randint(len(train_items), (size,), generator=gen).numpy()]
        phase = phases[int(torch.randint(len(phases), (1,), generator=gen))]
        target, extra = items.gather(indices)
        return target, extra, torch.tensor([phase])

    def loss_fn(model, target, extra, phase):
        return masked_loss(model, masker, target, extra if extra.numel() else None, int(phase))

    validation = []
    for chunk_start in range(0, len(held_out), budget.batch_size):
        target, extra = items.gather(held_out[chunk_start : chunk_start + budget.batch_size])
        for phase in phases[:: max(1, len(phases) // 3)]:
            validation.append((target, extra, torch.tensor([phase])))

    in_channels = 1 + (n_partners if partners is not None else 0)
    model = UNet(dims=2, in_channels=in_channels, out_channels=1, width=net_width, depth=depth)
    history = train_or_reuse(model, state_dict, sample_batch, loss_fn, validation, budget=budget, device=device,
                             generator=generator, label=label)
    denoised, single_pass, probe_change = _predict(model, masker, items, budget.batch_size, device, j_invariant,
                                                   seed)
    return _NetworkRun(
        volumes=list(volumes), denoised=denoised, history=history,
        final_loss=history["epochs"][-1]["val_loss"] if history["epochs"] else float("nan"),
        state_dict={k: v.cpu() for k, v in model.state_dict().items()},
        single_pass=single_pass, probe_change=probe_change,
    )


def _predict(model, masker, items, batch_size, device, j_invariant, seed=0):
    """The network's outputs for every slice of the items' volumes, each (len(volumes), n_slices, H, W).

    Returns the output ``j_invariant`` asks for, the single unmasked pass, and the Monte-Carlo
    divergence terms of that pass: ``b * (f(x + eps b) - f(x)) / eps`` per voxel, with ``b`` a
    seeded standard normal probe of the target channel (the partners stay as they are: the
    divergence is the derivative of a volume's output by that volume).
    """
    n_slices = items.n_slices
    shape = (len(items.volumes), n_slices) + items.stack.shape[2:]
    denoised, single, change = (np.empty(shape, dtype=np.float32) for _ in range(3))
    probe_generator = torch.Generator().manual_seed(seed + 7)
    for index in range(len(items.volumes)):
        for start in range(0, n_slices, batch_size):
            indices = [index * n_slices + p for p in range(start, min(start + batch_size, n_slices))]
            target, extra = items.gather(indices)
            probe = torch.randn(target.shape, generator=probe_generator)
            target, probe = target.to(device), probe.to(device)
            extra = extra.to(device) if items.partners is not None else None
            with torch.no_grad():
                plain = model(target if extra is None else torch.cat([target, extra], dim=1)).float()
                moved = target + PROBE_EPSILON * probe
                probed = model(moved if extra is None else torch.cat([moved, extra], dim=1)).float()
                output = j_invariant_predict(model, masker, target, extra) if j_invariant else plain
            block = slice(start, start + len(indices))
            denoised[index, block] = output[:, 0].float().cpu().numpy()
            single[index, block] = plain[:, 0].cpu().numpy()
            change[index, block] = (probe * (probed - plain) / PROBE_EPSILON)[:, 0].cpu().numpy()
    return denoised, single, change
