"""Fit detectors (``ash_lightning.detectors``) on ID data, per shaping setting, with a cache.

``fit_detectors`` fits every (setting, detector) pair: detectors without fit data (``odin``, ``gradnorm``) as they
are; the others from the cache or, for the pairs it lacks, from ONE ``FitPass`` over the ID fit data
(``ash_lightning.data.fit_pass``, the pass calibration makes too) that yields the penultimate features (the
classifier's input as each setting's shaping leaves it), the logits and, where a detector needs them, the class
labels of every setting at once; ``adascale`` adds its perturbed passes per batch.
The pass runs in eval mode without gradients (AdaSCALE's input gradients excepted) and leaves normal (not
inference) tensors, so that the statistics also serve the gradient detectors. Fit data is iterated in full by
the caller's process: under DDP every rank fits on the whole fit set and holds identical statistics.

The cache holds one ``torch.save``d ``FittedDetector.state_dict()`` per pair under
``$ASH_CACHE_DIR/detectors`` (``ash_lightning._cache``), named by the digest of its key: the fit pass's
``cache_key`` (``make_cache_key``: the network identity, i.e. name and weights fingerprint, the fit data spec,
...), the placement, the setting's shaping spec, the detector spec and ``max_samples``. Without a ``cache_key``
nothing is cached. Writes follow ``ash_lightning._cache``'s rule (atomic; concurrent runs and DDP ranks may race;
a full or read-only folder costs one warning, not the run).

``fit_detector(model, "knn@50", loader)`` is the functional form for one detector.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import Tensor, nn

from ash_lightning._cache import StaleEntry, cache_dir, canonical_json, key_digest, read_entry, write_entry
from ash_lightning.data.batches import batch_part, describe_batch, expected_layout
from ash_lightning.data.fit_pass import FitBatch, FitData, FitPass, fit_batches
from ash_lightning.detectors import (
    AdaScale,
    Detector,
    FeatureDetector,
    FeaturesAndLogits,
    FittedDetector,
    load_fitted,
    parse_detector,
)
from ash_lightning.errors import UserError
from ash_lightning.shaping.calibration import calibrate
from ash_lightning.shaping.hooks import attach_shaping, find_classifier
from ash_lightning.shaping.specs import Shaper, get_shaping
from ash_lightning.shaping.sweep import SettingOutputs, shaped_outputs

__all__ = ["FitSettings", "check_detectors", "classifier_weights", "fit_detector", "fit_detectors"]

log = logging.getLogger(__name__)

_CACHE_FORMAT = 2  # part of every key: bump it when a detector's statistics or the key's layout change


@dataclass(frozen=True)
class FitSettings:
    """The settings detectors are fitted for: ``names`` (their shaping specs, part of the cache key);
    ``outputs(x, settings)``, the features and logits of a fit batch under the listed settings (one backbone pass
    where possible); ``attached(setting)``, a context under which ``model`` runs that setting (for AdaSCALE)."""

    model: nn.Module
    names: Sequence[str]
    outputs: Callable[[Tensor, Sequence[int]], SettingOutputs]
    attached: Callable[[int], AbstractContextManager[Any]]

    @classmethod
    def of_shapers(cls, model: nn.Module, shapers: Sequence[Shaper], placement: str) -> FitSettings:
        """One setting per shaper, attached at ``placement`` in turn (``ash_lightning.shaping.sweep``)."""
        return cls(
            model,
            [shaper.spec for shaper in shapers],
            lambda x, settings: shaped_outputs(model, x, [shapers[s] for s in settings], placement),
            lambda s: attach_shaping(model, shapers[s], placement),
        )

    @classmethod
    def as_attached(cls, model: nn.Module, name: str) -> FitSettings:
        """One setting: ``model`` as it is (with whatever shaping is attached to it already), named ``name``."""

        def outputs(x: Tensor, settings: Sequence[int]) -> SettingOutputs:
            features, logits = FeaturesAndLogits(model)(x)
            return SettingOutputs(features[None], logits[None])

        return cls(model, [name], outputs, lambda s: nullcontext())


def check_detectors(model: nn.Module, detectors: Sequence[Detector], what: str) -> None:
    """A UserError (naming ``what``, e.g. ``model.score``) for a detector that reads the penultimate features or
    the classifier's weights of a ``model`` that has no classifier (or no (K, D) weight)."""
    for detector in detectors:
        reads_features = isinstance(detector, (FeatureDetector, AdaScale))
        if not reads_features:
            continue
        classifier = find_classifier(model)
        if classifier is None:
            raise UserError(
                f"{what}: {detector.spec} reads the penultimate features (the input of the classifier), but "
                f"{type(model).__name__} has no classifier (no get_classifier() module, no nn.Linear). Fix: use a "
                "logit score (energy, msp) or odin with this network, or a network with a classifier."
            )
        needs_weight = getattr(detector, "needs_classifier", False) or isinstance(detector, AdaScale)
        weight = getattr(classifier, "weight", None)
        if isinstance(detector, FeatureDetector) and isinstance(weight, Tensor) and weight.ndim == 2:
            try:
                detector.check_feature_dim(weight.shape[1])
            except UserError as err:
                raise UserError(f"{what}: {err}") from None
        if needs_weight and not (isinstance(weight, Tensor) and weight.ndim == 2):
            raise UserError(
                f"{what}: {detector.spec} needs the classifier's weight matrix (K, D), but "
                f"{type(model).__name__}'s classifier is a {type(classifier).__name__} without one. Fix: use a "
                "detector that reads features and logits only (knn, mds, rmds, nnguide, gradnorm)."
            )


