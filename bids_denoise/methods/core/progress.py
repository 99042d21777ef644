"""Progress of a long computation, with the time left, in the log.

A method that works through many similar pieces (windows, slabs, volumes, epochs) reports how far it is
and how long it needs still, at most every ``every`` seconds and at the end: a run of an hour says so
while it runs instead of keeping silent. The log is ``bids_denoise.methods.progress`` at INFO (the app
shows it; a library user sees it where logging is configured so).
"""

from __future__ import annotations

import logging
import time

LOGGER = logging.getLogger("bids_denoise.methods.progress")

#: Seconds between two reports of one computation.
EVERY = 30.0


class Progress:
    """``done(n)`` after each piece of ``total``; a line with the share done and the time left, now and then.

    Parameters
    ----------
    label : str
        What is computed ("MP-PCA", "Patch2Self, group 2").
    total : int
        How many pieces.
    unit : str
        What a piece is ("windows", "volumes", "epochs").
    every : float
        Least seconds between two lines (the first comes after ``every`` seconds too: short runs say nothing).
    """

    def __init__(self, label: str, total: int, unit: str, every: float = EVERY):
        self.label, self.total, self.unit, self.every = label, max(int(total), 1), unit, every
        self.count = 0
        self.started = self.last = time.monotonic()

    def done(self, pieces: int = 1) -> None:
        self.count = min(self.count + int(pieces), self.total)
        now = time.monotonic()
        finished = self.count >= self.total
        if now - self.last < self.every and not (finished and now - self.started >= self.every):
            return
        self.last = now
        elapsed = now - self.started
        share = self.count / self.total
        if finished:
            LOGGER.info("%s: %d %s done in %s", self.label, self.total, self.unit, duration(elapsed))
        elif share > 0:
            LOGGER.info("%s: %.0f%% of %d %s, about %s left", self.label, 100 * share, self.total, self.unit,
                        duration(elapsed * (1 - share) / share))


def duration(seconds: float) -> str:
    """``"45 s"``, ``"12 min"``, ``"2 h 05 min"``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    hours, minutes = divmod(int(seconds // 60), 60)
    return f"{hours} h {minutes:02d} min"
