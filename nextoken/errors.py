"""The one exception the command line turns into a clean, one-line error.

Anything a user can get wrong (a flag, a file, a folder) raises ``UserError`` with the
flag or path it is about; the CLI prints ``error: <message>`` and exits 2 without a
traceback. Everything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input, reported without a traceback."""

    def __init__(self, message: str, *, flag: str | None = None) -> None:
        self.flag = flag
        super().__init__(f"{flag}: {message}" if flag else message)
