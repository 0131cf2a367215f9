"""Exact OOD-detection metrics (FPR@TPR, AUROC, AUPR-In, AUPR-Out) and their torchmetrics wrapper.

Scores follow the convention "higher = more in-distribution". Everything is computed in
float64 from one stable sort of all scores, with no sigmoid and no binning, so the result is
exact for scores of any range (energies around 5..40, logits around -1000, heavy ties).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from ash_lightning._options import CONVENTIONS, check_convention, check_tpr

__all__ = [
    "CONVENTIONS",
    "OODMetrics",
    "fpr_key",
    "ood_metrics",
    "summarize",
    "threshold_at_tpr",
    "top1_accuracy",
    "unique_by_index",
]

ScoresLike = Tensor | np.ndarray | Sequence[float]


def fpr_key(tpr: float) -> str:
    """Metric key for the FPR at a given TPR: 0.95 -> ``"fpr95"``, 0.995 -> ``"fpr99.5"``."""
    return f"fpr{round(tpr * 100, 6):g}"


def _as_float64(scores: ScoresLike, set_name: str) -> np.ndarray:
    """1-D float64 numpy copy of ``scores``; ValueError if not 1-D, empty, or not finite."""
    if isinstance(scores, Tensor):
        array = scores.detach().to(device="cpu", dtype=torch.float64).numpy()
    else:
        array = np.asarray(scores, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{set_name} scores must be 1-D, got shape {array.shape}; flatten them first.")
    if array.size == 0:
        raise ValueError(f"{set_name} scores are empty; OOD metrics need at least one {set_name} score.")
    n_bad = array.size - int(np.count_nonzero(np.isfinite(array)))
    if n_bad:
        raise ValueError(
            f"{set_name} scores contain {n_bad} non-finite value(s) (NaN or Inf); "
            "fix or drop them (e.g. check the model's logits for overflow) before computing OOD metrics."
        )
    return array


def _meets_tpr(id_ge: np.ndarray, n_id: int, tpr: float) -> np.ndarray:
    """Whether keeping ``id_ge`` of ``n_id`` ID scores reaches ``tpr``: the one float comparison that both the
    ``paper`` FPR of :func:`ood_metrics` and :func:`threshold_at_tpr` make."""
    return id_ge / n_id >= tpr


def threshold_at_tpr(id_scores: ScoresLike, tpr: float = 0.95) -> float:
    """The largest threshold t keeping at least ``tpr`` of the ID scores >= t (higher = more in-distribution).

    It is always one of the ID scores, and it is the operating point of the ``paper`` convention: a sample is
    flagged OOD when its score < t, and ``ood_metrics(id, ood, tpr=tpr)[fpr_key(tpr)] == mean(ood >= t)``.

    Example:
        >>> threshold_at_tpr([4.0, 3.0, 2.0, 1.0], tpr=0.75)  # 4, 3 and 2 are >= 2
        2.0
    """
    check_tpr("tpr", tpr)
    id64 = _as_float64(id_scores, "ID")
    distinct = np.unique(id64)  # ascending
    id_ge = id64.size - np.searchsorted(np.sort(id64), distinct, side="left")  # ID scores >= each distinct score
    last = np.count_nonzero(_meets_tpr(id_ge, id64.size, tpr)) - 1
    return float(distinct[last])


def ood_metrics(
    id_scores: ScoresLike,
    ood_scores: ScoresLike,
    *,
    tpr: float = 0.95,
    convention: str = "paper",
) -> dict[str, float]:
    """FPR@``tpr``, AUROC, AUPR-In and AUPR-Out of scores where higher = more in-distribution.

    ``"paper"`` (ID positive, as the ASH, ReAct and Energy papers):

    - ``fpr{tpr}``: fraction of OOD scores >= t, t the largest threshold keeping >= ``tpr`` of ID scores >= t.
    - ``aupr_in`` / ``aupr_out``: average precision, sum over thresholds of (R_i - R_{i-1}) P_i (scikit-learn's
      ``average_precision_score``, ties grouped), ID positive on the scores / OOD positive on the negated scores.

    ``"openood"`` (OOD positive): OpenOOD v1.5's ``compute_all_metrics`` (``openood/evaluators/metrics.py``,
    scikit-learn's curves), ties included:

    - ``fpr{tpr}``: fraction of ID scores <= t, t the smallest threshold with >= ``tpr`` of OOD scores <= t
      among the thresholds ``roc_curve(drop_intermediate=True)`` keeps (a threshold whose (ID, OOD) count
      steps before and after are equal is dropped, so ties can move t up).
    - ``aupr_in`` / ``aupr_out``: trapezoid area under the precision-recall curve from (R=0, P=1),
      sum of (R_i - R_{i-1}) (P_i + P_{i-1}) / 2 (``auc(recall, precision)``), same positives as above.

    Both: ``auroc`` = P(s_id > s_ood) + 0.5 P(s_id = s_ood) (the ROC trapezoid).

    Example:
        >>> from ash_lightning import ood_metrics
        >>> ood_metrics([4.0, 3.0, 2.0, 1.0], [2.5, 0.5], tpr=0.75)  # t = 2 keeps 2.5; 6 of 8 pairs ordered
        {'fpr75': 0.5, 'auroc': 0.75, 'aupr_in': 0.8875, 'aupr_out': 0.75}
    """
    check_convention("convention", convention)
    check_tpr("tpr", tpr)
    id64 = _as_float64(id_scores, "ID")
    ood64 = _as_float64(ood_scores, "OOD")
    n_id, n_ood = id64.size, ood64.size

    # One stable sort, then cumulative counts at the last position of each distinct score.
    scores = np.concatenate((id64, ood64))
    order = np.argsort(scores, kind="stable")
    sorted_scores = scores[order]
    group_end = np.flatnonzero(sorted_scores[1:] != sorted_scores[:-1])
    group_end = np.append(group_end, scores.size - 1)
    id_le = np.cumsum(order < n_id)[group_end]  # number of ID scores <= each distinct score
    ood_le = group_end + 1 - id_le  # number of OOD scores <= each distinct score
    id_eq = np.diff(id_le, prepend=0)  # number of ID scores == each distinct score
    ood_eq = np.diff(ood_le, prepend=0)
    id_ge = n_id - id_le + id_eq  # number of ID scores >= each distinct score
    ood_ge = n_ood - ood_le + ood_eq

    # Precision at each distinct score s taken as the threshold: ID positive, predicted ID when score >= s;
    # OOD positive, predicted OOD when score <= s.
    precision_in = id_ge / (id_ge + ood_ge)
    precision_out = ood_le / (ood_le + id_le)
    if convention == "paper":
        # id_ge is non-increasing: the last distinct score meeting the TPR is the largest threshold.
        last = np.count_nonzero(_meets_tpr(id_ge, n_id, tpr)) - 1
        fpr = ood_ge[last] / n_ood
        aupr_in = float(np.dot(id_eq, precision_in)) / n_id
        aupr_out = float(np.dot(ood_eq, precision_out)) / n_ood
    else:
        fpr = _openood_fpr(id_eq, ood_eq, id_le, ood_le, tpr)
        # Recall grows by id_eq / n_id (ood_eq / n_ood) at each threshold, taken from high to low ID-ness for
        # ID positive and from low to high for OOD positive; the previous point of the first one is P = 1.
        aupr_in = float(np.dot(id_eq, precision_in + np.append(precision_in[1:], 1.0))) / (2 * n_id)
        aupr_out = float(np.dot(ood_eq, precision_out + np.insert(precision_out[:-1], 0, 1.0))) / (2 * n_ood)

    # 2 * sum over ID of (#OOD below + 0.5 #OOD tied), exact in int64.
    auroc_twice = int(np.dot(id_eq, 2 * (ood_le - ood_eq) + ood_eq))
    return {
        fpr_key(tpr): float(fpr),
        "auroc": auroc_twice / (2 * n_id * n_ood),
        "aupr_in": aupr_in,
        "aupr_out": aupr_out,
    }


def _openood_fpr(id_eq: np.ndarray, ood_eq: np.ndarray, id_le: np.ndarray, ood_le: np.ndarray, tpr: float) -> float:
    """OpenOOD's ``fpr_list[argmax(tpr_list >= tpr)]`` of ``roc_curve(is_ood, -scores)``, from per-distinct-score
    counts in ascending score order: the first threshold the curve keeps with OOD recall >= ``tpr``.

    ``drop_intermediate`` keeps the first and last thresholds and those where the curve bends, i.e. where the
    (ID, OOD) count step into the threshold differs from the step out of it.
    """
    kept = np.ones(id_eq.size, dtype=bool)
    kept[1:-1] = (id_eq[2:] != id_eq[1:-1]) | (ood_eq[2:] != ood_eq[1:-1])
    first = np.flatnonzero(kept & (ood_le / ood_le[-1] >= tpr))[0]
    return id_le[first] / id_le[-1]


def top1_accuracy(arrays: Mapping[str, np.ndarray], column: int) -> float | None:
    """Top-1 accuracy of run ``column`` (``preds`` (N, R) against ``targets`` (N,)) on the labelled samples
    (targets >= 0); None without predictions or labels."""
    if "preds" not in arrays:
        return None
    labelled = arrays["targets"] >= 0
    if not labelled.any():
        return None
    return float((arrays["preds"][labelled, column] == arrays["targets"][labelled]).mean())


def unique_by_index(index: Tensor, *tensors: Tensor) -> tuple[Tensor, ...]:
    """Keep the first occurrence of each ``index`` value; return ``(index, *tensors)`` filtered, in index order.

    ``tensors`` are aligned with ``index`` along dim 0 (e.g. samples repeated by DistributedSampler padding).
    """
    if index.ndim != 1 or index.is_floating_point() or index.is_complex():
        raise ValueError(f"index must be a 1-D integer tensor, got dtype {index.dtype} and shape {tuple(index.shape)}.")
    for position, tensor in enumerate(tensors):
        if tensor.shape[:1] != index.shape:
            raise ValueError(
                f"tensor {position} has {tensor.shape[0] if tensor.ndim else 'no'} rows but index has "
                f"{index.shape[0]}; pass tensors aligned with index along dim 0."
            )
    sorted_index, order = torch.sort(index, stable=True)
    is_first = torch.ones_like(sorted_index, dtype=torch.bool)
    is_first[1:] = sorted_index[1:] != sorted_index[:-1]
    keep = order[is_first]
    return (sorted_index[is_first], *(tensor[keep] for tensor in tensors))


class OODMetrics(Metric):
    """Accumulates per-sample scores with their ID/OOD flag (and optional sample index, labels, predictions and
    finite flag) and computes :func:`ood_metrics`; :meth:`samples` returns the per-sample rows themselves.

    States are lists gathered with ``dist_reduce_fx="cat"``, so DDP needs nothing extra. When ``index``
    is passed to :meth:`update`, each (is_id, index) pair is counted once, which undoes the repeated
    samples that ``DistributedSampler`` pads shards with. ``scores`` may hold one column per setting (B, R);
    :meth:`compute` needs a single column.

    Example:
        >>> import torch
        >>> from ash_lightning import OODMetrics
        >>> metric = OODMetrics(tpr=0.95)
        >>> metric.update(torch.tensor([3.0, 2.5, 2.0]), True, index=torch.tensor([0, 1, 2]))
        >>> metric.update(torch.tensor([1.0, 1.5, 1.0]), False, index=torch.tensor([0, 1, 0]))  # a padded repeat
        >>> metric.compute()
        {'fpr95': 0.0, 'auroc': 1.0, 'aupr_in': 1.0, 'aupr_out': 1.0}
        >>> metric.samples()["index"].tolist()  # ID samples, then OOD ones, each once, in index order
        [0, 1, 2, 0, 1]
    """

    is_differentiable = False
    higher_is_better = None  # mixed: FPR is lower-is-better, AUROC/AUPR are higher-is-better
    full_state_update = False
    OPTIONAL_COLUMNS = ("index", "targets", "preds")
    scores: list[Tensor]
    is_id: list[Tensor]
    finite: list[Tensor]

    def __init__(self, tpr: float = 0.95, convention: str = "paper", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        check_convention("convention", convention)
        check_tpr("tpr", tpr)
        self.tpr = tpr
        self.convention = convention
        for name in ("scores", "is_id", "finite", *self.OPTIONAL_COLUMNS):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(
        self,
        scores: Tensor,
        is_id: Tensor | bool,
        index: Tensor | None = None,
        *,
        targets: Tensor | None = None,
        preds: Tensor | None = None,
        finite: Tensor | None = None,
    ) -> None:
        """Add a batch of ``scores`` (B,) or (B, R); ``is_id`` is a bool per sample or one bool for the batch.
        ``index`` (integer sample ids), ``targets`` and ``preds`` are kept per sample when given (for every batch
        or for none); ``finite`` (B,) defaults to "every score of the sample is finite"."""
        if scores.ndim not in (1, 2):
            raise ValueError(f"scores must be 1-D (batch,) or 2-D (batch, columns), got shape {tuple(scores.shape)}.")
        rows = scores.shape[:1]
        if isinstance(is_id, bool):
            is_id = torch.full(rows, is_id, dtype=torch.bool, device=scores.device)
        if is_id.shape != rows:
            raise ValueError(f"is_id has shape {tuple(is_id.shape)} but scores have {tuple(scores.shape)}.")
        if index is not None and (index.shape != rows or index.is_floating_point()):
            raise ValueError(
                f"index must be an integer tensor shaped like scores {tuple(rows)}, "
                f"got dtype {index.dtype} and shape {tuple(index.shape)}."
            )
        optional = {"index": index, "targets": targets, "preds": preds}
        for name, column in optional.items():
            if len(self.scores) and (column is not None) != (len(getattr(self, name)) > 0):
                raise ValueError(f"Pass `{name}` to OODMetrics.update for every batch or for none, not for some only.")
            if column is not None and column.shape[:1] != rows:
                raise ValueError(f"{name} has {len(column)} rows but scores have {rows[0]}.")
        if finite is None:
            finite = torch.isfinite(scores.reshape(rows[0], -1)).all(dim=1)
        for name, column in optional.items():
            if column is not None:
                getattr(self, name).append(column.detach().long())
        self.scores.append(scores.detach().double())
        self.is_id.append(is_id.detach().bool())
        self.finite.append(finite.detach().bool())

    def _rows(self) -> dict[str, Tensor]:
        """The accumulated states (local, or synced inside ``sync_context``) concatenated; with an index, each
        (is_id, index) once, ID rows first, each part in index order. Empty when there is no row."""
        rows = {name: dim_zero_cat(state) for name in self._defaults if len(state := getattr(self, name))}
        if not len(rows.get("scores", ())):
            return {}
        rows.update({name: rows[name].long() for name in self.OPTIONAL_COLUMNS if name in rows})
        if "index" not in rows:
            return rows
        others = [name for name in rows if name != "index"]
        parts = [
            unique_by_index(rows["index"][mask], *(rows[n][mask] for n in others))
            for mask in (rows["is_id"], ~rows["is_id"])
        ]
        return {name: torch.cat([part[i] for part in parts]) for i, name in enumerate(["index", *others])}

    def samples(self) -> dict[str, Tensor]:
        """The per-sample rows of every process (gathered under DDP), each (is_id, index) once: ``scores``,
        ``is_id``, ``finite`` and those of ``index``/``targets``/``preds`` that were given; empty when nothing
        was accumulated."""
        with self.sync_context():
            return self._rows()

    def compute(self) -> dict[str, float]:
        """:func:`ood_metrics` over everything accumulated (de-duplicated by index when given)."""
        if len(self.scores) == 0:
            raise ValueError("OODMetrics has no scores; call update() with ID and OOD batches before compute().")
        rows = self._rows()
        scores, is_id = rows["scores"], rows["is_id"]
        if scores.ndim == 2:
            if scores.shape[1] != 1:
                raise ValueError(
                    f"compute() needs one score column, got {scores.shape[1]}; take the per-sample scores from "
                    "samples() and call ood_metrics on each column."
                )
            scores = scores[:, 0]
        return ood_metrics(scores[is_id], scores[~is_id], tpr=self.tpr, convention=self.convention)


def _mean_metrics(per_set: dict[str, dict[str, float]], names: Sequence[str]) -> dict[str, float]:
    keys = per_set[names[0]].keys()
    return {key: sum(per_set[name][key] for name in names) / len(names) for key in keys}


def summarize(
    per_set: dict[str, dict[str, float]],
    groups: Mapping[str, list[str]] | None = None,
) -> dict[str, Any]:
    """Average per-OOD-set metric dicts: ``{"mean": {...}, "groups": {group: {...}}}``.

    Each entry is the arithmetic mean per metric key over the member sets ("mean": all sets).
    """
    if not per_set:
        raise ValueError("summarize needs at least one OOD set's metrics, got an empty dict.")
    first_name, first = next(iter(per_set.items()))
    for name, metrics in per_set.items():
        if metrics.keys() != first.keys():
            raise ValueError(
                f"OOD set {name!r} has metric keys {sorted(metrics)} but {first_name!r} has {sorted(first)}; "
                "compute all sets with the same tpr."
            )
    groups = groups or {}
    unknown = sorted({name for members in groups.values() for name in members} - per_set.keys())
    if unknown:
        raise ValueError(f"Unknown OOD set(s) {unknown} in groups; known sets: {sorted(per_set)}.")
    empty = sorted(group for group, members in groups.items() if not members)
    if empty:
        raise ValueError(f"Group(s) {empty} have no member sets; list at least one OOD set per group.")
    return {
        "mean": _mean_metrics(per_set, list(per_set)),
        "groups": {group: _mean_metrics(per_set, members) for group, members in groups.items()},
    }
