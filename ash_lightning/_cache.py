"""The caches' common parts: where they live, how a key names an entry, which network an entry belongs to, and
reading and writing an entry so that a broken one costs a warning and a rebuild, never a wrong result.

Three caches use it: the calibration statistics (``ash_lightning.shaping.calibration``), the fitted detectors
(``ash_lightning.detectors.fitting``) and the test sets' features (``ash_lightning.evaluation.feature_cache``).

* A key is a JSON-able dict; its **canonical JSON** (``canonical_json``: sorted keys, non-JSON values by ``str()``)
  is what entries store and compare, and its **digest** (``key_digest``: the first 32 hex digits of that JSON's
  SHA-256) names the entry's file or folder.
* The **network identity** (``network_identity``) is the network's name and ``weights_fingerprint``, the SHA-256
  of its state (names, shapes, dtypes, values): any change of weights, however they were loaded, reads another
  entry.
* ``read_entry`` returns None for a missing entry and, after one warning line naming the entry and the problem,
  for an unusable one (the caller rebuilds it).

The write rule, which makes runs that share a cache folder (DDP ranks, jobs started together) safe: **an entry
becomes visible in one rename of a complete file or folder**, built under a hidden temporary name
(``.<name>.<random>.tmp``) in the same folder, so a reader sees a whole entry or none, never a torn one. A file
entry (``write_entry``: calibration, detectors) is renamed over the old one (``os.replace``): concurrent writers
of one key store equal values, and whichever rename comes last leaves a complete entry. A folder entry (the
feature cache) cannot be renamed over a full folder, so there the **first writer wins**: a writer that finds a
valid entry in place drops its own, one that finds a partial or corrupt one moves it aside and renames its own
in. A write that fails (a full disk: ENOSPC, EDQUOT; a read-only or unwritable folder) removes its temporary
file and gives ``warn_unwritable``'s warning, once per cache folder and process; the run goes on without
storing that entry and still reads the entries that are there. Temporary names are never read: those a killed
(SIGKILL) run leaves can be deleted.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from ash_lightning._files import write_atomically

__all__ = [
    "CACHE_ENV",
    "StaleEntry",
    "cache_dir",
    "canonical_json",
    "key_digest",
    "network_identity",
    "read_entry",
    "warn_unwritable",
    "weights_fingerprint",
    "writable_cache_folder",
    "write_entry",
]

CACHE_ENV = "ASH_CACHE_DIR"
_DEFAULT_CACHE_DIR = "~/.cache/ash_lightning/calibration"

T = TypeVar("T")

_warned_folders: set[Path] = set()  # the cache folders ``warn_unwritable`` has warned about in this process


def cache_dir() -> Path:
    """``$ASH_CACHE_DIR`` if set, else ``~/.cache/ash_lightning/calibration``."""
    return Path(os.environ.get(CACHE_ENV) or _DEFAULT_CACHE_DIR).expanduser()


def canonical_json(value: Any) -> str:
    """``value`` as JSON with sorted keys; values that are not JSON types count by ``str()``."""
    return json.dumps(value, sort_keys=True, default=str)


def key_digest(key: Any) -> str:
    """The name of ``key``'s entry: the first 32 hex digits of the SHA-256 of ``canonical_json(key)``."""
    return hashlib.sha256(canonical_json(key).encode()).hexdigest()[:32]


def weights_fingerprint(model: nn.Module) -> str:
    """SHA-256 of the model's state: each entry's name, shape and dtype, then its values' bytes."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def network_identity(name: str, model: nn.Module) -> dict[str, str]:
    """Which network a cache entry belongs to: ``{"backbone": name, "weights": weights_fingerprint(model)}``."""
    return {"backbone": name, "weights": weights_fingerprint(model)}


class StaleEntry(Exception):
    """An entry that exists but cannot be used (partial, corrupt, another key); the message says why."""


def read_entry(path: Path, read: Callable[[Path], T], what: str) -> T | None:
    """``read(path)``; None when there is no entry (``read`` raised ``FileNotFoundError``), and None after one
    warning ``"<what> <path> <problem>; rebuilding it."`` when it raised anything else (``StaleEntry`` gives the
    problem, any other error reads as "is unreadable (<error>)")."""
    try:
        return read(path)
    except FileNotFoundError:
        return None
    except Exception as err:  # noqa: BLE001  (any broken entry: rebuild it)
        problem = str(err) if isinstance(err, StaleEntry) else f"is unreadable ({err!r})"
        warnings.warn(f"{what} {path} {problem}; rebuilding it.", stacklevel=3)
        return None


def warn_unwritable(folder: Path, err: OSError, fix: str) -> None:
    """The warning that entries cannot be written to the cache ``folder`` (``err``: why), given once per folder and
    process: ``"cannot write to the cache folder <folder> (<reason>): ... Fix: <fix>."``."""
    if folder in _warned_folders:
        return
    _warned_folders.add(folder)
    warnings.warn(
        f"cannot write to the cache folder {folder} ({err.strerror or err}): the run goes on, reading the entries "
        f"already there; what it cannot store, the next run computes again. Fix: {fix}.",
        stacklevel=3,
    )


def writable_cache_folder(folder: Path, root: Path, fix: str) -> bool:
    """Whether entries can be written to ``folder`` (created if missing); False after ``warn_unwritable(root,
    ...)`` when it cannot be created or is not writable (a read-only cache: its entries are still read)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        warn_unwritable(root, err, fix)
        return False
    if not os.access(folder, os.W_OK | os.X_OK):
        warn_unwritable(root, PermissionError(errno.EACCES, "read-only: not writable"), fix)
        return False
    return True


def write_entry(path: Path, write: Callable[[str], object], root: Path | None = None, suffix: str = ".tmp") -> bool:
    """``write_atomically(path, write, suffix)`` (the write rule of the module docstring), creating the folder;
    whether the entry was written. When it cannot be (full disk, read-only folder) its temporary file is removed
    and ``warn_unwritable`` names ``root`` (default: ``cache_dir()``); the run goes on."""
    root = cache_dir() if root is None else root
    fix = f"free space there, or set {CACHE_ENV} to a writable folder with space"
    if not writable_cache_folder(path.parent, root, fix):
        return False
    try:
        write_atomically(path, write, suffix)
    except OSError as err:
        warn_unwritable(root, err, fix)
        return False
    return True
