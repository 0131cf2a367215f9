"""The ``scores.npz`` format: per-sample scores of every data set with the metadata that recomputes every metric.

A *score store* maps each data set name to numpy arrays ``scores`` (N, R), ``targets`` (N,), ``index`` (N,)
and optionally ``preds`` (N, R), one column per run (a (shaping, score) pair). In the file each array is
``<set name>/<field>`` and the metadata is one JSON string, ``__meta__``: ``runs``, ``loaders``, ``tpr`` and
``convention`` (required: ``report`` recomputes the metrics from them), ``groups``, ``skipped``,
``dropped_nonfinite`` and ``config``. ``OODMetricsCallback`` writes it after each finished set (``save_scores``),
``main.py report`` reads it (``load_scores``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ash_lightning._files import write_atomically
from ash_lightning.errors import UserError

__all__ = ["META_KEYS", "SCORES_FILE", "SET_FIELDS", "Store", "load_scores", "metadata", "save_scores", "scores_path"]

Store = dict[str, dict[str, np.ndarray]]
SCORES_FILE = "scores.npz"
#: The metadata keys a store cannot be reported without, and the arrays every data set has.
META_KEYS = ("runs", "loaders", "tpr", "convention")
SET_FIELDS = ("scores", "targets", "index")
_META = "__meta__"


def scores_path(directory: str) -> str:
    """The ``scores.npz`` of a run directory."""
    return os.path.join(directory, SCORES_FILE)


def metadata(
    *,
    runs: Sequence[Mapping[str, Any]],
    loaders: Sequence[Mapping[str, str]],
    tpr: float,
    convention: str,
    groups: Mapping[str, list[str]],
    skipped: Mapping[str, list[str]],
    dropped_nonfinite: Mapping[str, int],
    config: Mapping[str, Any],
) -> dict[str, Any]:
    """The metadata saved with a store: the runs (one per score column), the loaders (name and role, in order),
    the metric options, the groups, what was skipped or dropped per set, and the run's configuration."""
    return {
        "runs": list(runs),
        "loaders": list(loaders),
        "groups": dict(groups),
        "tpr": tpr,
        "convention": convention,
        "skipped": dict(skipped),
        "dropped_nonfinite": dict(dropped_nonfinite),
        "config": dict(config),
    }


def save_scores(path: str, store: Store, meta: Mapping[str, Any]) -> None:
    """Write the score store and its ``metadata`` to ``path`` atomically."""
    # Any: mypy matches ``**arrays`` against savez's ``allow_pickle: bool`` too (the names hold a "/", so never)
    arrays: dict[str, Any] = {_META: np.array(json.dumps(meta))}
    arrays.update({f"{name}/{key}": value for name, data in store.items() for key, value in data.items()})
    write_atomically(path, lambda tmp: np.savez(tmp, **arrays), suffix=".npz")


def load_scores(path: str) -> tuple[Store, dict[str, Any]]:
    """Read ``scores.npz`` (or the one inside a run directory) back into a store and its metadata; any file that
    is not a complete one (empty, truncated, failed CRC, another archive) is one UserError naming it."""
    if os.path.isdir(path):
        path = scores_path(path)
    if not os.path.isfile(path):
        raise UserError(
            f"no saved scores at {path!r}. Fix: pass a run directory (it holds {SCORES_FILE}) or the "
            f"{SCORES_FILE} file written by OODMetricsCallback."
        )
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data[_META]))
            store: Store = {}
            for key in data.files:
                if key != _META:
                    name, _, field = key.rpartition("/")
                    store.setdefault(name, {})[field] = data[key]
        missing = [k for k in META_KEYS if k not in meta] + [
            f"{name}/{field}" for name, arrays in store.items() for field in SET_FIELDS if field not in arrays
        ]
        if missing:
            raise KeyError(f"it lacks {', '.join(missing)}")
    except Exception as err:  # noqa: BLE001 (zipfile, zlib, EOF, JSON and format errors all mean "unreadable")
        reason = " ".join(str(err).split()) or "no data"
        raise UserError(
            f"cannot read {path!r} as a {SCORES_FILE} written by ash-lightning ({err.__class__.__name__}: "
            f"{reason[:200]}). Fix: pass the {SCORES_FILE} of a run (rerun the evaluation if it was cut "
            "short)."
        ) from err
    return store, meta
