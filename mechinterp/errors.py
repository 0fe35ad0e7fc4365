"""One exception type for every problem a user can fix.

The CLI turns a :class:`UserError` into one line on stderr and exit code 2 (no traceback);
library users catch it like any other exception. Everything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input: a spec, a file, a data row, an option.

    ``message`` names the problem; ``fix`` (optional) says what to do about it.
    """

    def __init__(self, message: str, fix: str | None = None):
        self.message = message
        self.fix = fix
        super().__init__(self.one_line())

    def one_line(self) -> str:
        text = self.message if not self.fix else f"{self.message} ({self.fix})"
        return " ".join(text.split())


class SpecError(UserError):
    """A model spec that cannot be resolved."""


class IncompatibleModels(UserError):
    """Base and variant cannot be compared (architecture, parameters or vocabulary differ)."""


class CorruptCheckpoint(UserError):
    """A weight file that is truncated or not what it claims to be."""


class DataError(UserError):
    """Missing data root or a malformed row."""
