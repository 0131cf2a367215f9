"""``odin[@T[@eps]]``: ODIN (Liang, Li & Srikant, "Enhancing the Reliability of Out-of-distribution Image
Detection in Neural Networks", ICLR 2018). Defaults T = 1000, eps = 0.0014 (OpenOOD v1.5's ``odin.yml``).

With x the model's (normalised) input and f the logits:

    g = sign(d/dx CE(f(x) / T, argmax f(x)))   (+1 where the gradient is 0)
    x' = x - eps * g / std                     (per input channel)
    score = max_k softmax(f(x') / T)_k

eps is a step in pixel space ([0, 1] images): the paper's code (facebookresearch/odin, ``calData.py``) divides the
sign by the normalising transform's per-channel std (63.0/255, 62.1/255, 66.7/255 for its CIFAR models), which is
``std`` here; pass ones for a model that normalises inside. Checked against OpenOOD v1.5,
``openood/postprocessors/odin_postprocessor.py`` (same steps, batched, with the mean cross-entropy over the batch:
the 1/B factor does not change the sign). Cost: one forward and one backward pass to the input plus a second
forward pass, on top of the test pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from ash_lightning.detectors.base import Detector, compute_dtype
from ash_lightning.detectors.forward import gradient_leaf

__all__ = ["ODIN", "odin"]


def odin(
    model: Callable[[Tensor], Tensor], x: Tensor, temperature: float, epsilon: float, std: Sequence[float]
) -> Tensor:
    """ODIN score (B,) of the input batch ``x`` (B, C, ...) for ``model`` (input -> logits, in eval mode): see the
    module docstring. ``std`` has one entry per channel C. Gradients flow to the input only, not into the
    parameters' ``.grad``; it cannot run under ``torch.inference_mode`` (UserError)."""
    if len(std) != x.shape[1]:
        raise ValueError(
            f"odin: std has {len(std)} entries but the input has {x.shape[1]} channels "
            f"(shape {tuple(x.shape)}); pass the data transform's per-channel std."
        )
    inputs = gradient_leaf(x, "odin")
    with torch.enable_grad():
        logits = model(inputs)
        loss = F.cross_entropy(logits / temperature, logits.detach().argmax(1))
        (gradient,) = torch.autograd.grad(loss, inputs)
    sign = torch.where(gradient >= 0, 1.0, -1.0).to(x.dtype)
    scale = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, *[1] * (x.ndim - 2))
    with torch.no_grad():
        logits = model(inputs.detach() - epsilon * sign / scale)
    return torch.softmax(logits.to(compute_dtype(logits)) / temperature, dim=1).amax(1)


@dataclass(frozen=True)
class ODIN(Detector):
    """``odin@T@eps``: ``ODIN(T, eps).score(model, x, std)`` = :func:`odin`. Needs no fit data, needs gradients."""

    name: ClassVar[str] = "odin"
    needs_fit: ClassVar[bool] = False
    needs_gradients: ClassVar[bool] = True
    temperature: float = 1000.0
    epsilon: float = 0.0014

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise self.invalid(f"temperature T must be a finite number > 0, got {self.temperature!r}.")
        if not (math.isfinite(self.epsilon) and self.epsilon >= 0):
            raise self.invalid(f"perturbation eps must be a finite number >= 0, got {self.epsilon!r}.")

    def score(self, model: Callable[[Tensor], Tensor], x: Tensor, std: Sequence[float]) -> Tensor:
        return odin(model, x, self.temperature, self.epsilon, std)

    def score_fitted(self, stats: Mapping[str, Tensor], *inputs: Any) -> Tensor:
        return self.score(*inputs)
