"""One forward pass that returns the penultimate features along with the logits, for input-space detectors."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from ash_lightning.hooks import _classifier

__all__ = ["FeaturesAndLogits"]


@dataclass(frozen=True)
class FeaturesAndLogits:
    """``FeaturesAndLogits(model)(x) == (h, model(x))`` with h the input of ``model.get_classifier()`` (B, D), as
    shaped by any shaping attached there, captured by a forward pre-hook that lives for the one call."""

    model: nn.Module

    def __call__(self, x: Tensor) -> tuple[Tensor, Tensor]:
        captured: list[Tensor] = []

        def capture(module: nn.Module, args: tuple[Any, ...]) -> None:
            captured.append(args[0])

        with _classifier(self.model).register_forward_pre_hook(capture):
            logits = self.model(x)
        return captured[-1], logits


ForwardWithFeatures = Callable[[Tensor], tuple[Tensor, Tensor]]
