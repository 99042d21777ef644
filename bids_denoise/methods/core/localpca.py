"""Local principal component analysis in sliding windows: the core of MP-PCA (and its noise maps).

For each window position, the voxels-by-volumes matrix is decomposed; the eigenvalues below the
Marchenko-Pastur edge (:mod:`bids_denoise.methods.core.randmat`) are noise, the others signal, and the
window's voxels are rebuilt from the signal components: the centre voxel of each voxel's window
(``aggregate="centre"``, as MRtrix3 ``dwidenoise``), or every voxel of every window, averaged
(``"overcomplete"``, as DIPY; ``"gaussian"`` with Gaussian weights). :func:`local_pca` is the one
engine, as DIPY's ``genpca``; MP-PCA (:mod:`bids_denoise.methods.mppca`) and the noise estimates of
:mod:`bids_denoise.methods.core.noise` call it.

A :class:`VolumeBasis` changes the basis of the volume axis before the PCA: each voxel's mean per
b-value shell (``mode="shell"``) or over time (``mode="time"``) is taken out exactly (Helmert
contrasts), so the PCA sees white noise in the remaining dimensions.

The eigenproblems are solved by a small compiled solver (``_localpca_kernel.c``, called through
ctypes by :mod:`bids_denoise.methods.core._localpca_solver`) where it was built, and by
``torch.linalg.eigh`` otherwise, with the same cut-offs and the same output to rounding. The solver
needs neither the whole spectrum nor all eigenvectors: eight windows' Gram matrices are reduced to
tridiagonal form together (the lanes of one vector register); the Marchenko-Pastur scan needs the
smallest eigenvalue and the largest ones down to the cut-off, found by Sturm-sequence bisection
finished by Newton steps, while the sums over the noise eigenvalues come from the trace; inverse
iteration gives the signal eigenvectors alone. Windows next to each other along z share all their
z-planes but one, so each plane's Gram matrix is formed once and the window's is summed from them.
"""

from __future__ import annotations

import gc
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from bids_denoise.methods.core import _localpca_solver
from bids_denoise.methods.core.device import resolve_device
from bids_denoise.methods.core.errors import UnsuitableDataError
from bids_denoise.methods.core.progress import Progress
from bids_denoise.methods.core.randmat import (
    MIN_EIGENVALUES,
    frobenius_shrinkage,
    known_sigma_cutoff,
    marchenko_pastur_cutoff,
)
from bids_denoise.methods.core.scaling import power_of_two_exponent
from bids_denoise.methods.core.windows import default_extent, gaussian_weights, slabs, strided_positions, window_means

#: Bytes of window data handled per batch (per worker thread).
BATCH_BYTES = 16 * 2**20
#: The fewest windows per batch (a multiple of the compiled solver's 8 lanes): larger batches share more
#: z-planes' Gram matrices, smaller ones hold less memory (64x64x32, 200 volumes, one thread: 64 took
#: 99 s and 2.4x the series in extra peak memory, 32 took 109 s and 2.1x, 16 took 137 s and 1.8x).
BATCH_MIN = 32

#: Standard deviation of the Gaussian aggregation weights, as a fraction of the window's extent along
#: each axis (``aggregate="gaussian"``): 0.25 of a 5-voxel window is 1.25 voxels, so the window's
#: corners weigh 2% of its centre.
GAUSSIAN_WIDTH = 0.25


@dataclass
class LocalPCAResult:
    """The output of :func:`local_pca`: the rebuilt series, the noise level and the rank per voxel, the
    window, and the solver that ran (``"tridiagonal"`` or ``"eigh"``)."""

    denoised: np.ndarray
    noise_sigma: np.ndarray
    rank: np.ndarray
    extent: tuple
    solver: str


def kernel_available() -> bool:
    """Whether the compiled window solver can be used (built, and not disabled by
    ``BIDS_DENOISE_DISABLE_KERNEL``): ``solver="auto"`` then uses it on the CPU."""
    return _localpca_solver.available()


