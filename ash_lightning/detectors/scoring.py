"""Score a batch with a fitted detector under one shaping setting, whatever inputs the detector reads.

A feature-space detector reads the setting's penultimate features and logits (from the sweep's one backbone
pass); an input-space one (``odin``, ``adascale``) runs the model itself, with the setting's shaping attached and
gradients enabled even inside ``torch.inference_mode`` (Lightning's test loop): the detector clones its input
batch into a normal tensor, and only the input gets a gradient. ``resolve_score`` reads a ``model.score`` entry:
a logit score (``energy``) or a detector spec (``knn@50``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ash_lightning.detectors import (
    ODIN,
    AdaScale,
    Detector,
    FeatureDetector,
    FeaturesAndLogits,
    FittedDetector,
    is_detector_spec,
    parse_detector,
    valid_forms,
)
from ash_lightning.detectors.fitting import classifier_weights
from ash_lightning.errors import UserError
from ash_lightning.scores.specs import get_score
from ash_lightning.shaping.hooks import attach_shaping
from ash_lightning.shaping.specs import Shaper, get_shaping
from ash_lightning.shaping.sweep import shaped_outputs

__all__ = ["SettingBatch", "detector_score", "detector_scores", "resolve_score", "score_name"]


def resolve_score(spec: str) -> Callable[[Tensor], Tensor] | Detector:
    """The logit score or the detector ``spec`` names; a ValueError naming both families' forms otherwise."""
    if isinstance(spec, str) and is_detector_spec(spec):
        return parse_detector(spec)
    try:
        return get_score(spec)
    except ValueError as err:
        raise ValueError(f"{err} Or a detector: {valid_forms()}.") from None


def score_name(score: Callable[[Tensor], Tensor] | Detector) -> str:
    """The normalised name a run reports: ``energy``, ``knn@50``."""
    if isinstance(score, Detector):
        return score.spec
    name: str = score.name  # type: ignore[attr-defined]  # get_score returns callables with a .name (Score)
    return name


@dataclass(frozen=True)
class SettingBatch:
    """One test batch under one setting: the ``model`` and the ``shaper`` at ``placement`` it runs with, the
    input ``x``, that setting's ``features`` (B, D) and ``logits`` (B, K) (feature-space detectors only), and the
    data transform's per-channel ``std`` (for ODIN's step in pixel space)."""

    model: nn.Module
    shaper: Shaper
    placement: str
    x: Tensor
    features: Tensor | None
    logits: Tensor | None
    std: Sequence[float]


def _odin_inputs(batch: SettingBatch) -> tuple[object, ...]:
    return batch.model, batch.x, batch.std


def _adascale_inputs(batch: SettingBatch) -> tuple[object, ...]:
    return FeaturesAndLogits(batch.model), batch.x, *classifier_weights(batch.model)


_INPUT_SPACE: dict[type[Detector], Callable[[SettingBatch], tuple[object, ...]]] = {
    ODIN: _odin_inputs,
    AdaScale: _adascale_inputs,
}


def detector_score(fitted: FittedDetector, batch: SettingBatch) -> Tensor:
    """The score (B,) of ``fitted`` on ``batch`` (see the module docstring)."""
    if isinstance(fitted.detector, FeatureDetector):
        return fitted.score(batch.features, batch.logits)
    inputs = _INPUT_SPACE[type(fitted.detector)]
    shaped = (
        nullcontext() if batch.shaper.spec == "none" else attach_shaping(batch.model, batch.shaper, batch.placement)
    )
    with torch.inference_mode(False), shaped:  # no hook for none: ODIN runs on networks without a classifier
        return fitted.score(*inputs(batch)).detach()


def detector_scores(
    model: nn.Module,
    fitted: FittedDetector,
    x: Tensor,
    shaping: str | Shaper = "none",
    placement: str = "penultimate",
    std: Sequence[float] | None = None,
) -> Tensor:
    """The score (B,) of ``fitted`` (from ``fit_detector``, or ``FittedDetector(parse_detector("odin"), {})``) on
    the input batch ``x`` for ``model`` with ``shaping`` attached at ``placement`` (the same shaping the detector
    was fitted with). ``std``: the data transform's per-channel std, for ODIN (default: ones)."""
    shaper = get_shaping(shaping)
    features = logits = None
    if isinstance(fitted.detector, FeatureDetector):
        with torch.no_grad():
            outputs = shaped_outputs(model, x, [shaper], placement)
        if outputs.features is None:
            raise UserError(
                f"{fitted.detector.spec} reads the classifier's input, but {type(model).__name__} has no classifier."
            )
        features, logits = outputs.features[0], outputs.logits[0]
    return detector_score(
        fitted, SettingBatch(model, shaper, placement, x, features, logits, std or [1.0] * x.shape[1])
    )
