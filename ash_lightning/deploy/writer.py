"""``PredictionWriter``: the callback behind ``main.py predict``; it flags each sample of the predict loop at an
operating point and writes the rows (``ash_lightning.deploy.predictions``).

The threshold is ``threshold`` when given, else that of the module's one setting in the run folder ``from_run``
(``ash_lightning.deploy.run_folder``); without either, one UserError names both ways. The module's
``predict_step`` returns ``scores``, ``logits`` and ``index`` per sample (``OODEvalModule`` does).
"""

from __future__ import annotations

import os
from typing import Any

from ash_lightning.deploy.predictions import PredictionRows, write_predictions
from ash_lightning.deploy.run_folder import run_results, run_setting
from ash_lightning.errors import UserError
from ash_lightning.lightning_packages import CALLBACK_BASES

NO_THRESHOLD = (
    "main.py predict needs an operating point, and none was given. Fix: pass --from_run <run folder> (a finished "
    "main.py test run: its selected setting and its threshold), or --predict.threshold <t> (samples scoring "
    "below t are flagged OOD)."
)


class PredictionWriter(*CALLBACK_BASES):  # type: ignore[misc]  # the Callback of every installed package
    """Flag the predict loop's samples OOD below a threshold; write ``predictions.csv`` and its summary.

    Args:
        threshold: the score below which a sample is OOD (overrides ``from_run``'s).
        from_run: a finished run's folder; its threshold for the module's setting is used.
    """

    def __init__(self, threshold: float | None = None, from_run: str | None = None) -> None:
        self.threshold, self.from_run = threshold, from_run
        self.summary: str | None = None
        self._rows: PredictionRows | None = None
        self._resolved: tuple[float, str] | None = None

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "predict":
            self._resolved = self._operating_point(pl_module)

    def _operating_point(self, pl_module: Any) -> tuple[float, str]:
        if self.threshold is not None:
            return float(self.threshold), "--predict.threshold"
        if self.from_run is None:
            raise UserError(NO_THRESHOLD)
        runs = getattr(pl_module, "runs", [])
        if len(runs) != 1:
            raise UserError(
                f"main.py predict scores one setting, but model.shaping and model.score give {len(runs)}. Fix: "
                "name one shaping and one score (or leave both to the run's selected setting)."
            )
        setting = run_setting(run_results(self.from_run), runs[0]["shaping"], runs[0]["score"])
        return float(setting.threshold["value"]), setting.source(self.from_run)

    def on_predict_start(self, trainer: Any, pl_module: Any) -> None:
        self.summary, self._rows = None, PredictionRows()

    def on_predict_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if self._rows is not None:
            self._rows.update(outputs["index"].cpu(), outputs["scores"].cpu(), outputs["logits"].cpu())

    def on_predict_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if self._rows is None or self._resolved is None:
            return
        rows = self._rows.compute()  # collective under DDP
        directory = os.path.abspath(trainer.log_dir or trainer.default_root_dir)  # collective
        if trainer.is_global_zero:
            source = getattr(trainer.datamodule, "predict_source", None)
            paths = getattr(source, "paths", None)
            self.summary = write_predictions(rows, paths, *self._resolved, directory)
        self._rows = None

    def state_dict(self) -> dict[str, Any]:
        """The summary of the last prediction (None before one)."""
        return {"summary": self.summary}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""
        self.summary = state_dict.get("summary")
