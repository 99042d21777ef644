"""MP-PCA: Marchenko-Pastur principal component denoising, with noise and rank maps.

For each voxel, the voxels-by-volumes matrix of a small window around it is
decomposed; its eigenvalues that fit the Marchenko-Pastur distribution of pure
noise are discarded, their mean gives the noise variance, and the voxel is
rebuilt from the remaining (signal) components (Veraart et al. 2016). The noise
level is estimated as in MRtrix3 3.0 ``dwidenoise`` with the estimator of
Cordero-Grande et al. 2019 (``Exp2``, default) or Veraart's (``Exp1``).

Behaviour matches ``dwidenoise`` 3.0.8: the default window is the smallest odd
isotropic extent whose cube holds at least as many voxels as there are volumes
(capped at the image size); at the image border the window is shifted to stay
inside the image; only the centre voxel is reconstructed; voxels outside the
mask are zero. ``aggregate="overcomplete"`` instead reconstructs every voxel of
every window and averages them with weights ``1 / (1 + rank)``, as DIPY's
``mppca`` does, optionally on a strided grid of windows (each voxel still
covered) for speed.

The eigenproblems are solved by a small compiled solver (``_mppca_kernel.c``,
called through ctypes) where it was built, and by ``torch.linalg.eigh``
otherwise, with the same cut-offs and the same output to rounding. The solver
needs neither the whole spectrum nor all eigenvectors: eight windows' Gram
matrices are reduced to tridiagonal form together (the lanes of one vector
register); the Marchenko-Pastur scan needs the smallest eigenvalue and the
largest ones down to the cut-off, found by Sturm-sequence bisection finished by
Newton steps, while the sums over the noise eigenvalues come from the trace;
inverse iteration gives the signal eigenvectors alone. Windows next to each
other along z share all their z-planes but one, so each plane's Gram matrix is
formed once and the window's is summed from them.

References
----------
.. [1] Veraart J., Novikov D.S., Christiaens D., Ades-aron B., Sijbers J.,
       Fieremans E. Denoising of diffusion MRI using random matrix theory.
       NeuroImage 142 (2016) 394-406.
.. [2] Cordero-Grande L., Christiaens D., Hutter J., Price A.N., Hajnal J.V.
       Complex diffusion-weighted image estimation via matrix recovery under
       general noise models. NeuroImage 200 (2019) 391-404.
.. [3] Manjon J.V. et al. Diffusion weighted image denoising using overcomplete
       local PCA. PLoS One 8 (2013) e73021.
"""

from __future__ import annotations

import gc
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from bids_denoise.methods import _mppca_solver
from bids_denoise.methods._device import resolve_device
from bids_denoise.methods.errors import UnsuitableDataError
from bids_denoise.methods.networks import power_of_two_exponent

#: Bytes of window data handled per batch (per worker thread).
BATCH_BYTES = 16 * 2**20

#: Fewest eigenvalues a window matrix must have (min(voxels, volumes)) for a Marchenko-Pastur
#: estimate: see :func:`_check_window_holds_estimate`.
MIN_EIGENVALUES = 4


@dataclass
class MPPCAResult:
    """Output of :func:`mppca`.

    Attributes
    ----------
    denoised : ndarray, shape (X, Y, Z, V)
    noise_sigma : ndarray, shape (X, Y, Z)
        Estimated noise standard deviation per voxel (0 where no noise
        component was found, and outside the mask).
    rank : ndarray, shape (X, Y, Z)
        Number of signal components kept (float for overcomplete averaging).
    extent : tuple of int
        The window used.
    solver : str
        ``"tridiagonal"`` (the compiled solver) or ``"eigh"``.
    """

    denoised: np.ndarray
    noise_sigma: np.ndarray
    rank: np.ndarray
    extent: tuple
    solver: str = "eigh"


def kernel_available() -> bool:
    """Whether the compiled window solver can be used (built, and not disabled by
    ``BIDS_DENOISE_DISABLE_KERNEL``): ``solver="auto"`` then uses it on the CPU."""
    return _mppca_solver.available()


def default_extent(n_volumes: int, shape) -> tuple:
    """MRtrix3's default window: smallest odd e with e**3 >= n_volumes, capped by the image."""
    edge = 1
    while edge**3 < n_volumes:
        edge += 2
    return tuple(min(edge, _largest_odd(size)) for size in shape)


