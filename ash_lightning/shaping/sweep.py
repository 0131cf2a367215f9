"""Logits (and the features the classifier saw) for several shapers from one backbone pass.

A forward pass splits into a shared part, run once per batch, and a per-setting part, run once per shaper
(``split_point``):

* ``"classifier"`` (placement ``penultimate`` on a network with a classifier): shared = the classifier's input h,
  captured unshaped during one pass of the network; per setting = the classifier applied to h with the shaper
  attached. It is checked once per network that the classifier applied to h gives the network's logits; where
  something runs after the classifier, the network runs once per setting instead (with a warning).
* ``"head"`` (placement ``pre_pool`` on a model with timm's interface): shared = ``forward_features(x)``, per
  setting = ``forward_head``.
* ``"stage"`` (a ``StageShaper``, i.e. ``rankfeat``, among the shapers, placement ``penultimate`` or ``pre_pool``, a
  model with timm's interface): shared = the input of the last stage (``last_stage``: OpenOOD's block 3), taken from a
  pass that stops there; per setting = ``forward_head`` of the last stage's output, which runs once for all other
  settings, and of ``StageShaper.branches`` for a ``rankfeat`` setting. It is checked once per network that
  ``forward_head`` of the last stage's output gives the network's logits; where not, the network runs once per
  setting (with a warning).
* ``"network"`` (any other placement, or a ``StageShaper`` at one): shared = x, per setting = the whole network.

Every setting also yields the input of the classifier as shaped by it (the penultimate features), which
feature-space detectors read; it is None for a network without a classifier.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn

from ash_lightning.shaping.hooks import StageShaper, attach_shaping, find_classifier, find_last_stage
from ash_lightning.shaping.specs import Shaper

log = logging.getLogger(__name__)

SplitPoint = Literal["classifier", "head", "stage", "network"]

# Per network, checked on its first batch: does its classifier's output give its output? Where not, it runs whole.
_CLASSIFIER_IS_LAST: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()
# Likewise: does forward_head of its last stage's output give its output?
_STAGE_IS_LAST: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()


class _StageReached(Exception):
    """Raised by a forward pre-hook to stop a pass at the last stage's input (nothing after it is computed)."""


class SettingOutputs(NamedTuple):
    """Per setting: ``features`` (S, B, D), the classifier's input as shaped (None without a classifier), and
    ``logits`` (S, B, K)."""

    features: Tensor | None
    logits: Tensor


def _has_head(model: nn.Module) -> bool:
    """Whether ``model`` has timm's ``forward_features``/``forward_head``."""
    return callable(getattr(model, "forward_features", None)) and callable(getattr(model, "forward_head", None))


def split_point(model: nn.Module, placement: str, shapers: Sequence[Shaper] = ()) -> SplitPoint:
    """Where ``model``'s forward pass splits into the shared part and the per-setting part for ``placement`` and
    ``shapers``."""
    if any(isinstance(shaper, StageShaper) for shaper in shapers):
        stage_ok = find_last_stage(model) is not None and _STAGE_IS_LAST.get(model, True)
        return "stage" if placement in ("penultimate", "pre_pool") and _has_head(model) and stage_ok else "network"
    if placement == "penultimate" and find_classifier(model) is not None and _CLASSIFIER_IS_LAST.get(model, True):
        return "classifier"
    if placement == "pre_pool" and _has_head(model):
        return "head"
    return "network"


def runs_backbone_once(model: nn.Module, placement: str, shapers: Sequence[Shaper] = ()) -> bool:
    """True when a sweep of ``shapers`` at ``placement`` reuses one backbone pass per batch for every setting."""
    return split_point(model, placement, shapers) != "network"


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


def shared_part(model: nn.Module, x: Tensor, placement: str, shapers: Sequence[Shaper] = ()) -> Tensor:
    """The part of the forward pass that every setting of ``shapers`` shares (see the module docstring), computed
    once."""
    point = split_point(model, placement, shapers)
    if point == "stage":
        return _stage_input(model, x)
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


