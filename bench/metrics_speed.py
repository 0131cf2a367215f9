"""Benchmark: ``ood_metrics`` vs scikit-learn on 1M ID + 1M OOD float32 scores.

The scikit-learn baseline is what an evaluation script calls for the same four numbers:
``roc_curve`` (for FPR@95%TPR) + ``roc_auc_score`` + two ``average_precision_score`` calls.
Reports the median of a few timed repeats after one warm-up, the ratio ours / scikit-learn
(target: <= 1.0), and whether the values agree to 1e-9.

Run: ``PYTHONPATH=. python bench/metrics_speed.py``
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from ash_lightning.evaluation.metrics import ood_metrics

N = 1_000_000
REPEATS = 3
TOL = 1e-9


def sklearn_metrics(id_scores: np.ndarray, ood_scores: np.ndarray, tpr: float = 0.95) -> dict[str, float]:
    """The same four metrics ("paper" convention, ID positive) from scikit-learn."""
    scores = np.concatenate((id_scores, ood_scores))
    labels = np.concatenate((np.ones(id_scores.size), np.zeros(ood_scores.size)))
    fprs, tprs, _ = roc_curve(labels, scores)
    return {
        "fpr95": float(fprs[np.argmax(tprs >= tpr)]),
        "auroc": float(roc_auc_score(labels, scores)),
        "aupr_in": float(average_precision_score(labels, scores)),
        "aupr_out": float(average_precision_score(1 - labels, -scores)),
    }


def median_time(fn: Callable[[], dict[str, float]]) -> tuple[float, dict[str, float]]:
    """Median wall time of ``REPEATS`` calls after one warm-up call, and the last result."""
    result = fn()
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> None:
    rng = np.random.default_rng(0)
    id_scores = rng.normal(1.0, 1.0, N).astype(np.float32)
    ood_scores = rng.normal(0.0, 1.0, N).astype(np.float32)

    ours_s, ours = median_time(lambda: ood_metrics(id_scores, ood_scores))
    sk_s, ref = median_time(lambda: sklearn_metrics(id_scores, ood_scores))
    ratio = ours_s / sk_s
    max_diff = max(abs(ours[key] - ref[key]) for key in ref)

    print(f"scores: {N:,} ID + {N:,} OOD float32; median of {REPEATS} after a warm-up")
    print(f"ood_metrics:                 {ours_s * 1e3:8.1f} ms")
    print(f"sklearn roc_curve+auc+2xAP:  {sk_s * 1e3:8.1f} ms")
    print(f"ratio ours/sklearn: {ratio:.3f}  ({'OK' if ratio <= 1.0 else 'SLOWER'}: ratio <= 1.0 is {ratio <= 1.0})")
    print("ours:    " + ", ".join(f"{key}={value:.12f}" for key, value in ours.items()))
    print("sklearn: " + ", ".join(f"{key}={value:.12f}" for key, value in ref.items()))
    print(f"values agree to {TOL:g}: {max_diff <= TOL} (max abs diff {max_diff:.2e})")


if __name__ == "__main__":
    main()
