"""Build of the optional C kernel of MP-PCA (everything else is in pyproject.toml).

The extension is optional: where it cannot be compiled the install goes on, and MP-PCA falls back
to torch's ``eigh`` (same results, slower).
"""

import sys

from setuptools import Extension, setup

flags = [] if sys.platform == "win32" else ["-O3", "-fno-wrapv", "-fno-fast-math"]

setup(
    ext_modules=[
        Extension(
            "bids_denoise.methods.core._localpca_kernel",
            sources=["bids_denoise/methods/core/_localpca_kernel.c"],
            extra_compile_args=flags,
            optional=True,
        )
    ]
)
