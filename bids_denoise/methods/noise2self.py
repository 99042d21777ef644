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
J-invariant because noise is independent across volumes). Images are
processed as 2D slices.

References
----------
.. [1] Batson J., Royer L. Noise2Self: Blind Denoising by Self-Supervision.
       ICML 2019.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from bids_denoise.methods._device import resolve_device
from bids_denoise.methods.calibrate import grid_mask
from bids_denoise.methods.networks import (
    IntensityScale,
    TrainingBudget,
    UNet,
    from_slices,
    seed_everything,
    to_slices,
    train_or_reuse,
)
from bids_denoise.methods.shells import cluster_shells


class Masker:
    """Grid masks of a given width in 2D or 3D, with ``zero`` or ``interpolate`` fill.

    Phase ``p`` hides the voxels whose coordinates, modulo ``width``, equal the
    ``p``-th combination; the ``width**dims`` phases cover every voxel exactly once.
    """

    def __init__(self, width=3, mode="interpolate", dims=2):
        if mode not in ("zero", "interpolate"):
            raise ValueError("mode must be 'zero' or 'interpolate'")
        self.width, self.mode, self.dims = int(width), mode, int(dims)
        self.n_phases = self.width**self.dims
        kernel = np.ones((3,) * self.dims, dtype=np.float32)
        kernel[(1,) * self.dims] = 0.0  # the centre is never looked at
        self.kernel = torch.from_numpy(kernel / kernel.sum())[None, None]

    def mask(self, shape, phase, device=None):
        """Boolean mask (spatial shape) of phase ``phase``."""
        hidden = torch.from_numpy(grid_mask(tuple(shape), self.width, int(phase) % self.n_phases))
        return hidden.to(device) if device is not None else hidden

    def apply(self, images, phase):
        """Hide phase ``phase`` in (N, C, *spatial) images; return (masked images, mask)."""
        hidden = self.mask(images.shape[2:], phase, images.device)
        if self.mode == "zero":
            filled = torch.zeros_like(images)
        else:
            conv = F.conv2d if self.dims == 2 else F.conv3d
            kernel = self.kernel.to(images.device, images.dtype).expand(images.shape[1], 1, *self.kernel.shape[2:])
            padded = F.pad(images, (1,) * (2 * self.dims), mode="replicate")
            filled = conv(padded, kernel, groups=images.shape[1])
        masked = torch.where(hidden, filled, images)
        return masked, hidden


def masked_loss(model, masker, target, extra, phase):
    """Mean squared error on the hidden voxels of channel 0 (the target image)."""
    masked_target, hidden = masker.apply(target, phase)
    inputs = masked_target if extra is None else torch.cat([masked_target, extra], dim=1)
    output = model(inputs)
    return torch.mean(((output - target)[:, :, hidden]) ** 2)


def j_invariant_predict(model, masker, target, extra=None):
    """Each voxel from the pass that hid it (``width**d`` passes)."""
    result = torch.zeros_like(target)
    with torch.no_grad():
        for phase in range(masker.n_phases):
            masked_target, hidden = masker.apply(target, phase)
            inputs = masked_target if extra is None else torch.cat([masked_target, extra], dim=1)
            output = model(inputs)
            result[:, :, hidden] = output[:, :, hidden]
    return result


@dataclass
class Noise2SelfResult:
    denoised: np.ndarray
    history: dict
    context: str
    final_loss: float
    state_dict: dict


def _series_partners(bvals, b0_threshold, shell_tolerance, n_partners):
    """For each volume, up to ``n_partners`` other volumes of its shell (nearest in order)."""
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


