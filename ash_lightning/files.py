"""Files: user paths with ``~`` and ``$VARS`` expanded, and writes that readers never see half done."""
from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path


def expand_user_vars(path: str | os.PathLike[str]) -> str:
    """``path`` with ``~`` and environment variables (``$DATASETS/...``) expanded; unset variables stay as written."""
    return os.path.expandvars(os.path.expanduser(str(path)))


def write_atomically(path: str | os.PathLike[str], write: Callable[[str], None], suffix: str = ".tmp") -> None:
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