def local_pca(data, *, extent=None, exp1=False, aggregate="centre", stride=(1, 1, 1), demean=False, basis=None,
              shrinkage="hard", gaussian_width=GAUSSIAN_WIDTH, rank_weighting=True, noise_sigma=None, mask=None,
              device="cpu", precision="float64", solver="auto", out_dtype=np.float32) -> LocalPCAResult:
    """Denoise a real 4D series by local PCA with Marchenko-Pastur thresholds.

    The options are those of :func:`bids_denoise.methods.mppca.mppca`, already checked there (this is
    its engine): ``exp1`` selects Veraart's estimator; ``demean`` removes each window's mean;
    ``basis`` (a :class:`VolumeBasis`) removes each voxel's shell or temporal means instead;
    ``stride`` is three integers. The series is checked here (4D, enough volumes, a window that holds
    an estimate, a non-empty mask).
    """
    data = check_series(data)
    shape = data.shape[:3]
    given = extent is not None
    extent = check_extent(extent, data.shape[3], shape)
    check_window_holds_estimate(extent, data.shape, given)
    if basis is not None:
        basis.check_enough_volumes()
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != shape:
            raise ValueError(f"mask shape {mask.shape} does not match image shape {shape}")
        if not mask.any():  # the output would be all zeros
            raise UnsuitableDataError("MP-PCA: the mask is empty, no voxel to denoise")
    sigma_map = None if noise_sigma is None else check_noise_sigma(noise_sigma, shape)
    device = resolve_device(device)
    dtype = {"float64": torch.float64, "float32": torch.float32}[precision]
    use_kernel = use_compiled_solver(solver, device, dtype)
    if use_kernel and sigma_map is not None and not _localpca_solver.known_available():
        if solver == "tridiagonal":
            raise ValueError("solver='tridiagonal' with noise_sigma needs the compiled solver's "
                             "mppca_signal_subspace_known (rebuild the extension), or use solver='eigh'")
        use_kernel = False
    exponent = power_of_two_exponent(data)
    if exponent:
        data = np.ldexp(data, -exponent)  # exact: the same digits at any scale
        if sigma_map is not None:
            sigma_map = np.ldexp(sigma_map, -exponent)
    noise_variance = None if sigma_map is None else sigma_map.astype(np.float64) ** 2
    spatial = gaussian_weights(extent, gaussian_width) if aggregate == "gaussian" else None

    # the compiled solver's Marchenko-Pastur scan takes every eigenvalue of the voxels' Gram matrix; where window
    # demeaning leaves one of them zero (more volumes than window voxels), the eigh path leaves it out (a given
    # noise level's cut-off already counts one voxel fewer)
    voxel_side = data.shape[3] >= int(np.prod(extent)) and sigma_map is None

    def denoise(series, demean_windows, course_weights=None, out_volumes=None):
        windows = WindowSolver(
            np.ascontiguousarray(series), extent, exp1, device, dtype, out_dtype,
            demean_windows, use_kernel and not (demean_windows and voxel_side), shrinkage=shrinkage,
            noise_variance=noise_variance, course_weights=course_weights,
        )
        if aggregate == "centre":
            return windows.centre_voxels(mask, out_volumes)
        return windows.overcomplete(mask, stride, spatial=spatial, rank_weighting=rank_weighting)

    if basis is None:
        denoised, sigma, rank = denoise(data, demean)
    elif basis.mode == "time":
        # the measured temporal means (their noise, sigma / sqrt(V), stays in its voxel); the window
        # weights of the average course are the voxels' overall means
        means = basis.shell_means(data)
        residual = basis.residual(data)
        n_volumes = data.shape[3]
        data = None  # not needed again: a converted copy goes now
        in_place = aggregate == "centre"  # the series rebuilt in the output's own memory
        denoised, sigma, rank = denoise(residual, False, course_weights=means.mean(axis=3),
                                        out_volumes=n_volumes if in_place else None)
        del residual
        if in_place:
            basis.restore_in_place(denoised, means)
        else:
            denoised = basis.restore(denoised, means, out_dtype)
        if mask is not None:
            denoised[~mask] = 0
    else:
        # the shell means of a first pass on the whole series (window means removed), then the PCA of
        # the residual: adding back the raw shell means would put their noise back unfiltered
        first, _, _ = denoise(data, True)
        shell_means = basis.shell_means(first)
        del first
        denoised, sigma, rank = denoise(basis.residual(data), False)
        denoised = basis.restore(denoised, shell_means, out_dtype)
        if mask is not None:
            denoised[~mask] = 0
    if sigma_map is not None:
        sigma = np.broadcast_to(sigma_map, shape).astype(np.float32)
        if mask is not None:
            sigma[~mask] = 0
    if exponent:
        denoised, sigma = np.ldexp(denoised, exponent), np.ldexp(sigma, exponent)
    solver = "tridiagonal" if use_kernel and not ((demean or basis is not None and basis.mode == "shell")
                                                  and voxel_side) else "eigh"
    return LocalPCAResult(denoised, sigma, rank, extent, solver)


