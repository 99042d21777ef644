"""P2S-Net: a diffusion-aware J-invariant network, each volume predicted from the others.

Patch2Self's idea [1]_ with a non-linear regressor, as in the first stage of
DDM2 [2]_: noise is independent between volumes, so a function that predicts
volume ``v`` from the *other* volumes (and their spatial neighbourhood) and
never from ``v`` itself is J-invariant over volumes. Trained on the run
itself to predict ``x_v``, its loss is the true error plus the noise variance
[3]_, and it cannot learn to copy the noise.

What the network sees for target volume ``v`` (all of it free of ``x_v``):

* **Angular predictions from the other volumes**, per voxel: the volume's own
  shell fitted without ``v`` by even spherical harmonics of order 0, 2 and 4
  (the orders the shell's size allows) and evaluated at ``v``'s gradient
  direction (leave-one-out); the mean of the b0s other than ``v``; the nearest
  lower and higher shells fitted by order 2 and evaluated at ``v``'s
  direction. These are linear in the data: one ``(V, 6)`` weight matrix per
  target, whose ``v``-th row is zero by construction. The angular contrast is
  modelled by the basis, not averaged across directions; ``g`` and ``-g`` are
  the same direction (even orders only).
* **The local signal subspace**: in the 5x5x5 window around the voxel, the
  components of the series above the Marchenko-Pastur noise edge (MP-PCA's
  subspace [4]_), fitted to the voxel's other volumes and evaluated at ``v``
  (a leave-one-out prediction, :func:`local_subspace_predictions`). Outside
  the brain mask, the mean of the other volumes of ``v``'s shell instead.
* **What it is predicting**: the b-value and the gradient direction's outer
  product ``g g^T`` (sign-invariant), as constant channels.

A small 3D CNN maps the linear channels and their spatial neighbourhood
(9x9x9 voxels), with the local-subspace prediction at the voxel, to the volume;
its output is added to the local-subspace prediction (residual). The
prediction of ``x_v`` at a voxel never depends on ``x_v`` at that voxel. It trains on random crops of the run's volumes, with some volumes
held out for early stopping, seeded; on CUDA with mixed precision.

**Do no harm.** The network's output ``f_v`` is blended with the input,
``a_v f_v + (1 - a_v) x_v``, with ``a_v = s / mean (f_v - x_v)^2`` over the
brain (:func:`bids_denoise.methods.core.calibrate.blend_weight`; ``s`` from
MP-PCA's noise map): for a J-invariant ``f`` this minimises the estimated
error, and a volume the network does not help keeps (almost) its input. All
weights are then scaled down until the angular contrast the output loses is
paid for by the noise it removes
(:func:`bids_denoise.methods.core.calibrate.angular_contrast`,
:func:`bids_denoise.methods.core.calibrate.contrast_cap`): squared-error weights do
not see a flattening of the angular contrast, which FA does.
Magnitude data keep a noise floor, which a prediction of ``x_v`` keeps too:
it is removed from the network's prediction (Koay & Basser, with MP-PCA's
Gaussian noise map), as the app's MP-PCA does, before the blend
(``noise_floor="none"`` keeps it). The blend's weights are estimated before the
floor is removed.

References
----------
.. [1] Fadnavis S., Batson J., Garyfallidis E. Patch2Self: Denoising Diffusion
       MRI with Self-Supervised Learning. NeurIPS 2020.
.. [2] Xiang T., Yurt M., Syed A. B., Setsompop K., Chaudhari A. DDM2:
       Self-Supervised Diffusion MRI Denoising with Generative Diffusion
       Models. ICLR 2023.
.. [3] Batson J., Royer L. Noise2Self: Blind Denoising by Self-Supervision.
       ICML 2019.
.. [4] Veraart J. et al. Denoising of diffusion MRI using random matrix
       theory. NeuroImage 142:394-406, 2016.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from bids_denoise.methods.core.calibrate import angular_contrast, blend_weight, contrast_cap, signal_to_noise
from bids_denoise.methods.core.device import resolve_device
from bids_denoise.methods.core.errors import UnsuitableDataError
from bids_denoise.methods.core.networks import TrainingOptions, seed_everything, train_or_reuse
from bids_denoise.methods.core.noise import series_noise_variance
from bids_denoise.methods.core.options import option, positive, resolve_options
from bids_denoise.methods.core.scaling import IntensityScale
from bids_denoise.methods.core.shells import cluster_shells, even_sh_basis

LOGGER = logging.getLogger(__name__)

#: Angular prediction channels per target volume: six linear ones (see :func:`angular_weights`) and
#: the local-subspace prediction (see :func:`local_subspace_predictions`).
ANGULAR_CHANNELS = ("own order 0", "own order 2", "own order 4", "b0 mean", "lower shell", "higher shell",
                    "local subspace")
#: Index of the channel the network's output is added to.
RESIDUAL_CHANNEL = 6
#: The linear angular channels (the first of :data:`ANGULAR_CHANNELS`).
LINEAR_CHANNELS = 6
#: Constant channels: b / b_max and the 6 entries of g g^T.
CONDITION_CHANNELS = 7
#: Ridge penalty of the spherical-harmonic fits, relative to the number of directions fitted.
SH_RIDGE = 1e-4


def _ridge_predictor(fit_directions, eval_direction, order):
    """Weights ``w`` (len(fit_directions),) with ``w @ y`` the order-``order`` fit of ``y`` evaluated at one direction."""
    basis = even_sh_basis(fit_directions, order)
    gram = basis.T @ basis
    gram += SH_RIDGE * max(np.trace(gram) / gram.shape[0], 1e-12) * np.eye(gram.shape[0])
    return even_sh_basis(eval_direction, order)[0] @ np.linalg.solve(gram, basis.T)


def _orders_for(count):
    """The spherical-harmonic orders a fit on ``count`` directions can take (a few directions spare)."""
    return [order for order, size in ((0, 1), (2, 6), (4, 15)) if count >= size + 3]


def angular_weights(bvals, bvecs, *, b0_threshold=50.0, shell_tolerance=100.0) -> np.ndarray:
    """The linear angular predictions of every volume from the other volumes: (V, 6, V) weights.

    ``weights[:, c, v]`` applied to a voxel's signal (V,) gives channel ``c`` of
    :data:`ANGULAR_CHANNELS` for target ``v``; ``weights[v, :, v]`` is zero (J-invariance). A
    channel with nothing to predict from (a lone volume, no lower shell) is the best channel
    there is, or zero.
    """
    bvals = np.asarray(bvals, dtype=float).ravel()
    directions = np.asarray(bvecs, dtype=float).reshape(3, -1).T
    norms = np.linalg.norm(directions, axis=1, keepdims=True)
    directions = np.where(norms > 1e-6, directions / np.maximum(norms, 1e-12), 0.0)
    shells = cluster_shells(bvals, b0_threshold=b0_threshold, tolerance=shell_tolerance)
    n_volumes = bvals.size
    members = {label: np.flatnonzero(shells == label) for label in np.unique(shells)}
    mean_b = {label: float(bvals[index].mean()) for label, index in members.items()}
    weights = np.zeros((n_volumes, LINEAR_CHANNELS, n_volumes))

    def shell_prediction(label, target, order_cap, exclude):
        index = np.array([m for m in members[label] if m != exclude], dtype=int)
        row = np.zeros(n_volumes)
        if index.size == 0:
            return None
        if label == 0 or not np.any(directions[target]):
            row[index] = 1.0 / index.size
            return row
        orders = [o for o in _orders_for(index.size) if o <= order_cap] or [0]
        row[index] = _ridge_predictor(directions[index], directions[target], orders[-1])
        return row

    dwi_labels = sorted(label for label in members if label != 0)
    for v in range(n_volumes):
        own = shells[v]
        previous = None
        for channel, cap in enumerate((0, 2, 4)):
            row = shell_prediction(own, v, cap, exclude=v)
            row = previous if row is None else row
            if row is not None:
                weights[:, channel, v] = row
                previous = row
        if 0 in members:
            row = shell_prediction(0, v, 0, exclude=v)
            if row is not None:
                weights[:, 3, v] = row
        below = [label for label in dwi_labels if label != own and mean_b[label] < bvals[v]]
        above = [label for label in dwi_labels if label != own and mean_b[label] > bvals[v]]
        for channel, candidates in ((4, below[-1:]), (5, above[:1])):
            if candidates:
                weights[:, channel, v] = shell_prediction(candidates[0], v, 2, exclude=v)
        weights[v, :, v] = 0.0
    return weights.astype(np.float32)


def local_subspace_predictions(series, noise_variance, *, extent=5, mask=None, batch=4096, device="cpu") -> np.ndarray:
    """Each volume at each voxel predicted from the voxel's other volumes in the local signal subspace.

    In the ``extent``-cube window around a voxel the series' centred signals span a few signal
    components above the noise (MP-PCA's observation [4]_): the eigenvectors of the window's
    covariance whose eigenvalues exceed the Marchenko-Pastur edge ``s (1 + sqrt(V / n))^2`` of the
    noise variance ``s``. The projection onto them, ``y = P x``, would use ``x_v`` to predict
    ``x_v``; the leave-one-out prediction ``(y_v - P_vv x_v) / (1 - P_vv)`` (the hat-matrix identity)
    does not: it is the least-squares fit of the other volumes by the subspace, evaluated at ``v``.
    The subspace and the window mean are estimated from the window's other voxels (the centre is left
    out), so the prediction of ``x_v`` at a voxel never depends on ``x_v`` there (J-invariant).

    Parameters
    ----------
    series : ndarray (X, Y, Z, V)
    noise_variance : ndarray (X, Y, Z)
    extent : int
        Window side (odd); windows are shifted inside the image at its border.
    mask : ndarray of bool (X, Y, Z), optional
        Voxels to predict (the others keep their values).
    device : str or torch.device
        Where the eigendecompositions run (float64).

    Returns
    -------
    ndarray (X, Y, Z, V), float32
    """
    series = np.asarray(series, dtype=np.float32)
    shape, n_volumes = series.shape[:3], series.shape[3]
    sizes = [min(extent, n) for n in shape]
    n = int(np.prod(sizes))
    if n < 3:
        raise UnsuitableDataError(f"a window of {n} voxels leaves too few to estimate a subspace")
    device = resolve_device(device)
    values = torch.from_numpy(np.ascontiguousarray(series)).double().to(device)
    windows = values.permute(3, 0, 1, 2)[None]
    for axis, size in enumerate(sizes):
        windows = windows.unfold(2 + axis, size, 1)
    # windows: (1, V, X - sx + 1, Y - sy + 1, Z - sz + 1, sx, sy, sz); voxel p uses the window starting at
    # clip(p - size // 2, 0, n - size)
    starts = [np.clip(np.arange(extent_) - size // 2, 0, extent_ - size) for extent_, size in zip(shape, sizes)]
    voxels = np.argwhere(np.ones(shape, bool) if mask is None else np.asarray(mask, bool))
    prediction = series.copy()
    edge = (1.0 + np.sqrt(n_volumes / (n - 1))) ** 2
    variance = torch.from_numpy(np.asarray(noise_variance, dtype=np.float64)).to(device)
    for begin in range(0, len(voxels), batch):
        chunk = voxels[begin : begin + batch]
        index = [torch.from_numpy(starts[a][chunk[:, a]]).to(device) for a in range(3)]
        chunk = torch.from_numpy(chunk).to(device)
        block = windows[0, :, index[0], index[1], index[2]].reshape(n_volumes, len(chunk), n).permute(1, 2, 0)
        # the voxel itself is left out of its window's statistics: nothing of it shapes its prediction
        offset = (chunk[:, 0] - index[0]) * sizes[1] * sizes[2] + (chunk[:, 1] - index[1]) * sizes[2] + (
            chunk[:, 2] - index[2])
        others = torch.ones(len(chunk), n, 1, dtype=block.dtype, device=device)
        others[torch.arange(len(chunk), device=device), offset] = 0.0
        mean = (block * others).sum(dim=1, keepdim=True) / (n - 1)
        centred = (block - mean) * others
        covariance = centred.transpose(1, 2) @ centred / (n - 1)
        eigenvalues, vectors = torch.linalg.eigh(covariance)
        threshold = edge * variance[chunk[:, 0], chunk[:, 1], chunk[:, 2]]
        keep = (eigenvalues > threshold[:, None]).double()
        projector = (vectors * keep[:, None, :]) @ vectors.transpose(1, 2)
        centre = values[chunk[:, 0], chunk[:, 1], chunk[:, 2]] - mean[:, 0]
        fitted = (projector @ centre[..., None])[..., 0]
        leverage = torch.diagonal(projector, dim1=1, dim2=2)
        loo = (fitted - leverage * centre) / (1.0 - leverage).clamp_min(1e-3)
        where = tuple(chunk[:, a].cpu().numpy() for a in range(3))
        prediction[where] = (loo + mean[:, 0]).float().cpu().numpy()
    return prediction


def conditions(bvals, bvecs) -> np.ndarray:
    """(V, 7) constants per target volume: b / b_max and g g^T's six entries (sign-invariant)."""
    bvals = np.asarray(bvals, dtype=float).ravel()
    g = np.asarray(bvecs, dtype=float).reshape(3, -1).T
    norms = np.linalg.norm(g, axis=1, keepdims=True)
    g = np.where(norms > 1e-6, g / np.maximum(norms, 1e-12), 0.0)
    outer = np.stack([g[:, 0] ** 2, g[:, 1] ** 2, g[:, 2] ** 2, 2 * g[:, 0] * g[:, 1], 2 * g[:, 0] * g[:, 2],
                      2 * g[:, 1] * g[:, 2]], axis=1)
    return np.concatenate([(bvals / max(bvals.max(), 1.0))[:, None], outer], axis=1).astype(np.float32)