def _largest_odd(size: int) -> int:
    return size if size % 2 else size - 1


def mppca(
    data,
    *,
    mask=None,
    extent=None,
    estimator="Exp2",
    aggregate="centre",
    stride=1,
    device="cpu",
    precision="float64",
    demean=False,
    solver="auto",
    out_dtype=np.float32,
):
    """Denoise a 4D series with MP-PCA.

    Parameters
    ----------
    data : ndarray, shape (X, Y, Z, V)
    mask : ndarray of bool, shape (X, Y, Z), optional
        Voxels to denoise; the output is zero elsewhere (as ``dwidenoise``).
    extent : int or sequence of 3 odd int, optional
        Window size; default as ``dwidenoise`` (see :func:`default_extent`).
    estimator : {"Exp2", "Exp1"}, optional
        Noise estimator: Cordero-Grande (``Exp2``, default) or Veraart 2016.
    aggregate : {"centre", "overcomplete"}, optional
        Rebuild the centre voxel of each voxel's window (``dwidenoise``), or
        every voxel of every window, averaged with weights 1/(1 + rank) (DIPY).
    stride : int or sequence of 3 int, optional
        Step between window positions for ``aggregate="overcomplete"``, one
        for all axes or one per axis (default 1, every position). Larger steps
        are faster; every voxel is still covered.
    device : str, optional
        ``cpu`` (default), ``cuda``, ``cuda:N`` or ``auto``. On the CPU, batches
        of windows run on ``torch.get_num_threads()`` threads. The cost is one
        eigendecomposition of a small Gram matrix per window; torch's batched
        CUDA ``eigh`` did about 1,000 68x68 matrices a second on an H100 (a
        measurement reported to this project), fewer than one CPU core does, so
        the app runs MP-PCA on the CPU.
    precision : {"float64", "float32"}, optional
        Arithmetic of the eigendecompositions (default float64; ``dwidenoise``
        uses float32, whose rounding flips borderline noise/signal decisions).
    demean : bool, optional
        Subtract each window's mean over its voxels before the PCA and add it
        back after (as DIPY's ``mppca``). ``dwidenoise`` does not (default).
    solver : {"auto", "tridiagonal", "eigh"}, optional
        How each window's Gram matrix is decomposed. ``tridiagonal``: the
        compiled solver of this package (Householder tridiagonalisation; by
        bisection only the eigenvalues the cut-off needs, the noise sums from
        the trace; inverse iteration for the signal eigenvectors only), float64
        on the CPU. ``eigh``: a full ``torch.linalg.eigh``. ``auto`` (default)
        takes ``tridiagonal`` where it applies (CPU, float64, extension built)
        and ``eigh`` otherwise. Both give the same cut-offs and the same
        signal subspaces to rounding.
    out_dtype : dtype, optional

    Returns
    -------
    MPPCAResult

    Raises
    ------
    UnsuitableDataError
        Not a 4D series; fewer than ``MIN_EIGENVALUES`` (4) volumes; an image so small that the
        largest window it allows has fewer than 4 voxels (1x1x1 for a 2x2x2 image, the extents
        being odd), so that each window would have fewer than 4 eigenvalues and MP-PCA would
        return zeros or noise (see :func:`_check_window_holds_estimate`); or an ``extent``
        larger than the image; or an empty mask. A given ``extent`` of fewer than 4 voxels is a
        ``ValueError``.

    Notes
    -----
    Scale-invariant: ``mppca(c * x)`` is ``c * mppca(x)`` (the noise map too) to rounding for any
    ``c``. Data whose largest magnitude is outside [1e-6, 1e6] are divided by a power of two
    first and multiplied back after, which is exact; other data are computed on as given, so
    their output is unchanged to the bit.
    """
    data = _check_series(data)
    if estimator not in ("Exp1", "Exp2"):
        raise ValueError(f"estimator must be 'Exp1' or 'Exp2', not {estimator!r}")
    if aggregate not in ("centre", "overcomplete"):
        raise ValueError(f"aggregate must be 'centre' or 'overcomplete', not {aggregate!r}")
    if precision not in ("float64", "float32"):
        raise ValueError(f"precision must be 'float64' or 'float32', not {precision!r}")
    stride = tuple(int(step) for step in np.atleast_1d(stride))
    stride = stride * 3 if len(stride) == 1 else stride
    if len(stride) != 3 or min(stride) < 1:
        raise ValueError(f"stride must be one or three integers >= 1, got {stride}")
    shape = data.shape[:3]
    given = extent is not None
    extent = _check_extent(extent, data.shape[3], shape)
    _check_window_holds_estimate(extent, data.shape, given)
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != shape:
            raise ValueError(f"mask shape {mask.shape} does not match image shape {shape}")
        if not mask.any():  # the output would be all zeros
            raise UnsuitableDataError("MP-PCA: the mask is empty, no voxel to denoise")
    device = resolve_device(device)
    dtype = {"float64": torch.float64, "float32": torch.float32}[precision]
    use_kernel = _use_compiled_solver(solver, device, dtype)
    exponent = power_of_two_exponent(data)
    if exponent:
        data = np.ldexp(data, -exponent)  # exact: the same digits at any scale
    windows = _WindowSolver(
        np.ascontiguousarray(data), extent, estimator == "Exp1", device, dtype, out_dtype, demean, use_kernel
    )
    if aggregate == "centre":
        denoised, sigma, rank = windows.centre_voxels(mask)
    else:
        denoised, sigma, rank = windows.overcomplete(mask, stride)
    if exponent:
        denoised, sigma = np.ldexp(denoised, exponent), np.ldexp(sigma, exponent)
    return MPPCAResult(
        denoised=denoised,
        noise_sigma=sigma,
        rank=rank,
        extent=extent,
        solver="tridiagonal" if use_kernel else "eigh",
    )


