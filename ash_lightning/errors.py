"""The error type for mistakes a user can cause: ``main.py`` prints its message without a traceback."""

from __future__ import annotations


class UserError(ValueError):
    """A bad path, spec, checkpoint, data set or config: the message names the cause and the fix."""