#: Widths (Gaussian sigma, voxels) of the fixed smoothings of the angular channels the CNN also sees.
SMOOTHING_WIDTHS = (1.0, 2.0)


def _gaussian_kernel(width):
    radius = int(np.ceil(2 * width))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / width) ** 2)
    return torch.from_numpy((taps / taps.sum()).astype(np.float32))


class AngularCNN(nn.Module):
    """A CNN from the angular-prediction and condition channels of one target volume to that volume.

    The linear angular channels (which never see the target volume anywhere) go through 3x3x3
    convolutions, as they are and smoothed by fixed Gaussians of :data:`SMOOTHING_WIDTHS` voxels
    (normalised at the border): the network learns where to trust which scale instead of learning
    to smooth from scratch. The local-subspace channel (which never sees the target volume at the
    voxel it predicts, but does see it at the neighbours) joins at the voxel only, in a 1x1x1 head:
    a spatial convolution over it would bring the voxel's own value back through its neighbours'
    predictions. The head's last layer starts at zero, so an untrained network returns the
    local-subspace prediction.

    Parameters
    ----------
    width : int
        Channels of the hidden layers.
    layers : int
        3x3x3 convolutions (receptive field ``2 * layers + 1`` voxels a side); a 1x1x1 head follows.
    """

    def __init__(self, width=24, layers=4):
        super().__init__()
        for index, sigma in enumerate(SMOOTHING_WIDTHS):
            self.register_buffer(f"taps{index}", _gaussian_kernel(sigma), persistent=False)
        channels = LINEAR_CHANNELS * (1 + len(SMOOTHING_WIDTHS)) + CONDITION_CHANNELS
        body = []
        for _ in range(layers):
            body += [nn.Conv3d(channels, width, 3, padding=1), nn.LeakyReLU(0.1, inplace=True)]
            channels = width
        self.body = nn.Sequential(*body)
        self.head = nn.Sequential(nn.Conv3d(channels + 1, width, 1), nn.LeakyReLU(0.1, inplace=True),
                                  nn.Conv3d(width, 1, 1))
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)

    def _smooth(self, images, taps):
        """Separable Gaussian of (N, C, X, Y, Z) images, zero outside, divided by the weight inside."""
        count = images.new_ones((1, 1) + tuple(images.shape[2:]))
        n, c = images.shape[:2]
        values = images.reshape(n * c, 1, *images.shape[2:])
        radius = (taps.numel() - 1) // 2
        for axis in range(3):
            shape = [1, 1, 1, 1, 1]
            shape[2 + axis] = taps.numel()
            kernel = taps.to(values.dtype).reshape(shape)
            padding = [0, 0, 0]
            padding[axis] = radius
            values = nn.functional.conv3d(values, kernel, padding=tuple(padding))
            count = nn.functional.conv3d(count, kernel, padding=tuple(padding))
        return values.reshape(n, c, *images.shape[2:]) / count.clamp_min(1e-6)

    def forward(self, angular, condition):
        """``angular`` (N, 7, X, Y, Z), ``condition`` (N, 7) -> (N, 1, X, Y, Z)."""
        linear, local = angular[:, :LINEAR_CHANNELS], angular[:, RESIDUAL_CHANNEL : RESIDUAL_CHANNEL + 1]
        scales = [linear] + [self._smooth(linear, getattr(self, f"taps{i}")) for i in range(len(SMOOTHING_WIDTHS))]
        planes = condition[:, :, None, None, None].expand(-1, -1, *angular.shape[2:])
        features = self.body(torch.cat(scales + [planes], dim=1))
        return local + self.head(torch.cat([features, local], dim=1))


