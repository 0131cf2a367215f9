"""Full-spectrum OOD detection (OpenOOD v1.5's ``fsood``): covariate-shifted ID (csid) samples count as ID.

As ``Evaluator.eval_ood(fsood=True)`` computes it (Jingkang50/OpenOOD, ``openood/evaluation_api/evaluator.py``):
the ID test scores and those of every csid set, in their order, are concatenated into one ID set, and each OOD set
gets the usual four metrics against it (``compute_all_metrics``: FPR@TPR, AUROC, AUPR-In, AUPR-Out, here
:func:`~ash_lightning.evaluation.metrics.ood_metrics` in either convention); group rows (OpenOOD's ``nearood`` /
``farood``) and the mean average the sets. OpenOOD's ACC column for it is ``eval_acc("csid")``: the top-1 accuracy
of the ID test set and every csid set pooled, correct / total. Each csid set's own accuracy is reported too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ash_lightning.evaluation.metrics import ood_metrics, summarize, top1_accuracy

Arrays = Mapping[str, np.ndarray]


def pooled(sets: Sequence[Arrays]) -> dict[str, np.ndarray]:
    """The per-sample arrays of ``sets`` concatenated in order (those every set has)."""
    fields = set.intersection(*(set(arrays) for arrays in sets))
    return {field: np.concatenate([arrays[field] for arrays in sets]) for field in sorted(fields)}


def full_spectrum_metrics(
    id_sets: Sequence[np.ndarray],
    ood_sets: Mapping[str, np.ndarray],
    groups: Mapping[str, list[str]] | None = None,
    tpr: float = 0.95,
    convention: str = "paper",
) -> dict[str, Any]:
    """``{"ood": {set: metrics}, "mean": ..., "groups": ...}`` of each OOD set's scores against the scores of
    ``id_sets`` (the ID test set, then the csid sets) concatenated as one ID set."""
    id_scores = np.concatenate(list(id_sets))
    per_set = {name: ood_metrics(id_scores, s, tpr=tpr, convention=convention) for name, s in ood_sets.items()}
    return {"ood": per_set, **summarize(per_set, groups)}


def full_spectrum_entry(
    store: Mapping[str, Arrays],
    id_name: str,
    csid_names: Sequence[str],
    ood_names: Sequence[str],
    column: int,
    groups: Mapping[str, list[str]] | None = None,
    tpr: float = 0.95,
    convention: str = "paper",
) -> dict[str, Any]:
    """One run's (score ``column``'s) full-spectrum results: :func:`full_spectrum_metrics` of the ID test set and
    the csid sets ``csid_names`` against the OOD sets, ``accuracy`` (OpenOOD's csid ACC: ID test and csid sets
    pooled) and ``csid_accuracy`` (per csid set); an accuracy is None without labels or predictions."""
    id_sets = [store[name] for name in (id_name, *csid_names)]
    return {
        **full_spectrum_metrics(
            [arrays["scores"][:, column] for arrays in id_sets],
            {name: store[name]["scores"][:, column] for name in ood_names},
            groups,
            tpr,
            convention,
        ),
        "accuracy": top1_accuracy(pooled(id_sets), column),
        "csid_accuracy": {name: top1_accuracy(store[name], column) for name in csid_names},
    }


def full_spectrum_rows(run: Mapping[str, Any]) -> list[tuple[str, Mapping[str, float], float | None]]:
    """The ``ood_results.csv`` rows of a run's full-spectrum results, ``(set, metrics, accuracy)``:
    ``fsood:<set>``, ``fsood:group:<group>`` and ``fsood:mean`` with the pooled accuracy (as OpenOOD's table), then
    ``csid:<set>`` with no metrics and that set's accuracy; none for a run without csid sets."""
    fsood = run.get("fsood")
    if fsood is None:
        return []
    sets = [*fsood["ood"].items(), *((f"group:{g}", m) for g, m in fsood["groups"].items()), ("mean", fsood["mean"])]
    rows: list[tuple[str, Mapping[str, float], float | None]] = [
        (f"fsood:{name}", metrics, fsood["accuracy"]) for name, metrics in sets
    ]
    return rows + [(f"csid:{name}", {}, accuracy) for name, accuracy in fsood["csid_accuracy"].items()]


def full_spectrum_scalars(run: Mapping[str, Any]) -> dict[str, float]:
    """Logger scalars of a run's full-spectrum results: ``fsood/<set>/<metric>`` (sets, ``mean``,
    ``group_<group>``), ``csid/accuracy`` (pooled) and ``csid/<set>/accuracy``; empty without csid sets."""
    fsood = run.get("fsood")
    if fsood is None:
        return {}
    sets = {**fsood["ood"], "mean": fsood["mean"], **{f"group_{g}": m for g, m in fsood["groups"].items()}}
    scalars = {f"fsood/{name}/{key}": value for name, metrics in sets.items() for key, value in metrics.items()}
    accuracies = {"csid/accuracy": fsood["accuracy"]}
    accuracies.update({f"csid/{name}/accuracy": value for name, value in fsood["csid_accuracy"].items()})
    return scalars | {tag: value for tag, value in accuracies.items() if value is not None}
