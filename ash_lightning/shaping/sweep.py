"""Logits (and the features the classifier saw) for several shapers from one backbone pass.

A forward pass splits into a shared part, run once per batch, and a per-setting part, run once per shaper
(``split_point``):

* ``"classifier"`` (placement ``penultimate`` on a network with a classifier): shared = the classifier's input h,
  captured unshaped during one pass of the network; per setting = the classifier applied to h with the shaper
  attached. It is checked once per network that the classifier applied to h gives the network's logits; where
  something runs after the classifier, the network runs once per setting instead (with a warning).
* ``"head"`` (placement ``pre_pool`` on a model with timm's interface): shared = ``forward_features(x)``, per
  setting = ``forward_head``.
* ``"network"`` (any other placement): shared = x, per setting = the whole network.

Every setting also yields the input of the classifier as shaped by it (the penultimate features), which
feature-space detectors read; it is None for a network without a classifier.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn

from ash_lightning.shaping.hooks import attach_shaping, find_classifier
from ash_lightning.shaping.specs import Shaper

log = logging.getLogger(__name__)

SplitPoint = Literal["classifier", "head", "network"]

# Per network, checked on its first batch: does its classifier's output give its output? Where not, it runs whole.
_CLASSIFIER_IS_LAST: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()


class SettingOutputs(NamedTuple):
    """Per setting: ``features`` (S, B, D), the classifier's input as shaped (None without a classifier), and
    ``logits`` (S, B, K)."""

    features: Tensor | None
    logits: Tensor


def split_point(model: nn.Module, placement: str) -> SplitPoint:
    """Where ``model``'s forward pass splits into the shared part and the per-setting part for ``placement``."""
    if placement == "penultimate" and find_classifier(model) is not None and _CLASSIFIER_IS_LAST.get(model, True):
        return "classifier"
    if (
        placement == "pre_pool"
        and callable(getattr(model, "forward_features", None))
        and callable(getattr(model, "forward_head", None))
    ):
        return "head"
    return "network"


def runs_backbone_once(model: nn.Module, placement: str) -> bool:
    """True when a sweep at ``placement`` reuses one backbone pass per batch for every setting."""
    return split_point(model, placement) != "network"


@contextmanager
def _captured_input(module: nn.Module | None) -> Iterator[list[Tensor]]:
    """The first positional input of every call of ``module`` while the context is open, as its other forward
    pre-hooks (e.g. a shaping) left it; nothing is captured for ``module=None``."""
    seen: list[Tensor] = []
    if module is None:
        yield seen
        return

    def capture(_: nn.Module, args: tuple[Any, ...]) -> None:
        seen.append(args[0])

    handle = module.register_forward_pre_hook(capture)
    try:
        yield seen
    finally:
        handle.remove()


def shared_part(model: nn.Module, x: Tensor, placement: str) -> Tensor:
    """The part of the forward pass that every setting shares (see the module docstring), computed once."""
    point = split_point(model, placement)
    if point == "head":
        return _call(model, "forward_features", x)
    if point == "network":
        return x
    classifier = find_classifier(model)
    assert classifier is not None  # split point "classifier" means it has one
    with _captured_input(classifier) as seen:
        logits = model(x)
    features = seen[-1]
    if model not in _CLASSIFIER_IS_LAST:
        _CLASSIFIER_IS_LAST[model] = _classifier_is_last(classifier, features, logits)
    if not _CLASSIFIER_IS_LAST[model]:
        log.warning(
            "%s's classifier output is not the network's output, so the whole network runs once per shaping setting",
            type(model).__name__,
        )
        return x
    return features


def _classifier_is_last(classifier: nn.Module, features: Tensor, logits: Any) -> bool:
    """Whether ``classifier(features)`` is the network's output ``logits`` (up to rounding)."""
    if not isinstance(logits, Tensor):
        return False
    again = classifier(features)
    return again.shape == logits.shape and torch.allclose(again, logits, rtol=1e-5, atol=1e-6)


def _setting_part(
    model: nn.Module, shared: Tensor, shaper: Shaper, placement: str, classifier: nn.Module | None, point: SplitPoint
) -> tuple[Tensor | None, Tensor]:
    """``(features, logits)`` of one setting from the shared part: the classifier's input as ``shaper`` left it
    (None without a classifier) and the logits; ``classifier`` and ``point`` are the model's, found once per batch."""
    with attach_shaping(model, shaper, placement), _captured_input(classifier) as seen:
        if point == "classifier" and classifier is not None:
            logits = classifier(shared)
        elif point == "head":
            logits = _call(model, "forward_head", shared)
        else:
            logits = model(shared)
    return (seen[-1] if seen else None), logits


def _call(model: nn.Module, method: str, x: Tensor) -> Tensor:
    """``model.<method>(x)`` for timm's ``forward_features``/``forward_head``, which ``nn.Module`` does not declare."""
    result: Tensor = getattr(model, method)(x)
    return result


def shaped_outputs(model: nn.Module, x: Tensor, shapers: Sequence[Shaper], placement: str) -> SettingOutputs:
    """Features and logits of ``model`` on ``x`` with each of ``shapers`` attached at ``placement`` in turn, from
    one backbone pass where the split point allows it."""
    return outputs_from_shared(model, shared_part(model, x, placement), shapers, placement)


def outputs_from_shared(model: nn.Module, shared: Tensor, shapers: Sequence[Shaper], placement: str) -> SettingOutputs:
    """``shaped_outputs`` from an already computed ``shared_part`` (e.g. read from a feature cache)."""
    classifier, point = find_classifier(model), split_point(model, placement)
    per_setting = [_setting_part(model, shared, shaper, placement, classifier, point) for shaper in shapers]
    features = [f for f, _ in per_setting if f is not None]
    stacked = torch.stack(features) if len(features) == len(per_setting) else None
    return SettingOutputs(stacked, torch.stack([logits for _, logits in per_setting]))


def shaped_logits(model: nn.Module, x: Tensor, shapers: Sequence[Shaper], placement: str) -> Tensor:
    """Stack of logits (S, B, K), one per shaper: ``model`` with that shaper attached at ``placement``."""
    return shaped_outputs(model, x, shapers, placement).logits
