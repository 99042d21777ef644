"""WASA: wavelet-attention super-resolution, trained on the subject's own images.

The network (after the seed's WASA design, made right for MRI): one input
channel; Haar DWT/IWT layers that are exact inverses; residual wavelet
attention blocks (convolutions in the wavelet domain, channel attention from
average and max pooling, a residual connection); a global attention module run
on a pooled feature map with ``scaled_dot_product_attention`` (memory grows with
the pooled size, not with (H*W)^2); sub-pixel (pixel-shuffle) upsampling along
the axis being super-resolved, x2 or x4; and an interpolation skip path.

No external training data exists, so it learns on the subject itself (the idea
of SMORE, Zhao et al. 2020): MRI is usually sharper in-plane than
through-plane, so in-plane slices are degraded the way the through-plane axis
is (slice-profile blur + decimation) and the network learns to undo that; it is
then applied along the through-plane axis. Loss: L1 plus the L1 of the wavelet
high-frequency bands. (A VGG perceptual term needs pretrained weights, which
cannot be downloaded here: it is not offered.)

References
----------
.. [1] Zhao C. et al. SMORE: A Self-Supervised Anti-Aliasing and
       Super-Resolution Algorithm for MRI Using Deep Learning. IEEE TMI 40 (2021).
.. [2] Shi W. et al. Real-Time Single Image and Video Super-Resolution Using an
       Efficient Sub-Pixel Convolutional Neural Network. CVPR 2016.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from bids_denoise.methods.core.device import resolve_device
from bids_denoise.methods.core.errors import UnsuitableDataError
from bids_denoise.methods.core.networks import TrainingOptions, seed_everything, train
from bids_denoise.methods.core.options import option, positive, resolve_options
from bids_denoise.methods.core.scaling import IntensityScale

# --------------------------------------------------------------------------- wavelet layers


def haar_dwt(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) with even H, W -> (N, 4C, H/2, W/2): LL, LH, HL, HH (orthonormal Haar)."""
    a, b = x[..., 0::2, 0::2], x[..., 0::2, 1::2]
    c, d = x[..., 1::2, 0::2], x[..., 1::2, 1::2]
    return torch.cat([(a + b + c + d) / 2, (-a - b + c + d) / 2, (-a + b - c + d) / 2, (a - b - c + d) / 2], dim=1)


def haar_iwt(y: torch.Tensor) -> torch.Tensor:
    """Exact inverse of :func:`haar_dwt`."""
    ll, lh, hl, hh = torch.chunk(y, 4, dim=1)
    a, b = (ll - lh - hl + hh) / 2, (ll - lh + hl - hh) / 2
    c, d = (ll + lh - hl - hh) / 2, (ll + lh + hl + hh) / 2
    n, channels, h, w = ll.shape
    x = torch.empty(n, channels, 2 * h, 2 * w, dtype=y.dtype, device=y.device)
    x[..., 0::2, 0::2], x[..., 0::2, 1::2], x[..., 1::2, 0::2], x[..., 1::2, 1::2] = a, b, c, d
    return x


class ChannelAttention(nn.Module):
    def __init__(self, channels, reduction=4):
        super().__init__()
        hidden = max(channels // reduction, 4)
        self.mlp = nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.ReLU(inplace=True), nn.Conv2d(hidden, channels, 1))

    def forward(self, x):
        weights = self.mlp(F.adaptive_avg_pool2d(x, 1)) + self.mlp(F.adaptive_max_pool2d(x, 1))
        return x * torch.sigmoid(weights)


class ResidualWaveletAttentionBlock(nn.Module):
    """x + CA(IWT(conv(relu(conv(DWT(x))))))."""

    def __init__(self, channels):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(4 * channels, 4 * channels, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(4 * channels, 4 * channels, 3, padding=1),
        )
        self.attention = ChannelAttention(channels)

    def forward(self, x):
        h, w = x.shape[2:]
        padded = F.pad(x, (0, w % 2, 0, h % 2), mode="replicate") if (h % 2 or w % 2) else x
        y = haar_iwt(self.body(haar_dwt(padded)))[..., :h, :w]
        return x + self.attention(y)


