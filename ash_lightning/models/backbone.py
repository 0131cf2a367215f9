"""One factory for every backbone: timm's registry (ours included), an optional local checkpoint, eval mode."""

from __future__ import annotations

import difflib
import os
import warnings
from typing import Any

import timm
from torch import nn

import ash_lightning.models  # noqa: F401  (registers the CIFAR ResNets in timm's registry)
from ash_lightning.errors import UserError
from ash_lightning.models.checkpoint import load_checkpoint


def create_backbone(
    name: str,
    *,
    pretrained: bool = False,
    num_classes: int | None = None,
    checkpoint_path: str | os.PathLike | None = None,
    strict: bool = True,
) -> nn.Module:
    """``timm.create_model(name)`` plus ``checkpoint_path`` loading, with user errors turned into UserError."""
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise UserError(
            f"unknown backbone {name!r}: timm has no such model.{hint} "
            "Fix: pick a name from timm.list_models() (e.g. resnet50.tv_in1k, cifar_resnet20)."
        )
    kwargs: dict[str, Any] = {} if num_classes is None else {"num_classes": num_classes}
    try:
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except (OSError, RuntimeError) as err:
        if not pretrained:
            raise
        raise UserError(
            f"pretrained weights for {name!r} could not be loaded ({err.__class__.__name__}: "
            f"{str(err)[:200]}). Fix: run once with network access (or set HF_HUB_OFFLINE=1 with a "
            "filled cache), or set pretrained: false and checkpoint_path: <local file>."
        ) from err
    if checkpoint_path:
        load_checkpoint(model, checkpoint_path, strict=strict)
    return model.eval()


class RandomWeightsWarning(UserWarning):
    """A backbone is evaluated with the random weights it was created with."""


def warn_if_random_weights(name: str, *, pretrained: bool, checkpoint_path: str | os.PathLike | None) -> None:
    """Warn (``RandomWeightsWarning``) when a backbone to be evaluated has neither a checkpoint nor pretrained
    weights: its random initialisation would otherwise give plausible-looking but meaningless metrics."""
    if not pretrained and not checkpoint_path:
        warnings.warn(
            f"RANDOM WEIGHTS: backbone {name!r} has no checkpoint_path and pretrained: false, so an "
            "untrained network is evaluated (the results file says so too). Fix: set "
            "model.checkpoint_path or model.pretrained: true.",
            RandomWeightsWarning,
            stacklevel=3,
        )
