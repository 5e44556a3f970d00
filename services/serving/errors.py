"""One error base class that carries its HTTP status; the server has one handler for it.

The CLI prints the message of any ``DlstackError`` and exits 2, so every message must
say what was wrong and how to fix it.
"""

from __future__ import annotations


class DlstackError(Exception):
    status: int = 500

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.__class__.__name__


class UserError(DlstackError, ValueError):
    """Bad input from a user (a request, a flag, a config file)."""

    status = 400


class NotFound(DlstackError):
    status = 404


class PayloadTooLarge(DlstackError):
    status = 413


class NotReady(DlstackError):
    status = 503