def classifier_weights(model: nn.Module) -> tuple[Tensor, Tensor | None]:
    """The classifier's ``weight`` (K, D) and ``bias`` (K,) (None without one), detached."""
    classifier = find_classifier(model)
    weight, bias = getattr(classifier, "weight", None), getattr(classifier, "bias", None)
    if not isinstance(weight, Tensor):  # check_detectors refuses such networks before any pass
        raise UserError(f"{type(model).__name__} has no linear classifier weight for the detectors to read.")
    return weight.detach(), bias.detach() if isinstance(bias, Tensor) else None


def _cache_path(key: dict[str, Any]) -> Path:
    return cache_dir() / "detectors" / f"{key_digest(key)}.pt"


def _read_fitted(path: Path, key: dict[str, Any]) -> FittedDetector:
    """The fitted detector of the cache entry for ``key`` at ``path``."""
    entry = torch.load(path, map_location="cpu", weights_only=True)
    if entry["key"] != canonical_json(key):
        raise StaleEntry("holds another key")
    return load_fitted(entry["fitted"])


class _Writes:
    """``file``'s ``write`` and ``flush``, for ``torch.save``, keeping the OSError a write raised (``error``):
    torch reports it as a RuntimeError without the cause."""

    def __init__(self, file: BinaryIO) -> None:
        self.file = file
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            return self.file.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        self.file.flush()


def _save(entry: dict[str, Any], path: str) -> None:
    """``torch.save(entry)`` to the file ``path``; a write that fails (e.g. a full disk) raises its OSError."""
    with open(path, "wb") as file:
        writes = _Writes(file)
        try:
            torch.save(entry, writes)  # type: ignore[arg-type]  # torch needs ``write`` and ``flush`` only
        except RuntimeError:
            if writes.error is not None:
                raise writes.error from None
            raise