def _check_series(data) -> np.ndarray:
    """The series as float32 or float64; UnsuitableDataError where it is no 4D series of enough volumes."""
    data = np.asarray(data)
    if data.ndim != 4:
        raise UnsuitableDataError(f"MP-PCA needs a 4D series, got an image of shape {data.shape}")
    if data.shape[3] < MIN_EIGENVALUES:
        raise UnsuitableDataError(
            f"MP-PCA needs at least {MIN_EIGENVALUES} volumes (one eigenvalue each for the "
            f"Marchenko-Pastur noise estimate), got {data.shape[3]}"
        )
    if data.dtype not in (np.float32, np.float64):
        data = data.astype(np.float32)
    return data


def _check_window_holds_estimate(extent, data_shape, given):
    """Refuse a window whose matrix has fewer than MIN_EIGENVALUES eigenvalues.

    A window of n voxels and V volumes has min(n, V) eigenvalues. The cut-off counts the
    smallest as noise whatever it is, so a one-voxel window is all noise and its voxel is
    rebuilt as zero; with two or three the noise level is the mean of one or two eigenvalues,
    no fit of a distribution. Where the image caps the default window (a 2x2x2 image allows
    only 1x1x1: odd extents within the image), MP-PCA would return zeros or noise dressed up as
    a denoised series: it raises UnsuitableDataError instead (ValueError for a given extent
    that is too small for any image).
    """
    n_voxels = int(np.prod(extent))
    if min(n_voxels, data_shape[3]) >= MIN_EIGENVALUES:
        return
    window = "x".join(str(edge) for edge in extent)
    holds = f"{window} ({n_voxels} voxel{'s' if n_voxels > 1 else ''})"
    needs = f"the Marchenko-Pastur noise estimate needs at least {MIN_EIGENVALUES} eigenvalues per window"
    if given:
        raise ValueError(f"MP-PCA extent {holds} is too small: {needs}")
    image = "x".join(str(size) for size in data_shape[:3])
    raise UnsuitableDataError(
        f"the image ({image} voxels) is smaller than the MP-PCA window needs: the largest window it "
        f"allows is {holds}, and {needs}"
    )


def _use_compiled_solver(solver, device, dtype) -> bool:
    """Whether the compiled solver runs: ``tridiagonal`` or ``auto`` where it applies."""
    if solver not in ("auto", "tridiagonal", "eigh"):
        raise ValueError(f"solver must be 'auto', 'tridiagonal' or 'eigh', not {solver!r}")
    applies = device.type == "cpu" and dtype == torch.float64 and kernel_available()
    if solver == "tridiagonal" and not applies:
        reason = _mppca_solver.unavailable_reason() or "it is available"
        raise ValueError(
            "solver='tridiagonal' needs device='cpu', precision='float64' and the compiled extension "
            f"({reason}; device {device.type}, precision {str(dtype).replace('torch.', '')})"
        )
    return applies and solver != "eigh"


