"""``RunScorer``: the score columns of ``OODMetricsCallback`` for one batch, one per (shaping setting, score).

The settings (``Settings``) come from ``ActivationShapingCallback``: one setting attached to the network while
it runs (or none), or a sweep of several, evaluated from one backbone pass per batch as ``main.py`` does
(``ash_lightning.shaping.sweep``): the network runs unshaped, its classifier's input is captured, and each
setting's shaping is applied to that input and the classifier run on it. Where the classifier's output is not
the network's output, or the placement is not ``penultimate``, each setting re-runs the network on the batch's
images (with a warning from the sweep). With ``rankfeat`` among the settings, which needs the map before the last
stage, the sweep re-runs the network on the batch's images once, up to that map (split point ``"stage"``).

A score is a logit score (``energy``) or a detector (``knn@50``, ``vim@64``; ``odin``/``adascale`` re-run the
network on the batch's images with input gradients, even under Lightning's ``torch.inference_mode``:
``ash_lightning.detectors.scoring``). Detectors are fitted per setting at the first scored batch, when every
callback's ``on_test_start`` has run (so the fit sees the test's shaping), on ``fit_dataloader`` or else the data
module's ``fit_dataloader()`` (cached by the network's weights, the fit data spec and the shapings; see
``ash_lightning.detectors.fitting``). ``check`` makes the checks that need no backbone pass (no classifier, no fit
data, no labels for mds/rmds) when testing starts. ``std``, the data transform's per-channel std (default
ones), puts ODIN's eps in pixel units as in the ODIN code.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ash_lightning._cache import network_identity
from ash_lightning.callbacks.fit_data import fit_data_name, id_fit_data, require_fit_labels
from ash_lightning.data.batches import expected_layout
from ash_lightning.data.fit_pass import FitData, FitPass, stop_on_signal
from ash_lightning.data.progress import trainer_progress
from ash_lightning.detectors import Detector, FeatureDetector, FittedDetector
from ash_lightning.detectors.fitting import FitSettings, check_detectors, fit_detectors
from ash_lightning.detectors.scoring import SettingBatch, detector_score, resolve_score, score_name
from ash_lightning.errors import UserError
from ash_lightning.evaluation.results import run_entry
from ash_lightning.shaping.calibration import make_cache_key
from ash_lightning.shaping.hooks import find_classifier
from ash_lightning.shaping.specs import Shaper, get_shaping
from ash_lightning.shaping.sweep import SettingOutputs, outputs_from_shared, shaped_outputs, split_point

if TYPE_CHECKING:
    from ash_lightning.callbacks.types import Trainer

__all__ = ["RunScorer", "Settings"]


@dataclass(frozen=True)
class Settings:
    """The shaping settings of a test: ``names`` (their specs); ``shapers`` at ``placement`` for a sweep
    (nothing attached while the network runs), or None for one setting, the network as it runs."""

    names: list[str]
    shapers: list[Shaper] | None
    placement: str = "penultimate"


class RunScorer:
    """``columns(...)`` = the scores (B, R) of a batch, R = settings x ``specs`` (see the module docstring)."""

    def __init__(
        self, specs: Sequence[str], fit_dataloader: FitData | None = None, std: Sequence[float] | None = None
    ) -> None:
        try:
            self.scores = [resolve_score(spec) for spec in specs]
        except ValueError as err:
            raise UserError(f"OODMetricsCallback(score=...): {err}") from err
        self.names = [score_name(score) for score in self.scores]
        if not self.names:
            raise UserError("OODMetricsCallback(score=[]) lists no score. Fix: e.g. score='energy'.")
        repeated = next((name for i, name in enumerate(self.names) if name in self.names[:i]), None)
        if repeated is not None:
            raise UserError(f"OODMetricsCallback(score=...) lists {repeated!r} twice. Fix: remove the repeat.")
        if std is not None and not (len(std) and all(math.isfinite(v) and v > 0 for v in std)):
            raise UserError(
                f"OODMetricsCallback(std={std!r}): std must be the data transform's per-channel standard "
                "deviations, positive finite numbers (e.g. std=(0.247, 0.243, 0.261) for CIFAR-10)."
            )
        self.std = None if std is None else [float(v) for v in std]
        self.fit_dataloader = fit_dataloader
        self._fitted: list[dict[str, FittedDetector]] | None = None
        self._classifier_is_last: bool | None = None

    @property
    def detectors(self) -> list[Detector]:
        return [score for score in self.scores if isinstance(score, Detector)]

    def runs(self, settings: Settings) -> list[dict[str, Any]]:
        """The runs of the columns, in order (every setting with every score), each with its parsed setting as
        results record it (``run_entry``)."""
        return [run_entry(get_shaping(s), n) for s, n in itertools.product(settings.names, self.names)]

    def check(self, trainer: Trainer, network: nn.Module) -> None:
        """UserErrors for what needs no backbone pass to tell; forgets the fits of an earlier test."""
        self._fitted, self._classifier_is_last = None, None
        check_detectors(network, self.detectors, "OODMetricsCallback(score=...)")
        needs_fit = [d.spec for d in self.detectors if d.needs_fit]
        if needs_fit:
            loader = self._fit_data(trainer, ", ".join(needs_fit))
            for detector in self.detectors:
                if detector.needs_labels:
                    require_fit_labels(loader, f"OODMetricsCallback(score={detector.spec!r})")

    def _fit_data(self, trainer: Trainer, needs: str) -> Iterable[Any]:
        return id_fit_data(
            self.fit_dataloader,
            trainer,
            f"OODMetricsCallback(score={needs!r})",
            "pass OODMetricsCallback(score=..., fit_dataloader=<an ID DataLoader, e.g. the training loader, or a "
            "callable returning one>).",
        )

    def _fit(self, trainer: Trainer, network: nn.Module, settings: Settings) -> list[dict[str, FittedDetector]]:
        """Per setting: detector spec -> the detector fitted on the ID fit data under that setting."""
        detectors = self.detectors
        if not any(d.needs_fit for d in detectors):
            return [{d.spec: FittedDetector(d, {}) for d in detectors} for _ in settings.names]
        fit = getattr(trainer.datamodule, "hparams", {}).get("fit") if self.fit_dataloader is None else None
        key = make_cache_key(network_identity(type(network).__name__, network), fit) if fit is not None else None
        fit_settings = (
            FitSettings.as_attached(network, str([(settings.names[0], settings.placement)]))
            if settings.shapers is None
            else FitSettings.of_shapers(network, settings.shapers, settings.placement)
        )
        fit_pass = FitPass(
            lambda: self._fit_data(trainer, ", ".join(d.spec for d in detectors)),
            key,
            device=next(network.parameters()).device,
            data_name=fit_data_name(self.fit_dataloader, trainer),
            progress=trainer_progress(trainer),
            stop=stop_on_signal(trainer),
        )
        fitted = fit_detectors(detectors, fit_settings, settings.placement, fit_pass)
        return [{one.spec: one for one in row} for row in fitted]

    def outputs(
        self, network: nn.Module, settings: Settings, logits: Tensor, features: Tensor | None, images: Tensor | None
    ) -> SettingOutputs:
        """Per setting: features (S, B, D) and logits (S, B, K), from the pass the network made (``logits`` and the
        captured ``features``), or, for a sweep, from its unshaped features (re-running the network on ``images``
        where the split point needs it)."""
        if settings.shapers is None:
            return SettingOutputs(None if features is None else features[None], logits[None])
        placement = settings.placement
        if (
            split_point(network, placement, settings.shapers) == "classifier"
            and features is not None
            and self._last(network, features, logits)
        ):
            return outputs_from_shared(network, features, settings.shapers, placement)
        if images is None:
            raise UserError(
                f"ActivationShapingCallback: the sweep at placement {placement!r} re-runs "
                f"{type(network).__name__} on the batch's images, but the batch holds none. Fix: yield them as "
                f"{expected_layout('images')}, or use placement='penultimate'."
            )
        return shaped_outputs(network, images.to(logits.device), settings.shapers, placement)

    def _last(self, network: nn.Module, features: Tensor, logits: Tensor) -> bool:
        """Whether the classifier's output is the network's output (checked on the first batch)."""
        if self._classifier_is_last is None:
            classifier = find_classifier(network)
            again = classifier(features) if classifier is not None else None
            self._classifier_is_last = (
                isinstance(again, Tensor) and again.shape == logits.shape and torch.allclose(again, logits, 1e-5, 1e-6)
            )
        return self._classifier_is_last

    def columns(
        self, trainer: Trainer, network: nn.Module, settings: Settings, outputs: SettingOutputs, images: Tensor | None
    ) -> Tensor:
        """The scores (B, R) of every setting with every score (the order of ``runs``)."""
        if self.detectors and self._fitted is None:
            self._fitted = self._fit(trainer, network, settings)
        columns = []
        for s, logits in enumerate(outputs.logits):
            features = None if outputs.features is None else outputs.features[s]
            for score in self.scores:
                if not isinstance(score, Detector):
                    columns.append(score(logits))
                    continue
                assert self._fitted is not None  # fitted above
                shaper = get_shaping("none") if settings.shapers is None else settings.shapers[s]
                columns.append(
                    self._detector(
                        score, self._fitted[s][score.spec], network, shaper, settings, logits, features, images
                    )
                )
        return torch.stack(columns, dim=1)

    def _detector(
        self,
        detector: Detector,
        fitted: FittedDetector,
        network: nn.Module,
        shaper: Shaper,
        settings: Settings,
        logits: Tensor,
        features: Tensor | None,
        images: Tensor | None,
    ) -> Tensor:
        """One detector's scores (B,) on the batch, with the UserErrors of inputs it cannot find."""
        name = type(network).__name__
        if isinstance(detector, FeatureDetector):
            if features is None or features.shape[0] != logits.shape[0]:
                raise UserError(
                    f"OODMetricsCallback(score={detector.spec!r}) reads the penultimate features of {name}, but its "
                    f"classifier did not see this batch of {logits.shape[0]} samples. Fix: compute the logits with "
                    "that network in test_step, or name the network with module=..."
                )
            return fitted.score(features.flatten(1), logits)
        if images is None or images.shape[0] != logits.shape[0]:
            raise UserError(
                f"OODMetricsCallback(score={detector.spec!r}) re-runs {name} on the batch's images, but cannot find "
                f"{logits.shape[0]} of them in the batch. Fix: yield them as {expected_layout('images')}."
            )
        std = self.std or [1.0] * images.shape[1]
        if len(std) != images.shape[1]:
            raise UserError(
                f"OODMetricsCallback(std={self.std!r}) has {len(std)} entries but the images have "
                f"{images.shape[1]} channels. Fix: pass one std per input channel."
            )
        x = images.to(logits.device)
        return detector_score(fitted, SettingBatch(network, shaper, settings.placement, x, None, None, std)).to(
            logits.device
        )
