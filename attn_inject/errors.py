"""The one exception type attn_inject raises on bad input or a failed check."""

from __future__ import annotations


class AttnInjectError(ValueError):
    """A problem with the input to attn_inject, described for the user.

    The message says what went wrong, where (a module path, a file and line, a rule), and what to
    do next. The CLI prints it as one line and exits with status 1.
    """

    def __init__(self, what: str, *, where: str | None = None, hint: str | None = None):
        self.what = what
        self.where = where
        self.hint = hint
        parts = [f"{where}: {what}" if where else what]
        if hint:
            parts.append(hint)
        super().__init__(" ".join(parts))