def noise2self(data, bvals=None, *, context="volume", width=3, mode="interpolate", slice_axis=2, n_partners=4,
               b0_threshold=50.0, shell_tolerance=100.0, epochs=30, max_seconds=600.0, steps_per_epoch=50,
               batch_size=16, net_width=24, depth=2, learning_rate=1e-3, j_invariant=True, seed=0, device="cpu",
               state_dict=None):
    """Denoise a 3D image or a 4D series with a J-invariant network trained on itself.

    Parameters
    ----------
    data : ndarray, (X, Y, Z) or (X, Y, Z, V)
    bvals : (V,) array, needed for ``context="series"``
    context : {"volume", "series"}
    width : int
        Masker grid width (``width**2`` phases on 2D slices).
    mode : {"zero", "interpolate"}
    slice_axis : int
    n_partners : int
        Other volumes of the shell given as channels in the ``series`` context.
    j_invariant : bool
        J-invariant inference (default) or a single unmasked pass.

    Returns
    -------
    Noise2SelfResult
    """
    data = np.asarray(data, dtype=np.float32)
    squeeze = data.ndim == 3
    series = data[..., None] if squeeze else data
    if context not in ("volume", "series"):
        raise ValueError("context must be 'volume' or 'series'")
    if context == "series" and (squeeze or bvals is None or series.shape[3] < 2):
        raise ValueError("the series context needs a 4D series and its b-values")
    device = resolve_device(device)
    generator = seed_everything(seed)
    scale = IntensityScale.fit(series)
    normalised = scale.forward(series)
    # (V, n_slices, H, W)
    stack = np.stack([to_slices(normalised[..., v], slice_axis) for v in range(series.shape[3])])
    partners = _series_partners(bvals, b0_threshold, shell_tolerance, n_partners) if context == "series" else None
    masker = Masker(width, mode, dims=2)
    n_volumes, n_slices = stack.shape[:2]
    rng = np.random.default_rng(seed)
    held_out = rng.permutation(n_volumes * n_slices)[: max(1, (n_volumes * n_slices) // 10)]
    held = set(held_out.tolist())
    train_items = np.array([i for i in range(n_volumes * n_slices) if i not in held] or list(held))

    def item(index):
        volume, position = divmod(int(index), n_slices)
        target = torch.from_numpy(np.ascontiguousarray(stack[volume, position][None]))
        extra = None
        if partners is not None:
            extra = torch.from_numpy(np.ascontiguousarray(stack[partners[volume], position]))
        return target, extra

    def gather(indices):
        items = [item(i) for i in indices]
        target = torch.stack([t for t, _ in items])
        extra = torch.stack([e for _, e in items]) if partners is not None else torch.zeros(0)
        return target, extra

    def sample_batch(gen, size):
        indices = train_items[torch.randint(len(train_items), (size,), generator=gen).numpy()]
        phase = torch.randint(masker.n_phases, (1,), generator=gen)
        target, extra = gather(indices)
        return target, extra, phase

    def loss_fn(model, target, extra, phase):
        return masked_loss(model, masker, target, extra if extra.numel() else None, int(phase))

    validation = []
    for chunk_start in range(0, len(held_out), batch_size):
        target, extra = gather(held_out[chunk_start : chunk_start + batch_size])
        for phase in range(0, masker.n_phases, max(1, masker.n_phases // 3)):
            validation.append((target, extra, torch.tensor([phase])))

    in_channels = 1 + (n_partners if partners is not None else 0)
    model = UNet(dims=2, in_channels=in_channels, out_channels=1, width=net_width, depth=depth)
    budget = TrainingBudget(epochs=epochs, max_seconds=max_seconds, steps_per_epoch=steps_per_epoch,
                            batch_size=batch_size, learning_rate=learning_rate)
    history = train_or_reuse(model, state_dict, sample_batch, loss_fn, validation, budget=budget, device=device,
                             generator=generator, label=f"noise2self ({context})")

    denoised = np.empty_like(stack)
    for volume in range(n_volumes):
        for start in range(0, n_slices, batch_size):
            indices = [volume * n_slices + p for p in range(start, min(start + batch_size, n_slices))]
            target, extra = gather(indices)
            target = target.to(device)
            extra = extra.to(device) if partners is not None else None
            if j_invariant:
                output = j_invariant_predict(model, masker, target, extra)
            else:
                with torch.no_grad():
                    output = model(target if extra is None else torch.cat([target, extra], dim=1))
            denoised[volume, start : start + len(indices)] = output[:, 0].float().cpu().numpy()
    result = np.stack([from_slices(denoised[v], slice_axis) for v in range(n_volumes)], axis=-1)
    result = scale.inverse(result)
    final = history["epochs"][-1]["val_loss"] if history["epochs"] else float("nan")
    return Noise2SelfResult(
        denoised=result[..., 0] if squeeze else result,
        history=history, context=context, final_loss=final,
        state_dict={k: v.cpu() for k, v in model.state_dict().items()},
    )
