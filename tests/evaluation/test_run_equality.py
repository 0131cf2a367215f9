"""``tests/run_equality.py`` accepts float32 reordering noise and rejects what a DDP fault changes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ash_lightning.evaluation.results import compute_results
from ash_lightning.evaluation.score_store import save_scores
from tests.run_equality import SCORE_RTOL, assert_same_evaluation

LOADERS = [{"name": "id", "role": "id"}, {"name": "far", "role": "ood"}]
RUNS = [{"shaping": "none", "score": "energy"}]


def _write_run(directory: Path, id_scores: np.ndarray, ood_scores: np.ndarray) -> Path:
    store = {
        name: {
            "scores": scores[:, None].astype(np.float32),
            "targets": np.zeros(len(scores), dtype=np.int64),
            "index": np.arange(len(scores)),
        }
        for name, scores in (("id", id_scores), ("far", ood_scores))
    }
    directory.mkdir()
    save_scores(
        str(directory / "scores.npz"), store, {"runs": RUNS, "loaders": LOADERS, "tpr": 0.95, "convention": "paper"}
    )
    (directory / "ood_results.json").write_text(json.dumps(compute_results(store, LOADERS, RUNS)))
    return directory


@pytest.fixture
def scores() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.normal(10, 1, 50), rng.normal(8, 1, 40)


def test_rounding_noise_and_near_tie_flips_pass(tmp_path: Path, scores) -> None:
    id_scores, ood_scores = scores
    ood_scores[0] = id_scores[0] - 1e-5  # a near-tie that the other run may order the other way
    noisy_id = id_scores + SCORE_RTOL * 0.1 * np.abs(id_scores).max()
    noisy_id[0] = ood_scores[0] - 1e-5
    assert_same_evaluation(
        _write_run(tmp_path / "a", id_scores, ood_scores), _write_run(tmp_path / "b", noisy_id, ood_scores)
    )


def test_score_beyond_rounding_fails(tmp_path: Path, scores) -> None:
    id_scores, ood_scores = scores
    shifted = id_scores.copy()
    shifted[3] += 10 * SCORE_RTOL * np.abs(id_scores).max()
    with pytest.raises(AssertionError, match="score differences"):
        assert_same_evaluation(
            _write_run(tmp_path / "a", id_scores, ood_scores), _write_run(tmp_path / "b", shifted, ood_scores)
        )


def test_duplicated_sample_fails(tmp_path: Path, scores) -> None:
    id_scores, ood_scores = scores
    padded = np.concatenate([id_scores, id_scores[:1]])
    with pytest.raises(AssertionError):
        assert_same_evaluation(
            _write_run(tmp_path / "a", id_scores, ood_scores), _write_run(tmp_path / "b", padded, ood_scores)
        )
