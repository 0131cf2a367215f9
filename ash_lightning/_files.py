"""Files: user paths with ``~`` and ``$VARS`` expanded, and writes that readers never see half done."""

from __future__ import annotations

import errno
import os
import re
import stat
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


def path_problem(path: str | os.PathLike[str], want: str = "file") -> tuple[str, str | None] | None:
    """Why ``path`` is not a readable ``want`` (``"file"`` or ``"folder"``), as ``(cause, fix)``; None when it is
    one. ``cause`` completes "<path> ...": it does not exist, a folder above it is a file, it is a dangling
    symbolic link (naming the missing target), a symbolic link loop, unreachable or unreadable (permissions), a
    folder where a file is wanted (naming what it holds), a file where a folder is wanted, or not a regular file
    (FIFO, device). ``fix`` fits that cause, or is None where only the caller knows it (a wrong or missing path:
    point the setting at the right one)."""
    path = str(path)
    try:
        mode = os.stat(path).st_mode
    except OSError as err:
        if err.errno == errno.ELOOP:
            return (
                "is a symbolic link loop (following it leads back to itself)",
                f"replace the link with one to the real file (`ls -l {path}` shows where it points), or give "
                "the real path",
            )
        if os.path.islink(path):
            target = os.readlink(path)
            return (
                f"is a symbolic link to {target!r}, which does not exist",
                f"restore {target!r}, re-create the link to where it is now (ln -sfn <real path> {path}), or "
                "give the real path",
            )
        if err.errno == errno.ENOTDIR:
            parent = next(p for p in Path(path).parents if p.exists())
            return f"cannot exist: {str(parent)!r} above it is a file, not a folder", None
        if err.errno in (errno.EACCES, errno.EPERM):
            return (
                "cannot be reached: a folder above it does not let you in (permission denied)",
                "ask for access to that folder, or copy the file somewhere you can read",
            )
        return "does not exist", None
    if want == "file" and stat.S_ISDIR(mode):
        entries = sorted(os.listdir(path)) if os.access(path, os.R_OK | os.X_OK) else []
        holds = f"it holds {', '.join(entries[:4])}{', ...' if len(entries) > 4 else ''}" if entries else "empty"
        return f"is a folder, not a file ({holds})", None
    if want == "folder" and not stat.S_ISDIR(mode):
        return "is a file, not a folder", None
    if want == "file" and not stat.S_ISREG(mode):
        return "is not a regular file (a FIFO, socket or device)", None
    if not os.access(path, os.R_OK | (os.X_OK if want == "folder" else 0)):
        return (
            "is not readable (permission denied)",
            "make it readable (chmod a+r, and a+x for a folder) or copy it somewhere you can read",
        )
    return None


def check_path(path: str | os.PathLike[str], want: str, what: str, fix: str) -> str:
    """``path`` if it is a readable ``want`` (``"file"`` or ``"folder"``), else a UserError ``<what> <path> <cause>.
    Fix: <fix>`` (``path_problem``; ``what`` e.g. ``"checkpoint"``), with the caller's ``fix`` where the cause has
    none of its own."""
    problem = path_problem(path, want)
    if problem is not None:
        cause, own_fix = problem
        raise UserError(f"{what} {str(path)!r} {cause}. Fix: {own_fix or fix}.")
    return str(path)


def npz_problem(path: str | os.PathLike[str], err: BaseException) -> tuple[str, bool]:
    """Why ``np.load(path, allow_pickle=False)`` failed with ``err``, as (cause completing "<path> ...", whether
    the file is a damaged archive rather than another kind of file): empty or damaged/truncated (the zip error),
    or a single .npy array, a Python pickle or an archive of pickled objects (never loaded: unpickling can run any
    code), or not a numpy file (its first bytes). numpy's own message is not repeated: for pickles it suggests
    loading them unsafely."""
    with open(path, "rb") as f:
        head = f.read(8)
    if not head:
        return "is empty (0 bytes)", True
    if head.startswith(b"\x93NUMPY"):
        return "is a single .npy array, not a .npz archive", False
    if head[:1] == b"\x80":
        return "is a Python pickle, not a .npz archive (never loaded: unpickling can run any code)", False
    if not head.startswith(b"PK"):
        return f"is not a .npz archive (it starts with {head!r})", False
    if isinstance(err, ValueError) and "pickle" in str(err).lower():
        return "holds pickled Python objects (never loaded: unpickling can run any code)", False
    reason = " ".join(str(err).split())[:200] or "no data"
    return f"is damaged or truncated ({err.__class__.__name__}: {reason})", True
