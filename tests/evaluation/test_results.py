"""``compute_results``: the operating point (threshold) of every run, on the ID test set and on ``val_id``."""

from __future__ import annotations

import numpy as np

from ash_lightning.evaluation.metrics import fpr_key, threshold_at_tpr
from ash_lightning.evaluation.results import compute_results

LOADERS = [
    {"name": "cifar", "role": "id"},
    {"name": "far", "role": "ood"},
    {"name": "val_id", "role": "val_id"},
    {"name": "val_far", "role": "val_ood"},
]
RUNS = [{"shaping": "none", "score": "energy"}, {"shaping": "ash_s@90", "score": "energy"}]


def _set(rng: np.random.Generator, n: int, shift: float) -> dict[str, np.ndarray]:
    scores = np.round(rng.normal(shift, 1.0, size=(n, 2)), 1)  # rounded: many ties
    return {"scores": scores, "index": np.arange(n), "targets": np.full(n, -1), "preds": np.zeros((n, 2), np.int64)}


def test_every_run_records_its_threshold_on_id_test_and_val_id_and_the_selected_one_carries_val_id() -> None:
    rng = np.random.default_rng(0)
    store = {"cifar": _set(rng, 60, 1.0), "far": _set(rng, 50, 0.0), "val_id": _set(rng, 30, 1.0)}
    store["val_far"] = _set(rng, 20, 0.0)
    results = compute_results(store, LOADERS, RUNS, tpr=0.9)
    for r, run in enumerate(results["runs"]):
        t = threshold_at_tpr(store["cifar"]["scores"][:, r], 0.9)
        assert run["threshold"] == {"value": t, "tpr": 0.9, "set": "cifar"}
        assert run["ood"]["far"][fpr_key(0.9)] == np.mean(store["far"]["scores"][:, r] >= t)
        val_t = threshold_at_tpr(store["val_id"]["scores"][:, r], 0.9)
        assert run["validation"]["threshold"] == {"value": val_t, "tpr": 0.9, "set": "val_id"}
    selected = results["selected"]
    assert selected["threshold"] == results["runs"][selected["run"]]["validation"]["threshold"]
    no_validation = compute_results(store, LOADERS[:2], RUNS, tpr=0.9)
    assert "selected" not in no_validation and "validation" not in no_validation["runs"][0]
    assert no_validation["runs"][1]["threshold"] == results["runs"][1]["threshold"]
