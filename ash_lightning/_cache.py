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
  for an unusable one (the caller rebuilds it); ``write_entry`` writes atomically (``write_atomically``: DDP ranks
  may race) and warns, without failing the run, when the folder is not writable.
"""

from __future__ import annotations

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
    "weights_fingerprint",
    "write_entry",
]

CACHE_ENV = "ASH_CACHE_DIR"
_DEFAULT_CACHE_DIR = "~/.cache/ash_lightning/calibration"

T = TypeVar("T")


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


def write_entry(path: Path, write: Callable[[str], object], what: str, suffix: str = ".tmp") -> None:
    """``write_atomically(path, write, suffix)``, creating the folder; a warning (and the run goes on) when the
    file cannot be written."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, write, suffix)
    except OSError as err:
        warnings.warn(
            f"could not write the {what} {path} ({err}); the next run computes it again. Fix: set {CACHE_ENV} "
            "to a writable folder.",
            stacklevel=3,
        )
