"""Intensity scalings that make the methods scale-invariant.

:func:`power_of_two_exponent` serves the exact methods (MP-PCA, NORDIC, Patch2Self): dividing by a
power of two changes no digit. :class:`IntensityScale` serves the networks: they see the same numbers
at any scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

#: Largest magnitudes within which the exact methods compute on the data as given (see
#: :func:`power_of_two_exponent`): squares and Gram sums of such values stay far from float32's
#: overflow (~3e38) and underflow (~1e-38).
SAFE_MAGNITUDES = (1e-6, 1e6)


def power_of_two_exponent(data, safe=SAFE_MAGNITUDES) -> int:
    """The ``k`` for which ``data * 2**-k`` has its largest magnitude in [1, 2), or 0 to leave it as is.

    The exact methods (Patch2Self, MP-PCA) are homogeneous: ``f(c x) = c f(x)``. In float32 they
    are not at every ``c``: squares overflow above ~1.8e19 and underflow below ~1e-19. They divide
    by ``2**k`` first and multiply back after (``np.ldexp``): a power of two changes the exponent
    alone, so every rounding is the same as at the original scale and the result is the same
    digits. Data whose largest magnitude is within ``safe`` (ordinary images), zero or not finite
    are left alone (``k = 0``): their results stay bit-identical and no copy is made.
    """
    data = np.asarray(data)
    if data.size == 0:
        return 0
    largest = max(abs(float(np.max(data))), abs(float(np.min(data))))  # two passes, no |data| copy
    if not math.isfinite(largest) or largest == 0.0 or safe[0] <= largest <= safe[1]:
        return 0
    return int(np.frexp(largest)[1]) - 1


@dataclass
class IntensityScale:
    """Per-run intensity normalisation: divide by a robust maximum, undone on output.

    The scale is a high percentile of the positive values (of the magnitudes where no value is
    positive), so it follows the data's own scale: ``fit(c * x)`` is ``c`` times ``fit(x)`` to
    rounding, the networks see the same numbers at any scale, and the learned methods are
    scale-invariant. Only all-zero data get the scale 1.
    """

    scale: float

    @classmethod
    def fit(cls, data: np.ndarray, percentile: float = 99.5) -> "IntensityScale":
        data = np.asarray(data)
        values = data[data > 0]
        if not values.size:
            values = np.abs(data[data != 0])
        scale = float(np.percentile(values, percentile)) if values.size else 1.0
        return cls(scale if scale > 0 and math.isfinite(scale) else 1.0)

    def forward(self, data):
        return np.asarray(data, dtype=np.float32) / np.float32(self.scale)

    def inverse(self, data):
        return np.asarray(data, dtype=np.float32) * np.float32(self.scale)
