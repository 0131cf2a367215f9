"""A simulated full disk: files opened for writing in one folder, whose names match a pattern, write half of the
first chunk they are given and then raise ``OSError(ENOSPC)``, as a disk that fills up mid-file does.

In this process: ``undo = fill_disk(folder, pattern, skip)``. In a subprocess: copy this file as
``sitecustomize.py`` into a folder on its ``PYTHONPATH`` and set ``FULL_DISK_FOLDER`` (and ``FULL_DISK_PATTERN``,
``FULL_DISK_SKIP``); Python imports it at start-up. Every ``open`` goes through ``io.open`` (``builtins.open``,
``zipfile``, ``Path.write_text``, TensorBoard's event files), which is what is replaced.
"""

from __future__ import annotations

import builtins
import errno
import fnmatch
import io
import os
from collections.abc import Callable
from typing import Any


class _FullFile:
    """A file whose first ``write`` stores half the data, then raises ENOSPC; the rest is the file's own."""

    def __init__(self, file: Any) -> None:
        self._file = file

    def write(self, data: Any) -> int:
        self._file.write(data[: len(data) // 2])
        self._file.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)

    def __enter__(self) -> _FullFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._file.close()


def fill_disk(folder: str | os.PathLike[str], pattern: str = "*", skip: int = 0) -> Callable[[], None]:
    """From now on, a file opened for writing directly in ``folder`` whose name matches ``pattern`` (fnmatch) is a
    full-disk file, except the first ``skip`` of them; returns the function that undoes it."""
    real_open = io.open
    folder = os.path.abspath(folder)
    left = [skip]

    def full_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        opened = real_open(file, mode, *args, **kwargs)
        if not isinstance(file, str | bytes | os.PathLike) or not any(m in mode for m in "wax+"):
            return opened
        path = os.path.abspath(os.fsdecode(file))
        if os.path.dirname(path) != folder or not fnmatch.fnmatch(os.path.basename(path), pattern):
            return opened
        if left[0] > 0:
            left[0] -= 1
            return opened
        return _FullFile(opened)

    io.open = builtins.open = full_open  # type: ignore[assignment]

    def undo() -> None:
        io.open = builtins.open = real_open  # type: ignore[assignment]

    return undo


if __name__ == "sitecustomize" and os.environ.get("FULL_DISK_FOLDER"):
    fill_disk(
        os.environ["FULL_DISK_FOLDER"],
        os.environ.get("FULL_DISK_PATTERN", "*"),
        int(os.environ.get("FULL_DISK_SKIP", "0")),
    )
