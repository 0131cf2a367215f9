"""A detector as ``OODMetricsCallback``'s score: it reads the penultimate features of the user's network, or, for
the input-space detectors (``odin``, ``adascale``), re-runs that network on the batch's images.

``CapturedFeatureScore(spec, fit_dataloader, module, std)`` finds the network inside the LightningModule as
``ActivationShapingCallback`` does, captures the input of its classifier (after any shaping attached there, by a
forward hook: it sees the arguments as the pre-hooks left them) on every call while testing, and scores
``(features of the last call, logits)`` with the detector. An input-space detector instead takes the images of
the test batch (``batch_part(batch, "images")``) and runs the network on them itself, attached shapings included,
with gradients to the input enabled even under Lightning's ``torch.inference_mode``
(``detector_scoring.detector_score``). That costs extra passes on top of test_step's (ODIN and AdaSCALE: a forward
and a backward pass to the input and a second forward pass). ``std``, the data transform's per-channel std
(default ones), puts ODIN's eps in pixel units as in the ODIN code. The detector is fitted at the first scored
batch, when every callback's ``on_test_start`` has run (so the fit sees the same shaping as the test), on
``fit_dataloader`` or else the data module's ``fit_dataloader()`` (cached by the network's weights, the fit data
spec and the attached shapings; see ``ash_lightning.detectors.fitting``). Checks that need no backbone pass (no
classifier, no fit data, no labels for mds/rmds) run in ``start``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ash_lightning._cache import network_identity
from ash_lightning.callbacks.activation_shaping import ActivationShapingCallback
from ash_lightning.callbacks.network import find_network
from ash_lightning.data.batches import batch_part, describe_batch, expected_layout
from ash_lightning.data.fit_pass import FitData, FitPass, fit_batches, fit_loader_of
from ash_lightning.detectors import FeatureDetector, FittedDetector, parse_detector
from ash_lightning.detectors.fitting import FitSettings, check_detectors, fit_detectors
from ash_lightning.detectors.scoring import SettingBatch, detector_score
from ash_lightning.errors import UserError
from ash_lightning.shaping.calibration import make_cache_key
from ash_lightning.shaping.hooks import find_classifier
from ash_lightning.shaping.specs import get_shaping

__all__ = ["CapturedFeatureScore"]


class CapturedFeatureScore:
    """``score(logits, batch)`` = the fitted detector on the features captured from the network's last call, or,
    for odin/adascale, on the network re-run on ``batch``'s images (see the module docstring); ``name`` is the
    detector spec. ``std``: the data transform's per-channel std (default ones); pass your normalisation std so
    eps is in pixel units as in the ODIN code."""

    def __init__(
        self,
        spec: str,
        fit_dataloader: FitData | None = None,
        module: str | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        detector = parse_detector(spec)
        if std is not None and not (len(std) and all(math.isfinite(v) and v > 0 for v in std)):
            raise UserError(
                f"OODMetricsCallback(std={std!r}): std must be the data transform's per-channel standard "
                "deviations, positive finite numbers (e.g. std=(0.247, 0.243, 0.261) for CIFAR-10)."
            )
        self.detector, self.name, self.std = detector, detector.spec, None if std is None else list(std)
        self.fit_dataloader, self.module = fit_dataloader, module
        self._reads_features = isinstance(detector, FeatureDetector)
        self._network: nn.Module | None = None
        self._handle: RemovableHandle | None = None
        self._captured: list[Tensor] = []
        self._fitted: FittedDetector | None = None
        self._trainer: Any = None

    def start(self, trainer: Any, pl_module: nn.Module) -> None:
        """Find the network and hook its classifier; UserErrors for what needs no backbone pass to tell."""
        self.stop()
        network = find_network(pl_module, self.module, "OODMetricsCallback")
        check_detectors(network, [self.detector], "OODMetricsCallback(score=...)")
        self._network, self._trainer, self._fitted = network, trainer, None
        if self.detector.needs_fit:
            loader = self._fit_loader()
            if self.detector.needs_labels:
                first = next(iter(loader), None)
                labels = None if first is None else batch_part(first, "labels")
                if labels is None or (len(labels) and int(labels.min()) < 0):
                    raise UserError(
                        f"OODMetricsCallback(score={self.name!r}) needs the class labels of the ID fit data, but its "
                        "first batch carries none (or unlabelled ones, -1). Fix: give labelled ID data, e.g. the "
                        "training loader yielding (x, y), as fit_dataloader; or use knn, vim, fdbd or nnguide."
                    )
        self._hook(network)
        self._captured = []

    def _hook(self, network: nn.Module) -> None:
        """Capture the input of ``network``'s classifier (check_detectors made sure it has one) on every call; no
        hook for an input-space detector, which runs the network itself."""
        if not self._reads_features:
            return
        classifier = find_classifier(network)
        if classifier is None:
            raise UserError(f"OODMetricsCallback: {type(network).__name__} has no classifier to read features from.")
        self._handle = classifier.register_forward_hook(self._capture)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _capture(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        self._captured[:] = [args[0]]

    def _fit_loader(self) -> Iterable[Any]:
        """``fit_dataloader``, else the data module's; a UserError naming both ways if neither."""
        if self.fit_dataloader is not None:
            return fit_batches(self.fit_dataloader)
        loader = fit_loader_of(self._trainer)
        if loader is None:
            raise UserError(
                f"OODMetricsCallback(score={self.name!r}) fits on ID data, and the trainer has none. Fix: pass "
                "OODMetricsCallback(score=..., fit_dataloader=<an ID DataLoader, e.g. the training loader, or a "
                "callable returning one>)."
            )
        return loader

    def _fit(self) -> FittedDetector:
        """The detector fitted on the ID fit data through the network as it is now (shapings attached)."""
        network, trainer = self._network, self._trainer
        if network is None:
            raise RuntimeError("CapturedFeatureScore.start(trainer, pl_module) must run before fitting")
        fit = getattr(trainer.datamodule, "hparams", {}).get("fit") if self.fit_dataloader is None else None
        shapings = [(cb.spec, cb.placement) for cb in trainer.callbacks if isinstance(cb, ActivationShapingCallback)]
        key = make_cache_key(network_identity(type(network).__name__, network), fit) if fit is not None else None
        self.stop()  # the fit pass is not a test batch
        try:
            ((fitted,),) = fit_detectors(
                [self.detector],
                FitSettings.as_attached(network, str(shapings)),
                "penultimate",
                FitPass(self._fit_loader, key, device=next(network.parameters()).device),
            )
        finally:
            self._hook(network)
        return fitted

    def __call__(self, logits: Tensor, batch: Any = None) -> Tensor:
        if self._network is None:
            raise RuntimeError("CapturedFeatureScore.start(trainer, pl_module) must run before scoring")
        if not self._reads_features:
            return self._score_input(logits, batch)
        if not self._captured or self._captured[0].shape[0] != logits.shape[0]:
            raise UserError(
                f"OODMetricsCallback(score={self.name!r}) reads the penultimate features of "
                f"{type(self._network).__name__}, but its classifier did not see this batch of {logits.shape[0]} "
                "samples in test_step. Fix: compute the logits with that network in test_step, or name the network "
                "with module=..."
            )
        return self._fitted_detector().score(self._captured[0].flatten(1), logits)

    def _fitted_detector(self) -> FittedDetector:
        if self._fitted is None:
            self._fitted = self._fit() if self.detector.needs_fit else FittedDetector(self.detector, {})
        return self._fitted

    def _score_input(self, logits: Tensor, batch: Any) -> Tensor:
        """The input-space detector on the network re-run on ``batch``'s images (attached shapings included)."""
        network = self._network
        assert network is not None  # checked by __call__
        images = batch_part(batch, "images")
        if images is None or images.shape[0] != logits.shape[0]:
            raise UserError(
                f"OODMetricsCallback(score={self.name!r}) re-runs {type(network).__name__} on the test batch's "
                f"images, but cannot find {logits.shape[0]} of them in the batch ({describe_batch(batch)}). Fix: "
                f"yield them as {expected_layout('images')}."
            )
        std = self.std or [1.0] * images.shape[1]
        if len(std) != images.shape[1]:
            raise UserError(
                f"OODMetricsCallback(std={self.std!r}) has {len(std)} entries but the images have "
                f"{images.shape[1]} channels. Fix: pass one std per input channel."
            )
        fitted = self._fitted_detector()
        x = images.to(next(network.parameters()).device)
        return detector_score(fitted, SettingBatch(network, get_shaping("none"), "penultimate", x, None, None, std))