@dataclass
class P2SNetResult:
    """Output of :func:`p2snet`.

    Attributes
    ----------
    denoised : ndarray (X, Y, Z, V)
    network : ndarray (X, Y, Z, V) or None
        The network's own prediction (before the blend and the floor removal); None unless asked.
    blend_weights : list of float
        Weight of the network's output in each volume (0: the input kept).
    blends : list of dict
        Each volume's blend (:class:`bids_denoise.methods.core.calibrate.Blend`) before the guard.
    history, state_dict : dict
    held_out_volumes : list of int
        Volumes left out of training (early stopping on them).
    noise_floor_removed : bool
    """

    denoised: np.ndarray
    network: np.ndarray | None
    blend_weights: list
    blends: list
    history: dict
    state_dict: dict
    held_out_volumes: list = field(default_factory=list)
    noise_floor_removed: bool = False
    #: the guard: the scale of the blend weights kept, and the angular contrast the output keeps per shell
    guard: dict = field(default_factory=dict)


@dataclass(frozen=True)
class P2SNetOptions(TrainingOptions):
    """The options of :func:`p2snet` (the training budget: :class:`TrainingOptions`, here ``batch_size``
    crops, each of one random volume, per step).

    Attributes
    ----------
    subspace_extent : int
        Window side of the local-subspace prediction (odd).
    width, layers : int
        The CNN's hidden channels and 3x3x3 layers.
    crop : int
        Side of the training crops, in voxels (smaller where the image is).
    blend : bool
        Blend each volume with the input by the self-supervised risk (default; False writes the
        network's output as is).
    noise_floor : {"koay", "none"}
        Remove the Rician/noncentral-chi noise floor at the end (default), or not.
    shell_tolerance, b0_threshold : float
        Shells as :func:`bids_denoise.methods.core.shells.cluster_shells`.
    validation_fraction : float
        Share of volumes held out of training for early stopping (at least one when there are 4+).
    n_coils : int
        Receive channels, for the noise floor.
    """

    epochs: int = option(40, "training epochs at most", parse=positive(int))
    steps_per_epoch: int = option(40, "optimiser steps per epoch", parse=positive(int))
    batch_size: int = option(4, "crops per batch", parse=positive(int))
    learning_rate: float = option(2e-3, "Adam's learning rate", parse=positive(float), app=False)
    subspace_extent: int = option(5, "window side (odd) of the local-subspace prediction", parse=positive(int))
    width: int = option(24, "hidden channels of the CNN", parse=positive(int))
    layers: int = option(4, "3x3x3 convolution layers", parse=positive(int))
    crop: int = option(16, "side of the training crops in voxels", parse=positive(int))
    blend: bool = option(True, "blend each volume with the input by the self-supervised risk (false: the "
                               "network's output as is)")
    noise_floor: str = option("koay", "remove the Rician noise floor at the end (koay) or not (none)",
                              choices=("koay", "none"))
    shell_tolerance: float = option(100.0, "b-value gap that separates shells", parse=positive(float))
    b0_threshold: float = option(50.0, "largest b-value of a b0", app=False)
    validation_fraction: float = option(0.1, "share of volumes held out for early stopping", app=False)
    n_coils: int = option(1, "receive channels, for the noise floor", app=False)


