"""BOLD MP-PCA judged as users judge it: nilearn's first-level GLM on phantoms from two generators.

A denoiser must raise the task's t without inventing activation: false positives 2-5 voxels from the
active region at most 1.5x the noisy input's, none added beyond 5 voxels or on a run without a task, and
a t gain at least the 1.5-voxel Gaussian's (``benchmarks/bold_glm.py`` runs the full grid: three
geometries, three run kinds, two noise levels, two seeds).
"""

from __future__ import annotations

import numpy as np
import pytest

from bids_denoise.testing.bold_glm import gaussian, make_case, registered, score


def _mppca(case, **changes):
    return registered(case, "mppca", **changes)


def _judge(geometry, snr, denoise):
    case, null = make_case(geometry, snr, 1), make_case(geometry, snr, 1, null=True)
    rows = {"noisy": lambda c: list(c.magnitude), "gaussian": gaussian, "denoised": denoise}
    task = {name: score(run(case), case, scorers=("nilearn",))["nilearn"] for name, run in rows.items()}
    nulls = {name: score(run(null), null, scorers=("nilearn",))["nilearn"]["fp_all"] for name, run in rows.items()}
    return task, nulls


def _meets_targets(task, nulls):
    noisy, smooth, ours = task["noisy"], task["gaussian"], task["denoised"]
    return {
        "halo (FP 2-5)": ours["fp_2-5"] <= 1.5 * noisy["fp_2-5"],
        "far (FP >5)": ours["fp_>5"] <= noisy["fp_>5"],
        "null run": nulls["denoised"] <= nulls["noisy"],
        "t gain": ours["roi_t"] / noisy["roi_t"] >= smooth["roi_t"] / noisy["roi_t"],
    }


@pytest.mark.parametrize("geometry, snr", [("small", 15.0), ("folded", 40.0)])
def test_the_bold_default_raises_t_without_a_halo_or_false_positives(geometry, snr):
    """The ellipsoid generator at tSNR 15 (where a 7x7x7 window spans 7 % of the brain) and the folded one
    (a cortical ribbon, jittered blocks, orthogonal physiology, drift) at tSNR 40."""
    task, nulls = _judge(geometry, snr, _mppca)
    met = _meets_targets(task, nulls)
    assert all(met.values()), (met, task, nulls)
    assert task["denoised"]["roi_t"] > 1.2 * task["noisy"]["roi_t"]


def test_the_previous_default_window_draws_a_halo():
    """The check can fail: dwidenoise's window (7x7x7 at 200 volumes, the centre voxel) multiplied the false
    positives next to activation."""
    from bids_denoise.methods.core.windows import default_extent

    extent = default_extent(200, (25, 30, 20))
    assert extent == (7, 7, 7)
    task, nulls = _judge("small", 15.0, lambda case: _mppca(case, aggregate="centre", extent=extent))
    assert not _meets_targets(task, nulls)["halo (FP 2-5)"]
    assert task["denoised"]["fp_2-5"] > 3 * task["noisy"]["fp_2-5"]
    assert np.isfinite(task["denoised"]["roi_t"])
