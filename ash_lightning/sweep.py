"""Logits for several shapers from one backbone pass.

With placement ``penultimate`` or ``pre_pool`` on a model with timm's interface, the hook point lies in
``forward_head``: ``forward_features`` runs once per batch and only the head (pooling and classifier)
runs per shaper. Any other placement needs the full network once per shaper.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ash_lightning.hooks import attach_shaping
from ash_lightning.shaping import Shaper

HEAD_PLACEMENTS = ("penultimate", "pre_pool")


def runs_backbone_once(model: nn.Module, placement: str) -> bool:
    """True when ``placement`` is inside ``model.forward_head`` (timm interface), so features can be reused."""
    return (
        placement in HEAD_PLACEMENTS
        and callable(getattr(model, "forward_features", None))
        and callable(getattr(model, "forward_head", None))
    )


def shaped_logits(model: nn.Module, x: Tensor, shapers: Sequence[Shaper], placement: str) -> Tensor:
    """Stack of logits (S, B, K), one per shaper: ``model`` with that shaper attached at ``placement``."""
    if runs_backbone_once(model, placement):
        features = model.forward_features(x)
        run = model.forward_head
    else:
        features, run = x, model
    outputs = []
    for shaper in shapers:
        with attach_shaping(model, shaper, placement):
            outputs.append(run(features))
    return torch.stack(outputs)
