"""Errors the methods raise about the data they are given.

The app tells a run that a method cannot process (exit code 65, one line naming
the file) apart from a bug (a traceback): a method raises
:class:`UnsuitableDataError` for the first. Its message is one line and stands
on its own: the app adds the file name.
"""

from __future__ import annotations


class UnsuitableDataError(ValueError):
    """The data cannot be processed by this method (e.g. too small for its window).

    A ``ValueError`` (the data is a bad value for the method), so callers that
    catch ``ValueError`` keep working. The message is a single, self-contained
    line without the file name.
    """

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