@dataclass
class _Collected:
    """What one pass over the fit data collects: per setting, features and logits; the labels; per AdaSCALE
    pair, the Q' values."""

    settings: list[int]
    adascale: list[tuple[int, AdaScale]]
    labelled: list[str]  # the specs of the detectors that need the fit labels
    features: list[list[Tensor]]
    logits: list[list[Tensor]]
    labels: list[Tensor]
    shifts: dict[tuple[int, str], list[Tensor]]

    def add(self, fit: FitSettings, batch: FitBatch) -> None:
        """Collect one batch of the fit pass."""
        x = batch.images
        labels = _checked_labels(batch, self.labelled) if self.labelled else None  # before any backbone pass
        if self.settings:
            with torch.no_grad():
                outputs = fit.outputs(x, self.settings)
            if outputs.features is None:  # check_detectors refuses networks without a classifier before any pass
                raise UserError(f"{type(fit.model).__name__} has no classifier whose input the detectors could read.")
            for s, features, logits in zip(self.settings, outputs.features, outputs.logits, strict=True):
                self.features[s].append(features.detach().cpu())
                self.logits[s].append(logits.detach().cpu())
        if labels is not None:
            self.labels.append(labels.cpu())
        for s, detector in self.adascale:
            with fit.attached(s):
                shifts = detector.fit_shifts(FeaturesAndLogits(fit.model), x)
            self.shifts[(s, detector.spec)].append(shifts.detach().cpu())


def _checked_labels(batch: FitBatch, specs: Sequence[str]) -> Tensor:
    """The labels of a fit batch; a UserError naming the detectors ``specs`` that need them when it has none or
    unlabelled (-1) ones."""
    need = f"{'/'.join(specs)} need{'s' if len(specs) == 1 else ''}"
    labels = batch.labels
    if labels is None:
        raise UserError(
            f"{need} the class labels of the ID fit data, but its batches carry none "
            f"({describe_batch(batch_part(batch.batch, 'labels'))} where the labels should be). Fix: give labelled "
            f"ID data (e.g. the training set) as data.fit or fit_dataloader, with the labels as "
            f"{expected_layout('labels')}; or use a detector without labels (knn, vim, fdbd, nnguide)."
        )
    if len(labels) and int(labels.min()) < 0:
        raise UserError(
            f"{need} the class labels of the ID fit data, but it holds unlabelled samples (label -1, e.g. a "
            "folder without class sub-folders or an .npz without 'y'). Fix: give labelled ID data as data.fit, or "
            "use a detector without labels (knn, vim, fdbd, nnguide)."
        )
    return labels


def fit_detectors(
    detectors: Sequence[Detector], settings: FitSettings, placement: str, fit: FitPass
) -> list[list[FittedDetector]]:
    """``fitted[s][j]``: detector j fitted on the ID fit data under setting s (see the module docstring), its
    statistics on ``fit``'s device. The ``fit`` pass runs only on a cache miss; a UserError when it has no data or
    no samples."""
    device = fit.device_of(settings.model)
    fitted: list[list[FittedDetector | None]] = [
        [None if d.needs_fit else FittedDetector(d, {}) for d in detectors] for _ in settings.names
    ]
    keys = {
        (s, j): {
            "key": fit.cache_key,
            "placement": placement,
            "shaping": name,
            "detector": d.spec,
            "max_samples": fit.max_samples,
            "format": _CACHE_FORMAT,
        }
        for s, name in enumerate(settings.names)
        for j, d in enumerate(detectors)
        if d.needs_fit
    }
    if fit.cache_key is not None:
        for (s, j), key in keys.items():
            fitted[s][j] = read_entry(_cache_path(key), functools.partial(_read_fitted, key=key), "detector cache")
    missing = [(s, j) for s, j in keys if fitted[s][j] is None]
    if missing:
        log.info("detectors: fitting %s on the ID fit data", sorted({detectors[j].spec for _, j in missing}))
        with torch.inference_mode(False):  # the statistics also serve the gradient detectors
            new = _fit_missing(detectors, settings, missing, fit)
        for (s, j), one in new.items():
            fitted[s][j] = one
            if fit.cache_key is not None:
                entry = {"key": canonical_json(keys[(s, j)]), "fitted": one.to("cpu").state_dict()}
                write_entry(_cache_path(keys[(s, j)]), functools.partial(_save, entry))
    elif keys:
        log.info("detectors: using cached fits")
    return [[_fitted(one).to(device) for one in row] for row in fitted]