class VolumeBasis:
    """Per-voxel, per-shell demeaning as an orthonormal change of basis of the volume axis.

    With ``S`` shells, the volume space splits into the ``S`` shell-mean directions (each shell's
    indicator) and their ``V - S``-dimensional complement, spanned by Helmert contrasts within each
    shell (orthonormal, exact, no decomposition involved). A voxel's series ``x`` is its shell means
    plus ``(x Q) Q'``; the PCA runs on ``x Q`` (``V - S`` columns), whose noise is as white as
    ``x``'s, and the means are added back after.
    """

    def __init__(self, labels, mode="shell"):
        self.labels = labels
        self.mode = mode  # "shell" (b-value shells) or "time" (one group, or real and imaginary parts)
        columns = []
        for label in np.unique(labels):
            members = np.flatnonzero(labels == label)
            for j in range(1, members.size):
                column = np.zeros(labels.size)
                column[members[:j]] = 1.0
                column[members[j]] = -float(j)
                columns.append(column / np.sqrt(j * (j + 1.0)))
        self.n_shells = int(np.unique(labels).size)
        self.basis = np.stack(columns, axis=1) if columns else np.zeros((labels.size, 0))

    @classmethod
    def from_bvals(cls, bvals, n_volumes):
        from bids_denoise.methods.core.shells import cluster_shells

        if bvals is None:
            raise ValueError("demean='shell' needs the b-values (bvals)")
        bvals = np.asarray(bvals, dtype=np.float64).ravel()
        if bvals.size != n_volumes or not np.all(np.isfinite(bvals)):
            raise ValueError(f"bvals must hold one finite b-value per volume ({n_volumes}), got {bvals.size}")
        return cls(cluster_shells(bvals))

    @classmethod
    def for_time(cls, n_volumes, groups=None):
        """Each voxel's temporal mean: one group (a magnitude series) or one per part (``groups``: e.g. the
        real and the imaginary part of a complex series stacked)."""
        labels = np.zeros(n_volumes, dtype=int) if groups is None else np.asarray(groups)
        return cls(labels, mode="time")

    def check_enough_volumes(self):
        if self.basis.shape[1] < MIN_EIGENVALUES:
            raise UnsuitableDataError(
                f"MP-PCA with demean={self.mode!r}: {self.labels.size} volumes in {self.n_shells} "
                f"{'shells' if self.mode == 'shell' else 'group(s)'} leave "
                f"{self.basis.shape[1]} dimensions once their means are removed, fewer than "
                f"{MIN_EIGENVALUES}"
            )

    def residual(self, data):
        """``x Q`` for every voxel: (X, Y, Z, V - S), in the data's dtype."""
        out = np.empty(data.shape[:3] + (self.basis.shape[1],), dtype=data.dtype)
        for part in slabs(data.shape, data.nbytes):
            out[part] = data[part].astype(np.float64) @ self.basis
        return out

    def shell_means(self, data):
        """Each voxel's mean over the volumes of each shell: (X, Y, Z, S), float64."""
        members = np.stack([self.labels == label for label in np.unique(self.labels)], axis=1).astype(np.float64)
        weights = members / members.sum(axis=0)
        out = np.empty(data.shape[:3] + (self.n_shells,))
        for part in slabs(data.shape, data.nbytes):
            out[part] = data[part].astype(np.float64) @ weights
        return out

    def restore_in_place(self, series, shell_means):
        """As :meth:`restore` where ``series`` (X, Y, Z, V) holds the residual in its first ``V - S``
        volumes: the full series is written over it, slab by slab."""
        kept = self.basis.shape[1]
        for part in slabs(series.shape, series.nbytes):
            series[part] = self._restored(series[part][..., :kept], shell_means[part])

    def restore(self, residual, shell_means, out_dtype):
        """``shell_means`` (X, Y, Z, S) spread over their volumes plus the residual mapped back: (X, Y, Z, V)."""
        out = np.empty(residual.shape[:3] + (self.labels.size,), dtype=out_dtype)
        for part in slabs(out.shape, out.nbytes):
            out[part] = self._restored(residual[part], shell_means[part])
        return out

    def _restored(self, residual, shell_means):
        """One slab's series, float64: its shell means over their volumes plus its residual mapped back."""
        shells = np.searchsorted(np.unique(self.labels), self.labels)
        return shell_means[..., shells] + residual.astype(np.float64) @ self.basis.T



