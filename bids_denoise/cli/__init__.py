"""The BIDS-App command line: ``bids-denoise BIDS_DIR OUTPUT_DIR {participant,group}``.

Exit codes follow the BIDS-Apps execution recommendations (:mod:`bids_denoise.cli.errors`). The
command line builds one :class:`~bids_denoise.config.RunConfig` (:mod:`bids_denoise.cli.parser`);
the participant level is a sequence of small named steps (:mod:`bids_denoise.cli.participant`), each
of which either returns what the next needs or raises :class:`~bids_denoise.cli.errors.AppError` with
its exit code and a one-line message; the group level collects what they wrote
(:mod:`bids_denoise.cli.group`). How the graph runs, and how the app and its workers live and die, is
:mod:`bids_denoise.engine`.
"""

from bids_denoise.cli.parser import build_config, build_parser
from bids_denoise.cli.run import main

__all__ = ["build_config", "build_parser", "main"]
