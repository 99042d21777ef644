"""What the learned methods share: their training-budget parameters and keeping trained weights."""

from __future__ import annotations

from pathlib import Path

from bids_denoise.contract import Param, default_of, positive

BUDGET = ("epochs", "max_seconds", "steps_per_epoch", "batch_size")


def budget_params(function, unit="slices") -> tuple:
    """The training-budget parameters, with the defaults of the method's own function."""
    return (
        Param("epochs", positive(int), default_of(function, "epochs"), "training epochs at most"),
        Param("max_seconds", positive(float), float(default_of(function, "max_seconds")),
              "training time budget in seconds"),
        Param("steps_per_epoch", positive(int), default_of(function, "steps_per_epoch"), "optimiser steps per epoch"),
        Param("batch_size", positive(int), default_of(function, "batch_size"), f"{unit} per batch"),
    )


def budget(parameters) -> dict:
    return {key: parameters[key] for key in BUDGET}


def save_weights(state_dict, work_dir) -> str:
    """Keep the trained weights in the node's folder (a cached rerun reuses the node)."""
    import torch

    path = Path(work_dir) / "weights.pt"
    torch.save(state_dict, path)
    return str(path)
