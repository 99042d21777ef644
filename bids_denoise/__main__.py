"""Allow ``python -m bids_denoise``."""

from bids_denoise.cli.run import console

if __name__ == "__main__":
    console()
