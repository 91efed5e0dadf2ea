"""The one exception type attn_inject raises on bad input or a failed check, and how it quotes others."""

from __future__ import annotations

_END = (".", "!", "?", ":", ";")


class AttnInjectError(ValueError):
    """A problem with the input to attn_inject, described for the user.

    The message says what went wrong, where (a module path, a file and line, a rule), and what to
    do next. The CLI prints it as one line and exits with status 1. ``field`` names the setting at
    fault when there is one (a ``TrainConfig`` field): the CLI names the matching flag instead.
    """

    def __init__(self, what: str, *, where: str | None = None, hint: str | None = None, field: str | None = None):
        self.what = what
        self.where = where
        self.hint = hint
        self.field = field
        message = f"{where}: {what}" if where else what
        if hint:  # a sentence of its own: "...has 1000 outputs. Pass --num-classes 10 ..."
            message = f"{message}{'' if message.endswith(_END) else '.'} {hint}"
        super().__init__(message)


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message ('' when it has none)."""
    return (str(exc).splitlines() or [""])[0]


def one_line(exc: BaseException) -> str:
    """``Type: first line of the message``, for reasons and errors that quote another library."""
    return f"{type(exc).__name__}: {first_line(exc)}".rstrip(": ")
