"""Each method's memory as Nipype is told it: measured in a fresh process at two sizes of input.

A method declares what its node needs (``MethodSpec.memory_gb``, from the series' size); MultiProc schedules
by it and the app refuses a run whose node cannot fit. Here the extra peak memory a method takes (over its
process once the input is built) is measured at two sizes, through its registration at the app's defaults:
it must stay within the declaration at both, and its growth per input MB (the slope between the two sizes)
within the declared growth, so a change that makes memory grow faster than the input fails.

The caps that bound a method's temporaries (MP-PCA's batches, Patch2Self's chunks, the median's slabs) are
set small here, so that these small inputs are large to them, as a real series is: what grows with the
input is then what the slope measures.
"""

from __future__ import annotations

import numpy as np
import pytest

from bids_denoise import registry
from bids_denoise.contract import MethodInputs
from bids_denoise.testing.resources import measure

MB = 2**20


def _dwi(shape, volumes):
    from bids_denoise.testing.phantom import make_phantom

    n_b0 = 4
    half = (volumes - n_b0) // 2
    phantom = make_phantom(shape, n_b0=n_b0, shells=((1000.0, half), (2000.0, volumes - n_b0 - half)),
                           noise_sigma=0.05, seed=0)
    return phantom.noisy.astype(np.float32), phantom.bvals, phantom.bvecs


def _bold(shape, volumes):
    from bids_denoise.testing.bold_phantom import make_bold_phantom

    return make_bold_phantom(shape, volumes, snr=15.0, seed=0).magnitude[0].astype(np.float32), None, None


def _anat(shape, volumes):
    from bids_denoise.testing.anat_phantom import make_anatomical_phantom

    return make_anatomical_phantom("synthetic", "T1w", shape=shape, snr=10.0, seed=0).noisy, None, None


def _run(method):
    def run(payload):
        data, bvals, bvecs = payload
        spec = registry.load_all()[method]
        result = spec.run(MethodInputs(data=data, affine=np.eye(4), bvals=bvals, bvecs=bvecs), spec.parse({}))
        return float(np.mean(result.image))

    return run


#: method, input maker, volumes, the two grids
CASES = [
    ("mppca", _dwi, 40, ((32, 32, 20), (48, 48, 24))),
    ("mppca", _bold, 60, ((32, 32, 20), (48, 48, 24))),
    ("patch2self", _dwi, 40, ((32, 32, 20), (48, 48, 24))),
    ("median", _dwi, 16, ((24, 24, 16), (36, 36, 20))),
    ("patchpca", _anat, 1, ((48, 48, 32), (80, 80, 48))),
]


@pytest.fixture
def small_caps(monkeypatch):
    from bids_denoise.methods import patch2self
    from bids_denoise.methods.core import localpca
    from bids_denoise.methods.core.neighbours import ProfileGuide

    monkeypatch.setattr(localpca, "BATCH_BYTES", 256 * 2**10)
    monkeypatch.setattr(patch2self, "CHUNK_BYTES", 256 * 2**10)
    monkeypatch.setattr(ProfileGuide, "SLAB_BYTES", 256 * 2**10)


@pytest.mark.parametrize("method, make, volumes, grids", CASES,
                         ids=[f"{case[0]}-{case[1].__name__[1:]}" for case in CASES])
def test_memory_stays_within_the_declaration_and_grows_with_the_input(method, make, volumes, grids, small_caps):
    spec = registry.load_all()[method]
    measured = []
    for grid in grids:
        _, extra, _ = measure(_run(method), lambda g=grid: make(g, volumes),
                              warmup=lambda: make((12, 12, 8), volumes))
        series = float(np.prod(grid)) * volumes * 4
        declared = spec.memory_gb(tuple(grid) + (volumes,)) * 2**30
        assert extra < declared, (f"{method} at {grid}x{volumes}: {extra / MB:.0f} MB beyond its input, more than "
                                  f"the {declared / MB:.0f} MB it declares")
        measured.append((series, extra))
    (small, small_extra), (large, large_extra) = measured
    slope = (large_extra - small_extra) / (large - small)
    # the growth the declaration allows per byte of input (the declared memory's own slope)
    allowed = (spec.memory_gb(tuple(grids[1]) + (volumes,)) - spec.memory_gb(tuple(grids[0]) + (volumes,))) \
        * 2**30 / (large - small)
    assert slope <= allowed, (f"{method}: {slope:.1f} MB of memory per MB of input between {grids[0]} and {grids[1]}, "
                              f"more than the {allowed:.1f} it declares")