class GlobalAttention(nn.Module):
    """Self-attention over a pooled feature map (at most ``tokens`` x ``tokens`` positions)."""

    def __init__(self, channels, tokens=24):
        super().__init__()
        self.tokens = tokens
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        n, c, h, w = x.shape
        size = (min(h, self.tokens), min(w, self.tokens))
        pooled = F.adaptive_avg_pool2d(x, size)
        q, k, v = self.qkv(pooled).flatten(2).transpose(1, 2).chunk(3, dim=2)  # (n, tokens, c)
        attended = F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1))[:, 0]
        attended = self.out(attended.transpose(1, 2).reshape(n, c, *size))
        return x + self.gamma * F.interpolate(attended, size=(h, w), mode="bilinear", align_corners=False)


class AxisShuffle(nn.Module):
    """Sub-pixel upsampling along one image axis: (N, C*s, H, W) -> (N, C, H*s, W) (axis 0)."""

    def __init__(self, scale, axis=0):
        super().__init__()
        self.scale, self.axis = scale, axis

    def forward(self, x):
        n, cs, h, w = x.shape
        c, s = cs // self.scale, self.scale
        x = x.reshape(n, c, s, h, w)
        if self.axis == 0:
            return x.permute(0, 1, 3, 2, 4).reshape(n, c, h * s, w)
        return x.permute(0, 1, 3, 4, 2).reshape(n, c, h, w * s)


class WASA(nn.Module):
    """Wavelet-attention super-resolution of 2D images along one axis, x2 or x4."""

    def __init__(self, scale=2, channels=32, n_blocks=4, axis=0, tokens=24):
        super().__init__()
        if scale not in (2, 4):
            raise ValueError("scale must be 2 or 4")
        self.scale, self.axis = scale, axis
        self.head = nn.Conv2d(1, channels, 3, padding=1)
        self.blocks = nn.Sequential(*[ResidualWaveletAttentionBlock(channels) for _ in range(n_blocks)])
        self.attention = GlobalAttention(channels, tokens)
        self.body_tail = nn.Conv2d(channels, channels, 3, padding=1)
        stages = []
        for _ in range({2: 1, 4: 2}[scale]):
            stages += [nn.Conv2d(channels, 2 * channels, 3, padding=1), AxisShuffle(2, axis), nn.ReLU(inplace=True)]
        self.upsample = nn.Sequential(*stages)
        self.tail = nn.Conv2d(channels, 1, 3, padding=1)

    def forward(self, x):
        size = list(x.shape[2:])
        size[self.axis] *= self.scale
        skip = F.interpolate(x, size=tuple(size), mode="bicubic", align_corners=False)
        features = self.head(x)
        features = features + self.body_tail(self.attention(self.blocks(features)))
        return skip + self.tail(self.upsample(features))


# --------------------------------------------------------------------------- degradation and geometry