def _check_extent(extent, n_volumes, shape):
    if extent is None:
        return default_extent(n_volumes, shape)
    extent = tuple(int(e) for e in np.atleast_1d(extent))
    if len(extent) == 1:
        extent = extent * 3
    if len(extent) != 3:
        raise ValueError("extent must be one odd number or three")
    for edge, size in zip(extent, shape):
        if edge < 1 or edge % 2 == 0:
            raise ValueError(f"extent must be odd numbers, got {extent}")
        if edge > size:
            raise UnsuitableDataError(
                f"the MP-PCA window asked for, extent {extent}, exceeds the image size {tuple(shape)}"
            )
    return extent


def marchenko_pastur_cutoff(eigenvalues, n_volumes, n_voxels, exp1=False):
    """Number of noise components and noise variance from ascending eigenvalues.

    Parameters
    ----------
    eigenvalues : torch.Tensor, shape (B, r)
        Eigenvalues of each window's Gram matrix, ascending.
    n_volumes, n_voxels : int
        The window matrix is n_volumes x n_voxels.
    exp1 : bool
        Veraart's estimator instead of Cordero-Grande's.

    Returns
    -------
    n_noise : torch.Tensor of int64, shape (B,)
    sigma2 : torch.Tensor, shape (B,)
        0 where no noise component was found (as ``dwidenoise``).
    """
    r = eigenvalues.shape[1]
    q = max(n_volumes, n_voxels)
    lam = eigenvalues.to(torch.float64)
    # values at the rounding level of the largest eigenvalue count as zero (the compiled solver uses
    # the same rule), so rank-deficient windows do not hinge on the sign of round-off
    negligible = r * torch.finfo(torch.float64).eps * lam.abs().amax(dim=1, keepdim=True)
    lam = torch.where(lam > negligible, lam, torch.zeros_like(lam)) / q
    count = torch.arange(1, r + 1, dtype=torch.float64, device=lam.device)
    if exp1:
        gamma = count / q
    else:
        gamma = count / (q - (r - count))
    cumulative = torch.cumsum(lam, dim=1)
    sigsq1 = cumulative / count
    sigsq2 = (lam - lam[:, :1]) / (4.0 * torch.sqrt(gamma))
    is_noise = sigsq2 < sigsq1
    # the cut-off is the last p at which the noise condition holds
    last = torch.where(is_noise, count.to(torch.int64), torch.zeros_like(is_noise, dtype=torch.int64))
    n_noise = last.max(dim=1).values
    index = (n_noise - 1).clamp_min(0).unsqueeze(1)
    sigma2 = torch.where(n_noise > 0, sigsq1.gather(1, index)[:, 0], torch.zeros_like(n_noise, dtype=torch.float64))
    return n_noise, sigma2


