"""The error type for mistakes a user can cause: ``main.py`` prints its message without a traceback; and the
write failures (full disk, quota, read-only or forbidden folder) that become one."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager

#: Set (to anything but 0) to see tracebacks instead of one-line user errors (``main.py --debug`` does the same).
DEBUG_ENV = "ASH_DEBUG"


def debug_requested() -> bool:
    """Whether ``$ASH_DEBUG`` asks for tracebacks."""
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


class UserError(ValueError):
    """A bad path, spec, checkpoint, data set or config: the message names the cause and the fix."""


#: What a failed write's errno means and its fix; ``DISK_ERRORS`` are those that only a write can raise.
WRITE_ERRORS = {
    errno.ENOSPC: ("no space left on the disk", "free space on that disk, or write to a folder on another disk"),
    errno.EDQUOT: ("disk quota exceeded", "free space within your quota, or write to a folder on another disk"),
    errno.EROFS: ("the file system is read-only", "write to a folder on a writable disk"),
    errno.EACCES: ("permission denied", "make the folder writable for you, or write to another folder"),
    errno.EPERM: ("operation not permitted", "make the folder writable for you, or write to another folder"),
}
DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def write_failure(err: BaseException, folder: str | None, what: str, elsewhere: str) -> UserError | None:
    """The UserError of a write that ``err`` stopped: ``cannot write <what> to <folder>: <meaning> (<errno name>).
    Fix: <fix> (<elsewhere>)``, ``elsewhere`` saying how to put the files in another folder (e.g. the option to
    set); None when ``err`` is not an OSError of ``WRITE_ERRORS``."""
    if not isinstance(err, OSError) or err.errno not in WRITE_ERRORS:
        return None
    meaning, fix = WRITE_ERRORS[err.errno]
    where = f" to {folder!r}" if folder else ""
    return UserError(f"cannot write {what}{where}: {meaning} ({errno.errorcode[err.errno]}). Fix: {fix} ({elsewhere}).")


def exception_chain(err: BaseException) -> list[BaseException]:
    """``err`` and its cause/context chain, outermost first."""
    chain: list[BaseException] = []
    cause: BaseException | None = err
    while cause is not None and all(cause is not seen for seen in chain):
        chain.append(cause)
        cause = cause.__cause__ or (None if cause.__suppress_context__ else cause.__context__)
    return chain


@contextmanager
def write_failures_reported(folder: str | None, what: str, elsewhere: str) -> Iterator[None]:
    """Run the block; an OSError of ``WRITE_ERRORS`` it raises becomes ``write_failure``'s UserError, also when
    it is the cause or context of what the block raised (a zip archive that fails to close after a failed write
    raises a ValueError)."""
    try:
        yield
    except Exception as err:
        failures = (write_failure(cause, folder, what, elsewhere) for cause in exception_chain(err))
        failure = next((f for f in failures if f is not None), None)
        if failure is None or isinstance(err, UserError):
            raise
        raise failure from err
