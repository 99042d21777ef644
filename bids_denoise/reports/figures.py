"""Quality-control figures: what a neuroimager looks at before trusting a denoiser.

Arrays in, PNG files out (matplotlib's Agg backend, no display needed).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from bids_denoise.io import atomic_path  # noqa: E402

ORIENTATIONS = (("sagittal", 0), ("coronal", 1), ("axial", 2))


def residual_statistics(noisy, denoised, bvals, mask, b0_threshold=50.0):
    """Per-volume residual RMS inside the mask, and robust outlier flags.

    A volume is flagged when its residual RMS lies more than 3.5 robust
    standard deviations (1.4826 x MAD) above the median of its shell.
    """
    from bids_denoise.methods.core.shells import cluster_shells

    residual = (noisy - denoised)[mask]  # (voxels, volumes)
    rms = np.sqrt(np.mean(residual.astype(np.float64) ** 2, axis=0))
    shells = cluster_shells(bvals, b0_threshold=b0_threshold)
    outlier = np.zeros(rms.shape, dtype=bool)
    for label in np.unique(shells):
        members = shells == label
        if members.sum() < 4:
            continue
        median = np.median(rms[members])
        spread = 1.4826 * np.median(np.abs(rms[members] - median))
        if spread > 0:
            outlier[members] = (rms[members] - median) / spread > 3.5
    return rms, outlier, shells


def representative_volumes(bvals, shells, kind="dwi"):
    """As (label, index) pairs: the first b0 and the first volume of each shell of a DWI series; the first, middle
    and last volumes of another series (``kind`` ``"series"``); the image (``kind`` ``"image"``)."""
    if kind == "image":
        return [("image", 0)]
    if kind == "series":
        last = len(shells) - 1
        return [(f"volume {index}", index) for index in dict.fromkeys((0, last // 2, last))]
    picks = []
    for label in np.unique(shells):
        members = np.flatnonzero(shells == label)
        name = "b0" if label == 0 else f"b={int(round(float(np.mean(bvals[members])), -1))}"
        picks.append((name, int(members[0])))
    return picks


def display_range(image) -> tuple[float, float]:
    """Grey-scale limits: from 0 (or the 0.5th percentile when the image goes below 0) to the 99.5th.

    Always an increasing pair, whatever the sign or the spread of the values.
    """
    values = np.asarray(image, dtype=np.float64)
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return 0.0, 1.0
    low, high = np.percentile(finite, [0.5, 99.5])
    low = min(0.0, float(low))
    high = float(high)
    if not high > low:
        high = low + (abs(low) or 1.0)
    return low, high


def _middle_slice(volume, axis):
    index = volume.shape[axis] // 2
    return np.rot90(np.take(volume, index, axis=axis))


def _save(figure, path):
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=80, bbox_inches="tight")
    plt.close(figure)
    return Path(path)


def mosaic(noisy, denoised, picks, path, title):
    """Input, denoised and residual (symmetric colour scale) in three orientations per picked volume."""
    rows = len(picks) * 3
    figure, axes = plt.subplots(rows, 3, figsize=(7.5, 2.2 * rows), squeeze=False, layout="constrained")
    for block, (name, index) in enumerate(picks):
        source, result = noisy[..., index], denoised[..., index]
        residual = source - result
        low_value, top = display_range(source)
        limit = np.percentile(np.abs(residual), 99.5) or 1.0
        for column, (orientation, axis) in enumerate(ORIENTATIONS):
            panels = (
                (source, "gray", low_value, top, f"{name} input"),
                (result, "gray", low_value, top, f"{name} denoised"),
                (residual, "RdBu_r", -limit, limit, f"{name} residual"),
            )
            for offset, (image, cmap, low, high, label) in enumerate(panels):
                ax = axes[block * 3 + offset, column]
                ax.imshow(_middle_slice(image, axis), cmap=cmap, vmin=low, vmax=high, interpolation="nearest")
                ax.set_axis_off()
                ax.set_title(f"{label} ({orientation})", fontsize=7)
    figure.suptitle(title, fontsize=9)
    return _save(figure, path)


def map_figure(volume, path, title, cmap="magma"):
    """A 3D map (noise sigma, rank, residual RMS) in three orientations with a colour bar."""
    figure, axes = plt.subplots(1, 3, figsize=(7.5, 2.6))
    low, top = display_range(volume)
    for ax, (orientation, axis) in zip(axes, ORIENTATIONS):
        shown = ax.imshow(_middle_slice(volume, axis), cmap=cmap, vmin=low, vmax=top, interpolation="nearest")
        ax.set_axis_off()
        ax.set_title(orientation, fontsize=7)
    figure.colorbar(shown, ax=axes, shrink=0.8)
    figure.suptitle(title, fontsize=9)
    return _save(figure, path)


def tsnr(series) -> np.ndarray:
    """Temporal SNR per voxel: mean over time / standard deviation over time (0 where flat)."""
    series = np.asarray(series, dtype=np.float64)
    spread = series.std(axis=3)
    return np.divide(series.mean(axis=3), spread, out=np.zeros(spread.shape), where=spread > 0)


def tsnr_figure(noisy, denoised, mask, path, title):
    """tSNR before, after and their ratio, axial middle slice."""
    before, after = tsnr(noisy), tsnr(denoised)
    ratio = np.divide(after, before, out=np.zeros(before.shape), where=before > 0)
    figure, axes = plt.subplots(1, 3, figsize=(7.5, 2.6))
    top = float(np.percentile(after[mask], 99)) if mask.any() else 1.0
    for ax, (image, label, low, high, cmap) in zip(axes, (
            (before, "tSNR before", 0, top or 1.0, "magma"), (after, "tSNR after", 0, top or 1.0, "magma"),
            (ratio, "after / before", 0, max(2.0, float(np.percentile(ratio[mask], 99)) if mask.any() else 2.0),
             "viridis"))):
        shown = ax.imshow(_middle_slice(image, 2), cmap=cmap, vmin=low, vmax=high, interpolation="nearest")
        ax.set_axis_off()
        ax.set_title(label, fontsize=7)
        figure.colorbar(shown, ax=ax, shrink=0.7)
    figure.suptitle(title, fontsize=9)
    return _save(figure, path)


def carpet_plot(noisy, denoised, mask, path, title, max_voxels=2000):
    """Brain voxels x time, before, after and removed, on the input's scale."""
    voxels = np.flatnonzero(mask.ravel())
    if voxels.size > max_voxels:
        voxels = voxels[np.linspace(0, voxels.size - 1, max_voxels).round().astype(int)]
    before = noisy.reshape(-1, noisy.shape[3])[voxels].astype(np.float64)
    after = denoised.reshape(-1, denoised.shape[3])[voxels].astype(np.float64)
    centre, scale = before.mean(axis=1, keepdims=True), before.std(axis=1, keepdims=True)
    scale[scale == 0] = 1.0
    panels = ((before - centre) / scale, (after - centre) / scale, (before - after) / scale)
    figure, axes = plt.subplots(3, 1, figsize=(7.5, 5.4), sharex=True)
    for ax, panel, label in zip(axes, panels, ("input", "denoised", "removed (input - denoised)")):
        ax.imshow(panel, aspect="auto", cmap="gray", vmin=-2.5, vmax=2.5, interpolation="nearest")
        ax.set_ylabel(label, fontsize=7)
        ax.set_yticks([])
    axes[-1].set_xlabel("volume")
    figure.suptitle(title, fontsize=9)
    return _save(figure, path)