class _WindowSolver:
    """Window extraction, eigendecomposition and reconstruction, in batches.

    The series stays in its own dtype (float32 usually); each batch of windows
    is converted to the compute precision on its own, so memory stays near the
    input plus the output.
    """

    def __init__(self, data, extent, exp1, device, dtype, out_dtype, demean=False, use_kernel=False):
        self.data = data
        self.shape = data.shape[:3]
        self.n_volumes = data.shape[3]
        self.extent = extent
        self.n_voxels = int(np.prod(extent))
        self.rank_limit = min(self.n_volumes, self.n_voxels)
        self.exp1 = exp1
        self.device = device
        self.dtype = dtype
        self.out_dtype = out_dtype
        self.demean = demean
        self.use_kernel = use_kernel
        # the windows are rebuilt in the output's precision where the compiled solver runs (float32
        # output: float32 products, no float64 copy of the window data); eigh's path stays in the
        # compute precision throughout, as the reference
        self.rebuild_dtype = (
            torch.float32 if use_kernel and np.dtype(out_dtype) == np.float32 else dtype
        )
        self.threads = max(1, torch.get_num_threads())
        # windows[a, b, c] is the (ex, ey, ez, V) window whose corner is (a, b, c); the volumes stay
        # innermost, so gathering a window copies contiguous runs of V values
        self.windows = np.lib.stride_tricks.sliding_window_view(data, extent, axis=(0, 1, 2)).transpose(
            0, 1, 2, 4, 5, 6, 3
        )
        if use_kernel and self.n_volumes <= self.n_voxels:
            # (X - ex + 1, Y - ey + 1, Z, ex, ey, V): the z-planes of the windows
            self.plane_view = np.lib.stride_tricks.sliding_window_view(
                data, extent[:2], axis=(0, 1)
            ).transpose(0, 1, 2, 4, 5, 3)
        itemsize = torch.finfo(dtype).bits // 8
        bytes_per_window = itemsize * (3 * self.n_volumes * self.n_voxels + 3 * min(self.n_volumes, self.n_voxels) ** 2)
        # batches of about BATCH_BYTES, smaller for small inputs so that the buffers of all worker
        # threads stay a fraction of the input (peak memory about the input plus the output)
        budget = min(BATCH_BYTES, data.nbytes // 4)  # independent of the thread count: same sums
        self.batch = max(64, budget // bytes_per_window)  # fewer, larger batches scale better on threads
        if device.type == "cuda":
            self.batch *= 16

    def _decompose(self, corners):
        """Window matrices, voxels by volumes (B, n, V); signal eigenvectors of the smaller Gram
        matrix (B, r, k), k the batch's largest signal count, zero columns where a window has
        fewer; n_noise, sigma2 and the window means (B, 1, V) or None."""
        block = self.windows[corners[:, 0], corners[:, 1], corners[:, 2]]
        matrix = torch.from_numpy(block.reshape(len(corners), self.n_voxels, self.n_volumes))
        from_planes = self.use_kernel and self.n_volumes <= self.n_voxels
        matrix = matrix.to(self.device, self.rebuild_dtype if from_planes else self.dtype)
        mean = None
        if self.demean:
            mean = matrix.mean(dim=1, keepdim=True)
            matrix.sub_(mean)  # a fresh copy: fancy indexing above never returns a view
        if from_planes:  # the window matrix is only needed to rebuild the windows
            eigenvectors, n_noise, sigma2 = self._signal_subspace_from_planes(corners)
        elif self.use_kernel:  # each window's Gram matrix is its one part
            eigenvectors, n_noise, sigma2 = self._signal_subspace(
                self._gram(matrix), None, np.arange(len(corners))[:, None]
            )
        else:
            eigenvalues, eigenvectors = torch.linalg.eigh(self._gram(matrix))
            n_noise, sigma2 = marchenko_pastur_cutoff(
                eigenvalues, self.n_volumes, self.n_voxels, self.exp1
            )
        r = self.rank_limit
        k = max(1, r - int(n_noise.min()))  # the batch's largest signal count
        if self.use_kernel:  # signal vectors as rows, zero rows past a window's own count
            signal = eigenvectors[:, :k, :].transpose(1, 2).to(matrix.dtype)
        else:  # ascending columns: the signal ones are the last r - n_noise, zero the others
            keep = torch.arange(r - k, r, device=self.device).unsqueeze(0) >= n_noise.unsqueeze(1)
            signal = eigenvectors[:, :, r - k :].to(matrix.dtype) * keep.unsqueeze(1).to(matrix.dtype)
        return matrix, signal, n_noise, sigma2, mean

    def _gram(self, matrix):
        """The smaller Gram matrix of each (B, n, V) window matrix: (B, r, r)."""
        if self.n_volumes <= self.n_voxels:
            return matrix.transpose(1, 2) @ matrix
        return matrix @ matrix.transpose(1, 2)

    def _signal_subspace_from_planes(self, corners):
        """The compiled solver on Gram matrices summed from those of the windows' z-planes.

        Windows along z share all their planes but one: each plane's (volumes x volumes) Gram
        matrix is formed once per batch and the solver adds up a window's ``ez`` of them (and
        removes the window mean from the plane sums), about ``ez`` times fewer products than one
        Gram matrix per window.
        """
        ny, nz = self.plane_view.shape[1], self.shape[2]
        depth = self.extent[2]
        ids = ((corners[:, 0] * ny + corners[:, 1]) * nz + corners[:, 2])[:, None] + np.arange(depth)
        planes, index = np.unique(ids, return_inverse=True)
        a, rest = np.divmod(planes, ny * nz)
        b, z = np.divmod(rest, nz)
        rows = torch.from_numpy(
            self.plane_view[a, b, z].reshape(len(planes), -1, self.n_volumes)
        ).to(self.device, self.dtype)
        parts = rows.transpose(1, 2) @ rows
        sums = rows.sum(dim=1) if self.demean else None
        return self._signal_subspace(parts, sums, index.reshape(len(corners), depth))

    def _signal_subspace(self, parts, part_sums, part_index):
        """The compiled solver (:func:`_mppca_solver.signal_subspace`, the cut-off rule of
        :func:`marchenko_pastur_cutoff`): signal eigenvectors as rows of a (B, r, r) array (only the
        first k rows are set, k the batch's largest signal count; zero rows past a window's own),
        n_noise and sigma2. Window w's Gram matrix is the sum of ``parts[part_index[w]]``, less the
        mean's outer product where ``part_sums`` is given."""
        return _mppca_solver.signal_subspace(
            parts.contiguous(),
            None if part_sums is None else part_sums.contiguous(),
            np.ascontiguousarray(part_index, dtype=np.int64),
            n_voxels=self.n_voxels,
            q=max(self.n_volumes, self.n_voxels),
            exp1=self.exp1,
        )

    def _run_batches(self, solve, count, apply=None):
        """Run ``solve(start)`` for every batch on ``self.threads`` worker threads.

        ``apply`` receives each batch's result in batch order, in this thread,
        so overlapping accumulations add up in the same order whatever the
        thread count (bit-identical results). Each worker keeps torch at one
        intra-op thread: threading inside one small eigendecomposition costs
        more than it gains; threads across batches scale.
        """
        apply = apply or (lambda payload: None)
        starts = list(range(0, count, self.batch))
        # the batches create only short-lived tensors: cyclic garbage collection would walk the
        # interpreter's whole object graph again and again (a few % of the run)
        collecting = gc.isenabled()
        gc.disable()
        try:
            self._run_starts(solve, starts, apply)
        finally:
            if collecting:
                gc.enable()

    def _run_starts(self, solve, starts, apply):
        if self.threads <= 1 or self.device.type == "cuda":
            for start in starts:
                apply(solve(start))
            return
        previous = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with ThreadPoolExecutor(self.threads) as pool:
                pending = []
                for start in starts:
                    pending.append(pool.submit(solve, start))
                    if len(pending) > self.threads:  # bound the results held in memory
                        apply(pending.pop(0).result())
                for future in pending:
                    apply(future.result())
        finally:
            torch.set_num_threads(previous)

    def _corner_of(self, coordinates):
        half = np.array(self.extent) // 2
        upper = np.array(self.shape) - np.array(self.extent)
        return np.clip(coordinates - half, 0, upper)

    def centre_voxels(self, mask):
        """dwidenoise's mode: each voxel rebuilt from its own (border-shifted) window.

        Voxels near the border share one window (it is shifted, not padded): each
        distinct window is decomposed once.
        """
        shape, n_volumes = self.shape, self.n_volumes
        denoised = np.zeros(shape + (n_volumes,), dtype=self.out_dtype)
        sigma = np.zeros(shape, dtype=np.float32)
        rank = np.zeros(shape, dtype=np.int16)
        targets = np.flatnonzero(mask.ravel()) if mask is not None else np.arange(np.prod(shape))
        coordinates = np.stack(np.unravel_index(targets, shape), axis=1)
        corners = self._corner_of(coordinates)
        local = coordinates - corners
        centres = (local[:, 0] * self.extent[1] + local[:, 1]) * self.extent[2] + local[:, 2]
        corner_ids, window_of_target = np.unique(
            np.ravel_multi_index(corners.T, shape), return_inverse=True
        )
        order = np.argsort(window_of_target, kind="stable")
        first_target = np.searchsorted(window_of_target[order], np.arange(corner_ids.size + 1))
        unique_corners = np.stack(np.unravel_index(corner_ids, shape), axis=1)
        r = min(n_volumes, self.n_voxels)

        def solve(start):
            stop = min(start + self.batch, corner_ids.size)
            matrix, vectors, n_noise, sigma2, mean = self._decompose(unique_corners[start:stop])
            batch_targets = order[first_target[start] : first_target[stop]]
            which = torch.from_numpy(window_of_target[batch_targets] - start).to(self.device)
            centre = torch.from_numpy(centres[batch_targets]).to(self.device)
            vectors_t = vectors[which]  # (T, r, k), noise columns zero
            if n_volumes <= self.n_voxels:
                column = matrix[which, centre, :]  # (T, V)
                coefficients = (vectors_t.transpose(1, 2) @ column.unsqueeze(2))[..., 0]
                rebuilt = (vectors_t @ coefficients.unsqueeze(2))[..., 0]
            else:
                weights = vectors_t @ vectors_t[torch.arange(len(which)), centre].unsqueeze(2)
                rebuilt = (matrix[which].transpose(1, 2) @ weights)[..., 0]
            if mean is not None:
                rebuilt = rebuilt + mean[which, 0, :]
            # each target voxel belongs to one batch: the writes never overlap
            index = np.unravel_index(targets[batch_targets], shape)
            denoised[index] = rebuilt.cpu().numpy()
            sigma[index] = torch.sqrt(sigma2)[which].cpu().numpy()
            rank[index] = (r - n_noise)[which].cpu().numpy()

        self._run_batches(solve, corner_ids.size)
        return denoised, sigma, rank

    def overcomplete(self, mask, stride):
        """DIPY's mode: every voxel of every window rebuilt, averaged with weights 1/(1 + rank)."""
        shape, n_volumes = self.shape, self.n_volumes
        positions = [
            _strided_positions(size - edge + 1, step)
            for size, edge, step in zip(shape, self.extent, stride)
        ]
        grid = np.stack(np.meshgrid(*positions, indexing="ij"), axis=-1).reshape(-1, 3)
        # linear offsets of a window's voxels from its corner, in the window's (x, y, z) order
        offsets = np.ravel_multi_index(
            np.meshgrid(*[np.arange(e) for e in self.extent], indexing="ij"), shape
        ).ravel()
        if mask is not None:
            covered = np.lib.stride_tricks.sliding_window_view(mask, self.extent).any(axis=(3, 4, 5))
            grid = grid[covered[grid[:, 0], grid[:, 1], grid[:, 2]]]
        n_total = int(np.prod(shape))
        # float32 sums of the rebuilt series (at most a few hundred terms per voxel); float64 sums
        # of the weights and of the weighted noise level and rank
        accumulated = torch.zeros(n_total, n_volumes, dtype=torch.float32, device=self.device)
        statistics = torch.zeros(n_total, 3, dtype=torch.float64, device=self.device)
        r = min(n_volumes, self.n_voxels)

        def solve(start):
            corners = grid[start : start + self.batch]
            matrix, signal, n_noise, sigma2, mean = self._decompose(corners)
            n_signal = r - n_noise
            theta = 1.0 / (1.0 + n_signal.to(torch.float64))  # (B,)
            weighted = signal * theta[:, None, None].to(matrix.dtype)
            # the rebuilt windows, voxels by volumes (B, n, V): rows go straight to the accumulator
            if n_volumes <= self.n_voxels:
                rebuilt = (matrix @ signal) @ weighted.transpose(1, 2)
            else:
                rebuilt = weighted @ (signal.transpose(1, 2) @ matrix)
            if mean is not None:
                rebuilt.add_(mean * theta[:, None, None].to(matrix.dtype))
            voxels = np.ravel_multi_index(corners.T, shape)[:, None] + offsets[None, :]
            index = torch.from_numpy(voxels.ravel()).to(self.device)
            values = rebuilt.reshape(-1, n_volumes).to(torch.float32)
            per_window = torch.stack([theta, theta * torch.sqrt(sigma2), theta * n_signal], dim=1)
            return index, values, per_window.repeat_interleave(self.n_voxels, dim=0)

        def accumulate(payload):
            index, values, per_voxel = payload
            accumulated.index_add_(0, index, values)
            statistics.index_add_(0, index, per_voxel)

        self._run_batches(solve, len(grid), accumulate)
        safe = statistics[:, 0].clamp_min(1e-300)
        accumulated /= safe[:, None].to(torch.float32)
        denoised = accumulated.cpu().numpy().reshape(shape + (n_volumes,)).astype(self.out_dtype, copy=False)
        sigma = (statistics[:, 1] / safe).cpu().numpy().reshape(shape).astype(np.float32)
        rank = (statistics[:, 2] / safe).cpu().numpy().reshape(shape).astype(np.float32)
        if mask is not None:
            denoised[~mask] = 0
            sigma[~mask] = 0
            rank[~mask] = 0
        return denoised, sigma, rank


def _strided_positions(count: int, stride: int) -> np.ndarray:
    positions = np.arange(0, count, stride)
    if positions[-1] != count - 1:
        positions = np.append(positions, count - 1)
    return positions
