"""``OODMetricsCallback``: OOD metrics over a multi-dataloader test loop, on one device or many.

Dataloader ``id_dataloader_idx`` is the ID set, every other one an OOD set (or, with ``OODDataModule``, the
roles it declares). Per-sample scores are gathered from all ranks after each dataloader's last batch,
de-duplicated by sample index (DistributedSampler pads shards with repeats) and saved to ``scores.npz`` at once,
so a failure or interruption on a later set loses nothing (``main.py report`` recomputes the metrics). A
sample whose logits or scores are NaN/Inf stops the run (``nonfinite="raise"``) or is dropped and counted
(``"drop"``). At the end: metrics per OOD set, their mean and group means, ID accuracy; scalars to every
logger, histograms and figures to TensorBoard (either Lightning package's logger), ``ood_results.json``/``.csv``,
``curves.png`` (and ``sweep.png`` for sweeps) and a Markdown table. Files go to ``output_dir``, else the logger's
log directory, else (no logger) ``trainer.default_root_dir``, whose path is logged. Messages go through
Lightning's ``rank_zero_info``/``rank_zero_warn``; with ``verbose`` (the default) the results table is logged at the
end (``main.py test`` prints it itself, from ``summary``).

Accumulation, gathering from all ranks and de-duplication by index are ``OODMetrics``' (one per dataloader, its
``samples()`` once the set is finished); this callback decides which loader is which set, when a set is finished,
what is kept (corrupt files, non-finite samples), saved and logged.

Works with any LightningModule whose ``test_step`` returns logits or a dict holding ``logits`` and/or ``scores``
(and optionally ``preds``, ``targets``, ``index``). Labels and sample indices are otherwise read from the batch
(``ash_lightning.data.batches``: ``(x, y, index)`` tuples or dicts with keys such as ``image``/``label``); when the ID
set's labels cannot be read, a warning says so once and ``id_accuracy`` is None. Scores returned by ``test_step``
are labelled "scores from test_step" unless the module declares ``runs``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, TypeAlias

import torch
from torch import Tensor

from ash_lightning._files import writable_directory
from ash_lightning._options import check_convention, check_tpr
from ash_lightning.callbacks.activation_shaping import ActivationShapingCallback
from ash_lightning.callbacks.detector_features import CapturedFeatureScore
from ash_lightning.data.batches import batch_part, describe_batch, expected_layout
from ash_lightning.data.fit_pass import FitData
from ash_lightning.detectors import is_detector_spec
from ash_lightning.errors import UserError
from ash_lightning.evaluation.constant_scores import constant_score_warning
from ash_lightning.evaluation.metrics import OODMetrics
from ash_lightning.evaluation.plots import curves_figure, sweep_figure
from ash_lightning.evaluation.results import (
    format_table,
    results_from_store,
    run_entry,
    stopped_message,
    write_results,
)
from ash_lightning.evaluation.score_store import metadata, save_scores, scores_path
from ash_lightning.evaluation.tensorboard import log_results
from ash_lightning.lightning_packages import CALLBACK_BASES, rank_zero_info, rank_zero_warn, tensorboard_writer
from ash_lightning.scores.specs import get_score
from ash_lightning.shaping.specs import get_shaping

NONFINITE_POLICIES = ("raise", "drop")
STEP_SCORES = "scores from test_step"
Trainer: TypeAlias = Any  # of either Lightning package (see ash_lightning.lightning_packages)
LightningModule: TypeAlias = Any


class OODMetricsCallback(*CALLBACK_BASES):  # type: ignore[misc]  # the Callback of every installed package
    """Accumulate scores per test dataloader and report FPR@TPR, AUROC, AUPR-In/Out per OOD set.

    Args:
        id_dataloader_idx: the ID dataloader when the data module declares no roles.
        ood_names: names of the other dataloaders (default: the data module's, else ``ood1``, ``ood2``...).
        groups: group name -> OOD set names to average (default: the data module's ``groups``).
        score: the score computed from logits when ``test_step`` returns no ``scores``: a logit score
            (``energy``) or a detector (``knn@50``, ``vim@64``; ``odin``/``adascale`` re-run the network on the
            batch's images with gradients, extra passes; see ``detector_features``).
        fit_dataloader: ID fit data for a fitted detector (a DataLoader or a callable returning one; default: the
            data module's ``fit_dataloader()``).
        std: the data transform's per-channel std, for ``odin`` (default: ones); pass your normalisation std so
            eps is in pixel units as in the ODIN code.
        tpr: the TPR of the FPR metric (0.95 -> ``fpr95``); convention: ``"paper"`` or ``"openood"``.
        nonfinite: ``"raise"`` stops on NaN/Inf scores naming the set and count; ``"drop"`` drops those
            samples and records them in the results.
        output_dir: where files go (default: the logger's log directory, else ``trainer.default_root_dir``).
        log_figures: write ``curves.png`` (and ``sweep.png``) and add them to TensorBoard.
        verbose: log the results table and the files written (``rank_zero_info``) at the end; ``summary``
            holds that text either way.

    After testing, ``results`` holds the results (also in ``ood_results.json``) and ``summary`` the table.

    Example:

    Example:
        >>> import tempfile, torch
        >>> import pytorch_lightning as pl
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> from ash_lightning.callbacks import OODMetricsCallback
        >>> class Linear(pl.LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.net = torch.nn.Linear(4, 3)
        ...     def test_step(self, batch, batch_idx, dataloader_idx=0):
        ...         return self.net(batch[0])
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> def loader(shift):  # (x, y, index) batches
        ...     x = torch.randn(32, 4) + shift
        ...     return DataLoader(TensorDataset(x, torch.zeros(32, dtype=torch.long), torch.arange(32)), batch_size=8)
        >>> metrics = OODMetricsCallback(ood_names=["far"], output_dir=tempfile.mkdtemp(), verbose=False)
        >>> trainer = pl.Trainer(logger=False, callbacks=[metrics], enable_progress_bar=False)
        >>> _ = trainer.test(Linear(), dataloaders=[loader(0.0), loader(3.0)], verbose=False)
        >>> sorted(metrics.results["runs"][0]["ood"]["far"])
        ['aupr_in', 'aupr_out', 'auroc', 'fpr95']
        >>> metrics.results["counts"]
        {'id': 32, 'far': 32}
    """

    def __init__(
        self,
        id_dataloader_idx: int = 0,
        ood_names: list[str] | None = None,
        groups: dict[str, list[str]] | None = None,
        score: str = "energy",
        tpr: float = 0.95,
        convention: str = "paper",
        nonfinite: str = "raise",
        output_dir: str | None = None,
        log_figures: bool = True,
        verbose: bool = True,
        fit_dataloader: FitData | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        if nonfinite not in NONFINITE_POLICIES:
            raise UserError(f"nonfinite={nonfinite!r}; use one of {NONFINITE_POLICIES}.")
        self.id_dataloader_idx, self.ood_names, self.groups = id_dataloader_idx, ood_names, groups
        self.score: Any = (
            CapturedFeatureScore(score, fit_dataloader, std=std) if is_detector_spec(score) else get_score(score)
        )
        check_tpr("ood_metrics.tpr", tpr)
        check_convention("ood_metrics.convention", convention)
        self.tpr, self.convention, self.nonfinite = tpr, convention, nonfinite
        self.output_dir, self.log_figures, self.verbose = output_dir, log_figures, verbose
        self.results: dict[str, Any] | None = None
        self.summary: str | None = None
        self._reset()

    def _reset(self) -> None:
        self._sets: list[OODMetrics] = []
        self._seen: dict[int, int] = {}
        self._store: dict[str, dict[str, Any]] = {}
        self._skipped: dict[str, list[str]] = {}
        self._dropped: dict[str, int] = {}
        self._current: int | None = None
        self._loaders: list[dict[str, str]] = []
        self._runs: list[dict[str, Any]] = []
        self._warned_no_index = self._warned_no_labels = self._module_runs = False
        self._directory = ""

    # ------------------------------------------------------------------ hooks
    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._reset()
        self.results = self.summary = None
        if isinstance(self.score, CapturedFeatureScore):
            self.score.start(trainer, pl_module)
        self._loaders = self._resolve_loaders(trainer)
        self._sets = [OODMetrics(self.tpr, self.convention) for _ in self._loaders]
        self._runs = self._resolve_runs(trainer, pl_module)
        self._directory = os.path.abspath(self.output_dir or trainer.log_dir or trainer.default_root_dir)  # collective
        writable_directory(self._directory, "ood_metrics.output_dir" if self.output_dir else "the logger's save_dir")
        if not trainer.loggers and not self.output_dir:
            rank_zero_info(
                f"OODMetricsCallback: no logger, so the results go to trainer.default_root_dir: {self._directory}"
            )

    def on_test_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Add the batch to its set; a set is finished (saved) after its dataloader's last batch, or, for
        loaders of unknown length, when the next dataloader starts."""
        if self._current is not None and dataloader_idx != self._current:
            self._finish_unfinished(trainer, self._current)
        rows = self._parse(outputs, batch, trainer, dataloader_idx)
        if self._current is None and (warning := constant_score_warning(rows["scores"], self._runs)):
            rank_zero_warn(warning)
        self._current = dataloader_idx
        self._seen[dataloader_idx] = self._seen.get(dataloader_idx, 0) + len(rows["scores"])
        self._sets[dataloader_idx].update(is_id=self._loaders[dataloader_idx]["role"].endswith("id"), **rows)
        if batch_idx + 1 == _num_batches(trainer, dataloader_idx):
            self._finish_loader(trainer, dataloader_idx)

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for idx in range(len(self._loaders)):
            self._finish_unfinished(trainer, idx)
        self.results = results = results_from_store(self._store, self._meta(trainer, pl_module))
        if trainer.is_global_zero:
            self._report(trainer, results)

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if isinstance(self.score, CapturedFeatureScore):
            self.score.stop()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self.on_test_end(trainer, pl_module)
        if self._loaders:
            rank_zero_info(
                "\n" + stopped_message(exception.__class__.__name__, list(self._store), self._loaders, self._directory)
            )

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The results of the last test (None before one), so that a checkpoint keeps them."""
        return {"results": self.results}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""
        self.results = state_dict.get("results")

    # ------------------------------------------------------------------ sets and samples
    def _resolve_loaders(self, trainer: Trainer) -> list[dict[str, str]]:
        declared = getattr(trainer.datamodule, "loaders", None)
        if declared:
            return [{"name": info.name, "role": info.role} for info in declared]
        count = len(trainer.test_dataloaders) if isinstance(trainer.test_dataloaders, Sequence) else 1
        others = list(self.ood_names or [f"ood{i}" for i in range(1, count)])
        if len(others) != count - 1:
            raise UserError(f"ood_names has {len(others)} names for {count - 1} OOD dataloaders.")
        return [
            {"name": "id", "role": "id"} if i == self.id_dataloader_idx else {"name": others.pop(0), "role": "ood"}
            for i in range(count)
        ]

    def _resolve_runs(self, trainer: Trainer, pl_module: LightningModule) -> list[dict[str, Any]]:
        runs = getattr(pl_module, "runs", None)
        self._module_runs = bool(runs)
        if runs:
            return [dict(r) for r in runs]
        shapers = [cb.shaper for cb in trainer.callbacks if isinstance(cb, ActivationShapingCallback)]
        return [run_entry(shapers[0] if shapers else get_shaping("none"), self.score.name)]

    def _parse(self, outputs: Any, batch: Any, trainer: Trainer, dataloader_idx: int) -> dict[str, Tensor]:
        """The ``OODMetrics.update`` columns of a batch: scores (B, R), finite (of the logits and scores), targets
        (-1 when unknown), preds when known, index (synthesised when the batches carry none)."""
        out = {"logits": outputs} if isinstance(outputs, Tensor) else dict(outputs or {})
        logits, scores = out.get("logits"), out.get("scores")
        if logits is None and scores is None:
            raise UserError(
                "OODMetricsCallback needs test_step to return logits (a tensor) or a dict holding "
                "'logits' and/or 'scores'. Fix: `return self(x)` at the end of test_step."
            )
        if scores is None:
            assert logits is not None  # one of the two is set (checked above)
            scores = self.score(logits, batch) if isinstance(self.score, CapturedFeatureScore) else self.score(logits)
        elif not self._module_runs:
            self._runs = [{**run, "score": STEP_SCORES} for run in self._runs]
        scores = scores.reshape(len(scores), -1)
        preds = out.get("preds")
        if preds is None and logits is not None and logits.ndim == 2:
            preds = logits.argmax(-1)
        finite = torch.isfinite(scores).all(dim=1)
        if logits is not None:
            finite &= torch.isfinite(logits.reshape(len(logits), -1)).all(dim=1)
        rows = {"scores": scores, "finite": finite}
        if preds is not None:
            rows["preds"] = preds.reshape(len(preds), -1).expand(-1, scores.shape[1])
        targets = out["targets"] if out.get("targets") is not None else batch_part(batch, "labels")
        if targets is None:
            self._warn_no_labels(batch, dataloader_idx)
        rows["targets"] = targets if targets is not None else torch.full((len(scores),), -1)
        index = out["index"] if out.get("index") is not None else batch_part(batch, "index")
        if index is None:
            if trainer.world_size > 1 and not self._warned_no_index:
                rank_zero_warn(
                    "batches carry no sample index, so samples that DistributedSampler repeats to pad "
                    "shards are counted twice. Fix: yield (x, y, index) batches (OODDataModule does)."
                )
                self._warned_no_index = True
            start = self._seen.get(dataloader_idx, 0)
            index = torch.arange(start, start + len(scores)) * trainer.world_size + trainer.global_rank
        rows["index"] = index
        return {k: v.detach().to("cpu", non_blocking=False) for k, v in rows.items()}

    def _warn_no_labels(self, batch: Any, dataloader_idx: int) -> None:
        """Warn once when a batch of the ID set carries no labels that can be read."""
        if self._warned_no_labels or self._loaders[dataloader_idx]["role"] != "id":
            return
        rank_zero_warn(
            f"OODMetricsCallback cannot read labels from the ID set's batches ({describe_batch(batch)}), "
            "so id_accuracy is not computed. Fix: return 'targets' from test_step, or give the labels "
            f"as {expected_layout('labels')}."
        )
        self._warned_no_labels = True

    def _finish_unfinished(self, trainer: Trainer, idx: int) -> None:
        """``_finish_loader(idx)`` unless that set is finished already."""
        if self._loaders[idx]["name"] not in self._store:
            self._finish_loader(trainer, idx)

    def _finish_loader(self, trainer: Trainer, idx: int) -> None:
        """Take one set's samples (all ranks', each once) from its ``OODMetrics``, drop skipped corrupt files
        (negative index), apply the ``nonfinite`` policy, save to disk. A UserError if no sample is left."""
        name = self._loaders[idx]["name"]
        rows = self._sets[idx].samples()  # collective
        self._sets[idx].reset()
        if not rows:
            raise UserError(
                f"data set {name!r} produced no samples. Fix: check that it is not empty and that "
                "limit_test_batches does not skip it."
            )
        del rows["is_id"]
        corrupt = rows["index"] < 0
        if corrupt.any():
            bad = sorted((-rows["index"][corrupt] - 1).tolist())
            datamodule = trainer.datamodule
            self._skipped[name] = (
                datamodule.sample_paths(name, bad) if hasattr(datamodule, "sample_paths") else [str(i) for i in bad]
            )
            rows = {k: v[~corrupt] for k, v in rows.items()}
        finite = rows.pop("finite")
        if not finite.all():
            count = int((~finite).sum())
            if self.nonfinite == "raise":
                raise UserError(
                    f"{count} of {len(finite)} samples of data set {name!r} have non-finite (NaN/Inf) "
                    "logits or scores. Fix: check the model and data (e.g. fp16 overflow), or set "
                    "ood_metrics.nonfinite: drop to drop and record them."
                )
            self._dropped[name] = count
            rows = {k: v[finite] for k, v in rows.items()}
        if not len(rows["index"]):
            raise UserError(
                f"data set {name!r} has no sample left to evaluate: {len(self._skipped.get(name, []))} "
                f"corrupt files skipped, {self._dropped.get(name, 0)} non-finite samples dropped. "
                "Fix: check the data set and the model."
            )
        self._store[name] = {k: v.numpy() for k, v in rows.items()}
        if trainer.is_global_zero:
            save_scores(scores_path(self._out()), self._store, self._meta(trainer, None))

    # ------------------------------------------------------------------ output
    def _out(self) -> str:
        os.makedirs(self._directory, exist_ok=True)
        return self._directory

    def _meta(self, trainer: Trainer, pl_module: LightningModule | None) -> dict[str, Any]:
        datamodule = trainer.datamodule
        groups = self.groups if self.groups is not None else getattr(datamodule, "groups", None)
        config = {
            "trainer": {
                "world_size": trainer.world_size,
                "strategy": type(trainer.strategy).__name__,
                "precision": str(trainer.precision),
            },
            "callback": {"tpr": self.tpr, "convention": self.convention, "nonfinite": self.nonfinite},
        }
        for key, obj in (("model", pl_module or trainer.lightning_module), ("data", datamodule)):
            if getattr(obj, "hparams", None):
                config[key] = dict(obj.hparams)
        return metadata(
            runs=self._runs,
            loaders=self._loaders,
            tpr=self.tpr,
            convention=self.convention,
            groups=groups or {},
            skipped=self._skipped,
            dropped_nonfinite=self._dropped,
            config=config,
        )

    def _report(self, trainer: Trainer, results: dict[str, Any]) -> None:
        directory = self._out()
        json_path, csv_path = write_results(results, directory)
        self._log(trainer, results)
        scores = scores_path(directory)
        self.summary = f"{format_table(results)}\n\nResults: {json_path}, {csv_path}; scores: {scores}"
        if self.verbose:
            rank_zero_info("\n" + self.summary)

    def _log(self, trainer: Trainer, results: Mapping[str, Any]) -> None:
        single = len(results["runs"]) == 1
        scalars = {}
        for run in results["runs"]:
            prefix = "" if single else f"{run['shaping']}|{run['score']}/"
            sets = {**run["ood"], "mean": run["mean"], **{f"group_{g}": m for g, m in run["groups"].items()}}
            scalars.update({f"{prefix}ood/{s}/{k}": v for s, m in sets.items() for k, v in m.items()})
            if run["id_accuracy"] is not None:
                scalars[f"{prefix}id/accuracy"] = run["id_accuracy"]
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=trainer.global_step)
        writer = tensorboard_writer(trainer.loggers)
        id_name = results["id"]
        if writer is not None:
            for r, run in enumerate(results["runs"]):
                prefix = "" if single else f"{run['shaping']}|{run['score']}/"
                for name in [id_name, *results["ood_sets"]]:
                    writer.add_histogram(
                        f"{prefix}scores/{name}", self._store[name]["scores"][:, r], trainer.global_step
                    )
        if self.log_figures:
            best = results["ranking"][0]
            run = results["runs"][best]
            curves = curves_figure(
                self._store[id_name]["scores"][:, best],
                {n: self._store[n]["scores"][:, best] for n in results["ood_sets"]},
                f"{run['shaping']} + {run['score']}",
            )
            sweep = sweep_figure(results["runs"], results["tpr"]) if not single else None
            figures = {"curves/roc_pr": ("curves.png", curves), "sweep/metrics_vs_percentile": ("sweep.png", sweep)}
            for tag, (filename, fig) in figures.items():
                if fig is None:
                    continue
                fig.savefig(os.path.join(self._out(), filename), dpi=120)
                if writer is not None:
                    writer.add_figure(tag, fig, trainer.global_step)
        if writer is not None:
            log_results(writer, results, self._store, trainer.global_step)
            writer.flush()


def _num_batches(trainer: Trainer, dataloader_idx: int) -> float:
    """The number of test batches of dataloader ``dataloader_idx`` (inf when unknown)."""
    counts = trainer.num_test_batches
    return counts[dataloader_idx] if dataloader_idx < len(counts) else float("inf")
