"""``OODEvalModule``: any timm backbone with activation shaping, evaluated by the test loop.

``shaping`` and ``score`` may be lists: a test run evaluates their product (a sweep), with one backbone
pass per batch where the placement allows it (see ``ash_lightning.shaping.sweep``). A ``score`` entry is a logit score
(``energy``) or a detector (``knn@50``, ``vim@64``, ``odin``: ``ash_lightning.detectors``), fitted per shaping on
``data.fit`` when testing starts (``ash_lightning.detectors.fitting``, cached) and scored per batch
(``ash_lightning.detectors.scoring``; ``odin``/``adascale`` take input gradients inside the test loop).
``test_step`` returns per-sample ``logits``, ``scores``, ``preds``, ``targets`` and ``index``; ``runs`` labels the
score columns.

The code lives in ``OODEvalModuleMixin``; ``OODEvalModule`` here is its ``pytorch_lightning`` class and
``ash_lightning.lightning.OODEvalModule`` its ``lightning.pytorch`` one (see ``ash_lightning.lightning_packages``).
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pytorch_lightning as pl
import torch
from timm.data import resolve_data_config
from torch import Tensor

from ash_lightning._cache import network_identity
from ash_lightning._options import check_int, check_range
from ash_lightning.data.datamodule import OODDataModuleMixin
from ash_lightning.data.fit_pass import FitPass, no_stop, stop_on_signal
from ash_lightning.data.progress import PassProgress, no_progress, trainer_progress
from ash_lightning.detectors import Detector, FittedDetector
from ash_lightning.detectors.fitting import FitSettings, check_detectors, fit_detectors
from ash_lightning.detectors.scoring import SettingBatch, detector_score, resolve_score, score_name
from ash_lightning.errors import UserError
from ash_lightning.evaluation.feature_cache import DEFAULT_MAX_GIB, FeatureCache, check_placement, open_feature_cache
from ash_lightning.evaluation.results import run_entry
from ash_lightning.models.backbone import create_backbone, warn_if_random_weights
from ash_lightning.shaping.calibration import (
    calibrate_shapers,
    check_calibration,
    make_cache_key,
    needs_calibration,
)
from ash_lightning.shaping.hooks import StageShaper, attach_shaping
from ash_lightning.shaping.specs import get_shaping
from ash_lightning.shaping.sweep import outputs_from_shared, runs_backbone_once, shaped_logits, shared_part

if TYPE_CHECKING:
    from pytorch_lightning.utilities.parsing import AttributeDict

log = logging.getLogger(__name__)


def _as_list(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def _user_spec(resolve: Any, spec: str, what: str) -> Any:
    try:
        return resolve(spec)
    except ValueError as err:
        raise UserError(f"model.{what}: {err}") from err


def _check_options(
    shapings: list[str], scores: list[str], calibration_samples: int | None, num_classes: int | None
) -> None:
    """UserErrors for a shaping or score listed twice (normalised specs: each would be evaluated, and reported,
    twice) and for counts out of range."""
    for key, specs in (("model.shaping", shapings), ("model.score", scores)):
        repeated = next((spec for i, spec in enumerate(specs) if spec in specs[:i]), None)
        if repeated is not None:
            raise UserError(
                f"{key} lists {repeated!r} twice (as written, or as the same setting written two "
                f"ways); each entry is evaluated once. Fix: remove the repeat from {key}."
            )
    if calibration_samples is not None:
        check_int("model.calibration_samples", calibration_samples, 1, example=10000)
    if num_classes is not None:
        check_int("model.num_classes", num_classes, 1, example=10)


class OODEvalModuleMixin:
    """Evaluate ``backbone`` with ``shaping`` at ``placement`` and OOD ``score`` on every test dataloader.

    The code of ``OODEvalModule``, for a class that also subclasses a Lightning package's ``LightningModule``.

    Args:
        backbone: a timm model name (``resnet50.tv_in1k``, ``cifar_resnet20``, ...).
        pretrained: load timm's pretrained weights (needs them downloaded or cached).
        checkpoint_path: a local state_dict (bare, or under ``state_dict``/``model``; ``module.`` is stripped).
        strict_loading: every checkpoint key must match the model.
        num_classes: override the classifier size (default: the model's).
        shaping: a shaping spec or a list of them (``"ash_s@90"``, ``["none", "ash_b@65"]``).
        placement: ``"penultimate"``, ``"pre_pool"`` or a dotted module name.
        score: a score name or detector spec, or a list of them (``"energy"``, ``"msp"``, ``"knn@50"``, ...).
        calibration_samples: at most this many ID fit samples for calibrated methods and fitted detectors
            (default: all of data.fit).
        feature_cache: a folder for each test set's shared features (``ash_lightning.evaluation.feature_cache``): a
            later run with the same backbone, weights, placement and data reads them and runs only the per-setting part
            (refused with ``rankfeat``, which needs the map before the last stage).
        feature_cache_max_gib: refuse to cache a set whose features would take more than this many GiB.
    """

    if TYPE_CHECKING:  # provided by the Lightning package's LightningModule that this is combined with
        hparams: AttributeDict
        trainer: Any  # that package's Trainer
        device: torch.device

        def save_hyperparameters(self, *args: Any, **kwargs: Any) -> None: ...

    def __init__(
        self,
        backbone: str,
        pretrained: bool = False,
        checkpoint_path: str | None = None,
        strict_loading: bool = True,
        num_classes: int | None = None,
        shaping: str | list[str] = "ash_s@90",
        placement: str = "penultimate",
        score: str | list[str] = "energy",
        calibration_samples: int | None = None,
        feature_cache: str | None = None,
        feature_cache_max_gib: float = DEFAULT_MAX_GIB,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.requested_shapers = [_user_spec(get_shaping, s, "shaping") for s in _as_list(shaping)]
        self.shapers = list(self.requested_shapers)  # calibrated ones are fitted when testing starts
        self.scores = [_user_spec(resolve_score, s, "score") for s in _as_list(score)]
        if not self.shapers or not self.scores:
            raise UserError("model.shaping and model.score need at least one entry each.")
        _check_options(
            [sh.spec for sh in self.requested_shapers],
            [score_name(sc) for sc in self.scores],
            calibration_samples,
            num_classes,
        )
        self.model = create_backbone(
            backbone,
            pretrained=pretrained,
            num_classes=num_classes,
            checkpoint_path=checkpoint_path,
            strict=strict_loading,
        )
        for shaper in self.requested_shapers:  # attached and removed at once: an unfit placement fails here
            key = "shaping" if isinstance(shaper, StageShaper) else "placement"  # a StageShaper ignores the placement
            _user_spec(lambda p, s=shaper: attach_shaping(self.model, s, p).remove(), placement, key)
        _user_spec(lambda p: check_calibration(self.requested_shapers, self.model, p), placement, "placement")
        check_detectors(self.model, self.detectors, "model.score")
        warn_if_random_weights(backbone, pretrained=pretrained, checkpoint_path=checkpoint_path)
        self.placement = placement
        if feature_cache is not None:
            stage = [sh.spec for sh in self.requested_shapers if isinstance(sh, StageShaper)]
            if stage:
                raise UserError(
                    f"model.shaping: {', '.join(stage)} re-run{'s' if len(stage) == 1 else ''} the last stage from "
                    "the feature map before it, which model.feature_cache does not store (it holds the classifier's "
                    "input). Fix: remove model.feature_cache for runs with rankfeat, or evaluate it in a separate run."
                )
            check_placement(self.model, placement)
            gradient = [d.spec for d in self.detectors if d.needs_gradients]
            if gradient:
                raise UserError(
                    f"model.score: {', '.join(gradient)} perturb the input images, which a run from "
                    "model.feature_cache does not load. Fix: remove model.feature_cache for runs with these scores, "
                    "or score them in a separate run."
                )
            limit = "model.feature_cache_max_gib"
            check_range(limit, feature_cache_max_gib, 0, math.inf, low_open=True, high_open=True, example=8)
        self._feature_cache: FeatureCache | None = None
        self._network: dict[str, str] | None = None  # network_identity, taken once per run where a cache needs it
        self.fitted: list[dict[str, FittedDetector]] = []  # per shaping: detector spec -> fitted, at test start
        self._std: tuple[float, ...] = ()  # the data transform's std, for odin
        self.runs = [run_entry(sh, score_name(sc)) for sh, sc in itertools.product(self.requested_shapers, self.scores)]

    @property
    def detectors(self) -> list[Detector]:
        """The detectors among the scores, in order."""
        return [score for score in self.scores if isinstance(score, Detector)]

    def forward(self, x: Tensor) -> Tensor:
        """Logits of the backbone with the first shaper attached."""
        return shaped_logits(self.model, x, self.shapers[:1], self.placement)[0]

    def setup(self, stage: str) -> None:
        """Open the feature cache for a test run: the data module loads the sets it holds without images."""
        hp, self._feature_cache, self._network = self.hparams, None, None
        if hp.feature_cache is not None and stage == "test":
            network = self._network_identity()
            self._feature_cache = open_feature_cache(
                hp.feature_cache, network, self.model, self.placement, self.trainer, hp.feature_cache_max_gib
            )
        datamodule = self.trainer.datamodule
        if isinstance(datamodule, OODDataModuleMixin):
            datamodule.load_without_images(self._feature_cache.complete_sets if self._feature_cache else ())

    def _network_identity(self) -> dict[str, str]:
        """The network's identity in the caches' keys (``network_identity``), taken once per run."""
        if self._network is None:
            self._network = network_identity(self.hparams.backbone, self.model)
        return self._network

    def on_test_end(self) -> None:
        if self._feature_cache is not None:
            self._feature_cache.close()

    def _shared(self, x: Tensor, targets: Tensor, index: Tensor, dataloader_idx: int) -> tuple[Tensor, Tensor, Tensor]:
        """``(shared_part, targets, index)`` of a batch, from the feature cache where it holds the set."""
        compute = lambda: shared_part(self.model, x, self.placement, self.shapers)  # noqa: E731
        if self._feature_cache is None:
            return compute(), targets, index
        return self._feature_cache.shared(dataloader_idx, targets, index, compute)

    def on_test_start(self) -> None:
        if len(self.shapers) > 1 and not runs_backbone_once(self.model, self.placement, self.shapers):
            log.warning(
                "placement %r is not inside forward_head: the full network runs once per shaping setting (%d settings)",
                self.placement,
                len(self.shapers),
            )
        if any(map(needs_calibration, self.requested_shapers)) or self.detectors:
            self.fit_on_id_data(self.trainer.datamodule, trainer_progress(self.trainer), stop_on_signal(self.trainer))

    def fit_on_id_data(
        self, datamodule: Any, progress: PassProgress = no_progress, stop: Callable[[], None] = no_stop
    ) -> None:
        """Calibrate the calibrated shapers, then fit the detectors per shaping, in one fit pass each (both cached,
        keyed by the network identity and ``datamodule``'s ``fit_identity``); its ``fit_dataloader`` is read on a
        cache miss, each pass shown by ``progress`` (``ash_lightning.data.progress``; the trainer's bar when
        testing) and ended early by ``stop`` (``FitPass.stop``; a signal when testing)."""
        data = datamodule.fit_identity() if isinstance(datamodule, OODDataModuleMixin) else None
        fit_dataloader = getattr(datamodule, "fit_dataloader", None)
        fit = FitPass(
            lambda: fit_dataloader() if callable(fit_dataloader) else None,
            None if data is None else make_cache_key(self._network_identity(), data),
            self.hparams.calibration_samples,
            self.device,
            "data.fit" if isinstance(datamodule, OODDataModuleMixin) else "the data module's fit_dataloader()",
            progress,
            stop,
        )
        if any(map(needs_calibration, self.requested_shapers)):
            self.shapers = calibrate_shapers(self.requested_shapers, self.model, self.placement, fit)
        settings = FitSettings.of_shapers(self.model, self.shapers, self.placement)
        fitted = fit_detectors(self.detectors, settings, self.placement, fit)
        self.fitted = [{one.spec: one for one in row} for row in fitted]
        self._std = tuple(self._data_config(datamodule)["std"])

    def _data_config(self, datamodule: Any) -> dict[str, Any]:
        """The data module's transform config, else the backbone's timm config."""
        if isinstance(datamodule, OODDataModuleMixin):
            return datamodule.data_config()
        return resolve_data_config(model=self.model)

    def _score(self, s: int, j: int, x: Tensor, features: Tensor | None, logits: Tensor) -> Tensor:
        """The scores (B,) of score ``j`` under shaping setting ``s``."""
        score = self.scores[j]
        if not isinstance(score, Detector):
            return score(logits)
        batch = SettingBatch(self.model, self.shapers[s], self.placement, x, features, logits, self._std)
        return detector_score(self.fitted[s][score.spec], batch).to(logits.device)

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        x, targets, index = batch
        shared, targets, index = self._shared(x, targets, index, dataloader_idx)
        outputs = outputs_from_shared(self.model, shared, self.shapers, self.placement)
        logits = outputs.logits  # (S, B, K)
        scores = torch.stack(
            [
                self._score(s, j, x, None if outputs.features is None else outputs.features[s], logits[s])
                for s in range(len(self.shapers))
                for j in range(len(self.scores))
            ],
            dim=1,
        )  # (B, R)
        preds = logits.argmax(-1).repeat_interleave(len(self.scores), dim=0).T  # (B, R)
        single = len(self.runs) == 1
        return {
            "logits": logits[0] if len(self.shapers) == 1 else logits.transpose(0, 1),
            "scores": scores[:, 0] if single else scores,
            "preds": preds[:, 0] if single else preds,
            "targets": targets,
            "index": index,
        }

    on_predict_start = on_test_start

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        return self.test_step(batch, batch_idx, dataloader_idx)


class OODEvalModule(OODEvalModuleMixin, pl.LightningModule):
    __doc__ = OODEvalModuleMixin.__doc__  # LightningCLI's help shows the class docstring
