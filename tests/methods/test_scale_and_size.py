"""Every method at any intensity scale and at the smallest image sizes.

Scale: images come in any unit (1e-30 or 1e30 is legal float32), and each method is
homogeneous: ``method(c * x) == c * method(x)``, to float32 rounding of ``c * x``. The exact
methods (Patch2Self, MP-PCA) rescale extreme data by a power of two, which is exact: at
``c = 2**k`` their output is the same digits. The learned ones normalise by a robust maximum.

Size: a method given an image too small for it either works (the learned ones pad) or raises
UnsuitableDataError with a one-line message; it never returns zeros or the input as "denoised".
"""

from __future__ import annotations

import numpy as np
import pytest

from bids_denoise.methods.core.errors import UnsuitableDataError
from bids_denoise.methods.core.scaling import IntensityScale, power_of_two_exponent
from bids_denoise.methods.mppca import mppca
from bids_denoise.methods.noise2noise import noise2noise
from bids_denoise.methods.noise2self import noise2self
from bids_denoise.methods.patch2self import patch2self
from bids_denoise.methods.superres import super_resolve
from bids_denoise.testing.phantom import make_phantom

TINY = {"epochs": 1, "steps_per_epoch": 2, "batch_size": 2, "seed": 1}


@pytest.fixture(scope="module")
def series():
    """A small phantom series: 2 b0s and 10 directions at b=1000, float32 as the app loads it."""
    return make_phantom((12, 12, 6), n_b0=2, shells=((1000.0, 10),), noise_sigma=0.04, seed=3)


def run_method(name, data, phantom):
    """The denoised (or super-resolved) image of ``name`` for ``data``, with extra outputs to compare."""
    if name == "patch2self":
        return {"denoised": patch2self(data, phantom.bvals)}
    if name == "mppca":
        result = mppca(data)
        return {"denoised": result.denoised, "noise_sigma": result.noise_sigma}
    if name == "mppca-float32":
        result = mppca(data, precision="float32", aggregate="overcomplete", stride=2)
        return {"denoised": result.denoised, "noise_sigma": result.noise_sigma}
    if name == "noise2noise":
        return {"denoised": noise2noise(data, phantom.bvals, phantom.bvecs, width=4, **TINY).denoised}
    if name == "noise2self":
        return {"denoised": noise2self(data, phantom.bvals, context="series", net_width=4, **TINY).denoised}
    if name == "wasa":
        result, _ = super_resolve(data[..., 0], np.eye(4), channels=4, n_blocks=1, patch=8, **TINY)
        return {"image": result.image}
    raise AssertionError(name)


def scaled(data, factor):
    """``factor * data`` rounded to float32, as a file in other units would hold it."""
    return (data.astype(np.float64) * factor).astype(np.float32)


METHODS = ["patch2self", "mppca", "mppca-float32", "noise2noise", "noise2self", "wasa"]


@pytest.mark.parametrize("factor", [1e-30, 1e30])
@pytest.mark.parametrize("name", METHODS)
def test_result_scales_with_the_data(series, name, factor):
    reference = run_method(name, series.noisy, series)
    result = run_method(name, scaled(series.noisy, factor), series)
    # float32 MP-PCA decomposes in float32: the rounding of c*x moves its eigenvectors further
    tolerance = 1e-4 if name == "mppca-float32" else 1e-5
    for key, expected in reference.items():
        assert np.isfinite(result[key]).all()
        unscaled = result[key].astype(np.float64) / factor
        assert np.abs(unscaled - expected).max() <= tolerance * np.abs(expected).max(), key


@pytest.mark.parametrize("exponent", [-100, 100])
@pytest.mark.parametrize("name", ["patch2self", "mppca", "mppca-float32"])
def test_exact_methods_give_the_same_digits_at_powers_of_two(series, name, exponent):
    reference = run_method(name, series.noisy, series)
    result = run_method(name, np.ldexp(series.noisy, exponent), series)
    for key, expected in reference.items():
        assert np.array_equal(np.ldexp(result[key], -exponent), expected), key


def test_power_of_two_exponent_leaves_ordinary_data_alone():
    ordinary = np.array([[0.0, -3.5], [4000.0, 12.0]], dtype=np.float32)
    assert power_of_two_exponent(ordinary) == 0
    assert power_of_two_exponent(np.zeros(4, np.float32)) == 0
    assert power_of_two_exponent(np.array([np.inf, 1e30])) == 0  # not finite: left to fail loudly
    for factor in (1e-30, 1e30, -1e30):
        exponent = power_of_two_exponent(ordinary * np.float32(factor))
        assert 1.0 <= np.abs(np.ldexp(ordinary * np.float32(factor), -exponent)).max() < 2.0


def test_intensity_scale_follows_data_without_positive_values():
    data = -np.random.default_rng(0).uniform(1, 100, (5, 5, 5)).astype(np.float32)
    small, large = IntensityScale.fit(data * np.float32(1e-30)), IntensityScale.fit(data * np.float32(1e30))
    assert large.scale / small.scale == pytest.approx(1e60, rel=1e-6)
    assert IntensityScale.fit(np.zeros(3)).scale == 1.0


@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 2, 2), (3, 3, 2)])
@pytest.mark.parametrize("name", ["noise2noise", "noise2self"])
def test_learned_methods_work_on_tiny_images(series, name, shape):
    data = np.ascontiguousarray(series.noisy[: shape[0], : shape[1], : shape[2]])
    result = run_method(name, data, series)["denoised"]
    assert result.shape == data.shape
    assert np.isfinite(result).all()
    assert not np.array_equal(result, data)  # processed, not passed through
    assert np.abs(result).max() > 0


def test_noise2self_validation_loss_is_finite_on_slices_narrower_than_the_mask(series):
    data = np.ascontiguousarray(series.noisy[:2, :2, :3])
    result = noise2self(data, series.bvals, context="volume", net_width=4, **TINY)
    assert all(np.isfinite(epoch["val_loss"]) for epoch in result.history["epochs"])


@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 2, 2)])
@pytest.mark.parametrize("name", ["patch2self", "mppca"])
def test_exact_methods_refuse_tiny_images(series, name, shape):
    data = np.ascontiguousarray(series.noisy[: shape[0], : shape[1], : shape[2]])
    with pytest.raises(UnsuitableDataError) as raised:
        run_method(name, data, series)
    assert "\n" not in str(raised.value) and str(raised.value)


@pytest.mark.parametrize("name", ["patch2self", "mppca"])
def test_empty_mask_is_refused_not_zeroed(series, name):
    empty = np.zeros(series.noisy.shape[:3], dtype=bool)
    with pytest.raises(UnsuitableDataError, match="mask is empty"):
        if name == "mppca":
            mppca(series.noisy, mask=empty)
        else:
            patch2self(series.noisy, series.bvals, mask=empty)


@pytest.mark.parametrize("factor", [1e-30, 1e30])
def test_brain_mask_does_not_depend_on_the_scale(series, factor):
    from bids_denoise.methods.core.masking import b0_brain_mask

    mask = b0_brain_mask(series.noisy, series.bvals)
    assert 0 < mask.sum() < mask.size
    assert np.array_equal(b0_brain_mask(scaled(series.noisy, factor), series.bvals), mask)
