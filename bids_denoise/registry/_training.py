"""What the learned methods' registrations share: keeping trained weights.

Their training-budget parameters come with their options classes, which extend
:class:`bids_denoise.methods.core.networks.TrainingOptions` (``params_from`` reads them).
"""

from __future__ import annotations

from pathlib import Path


def save_weights(state_dict, work_dir) -> str:
    """Keep the trained weights in the node's folder (a cached rerun reuses the node)."""
    import torch

    path = Path(work_dir) / "weights.pt"
    torch.save(state_dict, path)
    return str(path)
