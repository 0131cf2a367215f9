"""What a finished run's folder says about deploying one of its settings: its config and, per setting, the
operating point (threshold) that ``evaluation.results`` recorded.

The setting is the one selected on validation data, else the best ranked (the only one for a single run), unless
a shaping and/or score names another of the run's settings. Its threshold is the one on ``val_id`` when the run
had validation sets, else the one on the ID test set. A run whose ``ood_results.json`` lacks thresholds (written
before they were recorded) or is missing (an interrupted run) has them recomputed from ``scores.npz``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ash_lightning.detectors.scoring import resolve_score, score_name
from ash_lightning.errors import UserError
from ash_lightning.evaluation.results import results_from_store
from ash_lightning.evaluation.score_store import load_scores
from ash_lightning.shaping.specs import get_shaping


@dataclass(frozen=True)
class RunSetting:
    """One setting of a run: its ``shaping`` and ``score`` specs and its ``threshold`` entry (``value``, ``tpr``,
    ``set``; see ``evaluation.results.threshold_entry``)."""

    shaping: str
    score: str
    threshold: dict[str, Any]

    def source(self, run_dir: str | os.PathLike[str]) -> str:
        """Where the threshold comes from, in words."""
        t = self.threshold
        return f"run {run_dir}: TPR {t['tpr']:g} on its {t['set']!r} set ({self.shaping} + {self.score})"


def run_results(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The run's results with a threshold for every setting (see the module docstring)."""
    folder = Path(run_dir)
    if not folder.is_dir():
        raise UserError(f"run folder {str(run_dir)!r} does not exist. Fix: pass the log folder of a finished run.")
    path = folder / "ood_results.json"
    if path.is_file():
        results: dict[str, Any] = json.loads(path.read_text())
        if all("threshold" in run for run in results["runs"]):
            return results
    if not (folder / "scores.npz").is_file():
        raise UserError(
            f"{str(run_dir)!r} holds neither ood_results.json nor scores.npz. Fix: pass the log folder of a "
            "finished main.py test run (or of a run with OODMetricsCallback)."
        )
    store, meta = load_scores(str(folder))
    return results_from_store(store, meta)


def run_config(run_dir: str | os.PathLike[str], results: dict[str, Any]) -> dict[str, Any]:
    """The run's ``config.yaml`` (written by ``main.py``'s LightningCLI), else the config its results recorded."""
    path = Path(run_dir) / "config.yaml"
    if path.is_file():
        config: dict[str, Any] = yaml.safe_load(path.read_text())
        return config
    return dict(results.get("config") or {})


def _normalised(spec: str | None, parse: Any, what: str) -> str | None:
    try:
        return None if spec is None else parse(spec)
    except ValueError as err:
        raise UserError(f"{what}: {err}") from err


def run_setting(results: dict[str, Any], shaping: str | None = None, score: str | None = None) -> RunSetting:
    """The setting to deploy (see the module docstring); ``shaping``/``score`` pick another of the run's settings
    (either may be left out: the chosen one's is kept). A UserError lists the settings when none matches."""
    runs = results["runs"]
    chosen = runs[results["selected"]["run"] if "selected" in results else results["ranking"][0]]
    want_shaping = _normalised(shaping, lambda s: get_shaping(s).spec, "model.shaping") or chosen["shaping"]
    want_score = _normalised(score, lambda s: score_name(resolve_score(s)), "model.score") or chosen["score"]
    match = [run for run in runs if (run["shaping"], run["score"]) == (want_shaping, want_score)]
    if not match:
        settings = ", ".join(f"{run['shaping']} + {run['score']}" for run in runs)
        raise UserError(
            f"the run has no setting {want_shaping} + {want_score}, so no threshold for it. Fix: pick one of its "
            f"settings ({settings}) with --model.shaping/--model.score, or give --predict.threshold."
        )
    run = match[0]
    threshold = run["validation"]["threshold"] if "validation" in run else run["threshold"]
    return RunSetting(run["shaping"], run["score"], dict(threshold))