def check_series(data) -> np.ndarray:
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


def check_window_holds_estimate(extent, data_shape, given):
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


def use_compiled_solver(solver, device, dtype) -> bool:
    """Whether the compiled solver runs: ``tridiagonal`` or ``auto`` where it applies."""
    if solver not in ("auto", "tridiagonal", "eigh"):
        raise ValueError(f"solver must be 'auto', 'tridiagonal' or 'eigh', not {solver!r}")
    applies = device.type == "cpu" and dtype == torch.float64 and kernel_available()
    if solver == "tridiagonal" and not applies:
        reason = _localpca_solver.unavailable_reason() or "it is available"
        raise ValueError(
            "solver='tridiagonal' needs device='cpu', precision='float64' and the compiled extension "
            f"({reason}; device {device.type}, precision {str(dtype).replace('torch.', '')})"
        )
    return applies and solver != "eigh"


def check_extent(extent, n_volumes, shape):
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



def check_noise_sigma(noise_sigma, shape) -> np.ndarray:
    """A given noise level as a float64 (X, Y, Z) map (a scalar broadcast), checked."""
    sigma = np.asarray(noise_sigma, dtype=np.float64)
    if sigma.ndim == 0:
        sigma = np.full(shape, float(sigma))
    elif sigma.shape != tuple(shape):
        raise ValueError(f"noise_sigma must be one value or a map of the image's shape {tuple(shape)}, "
                         f"got shape {sigma.shape}")
    if not np.all(np.isfinite(sigma)) or np.any(sigma < 0):
        raise ValueError("noise_sigma must be finite and >= 0 everywhere")
    return sigma