def _crop_starts(shape, size, generator, count):
    return [[int(torch.randint(max(1, extent - size + 1), (1,), generator=generator)) for extent in shape]
            for _ in range(count)]


def p2snet(data, bvals, bvecs, options: P2SNetOptions | None = None, *, mask=None, seed=0, device="cpu",
           state_dict=None, keep_network_output=False, **changes) -> P2SNetResult:
    """Denoise a DWI series with a J-invariant network that predicts each volume from the others.

    Parameters
    ----------
    data : ndarray (X, Y, Z, V)
        Magnitude DWI series.
    bvals : (V,), bvecs : (3, V)
    options : P2SNetOptions, optional
        The method's options (default: :class:`P2SNetOptions`'s); keyword ``changes`` replace
        single options, e.g. ``p2snet(data, bvals, bvecs, noise_floor="none", epochs=5)``.
    mask : ndarray of bool (X, Y, Z), optional
        Voxels where the local subspace predicts and over which the blend weights are estimated
        (default: an automatic b0 brain mask).
    seed : int
    device : str
        ``cpu``, ``cuda``, ``auto`` ...; mixed precision on CUDA.
    state_dict : dict, optional
        Trained weights to reuse (no training then).
    keep_network_output : bool
        Return the network's own prediction too.

    Returns
    -------
    P2SNetResult

    Raises
    ------
    UnsuitableDataError
        Not a 4D series, or fewer than 3 volumes.
    """
    options = resolve_options(P2SNetOptions, options, changes)
    b0_threshold, shell_tolerance, crop, blend = (options.b0_threshold, options.shell_tolerance, options.crop,
                                                  options.blend)
    data = np.asarray(data, dtype=np.float32)
    if data.ndim != 4 or data.shape[3] < 3:
        raise UnsuitableDataError(f"P2S-Net needs a 4D series of at least 3 volumes, got shape {data.shape}")
    device = resolve_device(device)
    generator = seed_everything(seed)
    scale = IntensityScale.fit(data)
    series = scale.forward(data)
    n_volumes = series.shape[3]
    predictors = torch.from_numpy(angular_weights(bvals, bvecs, b0_threshold=b0_threshold,
                                                  shell_tolerance=shell_tolerance))
    condition = torch.from_numpy(conditions(bvals, bvecs))
    voxels = torch.from_numpy(np.ascontiguousarray(series))
    if mask is None:
        from bids_denoise.methods.core.masking import b0_brain_mask

        mask = b0_brain_mask(series, np.asarray(bvals, float), b0_threshold=b0_threshold)
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        mask = np.ones(series.shape[:3], dtype=bool)
    variance = series_noise_variance(series)
    # outside the brain: the mean of the other volumes of the shell (J-invariant too)
    local = np.einsum("xyzv,vn->xyzn", series, predictors[:, 0, :].numpy())
    local[mask] = local_subspace_predictions(series, variance, extent=options.subspace_extent, mask=mask,
                                             device=device)[mask]
    local = torch.from_numpy(np.ascontiguousarray(local, dtype=np.float32))

    def angular(box, volumes):
        """Angular channels of the given target volumes in a box: (len(volumes), 7, x, y, z)."""
        linear = torch.einsum("xyzv,vcn->ncxyz", voxels[box], predictors[:, :, volumes])
        subspace = local[box][..., volumes].permute(3, 0, 1, 2)[:, None]
        return torch.cat([linear, subspace], dim=1).contiguous()

    rng = np.random.default_rng(seed)
    n_held = int(round(options.validation_fraction * n_volumes)) if n_volumes >= 4 else 0
    n_held = max(1, n_held) if n_volumes >= 4 else 0
    held_out = sorted(rng.permutation(n_volumes)[:n_held].tolist())
    train_volumes = np.array([v for v in range(n_volumes) if v not in held_out])
    size = [min(crop, extent) for extent in series.shape[:3]]

    def batch_of(volumes, starts):
        inputs, targets = [], []
        for volume, start in zip(volumes, starts):
            box = tuple(slice(s, s + c) for s, c in zip(start, size))
            inputs.append(angular(box, [int(volume)])[0])
            targets.append(voxels[box][..., int(volume)][None])
        volumes = torch.as_tensor(np.asarray(volumes, dtype=np.int64))
        return torch.stack(inputs), condition[volumes], torch.stack(targets)

    def sample_batch(gen, count):
        volumes = train_volumes[torch.randint(len(train_volumes), (count,), generator=gen).numpy()]
        return batch_of(volumes, _crop_starts(series.shape[:3], crop, gen, count))

    def loss_fn(model, inputs, condition_batch, targets):
        return torch.mean((model(inputs, condition_batch) - targets) ** 2)

    validation_generator = torch.Generator().manual_seed(seed + 1)
    validation = []
    for volume in held_out or train_volumes[:1].tolist():
        starts = _crop_starts(series.shape[:3], crop, validation_generator, 4)
        validation.append(batch_of([volume] * 4, starts))

    model = AngularCNN(width=options.width, layers=options.layers)
    history = train_or_reuse(model, state_dict, sample_batch, loss_fn, validation, budget=options.budget, device=device,
                             generator=generator, label="p2snet")
    network = _predict(model, voxels, angular, condition, device)
    blends = [blend_weight(network[..., v][mask], series[..., v][mask], variance[mask]) for v in range(n_volumes)]
    weights = np.array([found.weight if blend else 1.0 for found in blends], dtype=np.float32)
    guard = {"scale": 1.0}
    if blend:
        shells = cluster_shells(bvals, b0_threshold=b0_threshold, tolerance=shell_tolerance)
        contrast = angular_contrast(network, series, shells, variance, mask)
        gains = [(float(w), 1.0, b.loss / max(b.identity_risk, 1e-30)) for w, b in zip(weights, blends)]
        snr = signal_to_noise(series, bvals, variance, mask, b0_threshold)
        cap = contrast_cap(contrast, {int(label): [gains[v] for v in np.flatnonzero(shells == label)]
                                      for label in np.unique(shells)}, snr)
        guard = {"scale": cap, "angular_contrast": contrast, "snr": round(snr, 3)}
        weights = weights * np.float32(cap)
    # the floor is removed from the network's estimate of the mean, which enters with its weight: a
    # volume that keeps most of its input keeps most of its (noisy) values, whose floor cannot be
    # inverted value by value
    estimate = _remove_floor(network, series, options.n_coils) if options.noise_floor == "koay" else network
    output = series + weights * (estimate - series)
    denoised = scale.inverse(output)
    kept = np.flatnonzero(weights == 0)  # volumes the network does not touch keep their values to the bit
    denoised[..., kept] = data[..., kept]
    return P2SNetResult(
        denoised=denoised, network=scale.inverse(network) if keep_network_output else None,
        blend_weights=[round(float(w), 4) for w in weights], blends=[b.as_dict() for b in blends], guard=guard,
        history=history,
        state_dict={k: v.cpu() for k, v in model.state_dict().items()}, held_out_volumes=held_out,
        noise_floor_removed=options.noise_floor == "koay",
    )


def _predict(model, voxels, angular, condition, device) -> np.ndarray:
    """The network's prediction of every volume, whole volumes one at a time: (X, Y, Z, V)."""
    prediction = np.empty(tuple(voxels.shape), dtype=np.float32)
    use_amp = device.type == "cuda"
    with torch.no_grad():
        for volume in range(voxels.shape[3]):
            inputs = angular((slice(None),) * 3, [volume]).to(device)
            with torch.autocast(device_type=device.type, enabled=use_amp):
                output = model(inputs, condition[volume : volume + 1].to(device))
            prediction[..., volume] = output[0, 0].float().cpu().numpy()
    return prediction


def _remove_floor(output, series, n_coils):
    """The floor-free signal of ``output`` (a mean estimate) with MP-PCA's Gaussian noise map of ``series``."""
    from bids_denoise.methods.core.noise import gaussian_noise_sigma
    from bids_denoise.methods.core.noise_floor import remove_noise_floor

    if series.shape[3] < 4:
        return output
    sigma = gaussian_noise_sigma(series, n_coils)
    return remove_noise_floor(output, sigma, n_coils, out_dtype=np.float32)
