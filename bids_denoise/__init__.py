"""bids-denoise: self-supervised denoising of (diffusion) MRI as a BIDS-App."""

from bids_denoise._version import __version__

__all__ = ["__version__"]