def _same_logits(again: Tensor, logits: Any) -> bool:
    """Whether ``again`` is the network's output ``logits`` (up to rounding)."""
    return isinstance(logits, Tensor) and again.shape == logits.shape and torch.allclose(again, logits, 1e-5, 1e-6)


def _classifier_is_last(classifier: nn.Module, features: Tensor, logits: Any) -> bool:
    """Whether ``classifier(features)`` is the network's output ``logits`` (up to rounding)."""
    return isinstance(logits, Tensor) and _same_logits(classifier(features), logits)


def _stage_input(model: nn.Module, x: Tensor) -> Tensor:
    """The input of ``model``'s last stage on ``x`` from a pass stopped there; on the network's first batch, from a
    whole pass that also checks that ``forward_head`` of the stage's output gives the logits (else x, with a
    warning: the network then runs once per setting)."""
    stage = find_last_stage(model)
    assert stage is not None  # split point "stage" means it has one
    if model not in _STAGE_IS_LAST:
        with _captured_input(stage) as seen:
            logits = model(x)
        _STAGE_IS_LAST[model] = bool(seen) and _same_logits(_call(model, "forward_head", stage(seen[-1])), logits)
        if not _STAGE_IS_LAST[model]:
            log.warning(
                "%s's forward_head of its last stage's output is not the network's output, so the whole network "
                "runs once per shaping setting",
                type(model).__name__,
            )
            return x
        return seen[-1]

    def stop(_: nn.Module, args: tuple[Any, ...]) -> None:
        raise _StageReached

    with _captured_input(stage) as seen:
        handle = stage.register_forward_pre_hook(stop)
        try:
            model(x)
        except _StageReached:
            pass
        finally:
            handle.remove()
    return seen[-1]


@dataclass(frozen=True)
class _Split:
    """What every setting of a batch shares: the split ``point``, the model's ``classifier``, and for point
    ``"stage"`` the last ``stage`` and its output ``stage_output`` on the shared input."""

    point: SplitPoint
    classifier: nn.Module | None
    stage: nn.Module | None = None
    stage_output: Tensor | None = None


def _setting_part(
    model: nn.Module, shared: Tensor, shaper: Shaper, placement: str, split: _Split
) -> tuple[Tensor | None, Tensor]:
    """``(features, logits)`` of one setting from the shared part: the classifier's input as ``shaper`` left it
    (None without a classifier) and the logits; ``split`` holds what the batch's settings share."""
    point, classifier = split.point, split.classifier
    with attach_shaping(model, shaper, placement), _captured_input(classifier) as seen:
        if point == "classifier" and classifier is not None:
            logits = classifier(shared)
        elif point == "stage" and split.stage is not None and split.stage_output is not None:
            mixed = (
                shaper.branches(split.stage, shared, split.stage_output)
                if isinstance(shaper, StageShaper)
                else split.stage_output
            )
            logits = _call(model, "forward_head", mixed)
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
    return outputs_from_shared(model, shared_part(model, x, placement, shapers), shapers, placement)


def outputs_from_shared(model: nn.Module, shared: Tensor, shapers: Sequence[Shaper], placement: str) -> SettingOutputs:
    """``shaped_outputs`` from an already computed ``shared_part`` (e.g. read from a feature cache)."""
    split = _Split(split_point(model, placement, shapers), find_classifier(model))
    if split.point == "stage":
        stage = find_last_stage(model)
        assert stage is not None  # split point "stage" means it has one
        split = _Split(split.point, split.classifier, stage, stage(shared))
    per_setting = [_setting_part(model, shared, shaper, placement, split) for shaper in shapers]
    features = [f for f, _ in per_setting if f is not None]
    stacked = torch.stack(features) if len(features) == len(per_setting) else None
    return SettingOutputs(stacked, torch.stack([logits for _, logits in per_setting]))


def shaped_logits(model: nn.Module, x: Tensor, shapers: Sequence[Shaper], placement: str) -> Tensor:
    """Stack of logits (S, B, K), one per shaper: ``model`` with that shaper attached at ``placement``."""
    return shaped_outputs(model, x, shapers, placement).logits
