"""The rows ``main.py predict`` writes: one per sample, each once (under DDP too), in input order.

``PredictionRows`` accumulates them (states gathered with ``dist_reduce_fx="cat"``, de-duplicated by sample index
with ``unique_by_index``); ``write_predictions`` writes ``predictions.csv`` (path or index, score, is_ood,
predicted class, max softmax) and ``predictions_summary.json``, and returns the summary's text.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from ash_lightning.deploy.detector import flag_ood
from ash_lightning.evaluation.metrics import unique_by_index

COLUMNS = ("index", "score", "pred", "max_softmax")


class PredictionRows(Metric):
    """Per sample: ``index``, ``score``, ``pred`` (predicted class) and ``max_softmax``; :meth:`compute` gives
    them from every process, each index once, in index order (empty tensors when nothing was added)."""

    full_state_update = False
    index: list[Tensor]

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for name in COLUMNS:
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, index: Tensor, score: Tensor, logits: Tensor) -> None:
        """Add a batch: sample ``index`` (B,), ``score`` (B,) and the ``logits`` (B, K) the class comes from."""
        probabilities = logits.detach().double().softmax(-1)
        max_softmax, pred = probabilities.max(-1)
        for name, column in zip(COLUMNS, (index.long(), score.double(), pred, max_softmax), strict=True):
            getattr(self, name).append(column.detach())

    def compute(self) -> dict[str, Tensor]:
        if isinstance(self.index, list) and not self.index:  # a list before DDP sync, its tensor after
            return {name: torch.empty(0) for name in COLUMNS}
        columns = unique_by_index(*(dim_zero_cat(getattr(self, name)) for name in COLUMNS))
        return dict(zip(COLUMNS, columns, strict=True))


def write_predictions(
    rows: dict[str, Tensor],
    paths: Sequence[str] | None,
    threshold: float,
    source: str,
    directory: str,
) -> str:
    """Write ``predictions.csv`` (rows with a negative index, skipped corrupt files, are left out and counted) and
    ``predictions_summary.json`` into ``directory``; returns the summary: count, fraction flagged, threshold and
    its source, the files."""
    kept = rows["index"] >= 0
    rows = {name: column[kept] for name, column in rows.items()}
    is_ood = flag_ood(rows["score"], threshold)
    os.makedirs(directory, exist_ok=True)
    csv_path = os.path.join(directory, "predictions.csv")
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path" if paths is not None else "index", "score", "is_ood", "pred", "max_softmax"])
        for i, score, ood, pred, prob in zip(
            rows["index"].tolist(),
            rows["score"].tolist(),
            is_ood.tolist(),
            rows["pred"].tolist(),
            rows["max_softmax"].tolist(),
            strict=True,
        ):
            writer.writerow([paths[i] if paths is not None else i, repr(score), int(ood), pred, repr(prob)])
    count, flagged = int(kept.sum()), int(is_ood.sum())
    fraction = flagged / count if count else 0.0
    summary = {
        "count": count,
        "flagged_ood": flagged,
        "fraction_flagged": fraction,
        "threshold": threshold,
        "threshold_source": source,
        "skipped_corrupt": int((~kept).sum()),
    }
    summary_path = os.path.join(directory, "predictions_summary.json")
    with open(summary_path, "w") as f:
        json.dump(summary, f, indent=2)
    skipped = f", {summary['skipped_corrupt']} corrupt file(s) skipped" if summary["skipped_corrupt"] else ""
    return (
        f"Predicted {count} samples{skipped}: {flagged} flagged OOD ({100 * fraction:.2f}%) "
        f"at threshold {threshold!r} (score < threshold is OOD), from {source}.\n"
        f"Written: {csv_path} and {summary_path}"
    )
