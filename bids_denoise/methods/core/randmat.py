"""Random-matrix thresholds and shrinkage for local low-rank denoising.

The noise eigenvalues of a window's voxels-by-volumes matrix follow the Marchenko-Pastur law;
these functions find where the signal components end (the noise level estimated, or given) and
how much of each signal component to keep. Shared by MP-PCA, NORDIC and Patch2Self.

References
----------
.. [1] Veraart J., Novikov D.S., Christiaens D., Ades-aron B., Sijbers J., Fieremans E. Denoising of
       diffusion MRI using random matrix theory. NeuroImage 142 (2016) 394-406.
.. [2] Cordero-Grande L., Christiaens D., Hutter J., Price A.N., Hajnal J.V. Complex diffusion-weighted
       image estimation via matrix recovery under general noise models. NeuroImage 200 (2019) 391-404.
.. [3] Gavish M., Donoho D.L. Optimal shrinkage of singular values. IEEE Trans Inf Theory 63 (2017)
       2137-2152.
.. [4] Marchenko V.A., Pastur L.A. Distribution of eigenvalues for some sets of random matrices. Math
       USSR-Sbornik 1 (1967) 457-483.
"""

from __future__ import annotations

import torch

#: Fewest eigenvalues a window matrix must have (min(voxels, volumes)) for a Marchenko-Pastur estimate.
MIN_EIGENVALUES = 4


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


def known_sigma_cutoff(eigenvalues, sigma2, q, r):
    """Number of noise components of each window where the noise variance is known.

    Scanning the eigenvalues from the largest, ``lambda_1 >= lambda_2 >= ...``, component ``i`` is
    signal while ``lambda_i > sigma2 * (sqrt(q - i + 1) + sqrt(r - i + 1))**2``: the upper edge of
    the Marchenko-Pastur law (Marchenko & Pastur 1967) of the noise matrix that is left,
    ``(q - i + 1) x (r - i + 1)``, once the ``i - 1`` larger components are taken out (Cordero-Grande
    et al. 2019). For ``i = 1`` this is the classic edge ``sigma2 * q * (1 + sqrt(r / q))**2``.

    Parameters
    ----------
    eigenvalues : torch.Tensor, shape (B, m)
        Eigenvalues of each window's Gram matrix (the window matrix times its transpose, not divided
        by anything), ascending; only the last ``r`` are considered (``m >= r``).
    sigma2 : torch.Tensor, shape (B,)
        Noise variance per matrix entry of each window.
    q, r : int
        The larger and the smaller dimension of the window matrix, after demeaning (one fewer voxel
        where the window mean is removed).

    Returns
    -------
    n_noise : torch.Tensor of int64, shape (B,)
        ``m - k`` with ``k`` the signal count; 0 where every component is signal (the convention of
        :func:`marchenko_pastur_cutoff`: the window is kept whole).
    """
    m = eigenvalues.shape[1]
    descending = torch.flip(eigenvalues[:, m - r :], dims=(1,)).to(torch.float64)
    i = torch.arange(r, dtype=torch.float64, device=eigenvalues.device)  # i - 1
    edge = (torch.sqrt(q - i) + torch.sqrt(r - i)) ** 2
    above = descending > sigma2.to(torch.float64)[:, None] * edge[None, :]
    k = torch.cumprod(above.to(torch.int64), dim=1).sum(dim=1)
    return torch.where(k >= m, torch.zeros_like(k), m - k)


def frobenius_shrinkage(eigenvalues, sigma2, q, r):
    """Gavish & Donoho's optimal shrinkage for the Frobenius loss, as a weight on each component.

    A window matrix ``Y = X + Z`` (``q x r`` after transposing, ``Z`` white noise of variance
    ``sigma2``) with singular values ``s_i`` (``s_i**2`` the Gram eigenvalues) is best approximated in
    Frobenius norm, asymptotically, by ``sum_i eta(y_i) sigma sqrt(q) u_i v_i'`` with
    ``y_i = s_i / (sigma sqrt(q))``, ``beta = r / q`` and

    ``eta(y) = sqrt((y**2 - beta - 1)**2 - 4 beta) / y`` for ``y >= 1 + sqrt(beta)``, 0 below

    (Gavish & Donoho 2017, eq. 7). Each component is thus kept with the weight
    ``eta(y_i) / y_i = sqrt((t - beta - 1)**2 - 4 beta) / t``, ``t = s_i**2 / (q sigma2)``, between 0
    (at the bulk edge) and 1 (far above it).

    Parameters
    ----------
    eigenvalues : torch.Tensor, shape (B, k)
        Gram eigenvalues ``s_i**2`` of the components to weigh.
    sigma2 : torch.Tensor, shape (B,)
        Noise variance per matrix entry; where it is 0 (no noise found) every weight is 1.
    q, r : int
        The larger and the smaller dimension of the window matrix.

    Returns
    -------
    torch.Tensor of float64, shape (B, k)
        Weights in [0, 1].

    References
    ----------
    Gavish M., Donoho D.L. Optimal shrinkage of singular values. IEEE Trans Inf Theory 63 (2017)
    2137-2152.
    """
    beta = r / q
    sigma2 = sigma2.to(torch.float64)[:, None]
    noisy = sigma2 > 0
    t = eigenvalues.to(torch.float64) / (q * torch.where(noisy, sigma2, torch.ones_like(sigma2)))
    above = t > (1.0 + beta**0.5) ** 2
    safe = torch.where(above, t, torch.ones_like(t))
    weight = torch.sqrt(torch.clamp((safe - beta - 1.0) ** 2 - 4.0 * beta, min=0.0)) / safe
    weight = torch.where(above, weight, torch.zeros_like(weight))
    return torch.where(noisy, weight, torch.ones_like(weight))

