"""What input-space detectors need from the model: the penultimate features along with the logits of one forward
pass, and an input batch that gradients can reach."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ash_lightning.errors import UserError
from ash_lightning.shaping.hooks import classifier_of

__all__ = ["FeaturesAndLogits", "ForwardWithFeatures", "gradient_leaf"]


@dataclass(frozen=True)
class FeaturesAndLogits:
    """``FeaturesAndLogits(model)(x) == (h, model(x))`` with h the input of ``model.get_classifier()`` (B, D), as
    shaped by any shaping attached there, captured by a forward pre-hook that lives for the one call."""

    model: nn.Module

    def __call__(self, x: Tensor) -> tuple[Tensor, Tensor]:
        captured: list[Tensor] = []

        def capture(module: nn.Module, args: tuple[Any, ...]) -> None:
            captured.append(args[0])

        with classifier_of(self.model).register_forward_pre_hook(capture):
            logits = self.model(x)
        return captured[-1], logits


ForwardWithFeatures = Callable[[Tensor], tuple[Tensor, Tensor]]


def gradient_leaf(x: Tensor, spec: str) -> Tensor:
    """A leaf copy of the input batch ``x`` that requires grad (a clone for an inference-mode tensor); a UserError
    inside ``torch.inference_mode``, where no gradient can be taken."""
    if torch.is_inference_mode_enabled():
        raise UserError(
            f"{spec} needs gradients with respect to the input, but it runs under torch.inference_mode. "
            "Fix: run it outside inference mode (with Lightning: Trainer(inference_mode=False))."
        )
    return (x.clone() if x.is_inference() else x.detach()).requires_grad_(True)
