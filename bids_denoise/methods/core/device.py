"""Choosing the torch device a method runs on.

Shared by every method that can use a GPU. ``auto`` picks CUDA when torch sees
a GPU; asking for CUDA where there is none is an error, never a silent
fall-back to the CPU.
"""

from __future__ import annotations

import torch


class DeviceUnavailableError(RuntimeError):
    """The requested device cannot be used on this machine."""


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """Turn ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` into a usable device.

    Parameters
    ----------
    spec : str or torch.device or None
        ``None`` and ``"auto"`` mean CUDA when available, else CPU.

    Returns
    -------
    torch.device

    Raises
    ------
    DeviceUnavailableError
        If CUDA is asked for and torch sees no (or not that) GPU.
    """
    if isinstance(spec, torch.device):
        spec = str(spec)
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise DeviceUnavailableError(
                f"--device {spec}: torch sees no CUDA GPU on this machine "
                "(use --device cpu or auto, or run the container with --gpus all / --nv)"
            )
        index = 0 if spec == "cuda" else int(spec.split(":", 1)[1])
        if index >= torch.cuda.device_count():
            raise DeviceUnavailableError(
                f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) visible"
            )
        return torch.device(f"cuda:{index}")
    raise DeviceUnavailableError(f"--device {spec!r}: expected auto, cpu, cuda or cuda:N")


def device_description(device: torch.device) -> str:
    """Human-readable device name, with the GPU model for CUDA devices."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return "cpu"