def volume_plot(rms, outlier, bvals, path, title):
    """Residual RMS over volume index, outliers marked."""
    figure, ax = plt.subplots(figsize=(7.5, 2.4))
    index = np.arange(rms.size)
    scatter = ax.scatter(index, rms, c=bvals, cmap="viridis", s=14)
    if outlier.any():
        ax.scatter(index[outlier], rms[outlier], s=80, facecolors="none", edgecolors="red", label="outlier")
        ax.legend(fontsize=7)
    ax.set_xlabel("volume")
    ax.set_ylabel("residual RMS")
    figure.colorbar(scatter, ax=ax, label="b-value")
    ax.set_title(title, fontsize=9)
    return _save(figure, path)


def group_plot(table_rows, path):
    """Residual RMS of each run, per method, across subjects."""
    methods = sorted({row["method"] for row in table_rows})
    figure, ax = plt.subplots(figsize=(7.5, 3))
    for position, method in enumerate(methods):
        values = [float(row["residual_rms"]) for row in table_rows if row["method"] == method]
        jitter = np.linspace(-0.15, 0.15, len(values)) if len(values) > 1 else [0.0]
        ax.scatter(position + np.asarray(jitter), values, s=20)
    ax.set_xticks(range(len(methods)), methods)
    ax.set_ylabel("mean residual RMS")
    ax.set_title("Residual RMS per run", fontsize=9)
    return _save(figure, path)