class WindowSolver:
    """Window extraction, eigendecomposition and reconstruction, in batches.

    The series stays in its own dtype (float32 usually); each batch of windows
    is converted to the compute precision on its own, so memory stays near the
    input plus the output.
    """

    def __init__(self, data, extent, exp1, device, dtype, out_dtype, demean=False, use_kernel=False,
                 shrinkage="hard", noise_variance=None, course_weights=None):
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
        self.shrinkage = shrinkage
        # the window matrix's dimensions for the noise model: removing the window mean leaves one
        # voxel fewer of independent noise
        rows = self.n_voxels - 1 if demean else self.n_voxels
        self.q_noise = max(rows, self.n_volumes)
        self.r_noise = min(rows, self.n_volumes)
        # a given noise variance map: its mean over each window position, (X-ex+1, Y-ey+1, Z-ez+1)
        self.window_variance = None if noise_variance is None else window_means(noise_variance, extent)
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
        # demean="time": each window voxel's weight in the window's average course, (.., ex, ey, ez)
        self.course_windows = None if course_weights is None else np.lib.stride_tricks.sliding_window_view(
            np.asarray(course_weights, dtype=np.float64), extent)
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
        self.batch = max(BATCH_MIN, budget // bytes_per_window)  # fewer, larger batches scale better on threads
        if device.type == "cuda":
            self.batch *= 16

    def _decompose(self, corners):
        """Window matrices, voxels by volumes (B, n, V); signal eigenvectors of the smaller Gram
        matrix (B, r, k), k the batch's largest signal count, zero columns where a window has
        fewer; n_noise, sigma2, the window means (B, 1, V) or None; the weight of each signal
        column (B, k) or None (hard cut: the columns kept whole); the count of kept
        components (B,); ``matrix @ signal`` (B, n, k) where it was formed, else None; and the
        window's average course (B, V), a unit vector orthogonal to the signal components (counted in
        the kept components), where the solver has course weights (``demean="time"``), else None."""
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
                self._gram(matrix), None, np.arange(len(corners))[:, None], corners
            )
        elif self.window_variance is not None:
            eigenvalues, eigenvectors = torch.linalg.eigh(self._gram(matrix))
            variance = self.window_variance[corners[:, 0], corners[:, 1], corners[:, 2]]
            sigma2 = torch.from_numpy(variance).to(self.device, torch.float64)
            n_noise = known_sigma_cutoff(eigenvalues, sigma2, self.q_noise, self.r_noise)
        elif self.demean and self.n_volumes >= self.n_voxels:
            # the Gram matrix is the voxels' (n x n): removing the window mean took one dimension, whose zero
            # eigenvalue is not noise to fit; the Marchenko-Pastur scan sees the n - 1 others
            eigenvalues, eigenvectors = torch.linalg.eigh(self._gram(matrix))
            n_noise, sigma2 = marchenko_pastur_cutoff(
                eigenvalues[:, 1:], self.n_volumes, self.n_voxels - 1, self.exp1
            )
            n_noise = n_noise + 1
        else:
            eigenvalues, eigenvectors = torch.linalg.eigh(self._gram(matrix))
            n_noise, sigma2 = marchenko_pastur_cutoff(
                eigenvalues, self.n_volumes, self.n_voxels, self.exp1
            )
        r = self.rank_limit
        k = max(1, r - int(n_noise.min()))  # the batch's largest signal count
        if self.use_kernel:  # signal vectors as rows, zero rows past a window's own count
            signal = eigenvectors[:, :k, :].transpose(1, 2).to(matrix.dtype)
            keep = torch.arange(k, device=self.device).unsqueeze(0) < (r - n_noise).unsqueeze(1)
        else:  # ascending columns: the signal ones are the last r - n_noise, zero the others
            keep = torch.arange(r - k, r, device=self.device).unsqueeze(0) >= n_noise.unsqueeze(1)
            signal = eigenvectors[:, :, r - k :].to(matrix.dtype) * keep.unsqueeze(1).to(matrix.dtype)
        n_signal = r - n_noise
        gain = projected = None
        if self.shrinkage == "frobenius":
            if self.use_kernel:  # Rayleigh quotients of the eigenvectors: the eigenvalues to rounding
                if self.n_volumes <= self.n_voxels:
                    projected = matrix @ signal  # (B, n, k), reused by the overcomplete rebuild
                    values = (projected.to(torch.float64) ** 2).sum(dim=1)
                else:
                    values = ((signal.transpose(1, 2) @ matrix).to(torch.float64) ** 2).sum(dim=2)
            else:
                values = eigenvalues[:, r - k :]
            gain = frobenius_shrinkage(values, sigma2, self.q_noise, self.r_noise) * keep.to(torch.float64)
            # a window without a noise component is kept whole (the compiled solver returns the
            # identity there, not eigenvectors)
            gain = torch.where((n_noise == 0)[:, None], keep.to(torch.float64), gain)
            n_signal = (gain > 0).sum(dim=1)
        course = None
        if self.course_windows is not None:
            course = self._average_course(corners, matrix, signal, n_noise)
            n_signal = n_signal + (course.abs().sum(dim=1) > 0).to(n_signal.dtype)
        return matrix, signal, n_noise, sigma2, mean, gain, n_signal, projected, course

    def _average_course(self, corners, matrix, signal, n_noise):
        """The window's average fluctuation, ``sum_j w_j y_j`` over its voxels' (demeaned) series
        ``y_j`` with weights ``w_j`` their temporal means, less its part in the span of the signal
        components, as a unit vector (B, V); zero where nothing is left (a window whose components are
        all signal spans every series of its voxels: the solvers may return any basis of it there)."""
        weights = torch.from_numpy(
            self.course_windows[corners[:, 0], corners[:, 1], corners[:, 2]].reshape(len(corners), -1)
        ).to(self.device, torch.float64)
        # the weighted sum over the window's voxels in the matrix's own precision (float32 where the
        # compiled solver rebuilds in float32: no float64 copy of the window data); the rest in float64
        course = (weights.to(matrix.dtype).unsqueeze(1) @ matrix)[:, 0, :].to(torch.float64)  # (B, V)
        if self.n_volumes <= self.n_voxels:  # signal: temporal vectors as columns (B, V, k)
            basis = signal.to(torch.float64)
        else:  # spatial vectors: their temporal counterparts, orthogonal already, normalised
            basis = (matrix.transpose(1, 2) @ signal).to(torch.float64)
            basis = basis / basis.norm(dim=1, keepdim=True).clamp_min(1e-300)
        course = course - (basis @ (basis.transpose(1, 2) @ course.unsqueeze(2)))[..., 0]
        norm = course.norm(dim=1, keepdim=True)
        scale = matrix.abs().amax(dim=(1, 2)).to(torch.float64).unsqueeze(1) * weights.abs().sum(dim=1, keepdim=True)
        # nothing left above rounding (a window of constant series): no course
        tolerance = 1e-9 if matrix.dtype == torch.float64 else 1e-5  # above the rounding of the weighted sum
        left = (norm > tolerance * scale.clamp_min(1e-300)) & (n_noise > 0).unsqueeze(1)
        course = torch.where(left, course / norm.clamp_min(1e-300), torch.zeros_like(course))
        return course.to(matrix.dtype)

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
        return self._signal_subspace(parts, sums, index.reshape(len(corners), depth), corners)

    def _signal_subspace(self, parts, part_sums, part_index, corners):
        """The compiled solver (:func:`_localpca_solver.signal_subspace`, the cut-off rule of
        :func:`marchenko_pastur_cutoff`): signal eigenvectors as rows of a (B, r, r) array (only the
        first k rows are set, k the batch's largest signal count; zero rows past a window's own),
        n_noise and sigma2. Window w's Gram matrix is the sum of ``parts[part_index[w]]``, less the
        mean's outer product where ``part_sums`` is given. With a given noise map, each window's
        noise variance goes with it (the cut-off of :func:`known_sigma_cutoff`)."""
        known = None
        if self.window_variance is not None:
            known = np.ascontiguousarray(self.window_variance[corners[:, 0], corners[:, 1], corners[:, 2]])
        return _localpca_solver.signal_subspace(
            parts.contiguous(),
            None if part_sums is None else part_sums.contiguous(),
            np.ascontiguousarray(part_index, dtype=np.int64),
            n_voxels=self.n_voxels,
            q=max(self.n_volumes, self.n_voxels),
            exp1=self.exp1,
            known_sigma2=known,
            noise_shape=None if known is None else (self.q_noise, self.r_noise),
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
        progress = Progress("local PCA", count, "windows")

        def applied(payload):
            apply(payload)
            progress.done(self.batch)

        # the batches create only short-lived tensors: cyclic garbage collection would walk the
        # interpreter's whole object graph again and again (a few % of the run)
        collecting = gc.isenabled()
        gc.disable()
        try:
            self._run_starts(solve, starts, applied)
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

    def centre_voxels(self, mask, out_volumes=None):
        """dwidenoise's mode: each voxel rebuilt from its own (border-shifted) window.

        Voxels near the border share one window (it is shifted, not padded): each
        distinct window is decomposed once.
        """
        shape, n_volumes = self.shape, self.n_volumes
        # out_volumes: room for the series the caller will rebuild in place (demean="time": one volume
        # more than the demeaned series); the denoised volumes are the first n_volumes
        denoised = np.zeros(shape + (out_volumes or n_volumes,), dtype=self.out_dtype)
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

        def solve(start):
            stop = min(start + self.batch, corner_ids.size)
            matrix, vectors, n_noise, sigma2, mean, gain, n_signal, _, course = self._decompose(
                unique_corners[start:stop])
            batch_targets = order[first_target[start] : first_target[stop]]
            which = torch.from_numpy(window_of_target[batch_targets] - start).to(self.device)
            centre = torch.from_numpy(centres[batch_targets]).to(self.device)
            vectors_t = vectors[which]  # (T, r, k), noise columns zero
            gain_t = None if gain is None else gain[which].to(matrix.dtype)  # (T, k)
            column = matrix[which, centre, :]  # (T, V): the centre voxels' own series
            if n_volumes <= self.n_voxels:
                coefficients = (vectors_t.transpose(1, 2) @ column.unsqueeze(2))[..., 0]
                if gain_t is not None:
                    coefficients = coefficients * gain_t
                rebuilt = (vectors_t @ coefficients.unsqueeze(2))[..., 0]
            else:
                at_centre = vectors_t[torch.arange(len(which)), centre]
                if gain_t is not None:
                    at_centre = at_centre * gain_t
                weights = vectors_t @ at_centre.unsqueeze(2)
                rebuilt = (matrix[which].transpose(1, 2) @ weights)[..., 0]
            if course is not None:  # the centre voxel's own amplitude on the window's average course
                course_t = course[which]
                rebuilt = rebuilt + (column * course_t).sum(dim=1, keepdim=True) * course_t
            if mean is not None:
                rebuilt = rebuilt + mean[which, 0, :]
            # each target voxel belongs to one batch: the writes never overlap
            index = np.unravel_index(targets[batch_targets], shape)
            denoised[index + (slice(0, n_volumes),)] = rebuilt.cpu().numpy()
            sigma[index] = torch.sqrt(sigma2)[which].cpu().numpy()
            rank[index] = n_signal[which].cpu().numpy()

        self._run_batches(solve, corner_ids.size)
        return denoised, sigma, rank

    def overcomplete(self, mask, stride, spatial=None, rank_weighting=True):
        """DIPY's mode: every voxel of every window rebuilt, averaged with weights 1/(1 + rank)
        (``rank_weighting``), times ``spatial[i]`` for the window's voxel i where given (Gaussian
        aggregation)."""
        shape, n_volumes = self.shape, self.n_volumes
        positions = [
            strided_positions(size - edge + 1, step)
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

        spatial_t = None if spatial is None else torch.from_numpy(np.asarray(spatial, np.float64)).to(self.device)

        def solve(start):
            corners = grid[start : start + self.batch]
            matrix, signal, n_noise, sigma2, mean, gain, n_signal, projected, course = self._decompose(corners)
            if rank_weighting:
                theta = 1.0 / (1.0 + n_signal.to(torch.float64))  # (B,)
            else:
                theta = torch.ones(len(corners), dtype=torch.float64, device=self.device)
            if gain is None:
                weighted = signal * theta[:, None, None].to(matrix.dtype)
            else:
                weighted = signal * (gain * theta[:, None])[:, None, :].to(matrix.dtype)
            # the rebuilt windows, voxels by volumes (B, n, V): rows go straight to the accumulator
            if n_volumes <= self.n_voxels:
                rebuilt = (matrix @ signal if projected is None else projected) @ weighted.transpose(1, 2)
            else:
                rebuilt = weighted @ (signal.transpose(1, 2) @ matrix)
            if course is not None:
                along = (matrix @ course.unsqueeze(2)) * theta[:, None, None].to(matrix.dtype)  # (B, n, 1)
                rebuilt.add_(along @ course.unsqueeze(1))
            if mean is not None:
                rebuilt.add_(mean * theta[:, None, None].to(matrix.dtype))
            if spatial_t is not None:
                rebuilt.mul_(spatial_t.to(rebuilt.dtype)[None, :, None])
            voxels = np.ravel_multi_index(corners.T, shape)[:, None] + offsets[None, :]
            index = torch.from_numpy(voxels.ravel()).to(self.device)
            values = rebuilt.reshape(-1, n_volumes).to(torch.float32)
            per_window = torch.stack([theta, theta * torch.sqrt(sigma2), theta * n_signal], dim=1)
            if spatial_t is None:
                return index, values, per_window.repeat_interleave(self.n_voxels, dim=0)
            return index, values, (per_window[:, None, :] * spatial_t[None, :, None]).reshape(-1, 3)

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
