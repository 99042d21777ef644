"""Few-direction DWI (clinical protocols, 1 b0 + 6 or 12 directions at b=1000): a small version of the regime
of ``benchmarks/few_directions.py``. The app's default for such runs, ``mppca``, must stay at least 1 dB above
DIPY's ``mppca`` (the best classical peer there) with a white-matter FA error no worse than its, on phantoms from
both generators."""

from __future__ import annotations

import numpy as np
import pytest

from bids_denoise.testing import harm
from tests.methods.test_harm import run_at_app_defaults


def _make(generator, directions):
    shells = ((1000.0, directions),)
    if generator == "head":
        from bids_denoise.testing.phantom import make_phantom

        return make_phantom((32, 36, 20), n_b0=1, shells=shells, noise_sigma=0.1, seed=1)
    from bids_denoise.testing.multitensor_phantom import make_multitensor_phantom

    return make_multitensor_phantom(n_b0=1, shells=shells, snr=10.0, seed=1)


@pytest.mark.parametrize("generator, directions", [("head", 6), ("head", 12), ("multitensor", 12)])
def test_the_default_beats_dipy_mppca_on_few_directions(generator, directions):
    localpca = pytest.importorskip("dipy.denoise.localpca")
    phantom = _make(generator, directions)
    reference = harm.tensor_reference(phantom)

    def scores(out):
        psnr = float(np.mean([value for b, value in harm.shell_psnr(out, phantom).items() if b > 0]))
        return psnr, harm.tensor_errors(out, phantom, reference)["fa"]

    ours = scores(run_at_app_defaults("mppca", phantom.noisy, phantom.bvals, phantom.bvecs))
    peer = scores(localpca.mppca(phantom.noisy.astype(np.float64), patch_radius=2))
    noisy = scores(phantom.noisy)
    assert ours[0] >= peer[0] + 1.0, (ours, peer)
    assert ours[1] <= peer[1], (ours, peer)
    assert ours[0] > noisy[0] and ours[1] < noisy[1], (ours, noisy)  # no harm at SNR 10