def loss_curves(history, path, title):
    """Training and validation loss per epoch."""
    epochs = [row["epoch"] for row in history["epochs"]]
    figure, ax = plt.subplots(figsize=(6, 2.6))
    ax.plot(epochs, [row["train_loss"] for row in history["epochs"]], "o-", label="training")
    ax.plot(epochs, [row["val_loss"] for row in history["epochs"]], "s-", label="validation (held out)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax.set_title(f"{title} ({history.get('stopped', '')})", fontsize=8)
    return _save(figure, path)


def calibration_curve(calibration, path, title):
    """Self-supervised loss of each candidate parameter, the chosen one marked."""
    figure, ax = plt.subplots(figsize=(6, 2.6))
    ax.plot(calibration["thetas"], calibration["losses"], "o-")
    ax.axvline(calibration["best"], color="red", linestyle="--", label=f"chosen: {calibration['best']:g}")
    ax.set_xlabel(calibration["parameter"])
    ax.set_ylabel("self-supervised loss")
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    return _save(figure, path)


def blend_figure(blend, path, title):
    """The weight of a learned method's output in each volume's blend with the input, by the choice the
    self-supervised risk made (identity: the input kept)."""
    weights = np.asarray(blend["blend_weights"], dtype=float)
    choices = list(blend.get("choices") or ["blend"] * weights.size)
    figure, ax = plt.subplots(figsize=(6, 2.6))
    for choice in dict.fromkeys(choices):
        volumes = [v for v, c in enumerate(choices) if c == choice]
        ax.bar(volumes, weights[volumes], label=choice)
    ax.set_xlabel("volume")
    ax.set_ylabel("weight of the output")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    return _save(figure, path)


def superres_figure(source, result, path, title):
    """Input and super-resolved output, central crops of the same region, each plane shown
    in world proportions (the input's thick voxels stretched)."""
    ratios = [result.shape[a] / source.shape[a] for a in range(3)]
    figure, axes = plt.subplots(2, 3, figsize=(7.5, 5), layout="constrained")
    for column, (orientation, axis) in enumerate(ORIENTATIONS):
        shown = [a for a in range(3) if a != axis]
        for row, (image, label) in enumerate(((source, "input"), (result, "super-resolved"))):
            plane = np.take(image, image.shape[axis] // 2, axis=axis)
            crop = tuple(slice(n // 4, n - n // 4) for n in plane.shape)
            aspect = (ratios[shown[1]] / ratios[shown[0]]) if image is source else 1.0
            ax = axes[row, column]
            ax.imshow(np.rot90(plane[crop]), cmap="gray", interpolation="nearest", aspect=aspect)
            ax.set_axis_off()
            ax.set_title(f"{label} ({orientation})", fontsize=7)
    figure.suptitle(title, fontsize=9)
    return _save(figure, path)
