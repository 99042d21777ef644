"""Noise2Noise for diffusion MRI: paired volumes of one shell, trained on the run itself.

Two volumes of the same shell whose gradient directions are nearly the same
are two noisy views of nearly the same anatomy; a network trained to map one to
the other learns to remove the noise, with no clean data (Lehtinen et al.
2018). Pairs are chosen by the angle between directions with g and -g taken as
the same direction (absolute cosine); b0 volumes pair with b0 volumes. Training
and inference work on 2D slices at native resolution (the network pads and
crops internally; nothing is resampled, repeated or truncated), optionally
2.5D with neighbouring slices as extra channels.

References
----------
.. [1] Lehtinen J. et al. Noise2Noise: Learning Image Restoration without Clean
       Data. ICML 2018.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from bids_denoise.methods._device import resolve_device
from bids_denoise.methods.errors import UnsuitableDataError
from bids_denoise.methods.networks import (
    IntensityScale,
    TrainingBudget,
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
from bids_denoise.methods.shells import cluster_shells

LOGGER = logging.getLogger(__name__)


@dataclass
class Noise2NoiseResult:
    """Output of :func:`noise2noise`.

    ``passed_through`` lists the volumes alone in their shell (a single b0, a lone b-value): with
    no partner to train or be judged against, they are returned unchanged.
    """

    denoised: np.ndarray
    pairs: list  # (volume, partner, angle in degrees)
    passed_through: list
    history: dict
    pair_psnr: float
    pair_ssim: float
    state_dict: dict


def pair_volumes(bvals, bvecs, *, b0_threshold=50.0, shell_tolerance=100.0):
    """For each volume, the nearest other volume of its shell.

    Parameters
    ----------
    bvals : (V,) array
    bvecs : (3, V) array
        Directions; g and -g are the same diffusion direction.

    Returns
    -------
    pairs : list of (volume, partner, angle_deg)
        Angles are 0 for b0 pairs (b0s pair with the next b0 in acquisition order).
    single : list of int
        Volumes alone in their shell (passed through unchanged).
    """
    bvecs = np.asarray(bvecs, dtype=float).reshape(3, -1)
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
        directions = bvecs[:, members]
        directions = directions / np.maximum(np.linalg.norm(directions, axis=0), 1e-12)
        cosine = np.abs(directions.T @ directions)
        np.fill_diagonal(cosine, -1.0)
        nearest = np.argmax(cosine, axis=1)
        for position, volume in enumerate(members):
            angle = float(np.degrees(np.arccos(np.clip(cosine[position, nearest[position]], -1, 1))))
            pairs.append((int(volume), int(members[nearest[position]]), round(angle, 3)))
    return pairs, sorted(single)


def noise2noise(data, bvals, bvecs, *, slice_axis=2, context=0, b0_threshold=50.0, shell_tolerance=100.0,
                epochs=30, max_seconds=600.0, steps_per_epoch=50, batch_size=16, width=24, depth=2,
                learning_rate=1e-3, validation_fraction=0.1, seed=0, device="cpu", state_dict=None):
    """Denoise a DWI series with Noise2Noise trained on its own volume pairs.

    Parameters
    ----------
    data : ndarray (X, Y, Z, V)
    bvals : (V,), bvecs : (3, V)
    slice_axis : int
        Axis of the 2D slices (default 2, the usual slice axis).
    context : int
        Neighbouring slices on each side given as extra channels (2.5D); 0 = 2D.
    epochs, max_seconds, steps_per_epoch, batch_size : training budget
    width, depth : U-Net size
    validation_fraction : float
        Share of slice positions held out for early stopping.
    seed : int
    device : str
    state_dict : dict, optional
        Trained weights to reuse (no training then).

    Returns
    -------
    Noise2NoiseResult
        Volumes alone in their shell are passed through unchanged (``passed_through``).

    Raises
    ------
    UnsuitableDataError
        Not a 4D series, or no shell with two volumes.

    Notes
    -----
    Any image size works: the U-Net pads each slice to a multiple of ``2**depth`` and crops
    back. Scale-invariant: the data are divided by a robust maximum (:class:`IntensityScale`)
    before the network sees them, and multiplied back.
    """
    data = np.asarray(data, dtype=np.float32)
    if data.ndim != 4:
        raise UnsuitableDataError(f"Noise2Noise needs a 4D series, got an image of shape {data.shape}")
    device = resolve_device(device)
    generator = seed_everything(seed)
    pairs, single = pair_volumes(bvals, bvecs, b0_threshold=b0_threshold, shell_tolerance=shell_tolerance)
    if not pairs:
        raise UnsuitableDataError("Noise2Noise needs at least two volumes in one shell (b0s, or one b-value)")
    scale = IntensityScale.fit(data)
    normalised = scale.forward(data)
    slices = [neighbour_stack(to_slices(normalised[..., v], slice_axis), context) for v in range(data.shape[3])]
    n_slices = slices[0].shape[0]
    rng = np.random.default_rng(seed)
    positions = rng.permutation(n_slices)
    n_val = max(1, int(round(validation_fraction * n_slices))) if n_slices > 2 else 0
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

    model = UNet(dims=2, in_channels=2 * context + 1, out_channels=1, width=width, depth=depth)
    budget = TrainingBudget(epochs=epochs, max_seconds=max_seconds, steps_per_epoch=steps_per_epoch,
                            batch_size=batch_size, learning_rate=learning_rate)
    history = train_or_reuse(model, state_dict, sample_batch, loss_fn,
                             validation or [sample_batch(generator, batch_size)], budget=budget, device=device,
                             generator=generator, label="noise2noise")

    denoised = data.copy()
    for volume in range(data.shape[3]):
        if volume in single:
            continue
        predicted = predict_in_batches(model, slices[volume], device, batch_size=max(batch_size, 8))[:, 0]
        denoised[..., volume] = scale.inverse(from_slices(predicted, slice_axis))
    # how well the prediction of a volume matches its partner (the seed's figure of merit)
    scores = [(psnr(normalised[..., b], scale.forward(denoised[..., a])),
               ssim(normalised[..., b], scale.forward(denoised[..., a]))) for a, b, _ in pairs[:16]]
    return Noise2NoiseResult(
        denoised=denoised, pairs=pairs, passed_through=single, history=history,
        pair_psnr=round(float(np.mean([s[0] for s in scores])), 3),
        pair_ssim=round(float(np.mean([s[1] for s in scores])), 4),
        state_dict={k: v.cpu() for k, v in model.state_dict().items()},
    )
