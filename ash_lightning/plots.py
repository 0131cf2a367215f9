"""Matplotlib figures of results: ROC and PR curves per OOD set, and a sweep's metrics against percentile."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from sklearn.metrics import precision_recall_curve, roc_curve  # noqa: E402

from ash_lightning.metrics import fpr_key  # noqa: E402
from ash_lightning.shaping import get_shaping  # noqa: E402


def curves_figure(id_scores: np.ndarray, ood_scores: Mapping[str, np.ndarray], title: str) -> Figure:
    """ROC (ID positive) and precision-recall (ID positive) curves, one line per OOD set."""
    fig, (roc_ax, pr_ax) = plt.subplots(1, 2, figsize=(10, 4.2))
    for name, scores in ood_scores.items():
        labels = np.r_[np.ones(len(id_scores)), np.zeros(len(scores))]
        values = np.r_[id_scores, scores].astype(np.float64)
        fpr, tpr, _ = roc_curve(labels, values)
        precision, recall, _ = precision_recall_curve(labels, values)
        roc_ax.plot(fpr, tpr, label=name)
        pr_ax.plot(recall, precision, label=name)
    roc_ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    roc_ax.set(xlabel="FPR (OOD accepted as ID)", ylabel="TPR (ID accepted)", title="ROC")
    pr_ax.set(xlabel="recall (ID)", ylabel="precision (ID)", title="PR, ID positive")
    roc_ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def sweep_figure(runs: Sequence[Mapping[str, Any]], tpr: float) -> Figure | None:
    """Mean FPR and mean AUROC against percentile, one line per (variant, score); None without percentiles."""
    fkey = fpr_key(tpr)
    lines: dict[str, list[tuple[float, float, float]]] = {}
    for run in runs:
        percentile = get_shaping(run["shaping"]).percentile
        if percentile is not None:
            label = f"{get_shaping(run['shaping']).name} + {run['score']}"
            lines.setdefault(label, []).append((percentile, run["mean"][fkey], run["mean"]["auroc"]))
    if not lines:
        return None
    fig, (fpr_ax, auroc_ax) = plt.subplots(1, 2, figsize=(10, 4.2))
    for label, points in sorted(lines.items()):
        p, fpr, auroc = zip(*sorted(points))
        fpr_ax.plot(p, 100 * np.array(fpr), marker="o", label=label)
        auroc_ax.plot(p, 100 * np.array(auroc), marker="o", label=label)
    fpr_ax.set(xlabel="percentile p", ylabel=f"mean {fkey.upper()} (%) ↓", title=f"mean {fkey.upper()}")
    auroc_ax.set(xlabel="percentile p", ylabel="mean AUROC (%) ↑", title="mean AUROC")
    fpr_ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
