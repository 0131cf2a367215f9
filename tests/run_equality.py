"""What two evaluations of the same data must share when only the order of float32 arithmetic differs between
them (1 vs 2 DDP processes, thread counts, batch composition, CPU vs GPU).

Exact: the sample sets, their counts, order and labels. Up to float32 rounding: the scores. Exact, or within a
bound explained by that rounding: the metrics.

The score tolerance. Every score column here is a short chain of float32 sums (convolutions of up to
3x3x64 = 576 terms, pooling, the classifier, logsumexp, distances) whose terms are no larger than the column's
largest magnitude ``M``: ViM's score is energy minus the virtual logit, two terms of order ``M`` whose difference
can be 100x smaller, which is why a tolerance relative to each score (``rtol`` on ``|s|``) is wrong there. A sum
of n float32 terms computed in another order differs by at most ``n * u * M`` (u = 2**-24, about 6e-8), so one
576-term reduction moves a score by at most 3.4e-5 M. Measured: at most 5e-7 M on the tiny model. The bound used,
``SCORE_RTOL * M`` with SCORE_RTOL = 1e-4, leaves a factor of 3 for the chain of layers and stays 1000x below
what a real fault changes (a padded duplicate or a lost sample changes the exact sample sets; a wrong shaping
changes scores by percents).

The metrics. FPR@TPR, AUROC and AUPR are functions of how ID and OOD scores compare (which is larger, or tied).
Where no (ID, OOD) pair compares differently in the two runs the metrics must be equal. A pair may compare
differently only when its two scores lie within twice the score tolerance (a float32 near-tie). Each such pair
moves AUROC by at most 1 / (n_id * n_ood). A threshold metric (FPR, a precision at a recall) moves by at most one
sample per sample taking part in such pairs, so those move by at most (samples in flipped pairs) / (set size).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ash_lightning.evaluation.score_store import load_scores

SCORE_RTOL = 1e-4


def _score_tolerance(scores: np.ndarray) -> np.ndarray:
    """Per column: SCORE_RTOL times the column's largest magnitude (see the module docstring)."""
    return SCORE_RTOL * np.abs(scores).max(axis=0)


def _flipped_pairs(id_a: np.ndarray, ood_a: np.ndarray, id_b: np.ndarray, ood_b: np.ndarray) -> np.ndarray:
    """Boolean (n_id, n_ood): the pairs whose comparison (>, =, <) differs between run a and run b."""
    return np.sign(id_a[:, None] - ood_a[None, :]) != np.sign(id_b[:, None] - ood_b[None, :])


def assert_same_evaluation(run_a: Path, run_b: Path, id_name: str = "id") -> None:
    """Assert that two run directories hold the same evaluation (module docstring: exact sets, scores to float32
    rounding, metrics equal or within the near-tie bound)."""
    store_a, _ = load_scores(str(run_a))
    store_b, _ = load_scores(str(run_b))
    assert store_a.keys() == store_b.keys()
    for name in store_a:
        for field in ("index", "targets"):
            np.testing.assert_array_equal(store_a[name][field], store_b[name][field], err_msg=f"{name}/{field}")
        assert store_a[name]["scores"].shape == store_b[name]["scores"].shape
    tolerance = _score_tolerance(np.concatenate([arrays["scores"] for arrays in store_a.values()]))
    for name in store_a:
        difference = np.abs(store_a[name]["scores"] - store_b[name]["scores"])
        assert (difference <= tolerance).all(), f"{name}: score differences {difference.max(axis=0)} > {tolerance}"

    results_a = json.loads((run_a / "ood_results.json").read_text())
    results_b = json.loads((run_b / "ood_results.json").read_text())
    assert [(r["shaping"], r["score"]) for r in results_a["runs"]] == [
        (r["shaping"], r["score"]) for r in results_b["runs"]
    ]
    csid = results_a.get("csid_sets", [])
    assert csid == results_b.get("csid_sets", [])
    for column, (run_result_a, run_result_b) in enumerate(zip(results_a["runs"], results_b["runs"], strict=True)):
        assert run_result_a["id_accuracy"] == run_result_b["id_accuracy"]
        # the standard results (ID = the ID test set) and, with csid sets, the full-spectrum ones (ID = both)
        parts = [(run_result_a, run_result_b, [id_name])]
        if csid:
            parts.append((run_result_a["fsood"], run_result_b["fsood"], [id_name, *csid]))
            assert run_result_a["fsood"]["accuracy"] == run_result_b["fsood"]["accuracy"]
            assert run_result_a["fsood"]["csid_accuracy"] == run_result_b["fsood"]["csid_accuracy"]
        for part_a, part_b, id_names in parts:
            id_a, id_b = (np.concatenate([s[n]["scores"][:, column] for n in id_names]) for s in (store_a, store_b))
            _assert_same_metrics(part_a, part_b, id_a, id_b, store_a, store_b, column, tolerance[column])


def _assert_same_metrics(
    part_a: dict,
    part_b: dict,
    id_a: np.ndarray,
    id_b: np.ndarray,
    store_a: dict,
    store_b: dict,
    column: int,
    tolerance: float,
) -> None:
    """Per OOD set of two results (``ood`` and ``mean`` of a run, or of its ``fsood``) with ID scores ``id_a`` and
    ``id_b``: equal metrics where no pair flipped, else within the near-tie bound (module docstring)."""
    any_flip = False
    for ood_name, metrics_a in part_a["ood"].items():
        metrics_b = part_b["ood"][ood_name]
        ood_a, ood_b = store_a[ood_name]["scores"][:, column], store_b[ood_name]["scores"][:, column]
        flipped = _flipped_pairs(id_a, ood_a, id_b, ood_b)
        near_tie = np.abs(id_a[:, None] - ood_a[None, :]) <= 2 * tolerance
        assert not (flipped & ~near_tie).any(), f"{ood_name}, run {column}: a pair far apart changed order"
        if not flipped.any():
            assert metrics_a == metrics_b, (ood_name, column)
            continue
        any_flip = True
        n_id, n_ood = flipped.shape
        assert abs(metrics_a["auroc"] - metrics_b["auroc"]) <= flipped.sum() / (n_id * n_ood)
        moved = flipped.any(axis=1).sum() + flipped.any(axis=0).sum()
        for key in ("fpr95", "aupr_in", "aupr_out"):
            assert abs(metrics_a[key] - metrics_b[key]) <= moved / min(n_id, n_ood), (ood_name, column, key)
    if not any_flip:
        assert part_a["mean"] == part_b["mean"]
