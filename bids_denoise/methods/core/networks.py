"""Building blocks shared by the learned methods: U-Nets, the training loop, slicing, scaling.

One set of blocks and one training loop serve Noise2Noise, Noise2Self and
super-resolution: device placement, mixed precision on CUDA, seeding, a
progress log, early stopping on held-out samples and a time or epoch budget
live here once, with the training options each method's options class extends
(:class:`TrainingOptions`). The intensity scalings are in :mod:`bids_denoise.methods.core.scaling`.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from bids_denoise.methods.core.options import Options, option, positive
from bids_denoise.methods.core.progress import duration

LOGGER = logging.getLogger(__name__)
PROGRESS = logging.getLogger("bids_denoise.methods.progress")


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return a torch generator for data sampling."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


# --------------------------------------------------------------------------- arrays


def to_slices(volume: np.ndarray, axis: int) -> np.ndarray:
    """(X, Y, Z) -> (n_slices, H, W) along ``axis``: a view, no resampling."""
    return np.moveaxis(volume, axis, 0)


def from_slices(slices: np.ndarray, axis: int) -> np.ndarray:
    """Inverse of :func:`to_slices` (bit for bit)."""
    return np.moveaxis(slices, 0, axis)


def neighbour_stack(slices: np.ndarray, context: int) -> np.ndarray:
    """(n, H, W) -> (n, 2*context+1, H, W): each slice with its neighbours as channels.

    Beyond the first and last slice the missing neighbours are zeros (anatomy is
    never repeated).
    """
    n = slices.shape[0]
    padded = np.concatenate(
        [np.zeros((context,) + slices.shape[1:], slices.dtype), slices,
         np.zeros((context,) + slices.shape[1:], slices.dtype)]
    )
    return np.stack([padded[offset : offset + n] for offset in range(2 * context + 1)], axis=1)


# --------------------------------------------------------------------------- networks


def _conv(dims):
    return nn.Conv2d if dims == 2 else nn.Conv3d


class _Block(nn.Module):
    def __init__(self, dims, channels_in, channels_out):
        super().__init__()
        conv = _conv(dims)
        self.body = nn.Sequential(
            conv(channels_in, channels_out, 3, padding=1), nn.LeakyReLU(0.1, inplace=True),
            conv(channels_out, channels_out, 3, padding=1), nn.LeakyReLU(0.1, inplace=True),
        )

    def forward(self, x):
        return self.body(x)


class UNet(nn.Module):
    """A small U-Net for 2D or 3D images of any size (padded internally, cropped back).

    Parameters
    ----------
    dims : {2, 3}
    in_channels, out_channels : int
    width : int
        Channels of the first level (doubled at each level down).
    depth : int
        Number of downsamplings.
    """

    def __init__(self, dims=2, in_channels=1, out_channels=1, width=24, depth=2):
        super().__init__()
        if dims not in (2, 3):
            raise ValueError("dims must be 2 or 3")
        self.dims, self.depth = dims, depth
        self.down = nn.ModuleList()
        channels, level_channels = in_channels, []
        for level in range(depth):
            self.down.append(_Block(dims, channels, width * 2**level))
            channels = width * 2**level
            level_channels.append(channels)
        self.bottom = _Block(dims, channels, width * 2**depth)
        channels = width * 2**depth
        self.up = nn.ModuleList()
        for level in reversed(range(depth)):
            self.up.append(_Block(dims, channels + level_channels[level], level_channels[level]))
            channels = level_channels[level]
        self.head = _conv(dims)(channels, out_channels, 1)

    def forward(self, x):
        size = x.shape[2:]
        multiple = 2**self.depth
        pads = []
        for extent in reversed(size):
            pads += [0, (-extent) % multiple]
        x = F.pad(x, pads, mode="replicate") if any(pads) else x
        skips = []
        pool = F.max_pool2d if self.dims == 2 else F.max_pool3d
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = pool(x, 2)
        x = self.bottom(x)
        for block in self.up:
            skip = skips.pop()
            x = F.interpolate(x, size=skip.shape[2:], mode="nearest")
            x = block(torch.cat([x, skip], dim=1))
        x = self.head(x)
        crop = tuple(slice(0, extent) for extent in size)
        return x[(slice(None), slice(None)) + crop]


# --------------------------------------------------------------------------- training


@dataclass
class TrainingBudget:
    """How long to train: at most ``epochs`` epochs and ``max_seconds`` seconds."""

    epochs: int = 30
    max_seconds: float = 600.0
    steps_per_epoch: int = 50
    batch_size: int = 16
    learning_rate: float = 1e-3
    patience: int = 5


@dataclass(frozen=True)
class TrainingOptions(Options):
    """The training options every learned method's options class extends (each may set its own defaults).

    Attributes
    ----------
    epochs : int
        Training epochs at most (early stopping may end sooner: no validation gain in
        ``TrainingBudget.patience`` epochs).
    max_seconds : float
        Training time budget in seconds, checked after each epoch.
    steps_per_epoch : int
        Optimiser steps per epoch.
    batch_size : int
        Training items per optimiser step (slices, crops or patches, as the method says); also the
        batch of inference.
    learning_rate : float
        Adam's learning rate (not offered by the app).
    """

    epochs: int = option(30, "training epochs at most", parse=positive(int))
    max_seconds: float = option(600.0, "training time budget in seconds", parse=positive(float))
    steps_per_epoch: int = option(50, "optimiser steps per epoch", parse=positive(int))
    batch_size: int = option(16, "slices per batch", parse=positive(int))
    learning_rate: float = option(1e-3, "Adam's learning rate", parse=positive(float), app=False)

    @property
    def budget(self) -> TrainingBudget:
        """The :class:`TrainingBudget` of these options."""
        return TrainingBudget(epochs=self.epochs, max_seconds=self.max_seconds, steps_per_epoch=self.steps_per_epoch,
                              batch_size=self.batch_size, learning_rate=self.learning_rate)


@dataclass
class TrainingHistory:
    epochs: list = field(default_factory=list)  # dicts: epoch, train_loss, val_loss, seconds
    stopped: str = ""
    planned: int = 0  # the epoch budget

    def as_dict(self):
        return {"epochs": self.epochs, "stopped": self.stopped, "planned": self.planned}


def train(model, sample_batch, loss_fn, validation_batches, *, budget: TrainingBudget, device, generator,
          label="training"):
    """Train ``model``; keep the weights of the best validation loss.

    Parameters
    ----------
    sample_batch : callable(generator, batch_size) -> tuple of tensors
        Draws one training batch (on the CPU).
    loss_fn : callable(model, *batch) -> scalar tensor
    validation_batches : list of tuples
        Fixed held-out batches for early stopping.
    """
    model.to(device)
    optimiser = torch.optim.Adam(model.parameters(), lr=budget.learning_rate)
    use_amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if use_amp else None
    history = TrainingHistory(planned=budget.epochs)
    best, best_state, waited = math.inf, None, 0
    start = time.perf_counter()
    for epoch in range(1, budget.epochs + 1):
        model.train()
        running = 0.0
        for _ in range(budget.steps_per_epoch):
            batch = [t.to(device) for t in sample_batch(generator, budget.batch_size)]
            optimiser.zero_grad(set_to_none=True)
            with torch.autocast(device_type=device.type, enabled=use_amp):
                loss = loss_fn(model, *batch)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimiser)
                scaler.update()
            else:
                loss.backward()
                optimiser.step()
            running += float(loss.detach())
        model.eval()
        with torch.no_grad():
            val = float(np.mean([float(loss_fn(model, *[t.to(device) for t in batch])) for batch in validation_batches]))
        elapsed = time.perf_counter() - start
        history.epochs.append({"epoch": epoch, "train_loss": running / budget.steps_per_epoch,
                               "val_loss": val, "seconds": round(elapsed, 2)})
        left = min(elapsed / epoch * (budget.epochs - epoch), max(budget.max_seconds - elapsed, 0.0))
        PROGRESS.info("%s: epoch %d of %d, train %.5f, held-out %.5f, %s so far, at most %s left", label, epoch,
                      budget.epochs, running / budget.steps_per_epoch, val, duration(elapsed), duration(left))
        if val < best:
            best, waited = val, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            waited += 1
            if waited >= budget.patience:
                history.stopped = f"early stop at epoch {epoch} (no validation gain in {budget.patience} epochs)"
                break
        if elapsed >= budget.max_seconds:
            history.stopped = f"time budget of {budget.max_seconds:g} s reached at epoch {epoch}"
            break
    else:
        history.stopped = f"epoch budget of {budget.epochs} reached"
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return history


def train_or_reuse(model, state_dict, sample_batch, loss_fn, validation_batches, *, budget, device, generator,
                   label="training") -> dict:
    """Load ``state_dict`` into ``model`` if given (no training), else :func:`train` it.

    Returns the training history as a dict (empty epochs when weights were reused).
    """
    if state_dict is not None:
        model.load_state_dict(state_dict)
        model.to(device).eval()
        return {"epochs": [], "stopped": "reused trained weights"}
    return train(model, sample_batch, loss_fn, validation_batches, budget=budget, device=device,
                 generator=generator, label=label).as_dict()


def predict_in_batches(model, inputs: np.ndarray, device, batch_size=16) -> np.ndarray:
    """Run ``model`` over a (N, C, ...) float32 array; return (N, out, ...)."""
    outputs = []
    with torch.no_grad():
        for start in range(0, inputs.shape[0], batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(inputs[start : start + batch_size])).to(device)
            outputs.append(model(batch).float().cpu().numpy())
    return np.concatenate(outputs)


def psnr(reference, estimate, data_range=None) -> float:
    reference, estimate = np.asarray(reference, float), np.asarray(estimate, float)
    data_range = data_range or float(reference.max() - reference.min()) or 1.0
    mse = float(np.mean((reference - estimate) ** 2))
    return float("inf") if mse == 0 else 10 * math.log10(data_range**2 / mse)


def ssim(reference, estimate, data_range=None) -> float:
    """Mean structural similarity (Gaussian window, sigma 1.5), any dimension."""
    from scipy.ndimage import gaussian_filter

    x, y = np.asarray(reference, float), np.asarray(estimate, float)
    data_range = data_range or float(x.max() - x.min()) or 1.0
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_x, mu_y = gaussian_filter(x, 1.5), gaussian_filter(y, 1.5)
    var_x = gaussian_filter(x * x, 1.5) - mu_x**2
    var_y = gaussian_filter(y * y, 1.5) - mu_y**2
    cov = gaussian_filter(x * y, 1.5) - mu_x * mu_y
    index = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return float(index.mean())
