"""Allow ``python -m bids_denoise``."""

import sys

from bids_denoise.cli import main

if __name__ == "__main__":
    sys.exit(main())
