"""Files: user paths with ``~`` and ``$VARS`` expanded, and writes that readers never see half done."""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Callable
from pathlib import Path

from ash_lightning.errors import UserError

_VARIABLE = re.compile(r"\$(?:\{(?P<braced>\w+)\}|(?P<bare>\w+))")


def expand_user_vars(path: str | os.PathLike[str]) -> str:
    """``path`` with ``~`` and environment variables (``$DATASETS/...``) expanded; unset variables stay as written."""
    return os.path.expandvars(os.path.expanduser(str(path)))


def expand_set_vars(path: str | os.PathLike[str], what: str) -> str:
    """``expand_user_vars(path)``; a UserError naming each environment variable in it that is not set."""
    unset = sorted({m["braced"] or m["bare"] for m in _VARIABLE.finditer(str(path))} - set(os.environ))
    if unset:
        names = " and ".join(unset)
        raise UserError(
            f"{what}: path {str(path)!r} uses {names}, which {'is' if len(unset) == 1 else 'are'} not "
            f"set. Fix: export {unset[0]}=/path/to/data before running, or give the full path."
        )
    return expand_user_vars(path)


def writable_directory(path: str | os.PathLike[str], what: str) -> str:
    """``path``, created if missing; a UserError naming ``what`` when it is a file, cannot be created or is not
    writable, so a run finds out before it evaluates anything rather than when it saves the first result."""
    path = str(path)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as err:
        problem = "is a file, not a folder" if os.path.isfile(path) else f"cannot be created ({err.strerror})"
        raise UserError(
            f"{what}: output folder {path!r} {problem}. Fix: point it at a folder you can write to."
        ) from err
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserError(
            f"{what}: output folder {path!r} is not writable. Fix: point it at a folder you can write "
            "to, or change its permissions."
        )
    return path


def write_atomically(path: str | os.PathLike[str], write: Callable[[str], object], suffix: str = ".tmp") -> None:
    """Call ``write(tmp)`` on a new uniquely named file beside ``path`` (its name ends with ``suffix``, e.g.
    ``.npz`` for ``np.savez``), then rename it over ``path``: readers, and other processes writing the same
    file, see the old or the new content, never a half-written one. The temporary file is removed on failure."""
    path = Path(path)
    tmp = str(path.with_name(f".{path.name}.{uuid.uuid4().hex}{suffix}"))  # created by ``write``: usual permissions
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)  # only left when writing or replacing failed
