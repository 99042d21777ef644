"""Grouping diffusion volumes by b-value.

Scanners write nominal b-values with small deviations (995, 1000, 1005 ...);
every method that treats shells separately clusters them the same way, here.
"""

from __future__ import annotations

import numpy as np


def cluster_shells(bvals, *, b0_threshold: float = 50.0, tolerance: float = 100.0) -> np.ndarray:
    """Label each volume with the index of its shell.

    Volumes with ``b <= b0_threshold`` form shell 0. The others are sorted by
    b-value and split wherever two consecutive sorted b-values differ by more
    than ``tolerance``; shells are numbered 1, 2, ... by increasing b-value.

    Parameters
    ----------
    bvals : array-like, shape (n_volumes,)
        b-values in s/mm^2.
    b0_threshold : float, optional
        Largest b-value counted as a b0 (default 50, as DIPY).
    tolerance : float, optional
        Largest gap between b-values of the same shell (default 100).

    Returns
    -------
    shell_of_volume : ndarray of int, shape (n_volumes,)
        0 for b0 volumes, k >= 1 for the k-th diffusion-weighted shell.
    """
    bvals = np.asarray(bvals, dtype=float).ravel()
    shell_of_volume = np.zeros(bvals.shape, dtype=int)
    weighted = np.flatnonzero(bvals > b0_threshold)
    if weighted.size == 0:
        return shell_of_volume
    order = weighted[np.argsort(bvals[weighted], kind="stable")]
    gaps = np.diff(bvals[order]) > tolerance
    shell_of_volume[order] = 1 + np.concatenate([[0], np.cumsum(gaps)])
    return shell_of_volume


def shell_bvalues(bvals, shell_of_volume) -> dict[int, float]:
    """Mean b-value of each shell label, for reports and sidecars."""
    bvals = np.asarray(bvals, dtype=float).ravel()
    return {
        int(label): float(np.round(bvals[shell_of_volume == label].mean(), 1))
        for label in np.unique(shell_of_volume)
    }


def even_sh_basis(directions, order):
    """Real, even spherical-harmonic basis of ``order`` (0, 2, 4, ...) at unit ``directions`` (N, 3).

    Spans the homogeneous polynomials of degree ``order`` restricted to the sphere ((order + 1)(order + 2) / 2
    functions: 1, 6, 15 ...): monomials ``x^i y^j z^k`` with ``i + j + k = order``, which on the sphere span
    the even harmonics up to ``order``. Even, so ``g`` and ``-g`` give the same row.
    """
    directions = np.asarray(directions, dtype=np.float64).reshape(-1, 3)
    columns = [directions[:, 0] ** i * directions[:, 1] ** j * directions[:, 2] ** (order - i - j)
               for i in range(order + 1) for j in range(order + 1 - i)]
    return np.stack(columns, axis=1)
