"""The compiled MP-PCA window solver (``_localpca_kernel.c``), loaded through ctypes and called safely.

The C function reads and writes raw memory: an array of the wrong dtype,
strides or shape is not an error there but a wrong answer or a crash. So every
array is checked here (dtype, C order, shape, index range) before its address
is handed over, and a mistake in the caller is a ``ValueError`` that says what
was wrong.

The extension is optional (``setup.py`` builds it where a C compiler exists);
:func:`available` tells whether it can be used. Setting the environment
variable ``BIDS_DENOISE_DISABLE_KERNEL=1`` makes it unavailable (read at every
call), so MP-PCA takes torch's ``eigh`` path: a way to compare the two on one
installation, or to rule the compiled code out when hunting a problem.
"""

from __future__ import annotations

import ctypes
import os
from functools import lru_cache
from importlib.util import find_spec

import numpy as np
import torch

#: Environment variable that, set to 1 (or true/yes/on), keeps the compiled solver from being used.
DISABLE_VARIABLE = "BIDS_DENOISE_DISABLE_KERNEL"

_INT_MAX = 2**31 - 1


@lru_cache(maxsize=1)
def _library():
    try:
        return ctypes.CDLL(find_spec("bids_denoise.methods.core._localpca_kernel").origin)
    except (AttributeError, ImportError, OSError, TypeError):
        return None


@lru_cache(maxsize=1)
def _load():
    """The C function ``mppca_signal_subspace`` with its signature, or None where it was not built."""
    library = _library()
    if library is None:
        return None
    function = library.mppca_signal_subspace
    function.restype = ctypes.c_int
    function.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                         ctypes.c_int, ctypes.c_double, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                         ctypes.c_void_p, ctypes.c_void_p]
    return function


@lru_cache(maxsize=1)
def _load_known():
    """The C function ``mppca_signal_subspace_known`` (noise level given), or None where the extension
    was not built or predates it."""
    library = _library() if _load() is not None else None
    function = getattr(library, "mppca_signal_subspace_known", None) if library is not None else None
    if function is None:
        return None
    function.restype = ctypes.c_int
    function.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                         ctypes.c_int, ctypes.c_double, ctypes.c_void_p, ctypes.c_double, ctypes.c_double,
                         ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    return function


def known_available() -> bool:
    """Whether the compiled solver can also take a given noise level (:func:`signal_subspace` with
    ``known_sigma2``): available, and built with that entry point."""
    return available() and _load_known() is not None


def disabled() -> bool:
    """Whether ``BIDS_DENOISE_DISABLE_KERNEL`` asks not to use the compiled solver (read now)."""
    return os.environ.get(DISABLE_VARIABLE, "").strip().lower() in ("1", "true", "yes", "on")


def built() -> bool:
    """Whether the extension was built and loads."""
    return _load() is not None


def available() -> bool:
    """Whether the compiled solver can be used: built, and not disabled by the environment."""
    return not disabled() and built()


def unavailable_reason() -> str:
    """Why :func:`available` is false, in a few words ("" when it is true)."""
    if disabled():
        return f"disabled by {DISABLE_VARIABLE}={os.environ.get(DISABLE_VARIABLE)}"
    if not built():
        return "the compiled extension bids_denoise.methods._mppca_kernel was not built"
    return ""


