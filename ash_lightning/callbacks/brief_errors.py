"""``show_user_errors_briefly``: in a user's own script, a ``UserError`` from the callbacks ends the run with its
one-line message (cause and fix) instead of a traceback, as ``main.py`` prints it.

The callbacks install it when a Trainer sets them up: a ``sys.excepthook`` that prints an uncaught ``UserError`` as
``UserError: <message>`` on stderr (the exit status stays 1) and hands every other exception to the hook that was
there before. Installed once per process.
"""

from __future__ import annotations

import sys
from types import TracebackType

from ash_lightning.errors import UserError


def _brief_hook(previous: object) -> object:
    def hook(kind: type[BaseException], error: BaseException, traceback: TracebackType | None) -> None:
        if isinstance(error, UserError):
            print(f"UserError: {error}", file=sys.stderr)
            return
        previous(kind, error, traceback)  # type: ignore[operator]

    hook.ash_lightning_brief = True  # type: ignore[attr-defined]
    return hook


def show_user_errors_briefly() -> None:
    """Install the hook (see the module docstring) unless it is installed already."""
    if not getattr(sys.excepthook, "ash_lightning_brief", False):
        sys.excepthook = _brief_hook(sys.excepthook)  # type: ignore[assignment]