def degrade(images: np.ndarray, scale: int, axis: int) -> np.ndarray:
    """A thick-slice acquisition of (N, ...) images along image ``axis``: each low-resolution voxel
    averages ``scale`` consecutive voxels (a box slice profile, then decimation).

    Low-resolution voxel ``k`` is centred on high-resolution coordinate ``(k + 0.5) * scale - 0.5``,
    the geometry :func:`upsampled_affine` assumes.
    """
    dim = axis + 1
    length = images.shape[dim] // scale * scale
    cropped = np.take(images, np.arange(length), axis=dim)
    shape = cropped.shape[:dim] + (length // scale, scale) + cropped.shape[dim + 1 :]
    return cropped.reshape(shape).mean(axis=dim + 1)


def upsampled_affine(affine, axis: int, scale: int) -> np.ndarray:
    """Affine of the grid with ``scale`` times more voxels along ``axis``, covering the same space.

    Each low-resolution voxel is split into ``scale`` voxels: new voxel ``i`` sits at old voxel
    coordinate ``(i + 0.5) / scale - 0.5``.
    """
    transform = np.eye(4)
    transform[axis, axis] = 1.0 / scale
    transform[axis, 3] = 0.5 / scale - 0.5
    return np.asarray(affine, float) @ transform


# --------------------------------------------------------------------------- training and use


def wavelet_l1_loss(prediction, target, weight=0.5):
    h, w = prediction.shape[2:]
    pad = (0, w % 2, 0, h % 2)
    bands_p = haar_dwt(F.pad(prediction, pad, mode="replicate"))[:, 1:]
    bands_t = haar_dwt(F.pad(target, pad, mode="replicate"))[:, 1:]
    return F.l1_loss(prediction, target) + weight * F.l1_loss(bands_p, bands_t)


@dataclass
class SuperResolutionResult:
    image: np.ndarray
    affine: np.ndarray
    history: dict
    axis: int
    scale: int


def _training_pairs(volume, axis, scale):
    """In-plane slices (the two axes other than ``axis``), degraded along each in-plane axis.

    An in-plane axis shorter than ``scale`` has no low-resolution row to learn from and gives no
    pair; where neither gives one, the image cannot be super-resolved (UnsuitableDataError).
    """
    planes = np.moveaxis(volume, axis, 0)  # (n, b, c): both in-plane axes at full resolution
    pairs = []
    for in_plane in (0, 1):
        length = planes.shape[1 + in_plane] // scale * scale
        if length == 0:
            continue
        crop = [slice(None)] * 3
        crop[1 + in_plane] = slice(0, length)
        high = planes[tuple(crop)]
        low = degrade(high, scale, in_plane)
        if in_plane == 1:  # the network upsamples along image axis 0: transpose
            high, low = high.transpose(0, 2, 1), low.transpose(0, 2, 1)
        pairs.append((low, high))
    if not pairs:
        raise UnsuitableDataError(
            f"WASA x{scale} needs an in-plane size of at least {scale} voxels to learn from, got "
            f"{planes.shape[1]}x{planes.shape[2]}"
        )
    return pairs


def _patch_shape(pairs, patch, scale):
    """Low-resolution training patch (rows, columns) that fits every pair.

    ``patch // scale`` rows (at least 4) by ``patch`` columns, clipped to the smallest pair: the
    two in-plane orientations differ in shape (transposed, cropped to a multiple of ``scale``), and
    one batch draws from both, so its patches must share one shape even where the image is smaller
    than the patch.
    """
    rows = min(max(patch // scale, 4), min(low.shape[1] for low, _ in pairs))
    columns = min(patch, min(low.shape[2] for low, _ in pairs))
    return rows, columns


@dataclass(frozen=True)
class WASAOptions(TrainingOptions):
    """The options of :func:`super_resolve` (the training budget: :class:`TrainingOptions`, here
    ``batch_size`` patches per step, and planes per batch when the network is applied).

    Attributes
    ----------
    axis : {0, 1, 2}
        The low-resolution (through-plane) axis to super-resolve.
    scale : {2, 4}
        Resolution factor.
    channels, n_blocks : int
        The network's feature channels and residual wavelet-attention blocks.
    patch : int
        Training patch size (in high-resolution voxels), clipped to the image where it is smaller.
    """

    steps_per_epoch: int = option(40, "optimiser steps per epoch", parse=positive(int))
    batch_size: int = option(8, "patches per batch", parse=positive(int))
    learning_rate: float = option(2e-4, "Adam's learning rate", parse=positive(float), app=False)
    axis: int = option(2, "voxel axis to super-resolve", choices=(0, 1, 2), app=False)
    scale: int = option(2, "resolution factor", choices=(2, 4))
    channels: int = option(32, "feature channels of the network", app=False)
    n_blocks: int = option(4, "residual wavelet-attention blocks", app=False)
    patch: int = option(48, "training patch size in high-resolution voxels", app=False)


def super_resolve(volume, affine, options: WASAOptions | None = None, *, model=None, seed=0, device="cpu",
                  **changes):
    """Raise the resolution of a 3D image along ``axis`` by ``scale``, learning from its own in-plane detail.

    Parameters
    ----------
    volume : ndarray (X, Y, Z)
    affine : (4, 4) array
    options : WASAOptions, optional
        The method's options (default: :class:`WASAOptions`'s); keyword ``changes`` replace single
        options, e.g. ``super_resolve(volume, affine, axis=0, scale=4)``.
    model : WASA, optional
        A trained network to reuse (no training then), e.g. for the other volumes of a DWI run.
    seed : int
    device : str

    Returns
    -------
    result : SuperResolutionResult
        ``image`` has ``scale`` times more voxels along ``axis``; ``affine`` keeps it in place.
    model : WASA
        The trained network (pass it back as ``model`` for more volumes of the same run).

    Raises
    ------
    UnsuitableDataError
        Not a 3D image, or no in-plane axis of at least ``scale`` voxels.

    Notes
    -----
    Scale-invariant: the image is divided by a robust maximum (:class:`IntensityScale`) before
    the network sees it, and multiplied back.
    """
    options = resolve_options(WASAOptions, options, changes)
    axis, scale, batch_size = options.axis, options.scale, options.batch_size
    volume = np.asarray(volume, dtype=np.float32)
    if volume.ndim != 3:
        raise UnsuitableDataError(f"WASA super-resolves a 3D image, got shape {volume.shape}")
    device = resolve_device(device)
    generator = seed_everything(seed)
    norm = IntensityScale.fit(volume)
    data = norm.forward(volume)
    history = {"epochs": [], "stopped": "reused trained weights"}
    if model is None:
        pairs = _training_pairs(data, axis, scale)
        ph, pw = _patch_shape(pairs, options.patch, scale)
        model = WASA(scale=scale, channels=options.channels, n_blocks=options.n_blocks, axis=0)

        def sample(gen, size):
            lows, highs = [], []
            for _ in range(size):
                low, high = pairs[int(torch.randint(len(pairs), (1,), generator=gen))]
                n, h, w = low.shape
                i = int(torch.randint(n, (1,), generator=gen))
                y = int(torch.randint(h - ph + 1, (1,), generator=gen))
                x = int(torch.randint(w - pw + 1, (1,), generator=gen))
                lows.append(low[i, y : y + ph, x : x + pw])
                highs.append(high[i, y * scale : (y + ph) * scale, x : x + pw])
            return (torch.from_numpy(np.ascontiguousarray(np.stack(lows)[:, None])),
                    torch.from_numpy(np.ascontiguousarray(np.stack(highs)[:, None])))

        def loss_fn(net, low, high):
            return wavelet_l1_loss(net(low), high)

        validation_generator = torch.Generator().manual_seed(seed + 1)
        validation = [sample(validation_generator, batch_size) for _ in range(2)]
        history = train(model, sample, loss_fn, validation, budget=options.budget, device=device,
                        generator=generator, label="wasa").as_dict()
    model.to(device).eval()
    # apply along ``axis``: take planes containing ``axis`` and another axis, upsample along ``axis``
    other = [a for a in range(3) if a != axis][1]
    planes = np.moveaxis(data, (other, axis), (0, 1))  # (n, axis, rest)
    outputs = []
    with torch.no_grad():
        for start in range(0, planes.shape[0], batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(planes[start : start + batch_size][:, None])).to(device)
            outputs.append(model(batch)[:, 0].float().cpu().numpy())
    upsampled = np.moveaxis(np.concatenate(outputs), (0, 1), (other, axis))
    return SuperResolutionResult(
        image=norm.inverse(upsampled), affine=upsampled_affine(affine, axis, scale), history=history,
        axis=axis, scale=scale,
    ), model
