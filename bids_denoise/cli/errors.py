"""Exit codes (BIDS-Apps execution recommendations) and the one-line error that carries one."""

from __future__ import annotations

EXIT_OK, EXIT_FAILURE = 0, 1
EXIT_INVALID_BIDS, EXIT_NOTHING_SELECTED = 16, 18
EXIT_USAGE, EXIT_DATAERR, EXIT_NOINPUT, EXIT_CANTCREAT, EXIT_IOERR = 64, 65, 66, 73, 74
EXIT_INTERRUPTED, EXIT_TERMINATED = 130, 143


class AppError(Exception):
    """A one-line error with its exit code."""

    def __init__(self, exit_code: int, message: str):
        super().__init__(message)
        self.exit_code = exit_code
