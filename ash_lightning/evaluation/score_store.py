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

from ash_lightning._files import check_path, npz_problem, write_atomically
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
    """Read ``scores.npz`` (or the one inside a run directory) back into a store and its metadata. A path that is
    not a readable file (``check_path``: missing, a folder, a dangling link, a link loop) and a file that is not a
    complete one of ours (empty, truncated, failed CRC, a pickle, another archive) are each one UserError naming
    the cause."""
    fix = f"pass a run folder (it holds {SCORES_FILE}) or the {SCORES_FILE} written by OODMetricsCallback"
    if os.path.isdir(path):
        if not os.path.lexists(scores_path(path)):
            raise UserError(
                f"run folder {path!r} holds no {SCORES_FILE}. Fix: {fix} (the log folder of a main.py test run, "
                "runs/<name>/version_N; a run that stopped before its first data set saved none: rerun it)."
            )
        path = scores_path(path)
    check_path(path, "file", "saved scores", fix)
    damaged, cause = False, None
    try:
        with np.load(path, allow_pickle=False) as data:
            if _META not in data.files:
                listed = ", ".join(sorted(data.files)[:6]) or "no array"
                cause = f"is a .npz archive of other arrays ({listed}; no {_META})"
            else:
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
                    damaged, cause = True, f"lacks {', '.join(missing)}"
    except Exception as err:  # noqa: BLE001 (zipfile, zlib, EOF, pickle and JSON errors all mean "unreadable")
        cause, damaged = npz_problem(path, err)
    if cause is not None:
        again = "rerun the evaluation (it was cut short or its disk was full)" if damaged else fix
        raise UserError(
            f"cannot read {path!r} as a {SCORES_FILE} written by ash-lightning: the file {cause}. Fix: {again}."
        )
    return store, meta
