"""``OODMetricsCallback``: OOD metrics over a multi-dataloader test loop, on one device or many.

Dataloader ``id_dataloader_idx`` is the ID set, every other one an OOD set (or, with ``OODDataModule``, the
roles it declares). Per-sample scores are gathered from all ranks after each dataloader's last batch,
de-duplicated by sample index (DistributedSampler pads shards with repeats) and saved to ``scores.npz`` at once,
so a failure or interruption on a later set loses nothing (``main.py report`` recomputes the metrics). A
sample whose logits or scores are NaN/Inf stops the run (``nonfinite="raise"``) or is dropped and counted
(``"drop"``). At the end: metrics per OOD set, their mean and group means, ID accuracy; scalars to every
logger, histograms and figures to TensorBoard (either Lightning package's logger), ``ood_results.json``/``.csv``,
``curves.png`` (and ``sweep.png`` for sweeps) and a Markdown table. Files go to ``output_dir``, else the logger's
log directory, else (no logger) ``trainer.default_root_dir``, whose path is logged; each is written atomically,
and one that cannot be written (full disk, quota, read-only folder; TensorBoard events too) stops the run with one
UserError naming the folder, the sets saved before staying in ``scores.npz``. Messages go through
Lightning's ``rank_zero_info``/``rank_zero_warn``; with ``verbose`` (the default) the results table is logged at the
end (``main.py test`` prints it itself, from ``summary``).

Accumulation, gathering from all ranks and de-duplication by index are ``OODMetrics``' (one per dataloader, its
``samples()`` once the set is finished); this callback decides which loader is which set, when a set is finished,
what is kept (corrupt files, non-finite samples), saved and logged.

Works with any LightningModule, whatever its ``test_step`` returns (None, a loss, a dict of its own): the logits
are read by a forward hook on the network ``find_network`` finds (``module=`` names it), with no second forward
pass (``ash_lightning.callbacks.capture``). A ``test_step`` that returns logits, or a dict holding ``logits`` and/or
``scores`` (and optionally ``preds``, ``targets``, ``index``), is read as before. Labels and sample indices are
otherwise read from the batch (``ash_lightning.data.batches``: ``(x, y, index)`` tuples or dicts with keys such as
``image``/``label``); when the ID set's labels cannot be read, a warning says so once and ``id_accuracy`` is None.
Scores returned by ``test_step`` are labelled "scores from test_step" unless the module declares ``runs``.

OOD sets come either through the test loop (several test dataloaders and a ``test_step`` with ``dataloader_idx``:
dataloader ``id_dataloader_idx`` is ID, ``ood_names`` names the others) or through ``ood=`` (name -> Dataset,
DataLoader or data spec; ``ash_lightning.callbacks.ood_sets``). The latter keeps the user's test loop to the ID set
alone: when it ends (``on_test_epoch_end``) the callback scores each OOD set itself, through the module's
``forward`` on the batch's images, on the trainer's device and precision, under inference mode, with the shaping
attached as for the ID set, sharded across ranks (each sample once, by index), with a progress bar of the trainer's
kind. They never pass through the user's ``test_step``, so the metrics it logs are the ID set's alone. A sweep
(``ActivationShapingCallback([...])``) is scored from one backbone pass per batch for every setting
(``ash_lightning.callbacks.scoring``). Covariate-shifted ID sets (``csid=``, scored after ``ood=`` the same way, or
role ``csid`` declared by the data module) add the full-spectrum results (``ash_lightning.evaluation.full_spectrum``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ash_lightning._files import writable_directory, write_atomically
from ash_lightning._options import check_convention, check_int, check_tpr
from ash_lightning.callbacks.activation_shaping import ActivationShapingCallback
from ash_lightning.callbacks.brief_errors import show_user_errors_briefly
from ash_lightning.callbacks.capture import NetworkCapture
from ash_lightning.callbacks.network import find_network
from ash_lightning.callbacks.ood_sets import (
    OODSet,
    OODSource,
    described,
    id_test_loader,
    prepare,
    shard_loader,
)
from ash_lightning.callbacks.recorded import recorded
from ash_lightning.callbacks.scoring import RunScorer, Settings
from ash_lightning.data.batches import batch_part, describe_batch, expected_layout
from ash_lightning.data.fit_pass import FitData
from ash_lightning.data.progress import trainer_progress
from ash_lightning.errors import UserError, write_failures_reported
from ash_lightning.evaluation.constant_scores import constant_score_warning
from ash_lightning.evaluation.full_spectrum import full_spectrum_scalars
from ash_lightning.evaluation.metrics import OODMetrics
from ash_lightning.evaluation.plots import curves_figure, sweep_figure
from ash_lightning.evaluation.results import (
    format_table,
    results_from_store,
    stopped_message,
    write_results,
)
from ash_lightning.evaluation.score_store import SCORES_FILE, metadata, save_scores, scores_path
from ash_lightning.evaluation.tensorboard import log_results
from ash_lightning.lightning_packages import CALLBACK_BASES, rank_zero_info, rank_zero_warn, tensorboard_writer

if TYPE_CHECKING:
    from ash_lightning.callbacks.types import LightningModule, Trainer

NONFINITE_POLICIES = ("raise", "drop")
STEP_SCORES = "scores from test_step"


class OODMetricsCallback(*CALLBACK_BASES):  # type: ignore[misc]  # the Callback of every installed package
    """Accumulate scores per data set and report FPR@TPR, AUROC, AUPR-In/Out per OOD set.

    Args:
        ood: OOD set name -> a Dataset, a DataLoader or a data spec (``"npz:path"``, ``{kind: folder, path: ...}``),
            scored by the callback after the user's test loop, which then holds the ID set alone (module
            docstring). Any Mapping works (Hydra's DictConfig, LightningCLI's dicts).
        csid: covariate-shifted ID set name -> a Dataset, a DataLoader or a data spec, scored like ``ood`` after
            it (needs ``ood``): counted as ID in the full-spectrum results (``fsood``), with their accuracy
            (``ash_lightning.evaluation.full_spectrum``). With ``OODDataModule``, ``data.csid`` declares them instead.
        transform: the transform of the images of data specs in ``ood`` (default: the ID test data set's own
            ``transform`` attribute).
        batch_size, num_workers: for the Datasets and specs in ``ood`` (default: the ID test loader's).
        module: the attribute of the LightningModule holding the network whose output is read as the logits
            (default: the ``ActivationShapingCallback``'s, else the first child with a classifier).
        id_dataloader_idx: the ID dataloader when the data module declares no roles.
        ood_names: names of the other test dataloaders (default: the data module's, else ``ood1``, ``ood2``...).
        groups: group name -> OOD set names to average (default: the data module's ``groups``).
        score: a score or a list of them, computed from the logits unless ``test_step`` returns ``scores``: logit
            scores (``energy``) and detectors (``knn@50``, ``vim@64``; ``odin``/``adascale`` re-run the network on
            the batch's images with gradients, extra passes; see ``ash_lightning.callbacks.scoring``).
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
        >>> import tempfile, torch
        >>> import pytorch_lightning as pl
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> from ash_lightning.callbacks import OODMetricsCallback
        >>> class Linear(pl.LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        ...     def forward(self, x):
        ...         return self.net(x)
        ...     def test_step(self, batch, batch_idx):  # returns its loss: the logits come from a hook
        ...         x, y = batch
        ...         return torch.nn.functional.cross_entropy(self(x), y)
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> def data(shift):  # (x, y) samples
        ...     return TensorDataset(torch.randn(32, 4) + shift, torch.zeros(32, dtype=torch.long))
        >>> metrics = OODMetricsCallback(ood={"far": data(3.0)}, output_dir=tempfile.mkdtemp(), verbose=False)
        >>> trainer = pl.Trainer(logger=False, callbacks=[metrics], enable_progress_bar=False)
        >>> _ = trainer.test(Linear(), dataloaders=DataLoader(data(0.0), batch_size=8), verbose=False)
        >>> sorted(metrics.results["runs"][0]["ood"]["far"])
        ['aupr_in', 'aupr_out', 'auroc', 'fpr95']
        >>> metrics.results["counts"]
        {'id': 32, 'far': 32}
    """

    def __init__(
        self,
        ood: Mapping[str, OODSet] | None = None,
        transform: Callable[[Any], Any] | None = None,
        batch_size: int | None = None,
        num_workers: int | None = None,
        module: str | None = None,
        id_dataloader_idx: int = 0,
        ood_names: Sequence[str] | None = None,
        groups: Mapping[str, Sequence[str]] | None = None,
        score: str | Sequence[str] = "energy",
        tpr: float = 0.95,
        convention: str = "paper",
        nonfinite: str = "raise",
        output_dir: str | None = None,
        log_figures: bool = True,
        verbose: bool = True,
        fit_dataloader: FitData | None = None,
        std: Sequence[float] | None = None,
        csid: Mapping[str, OODSet] | None = None,
    ) -> None:
        if nonfinite not in NONFINITE_POLICIES:
            raise UserError(f"nonfinite={nonfinite!r}; use one of {NONFINITE_POLICIES}.")
        self.ood: dict[str, OODSet] = {str(name): value for name, value in (ood or {}).items()}
        if ood is not None and not self.ood:
            raise UserError("OODMetricsCallback(ood={}) names no OOD set. Fix: e.g. ood={'noise': <a Dataset>}.")
        self.csid: dict[str, OODSet] = {str(name): value for name, value in (csid or {}).items()}
        _check_csid(self.ood, self.csid)
        self.transform, self.module = transform, module
        if batch_size is not None:
            check_int("ood_metrics.batch_size", batch_size, 1, example=64)
        if num_workers is not None:
            check_int("ood_metrics.num_workers", num_workers, 0, example=4)
        self.batch_size, self.num_workers = batch_size, num_workers
        self.id_dataloader_idx = id_dataloader_idx
        self.ood_names = None if ood_names is None else [str(name) for name in ood_names]
        self.groups = None if groups is None else {str(g): [str(n) for n in members] for g, members in groups.items()}
        if self.ood and self.groups:
            unknown = sorted({n for members in self.groups.values() for n in members} - set(self.ood))
            if unknown:
                raise UserError(
                    f"OODMetricsCallback(groups=...) names unknown OOD sets {unknown}; ood has {list(self.ood)}."
                )
        self.scorer = RunScorer([score] if isinstance(score, str) else list(score), fit_dataloader, std)
        check_tpr("ood_metrics.tpr", tpr)
        check_convention("ood_metrics.convention", convention)
        self.tpr, self.convention, self.nonfinite = tpr, convention, nonfinite
        self.output_dir, self.log_figures, self.verbose = output_dir, log_figures, verbose
        self.results: dict[str, Any] | None = None
        self.summary: str | None = None
        self._capture: NetworkCapture | None = None
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
        self._settings: Settings | None = None
        self._channels: int | None = None
        self._ood_sources: list[OODSource] = []
        self._warned_no_index = self._warned_no_labels = self._module_runs = False
        self._directory = ""
        self._saved: list[str] = []  # the sets whose scores are on disk

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        show_user_errors_briefly()

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._reset()
        self.results = self.summary = None
        self._loaders = self._resolve_loaders(trainer)
        self._sets = [OODMetrics(self.tpr, self.convention) for _ in self._loaders]
        self._runs = self._resolve_runs(trainer, pl_module)
        id_loader = id_test_loader(trainer)
        self._ood_sources = [
            prepare(name, value, self.transform, id_loader, role)
            for role, sets in self._own_sets().items()
            for name, value in sets.items()
        ]
        if not self._module_runs:
            network = find_network(pl_module, self._network_name(trainer), "OODMetricsCallback")
            self.scorer.check(trainer, network)
            self._remove_capture()
            self._capture = NetworkCapture(network)
        self._directory = os.path.abspath(self.output_dir or trainer.log_dir or trainer.default_root_dir)  # collective
        writable_directory(self._directory, "ood_metrics.output_dir" if self.output_dir else "the logger's save_dir")
        if not trainer.loggers and not self.output_dir:
            rank_zero_info(
                f"OODMetricsCallback: no logger, so the results go to trainer.default_root_dir: {self._directory}"
            )

    def on_test_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if self._capture is not None:
            self._capture.clear()

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
        rows = self._parse(outputs, batch, trainer, dataloader_idx, "test_step")
        if self._current is None and (warning := constant_score_warning(rows["scores"], self._runs)):
            rank_zero_warn(warning)
        self._current = dataloader_idx
        self._seen[dataloader_idx] = self._seen.get(dataloader_idx, 0) + len(rows["scores"])
        self._sets[dataloader_idx].update(is_id=self._loaders[dataloader_idx]["role"].endswith("id"), **rows)
        if batch_idx + 1 == _num_batches(trainer, dataloader_idx):
            self._finish_loader(trainer, dataloader_idx)

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for idx in range(len(self._loaders) - len(self._ood_sources)):  # the test loop's sets
            self._finish_unfinished(trainer, idx)
        self._score_ood_sets(trainer, pl_module)
        self.results = results = results_from_store(self._store, self._meta(trainer, pl_module))
        if trainer.is_global_zero:
            self._report(trainer, results)

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._remove_capture()

    def _remove_capture(self) -> None:
        if self._capture is not None:
            self._capture.remove()
            self._capture = None

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self.on_test_end(trainer, pl_module)
        if self._loaders:
            rank_zero_info(
                "\n" + stopped_message(exception.__class__.__name__, self._saved, self._loaders, self._directory)
            )

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The results of the last test (None before one), so that a checkpoint keeps them."""
        return {"results": self.results}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""
        self.results = state_dict.get("results")

    # ------------------------------------------------------------------ sets and samples
    def _shaping(self, trainer: Trainer) -> ActivationShapingCallback | None:
        return next((cb for cb in trainer.callbacks if isinstance(cb, ActivationShapingCallback)), None)

    def _own_sets(self) -> dict[str, dict[str, OODSet]]:
        """The sets the callback scores itself after the test loop, by role: ``ood=``'s, then ``csid=``'s."""
        return {"ood": self.ood, "csid": self.csid}

    def _network_name(self, trainer: Trainer) -> str | None:
        shaping = self._shaping(trainer)
        return self.module if self.module is not None or shaping is None else shaping.module

    def _resolve_loaders(self, trainer: Trainer) -> list[dict[str, str]]:
        declared = getattr(trainer.datamodule, "loaders", None)
        count = len(trainer.test_dataloaders) if isinstance(trainer.test_dataloaders, Sequence) else 1
        if self.ood:
            if count != 1 or declared:
                raise UserError(
                    f"OODMetricsCallback(ood={list(self.ood)}) scores the OOD sets itself, but the test loop has "
                    f"{count} test dataloaders{' (declared by the data module)' if declared else ''}. Fix: give "
                    "either ood= with the ID set as the only test dataloader, or the OOD sets as extra test "
                    "dataloaders (with dataloader_idx in test_step) and no ood=."
                )
            own = self._own_sets().items()
            return [{"name": "id", "role": "id"}, *({"name": n, "role": role} for role, sets in own for n in sets)]
        if declared:
            return [{"name": info.name, "role": info.role} for info in declared]
        others = list(self.ood_names or [f"ood{i}" for i in range(1, count)])
        if len(others) != count - 1:
            raise UserError(
                f"OODMetricsCallback(ood_names={others}) has {len(others)} names for {count - 1} OOD test "
                "dataloaders. Fix: give one name per test dataloader after the ID one, in order, or pass the OOD "
                "sets as OODMetricsCallback(ood={name: dataset}) and the ID set alone to trainer.test."
            )
        return [
            {"name": "id", "role": "id"} if i == self.id_dataloader_idx else {"name": others.pop(0), "role": "ood"}
            for i in range(count)
        ]

    def _resolve_runs(self, trainer: Trainer, pl_module: LightningModule) -> list[dict[str, Any]]:
        runs = getattr(pl_module, "runs", None)
        self._module_runs = bool(runs)
        if runs:
            return [dict(r) for r in runs]
        shaping = self._shaping(trainer)
        return self.scorer.runs(Settings(shaping.specs if shaping else ["none"], None))

    def _current_settings(self, trainer: Trainer) -> Settings:
        """The shaping settings, read once per test after every callback's ``on_test_start`` (calibration) ran."""
        if self._settings is None:
            shaping = self._shaping(trainer)
            self._settings = shaping.settings() if shaping is not None else Settings(["none"], None)
        return self._settings

    def _parse(
        self, outputs: Any, batch: Any, trainer: Trainer, dataloader_idx: int, where: str, index: Tensor | None = None
    ) -> dict[str, Tensor]:
        """The ``OODMetrics.update`` columns of a batch: scores (B, R), finite (of the logits and scores), targets
        (-1 when unknown), preds when known, index (``index``, else the batch's, else synthesised)."""
        out = _step_outputs(outputs)
        images = batch_part(batch, "images")
        if images is not None and self._channels is None and images.ndim >= 2:
            self._channels = int(images.shape[1])
        if out.get("scores") is not None:
            scores, logits, preds = out["scores"], out.get("logits"), out.get("preds")
            if not self._module_runs:
                self._runs = [{**run, "score": STEP_SCORES} for run in self._runs]
            if preds is None and logits is not None and logits.ndim == 2:
                preds = logits.argmax(-1)
        else:
            scores, logits, preds = self._scores(trainer, out, images, where)
        scores = scores.reshape(len(scores), -1)
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
        if index is None:
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

    def _scores(
        self, trainer: Trainer, out: dict[str, Tensor], images: Tensor | None, where: str
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The scores (B, R) of every run, the logits ((B, K), or (B, S, K) for a sweep) and the predictions (B, R)
        of a batch, from the logits ``test_step`` returned, else those the network gave (forward hook)."""
        capture, logits = self._capture, out.get("logits")
        if capture is None:
            raise UserError(
                "OODMetricsCallback: a LightningModule that declares `runs` must return its own 'scores' from "
                "test_step. Fix: return {'logits': ..., 'scores': ...} from test_step."
            )
        settings = self._current_settings(trainer)
        if logits is None or settings.shapers is not None:
            logits = capture.logits(where)
        outputs = self.scorer.outputs(capture.network, settings, logits, capture.features, images)
        scores = self.scorer.columns(trainer, capture.network, settings, outputs, images)
        preds = outputs.logits.argmax(-1).repeat_interleave(len(self.scorer.names), dim=0).T  # (B, R)
        return scores, outputs.logits.transpose(0, 1).squeeze(1), preds

    def _score_ood_sets(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Score the sets given by ``ood=`` and ``csid=`` (module docstring), each finished and saved in turn."""
        if not self._ood_sources:
            return
        id_loader = id_test_loader(trainer)
        device = pl_module.device
        for idx, ood in enumerate(self._ood_sources, start=1):
            name = ood.name
            loader, positions = shard_loader(
                ood,
                id_loader,
                self.batch_size,
                self.num_workers,
                self._channels,
                trainer.global_rank,
                trainer.world_size,
            )
            done = 0
            total = len(loader) if positions is not None else None
            role = self._loaders[idx]["role"]
            with trainer_progress(trainer)(f"{role.upper()} {name}", total) as advance, torch.inference_mode():
                for batch in loader:
                    images = batch_part(batch, "images")
                    if images is None:
                        raise UserError(
                            f"OODMetricsCallback: the items of {role.upper()} set {name!r} hold no image tensor "
                            f"({describe_batch(batch)}). Fix: make them (image tensor, label) or a dict with an "
                            "'image' "
                            "tensor, or give a data spec with OODMetricsCallback(transform=...)."
                        )
                    count = len(images)
                    index = torch.tensor(positions[done : done + count] if positions else range(done, done + count))
                    done += count
                    if self._capture is not None:
                        self._capture.clear()
                    with trainer.precision_plugin.test_step_context():
                        returned = pl_module(images.to(device))
                    called = self._capture is not None and self._capture.called
                    rows = self._parse(None if called else returned, batch, trainer, idx, "forward", index)
                    self._sets[idx].update(is_id=role.endswith("id"), **rows)
                    advance()
            self._finish_loader(trainer, idx)

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
            with self._writing(f"the scores of data set {name!r} ({SCORES_FILE})"):
                save_scores(scores_path(self._out()), self._store, self._meta(trainer, None))
        self._saved = list(self._store)

    # ------------------------------------------------------------------ output
    def _out(self) -> str:
        os.makedirs(self._directory, exist_ok=True)
        return self._directory

    def _writing(self, what: str, folder: str | None = None) -> contextlib.AbstractContextManager[None]:
        """A block writing ``what`` to ``folder`` (default: the output folder), where a full disk, a quota or a
        folder that cannot be written is one UserError naming the folder and the fix (``write_failure``)."""
        elsewhere = "set ood_metrics.output_dir" + ("" if self.output_dir else " or the logger's save_dir")
        return write_failures_reported(folder or self._directory, what, elsewhere)

    def _meta(self, trainer: Trainer, pl_module: LightningModule | None) -> dict[str, Any]:
        datamodule = trainer.datamodule
        groups = self.groups if self.groups is not None else getattr(datamodule, "groups", None)
        config = {
            "trainer": {
                "world_size": trainer.world_size,
                "strategy": type(trainer.strategy).__name__,
                "precision": str(trainer.precision),
            },
            "callback": {
                "tpr": self.tpr,
                "convention": self.convention,
                "nonfinite": self.nonfinite,
                "score": self.scorer.names,
                **{
                    role: {name: described(value) for name, value in sets.items()}
                    for role, sets in self._own_sets().items()
                    if sets
                },
            },
        }
        for key, obj in (("model", pl_module or trainer.lightning_module), ("data", datamodule)):
            if getattr(obj, "hparams", None):
                config[key] = recorded(dict(obj.hparams))
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
        with self._writing("ood_results.json/.csv"):
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
            scalars.update({f"{prefix}{tag}": value for tag, value in full_spectrum_scalars(run).items()})
        for logger in trainer.loggers:
            folder = getattr(logger, "log_dir", None) or getattr(logger, "save_dir", None)
            with self._writing(f"the metrics of {type(logger).__name__}", folder):
                logger.log_metrics(scalars, step=trainer.global_step)
        writer = tensorboard_writer(trainer.loggers)
        id_name = results["id"]
        events_dir = writer.get_logdir() if writer is not None else None

        def events() -> contextlib.AbstractContextManager[None]:
            return self._writing("TensorBoard events", events_dir)

        if writer is not None:
            with events():
                for r, run in enumerate(results["runs"]):
                    prefix = "" if single else f"{run['shaping']}|{run['score']}/"
                    for name in [id_name, *results["ood_sets"], *results.get("csid_sets", [])]:
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
                with self._writing(filename):
                    write_atomically(os.path.join(self._out(), filename), partial(fig.savefig, dpi=120), suffix=".png")
                if writer is not None:
                    with events():
                        writer.add_figure(tag, fig, trainer.global_step)
        if writer is not None:
            with events():
                log_results(writer, results, self._store, trainer.global_step)
                writer.flush()  # raises what the writer's thread failed to write (log_results flushes its own)


def _check_csid(ood: Mapping[str, OODSet], csid: Mapping[str, OODSet]) -> None:
    """UserErrors for ``csid=`` without ``ood=`` and for a name used by both (or ``id``)."""
    if csid and not ood:
        raise UserError(
            f"OODMetricsCallback(csid={list(csid)}) scores the csid sets after the OOD sets of ood=, which is not "
            "given. Fix: pass the OOD sets as ood= too, or declare both in the data module (data.ood, data.csid)."
        )
    shared = sorted(set(csid) & {*ood, "id"})
    if shared:
        raise UserError(
            f"OODMetricsCallback: {shared} named in csid= and in ood= (or 'id', the ID set's name); results are "
            "keyed by set name. Fix: rename the csid set."
        )


def _num_batches(trainer: Trainer, dataloader_idx: int) -> float:
    """The number of test batches of dataloader ``dataloader_idx`` (inf when unknown)."""
    counts = trainer.num_test_batches
    return counts[dataloader_idx] if dataloader_idx < len(counts) else float("inf")


def _step_outputs(outputs: Any) -> dict[str, Tensor]:
    """What ``test_step`` (or ``forward``) returned, as the columns it holds: a per-sample tensor is the logits, a
    dict is read if it holds ``logits`` or ``scores``; anything else (None, a scalar loss, a dict of the user's
    own) holds none, and the logits come from the forward hook."""
    if isinstance(outputs, Tensor):
        return {"logits": outputs} if outputs.ndim >= 1 else {}
    if isinstance(outputs, Mapping) and ("logits" in outputs or "scores" in outputs):
        return {str(k): v for k, v in outputs.items() if isinstance(v, Tensor)}
    return {}