def _fitted(one: FittedDetector | None) -> FittedDetector:
    """``one``, which fit_detectors has filled in (read from the cache or fitted) by the time it returns."""
    if one is None:
        raise RuntimeError("a detector was neither read from the cache nor fitted")
    return one


def _fit_missing(
    detectors: Sequence[Detector], settings: FitSettings, missing: list[tuple[int, int]], fit: FitPass
) -> dict[tuple[int, int], FittedDetector]:
    """Fit the ``missing`` (setting, detector) pairs from one ``fit`` pass (in eval mode; outside inference mode,
    which the caller leaves)."""
    specs = sorted({detectors[j].spec for _, j in missing})
    no_data = (
        f"{', '.join(specs)} need{'s' if len(specs) == 1 else ''} ID fit data: set data.fit (e.g. the ID "
        "training set: data.fit: {kind: npz, path: ...}), or pass fit_dataloader=<an ID DataLoader>."
    )
    features = [(s, detectors[j]) for s, j in missing if isinstance(detectors[j], FeatureDetector)]
    collected = _Collected(
        settings=sorted({s for s, _ in features}),
        adascale=[(s, d) for s, j in missing if isinstance(d := detectors[j], AdaScale)],
        labelled=sorted({detectors[j].spec for _, j in missing if detectors[j].needs_labels}),
        features=[[] for _ in settings.names],
        logits=[[] for _ in settings.names],
        labels=[],
        shifts={(s, detectors[j].spec): [] for s, j in missing if isinstance(detectors[j], AdaScale)},
    )
    take = functools.partial(collected.add, settings)
    under = f" under {', '.join(settings.names[s] for s in sorted({s for s, _ in missing}))}"
    what = ", ".join(specs) + (under if len(settings.names) > 1 else "")
    fit.run(settings.model, take, what=what, no_data=no_data, grad_mode=nullcontext)  # no inference mode
    labels = torch.cat(collected.labels) if collected.labelled else None
    weight, bias = classifier_weights(settings.model) if features else (None, None)
    result: dict[tuple[int, int], FittedDetector] = {}
    for s, j in missing:
        detector = detectors[j]
        if isinstance(detector, AdaScale):
            result[(s, j)] = detector.fit(torch.cat(collected.shifts[(s, detector.spec)]))
        elif isinstance(detector, FeatureDetector):
            result[(s, j)] = detector.fit(
                torch.cat(collected.features[s]),
                torch.cat(collected.logits[s]),
                labels,
                None if weight is None else weight.cpu(),
                None if bias is None else bias.cpu(),
            )
    return result


def fit_detector(
    model: nn.Module,
    spec: str | Detector,
    loader: FitData,
    placement: str = "penultimate",
    shaping: str | Shaper = "none",
    max_samples: int | None = None,
    device: torch.device | None = None,
) -> FittedDetector:
    """``spec`` (e.g. ``"knn@50"``) fitted on the ID data ``loader`` (a DataLoader or any iterable of batches, or
    a callable returning one; at most ``max_samples`` samples) for ``model`` with ``shaping`` attached at
    ``placement`` (a calibrated shaping is calibrated on the same data first). Score with
    ``ash_lightning.detectors.scoring.detector_scores``. Nothing is cached."""
    detector = parse_detector(spec) if isinstance(spec, str) else spec
    check_detectors(model, [detector], "fit_detector")
    try:
        shaper = get_shaping(shaping)
    except ValueError as err:
        raise UserError(str(err)) from err
    shaper = calibrate(model, shaper, loader, placement, max_samples, device)
    settings = FitSettings.of_shapers(model, [shaper], placement)
    ((fitted,),) = fit_detectors(
        [detector], settings, placement, FitPass(lambda: fit_batches(loader), None, max_samples, device)
    )
    return fitted
