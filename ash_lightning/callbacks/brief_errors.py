"""``show_user_errors_briefly``: in a user's own script, a ``UserError`` from the callbacks ends the run with its
one-line message (cause and fix) instead of a traceback, as ``main.py`` prints it.

The callbacks install it when a Trainer sets them up: a ``sys.excepthook`` that prints an uncaught ``UserError`` (or
an exception raised while one was handled, e.g. by a logger that failed to flush on the same full disk) as
``UserError: <message>`` on stderr (the exit status stays 1) and hands every other exception (every exception, with
``ASH_DEBUG=1``) to the hook that was there before. Also a ``threading.excepthook`` that keeps quiet about a write a
TensorBoard writer's thread failed (a full disk, a quota, a read-only folder: ``WRITE_ERRORS``): that thread would
print its traceback, while the writer raises the same error again at its next write or flush, where
``OODMetricsCallback`` turns it into a UserError naming the folder. Installed once per process.
"""

from __future__ import annotations

import sys
import threading
from types import TracebackType

from ash_lightning.errors import WRITE_ERRORS, UserError, debug_requested, exception_chain


def _brief_hook(previous: object) -> object:
    def hook(kind: type[BaseException], error: BaseException, traceback: TracebackType | None) -> None:
        user = next((cause for cause in exception_chain(error) if isinstance(cause, UserError)), None)
        if user is not None and not debug_requested():
            print(f"UserError: {user}", file=sys.stderr)
            return
        previous(kind, error, traceback)  # type: ignore[operator]

    hook.ash_lightning_brief = True  # type: ignore[attr-defined]
    return hook


def _quiet_writer_thread_hook(previous: object) -> object:
    def hook(args: threading.ExceptHookArgs) -> None:
        writer_thread = type(args.thread).__module__.startswith("tensorboard.")
        if writer_thread and isinstance(args.exc_value, OSError) and args.exc_value.errno in WRITE_ERRORS:
            return  # raised again by the writer's next write or flush
        previous(args)  # type: ignore[operator]

    hook.ash_lightning_brief = True  # type: ignore[attr-defined]
    return hook


def show_user_errors_briefly() -> None:
    """Install the hooks (see the module docstring) unless they are installed already."""
    if not getattr(sys.excepthook, "ash_lightning_brief", False):
        sys.excepthook = _brief_hook(sys.excepthook)  # type: ignore[assignment]
    if not getattr(threading.excepthook, "ash_lightning_brief", False):
        threading.excepthook = _quiet_writer_thread_hook(threading.excepthook)  # type: ignore[assignment]