def signal_subspace(parts, part_sums, part_index, n_voxels: int, q: int, exp1: bool, known_sigma2=None,
                    noise_shape=None):
    """Marchenko-Pastur cut-off and signal eigenvectors of a batch of window Gram matrices (in C).

    Window ``w``'s Gram matrix is the sum of ``parts[part_index[w, t]]`` over ``t``, less the
    outer product of the window's column sums divided by ``n_voxels`` where ``part_sums`` is given
    (demeaning). The cut-off rule is :func:`bids_denoise.methods.mppca.marchenko_pastur_cutoff`'s,
    or :func:`bids_denoise.methods.mppca.known_sigma_cutoff`'s where ``known_sigma2`` is given.

    Parameters
    ----------
    parts : ndarray or CPU torch.Tensor, float64, C-contiguous, shape (P, r, r)
        Symmetric Gram matrices of the parts (a window's z-planes, or whole windows).
    part_sums : ndarray or CPU torch.Tensor, float64, C-contiguous, shape (P, r), or None
        Column sums of each part, for demeaning; None for no demeaning.
    part_index : ndarray of int64, C-contiguous, shape (B, depth)
        The parts of each window, each in ``[0, P)``.
    n_voxels : int
        Voxels of a window (the divisor of the mean).
    q : int
        The larger dimension of the window matrix, ``max(volumes, voxels)`` (>= r).
    exp1 : bool
        Veraart's estimator instead of Cordero-Grande's (unused where ``known_sigma2`` is given).
    known_sigma2 : ndarray of float64, shape (B,), optional
        Each window's noise variance, given: the cut-off is then the Marchenko-Pastur edge for it
        (``mppca_signal_subspace_known`` in C) and ``sigma2`` returns it.
    noise_shape : (int, int), optional
        With ``known_sigma2``: the window matrix's larger and smaller dimension for the noise
        (``q_noise >= r_noise``; one voxel fewer where windows are demeaned).

    Returns
    -------
    vectors : torch.Tensor, float64, shape (B, r, r)
        Signal eigenvectors as rows, largest eigenvalue first; only the first k rows are set
        (k the batch's largest signal count), zero rows past a window's own count.
    n_noise : torch.Tensor, int64, shape (B,)
    sigma2 : torch.Tensor, float64, shape (B,)

    Raises
    ------
    ValueError
        An array of the wrong dtype, order or shape, an index out of range, or sizes C's int
        cannot hold.
    RuntimeError
        The solver is not available (see :func:`unavailable_reason`).
    MemoryError
        The solver could not allocate its buffers.
    """
    function = _load()
    if function is None or disabled():
        raise RuntimeError(f"MP-PCA compiled solver unavailable: {unavailable_reason()}")
    if known_sigma2 is not None and _load_known() is None:
        raise RuntimeError("MP-PCA compiled solver built without mppca_signal_subspace_known: rebuild it")
    parts = _checked("parts", parts, np.float64, ndim=3)
    count, r = parts.shape[0], parts.shape[1]
    if parts.shape[2] != r or count < 1 or r < 1:
        raise ValueError(f"parts must be a non-empty stack of square matrices (P, r, r), got shape {parts.shape}")
    if part_sums is not None:
        part_sums = _checked("part_sums", part_sums, np.float64, ndim=2)
        if part_sums.shape != (count, r):
            raise ValueError(f"part_sums must have shape {(count, r)} (one row per part), got {part_sums.shape}")
    part_index = _checked("part_index", part_index, np.int64, ndim=2)
    batch, depth = part_index.shape
    if depth < 1:
        raise ValueError(f"part_index must name at least one part per window, got shape {part_index.shape}")
    if batch and (part_index.min() < 0 or part_index.max() >= count):
        raise ValueError(f"part_index values must lie in [0, {count}), got [{part_index.min()}, {part_index.max()}]")
    if not 1 <= n_voxels or q < r:
        raise ValueError(f"n_voxels must be >= 1 and q >= r = {r}, got n_voxels={n_voxels}, q={q}")
    if max(batch, r * r, depth, q) > _INT_MAX:
        raise ValueError(f"sizes exceed C int: batch={batch}, r={r}, depth={depth}, q={q}")
    if known_sigma2 is not None:
        known_sigma2 = _checked("known_sigma2", known_sigma2, np.float64, ndim=1)
        if known_sigma2.shape != (batch,):
            raise ValueError(f"known_sigma2 must have shape {(batch,)} (one value per window), got {known_sigma2.shape}")
        if not np.all(np.isfinite(known_sigma2)) or np.any(known_sigma2 < 0):
            raise ValueError("known_sigma2 must be finite and >= 0")
        q_noise, r_noise = noise_shape if noise_shape is not None else (q, r)
        if not 1 <= r_noise <= q_noise or r_noise > r:
            raise ValueError(f"noise_shape must be (q_noise, r_noise) with 1 <= r_noise <= q_noise and r_noise <= "
                             f"{r}, got {noise_shape}")
    n_noise = torch.empty(batch, dtype=torch.int64)
    sigma2 = torch.empty(batch, dtype=torch.float64)
    vectors = torch.empty(batch, r, r, dtype=torch.float64)
    sums_address = None if part_sums is None else part_sums.ctypes.data
    if known_sigma2 is None:
        status = function(
            batch, r, parts.ctypes.data, sums_address, part_index.ctypes.data, depth, float(n_voxels), int(q),
            int(bool(exp1)), n_noise.data_ptr(), sigma2.data_ptr(), vectors.data_ptr(),
        )
    else:
        status = _load_known()(
            batch, r, parts.ctypes.data, sums_address, part_index.ctypes.data, depth, float(n_voxels),
            known_sigma2.ctypes.data, float(q_noise), float(r_noise), n_noise.data_ptr(), sigma2.data_ptr(),
            vectors.data_ptr(),
        )
    if status != 0:
        raise MemoryError("MP-PCA: the window solver could not allocate its buffers")
    return vectors, n_noise, sigma2


def _checked(name, array, dtype, ndim) -> np.ndarray:
    """``array`` as an ndarray sharing its memory, after checking dtype, dimensions and C order."""
    if isinstance(array, torch.Tensor):
        if array.device.type != "cpu":
            raise ValueError(f"{name} must be on the CPU, got a tensor on {array.device}")
        array = array.detach().numpy()
    if not isinstance(array, np.ndarray):
        raise ValueError(f"{name} must be a numpy array or a CPU tensor, got {type(array).__name__}")
    if array.dtype != dtype:
        raise ValueError(f"{name} must be {np.dtype(dtype).name}, got {array.dtype}")
    if array.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {array.shape}")
    if not array.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous (call .contiguous() or np.ascontiguousarray first)")
    return array
