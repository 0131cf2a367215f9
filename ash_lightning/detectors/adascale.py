"""``adascale[@p_min@p_max[@k1@k2@lambda@o]]``: AdaSCALE-A (Regmi, "AdaSCALE: Adaptive Scaling for OOD Detection",
ICML 2025): SCALE with a per-sample percentile set by how much the top activations move under a small input
perturbation. Defaults p_min = 75, p_max = 85, k1 = 5, k2 = 1 (percent of the D units), lambda = 10, o = 0.05, as
OpenOOD v1.5's ``configs/postprocessors/adascale_a.yml`` (whose sweep then tunes p_min, p_max on OOD validation
data; its ResNet-50 choice is 80, 85).

Per sample, with model input x (normalised, as the model sees it), penultimate features h (D,), logits l:

1. g = d l_m / dx, m = argmax l; x' = x + 0.5 * sign(g) on the fraction o of input elements with the smallest
   |g| (the least sensitive ones); h' = features of x'.
2. C_o = sum of relu(h') over the top-k1 units of h; Q = sum of |h - h'| over the top-k2 units of h
   (k = int(D * percent / 100), at least 1: OpenOOD's int() alone gives k2 = 0 for D < 100, dropping Q);
   Q' = C_o + lambda * Q.
3. p = p_min + (1 - F(Q')) * (p_max - p_min), F the empirical CDF of Q' on the ID fit data (fraction of fit
   values <= Q', as statsmodels' ECDF); a larger shift than ID gives a smaller percentile (weaker scaling).
4. r = sum(relu h) / sum of the top-k(p) values of relu h, k(p) = D - round(D * p / 100) (as SCALE);
   score = logsumexp(W (h * exp(r)) + b).

Checked against OpenOOD v1.5, ``openood/postprocessors/adascale_postprocessor.py`` and the ``ada_scale`` /
``AdaScaleANet.forward_threshold`` of ``openood/networks/adascale_net.py``. Differences: the ECDF uses all fit
samples (OpenOOD keeps a random 5000); the perturbation magnitude 0.5 is in the model's input space, as there.
The logit-scaling variant AdaSCALE-L is not provided. Cost: a forward and a backward pass to the input, then a
forward pass of x' (the score reuses the first pass's h).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from ash_lightning.detectors.base import Detector, FittedDetector, compute_dtype
from ash_lightning.detectors.forward import ForwardWithFeatures, gradient_leaf

__all__ = [
    "AdaScale",
    "adaptive_percentiles",
    "adascale_perturbation",
    "adascale_shift",
    "adascale_logits",
    "perturbed_pass",
]

PERTURBATION = 0.5  # OpenOOD's step on the perturbed input elements


def adascale_perturbation(x: Tensor, gradient: Tensor, fraction: float) -> Tensor:
    """``x + 0.5 * sign(gradient)`` on the int(fraction * n) elements of each sample with the smallest |gradient|
    (n elements per sample), ``x`` elsewhere."""
    flat = gradient.reshape(gradient.shape[0], -1)
    count = int(flat.shape[1] * fraction)
    chosen = flat.abs().topk(count, dim=1, largest=False).indices
    mask = torch.zeros_like(flat).scatter_(1, chosen, 1.0).view_as(x)
    return x + PERTURBATION * gradient.sign() * mask


def perturbed_pass(forward: ForwardWithFeatures, x: Tensor, fraction: float) -> tuple[Tensor, Tensor, Tensor]:
    """``(h, logits, h')``: the features and logits of ``x`` and the features of its AdaSCALE perturbation, the
    gradient of the predicted class's logit taken to the input only (not under ``torch.inference_mode``). All
    three are detached."""
    inputs = gradient_leaf(x, "adascale")
    with torch.enable_grad():
        features, logits = forward(inputs)
        top = logits.gather(1, logits.detach().argmax(1, keepdim=True)).sum()
        (gradient,) = torch.autograd.grad(top, inputs)
    with torch.no_grad():
        perturbed, _ = forward(adascale_perturbation(inputs.detach(), gradient, fraction))
    return features.detach(), logits.detach(), perturbed


def _top_units(features: Tensor, percent: float) -> Tensor:
    """Indices (B, k) of each sample's k = max(1, int(D * percent / 100)) largest features."""
    return features.topk(max(1, int(features.shape[1] * percent / 100)), dim=1).indices


def adascale_shift(features: Tensor, perturbed: Tensor, k1: float, k2: float, lmbda: float) -> Tensor:
    """Q' (B,) = C_o + lambda * Q: relu(h') summed over the top-k1% units of h plus lambda times |h - h'| summed
    over the top-k2% units of h."""
    correction = F.relu(perturbed).gather(1, _top_units(features, k1)).sum(1)
    shift = (features - perturbed).abs().gather(1, _top_units(features, k2)).sum(1)
    return correction + lmbda * shift


def adaptive_percentiles(shift: Tensor, fit_shifts: Tensor, p_min: float, p_max: float) -> Tensor:
    """p (B,) = p_min + (1 - F(Q')) (p_max - p_min), F the empirical CDF of the sorted ``fit_shifts``."""
    cdf = torch.searchsorted(fit_shifts, shift.contiguous(), right=True).to(shift.dtype) / fit_shifts.numel()
    return p_min + (1 - cdf) * (p_max - p_min)


def adascale_logits(features: Tensor, percentiles: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``W (h * exp(r)) + b`` with r = sum(relu h) / (sum of the top-k(p) of relu h), k(p) = D - round(D p / 100)
    per sample (at least 1); r = 0 where that top-k sum is 0."""
    positive = F.relu(features)
    d = features.shape[1]
    keep = (d - torch.round(d * percentiles / 100)).clamp(1, d).long()
    values = positive.topk(int(keep.max()), dim=1).values
    kept = values.masked_fill(torch.arange(values.shape[1], device=values.device) >= keep[:, None], 0).sum(1)
    ratio = torch.where(kept > 0, positive.sum(1) / kept, 0.0)
    return F.linear(
        features * ratio.exp()[:, None], weight.to(features.dtype), None if bias is None else bias.to(features.dtype)
    )


@dataclass(frozen=True)
class AdaScale(Detector):
    """``adascale@p_min@p_max@k1@k2@lambda@o`` (see the module docstring). Fit: ``fit(shifts)`` with the
    ``fit_shifts(forward, x)`` of the ID fit batches; score: ``fitted.score(forward, x, weight, bias)`` with
    ``forward`` an input -> (features, logits) callable such as ``FeaturesAndLogits(model)``. Stats:
    ``fit_shifts`` (N,), sorted."""

    name: ClassVar[str] = "adascale"
    needs_gradients: ClassVar[bool] = True
    p_min: float = 75.0
    p_max: float = 85.0
    k1: float = 5.0
    k2: float = 1.0
    lmbda: float = 10.0
    o: float = 0.05

    def __post_init__(self) -> None:
        if not (0 < self.p_min <= self.p_max < 100):
            raise self.invalid(
                f"percentiles must satisfy 0 < p_min <= p_max < 100, got {self.p_min!r}, {self.p_max!r}."
            )
        for label, value in (("k1", self.k1), ("k2", self.k2)):
            if not 0 < value <= 100:
                raise self.invalid(f"{label} (percent of the feature units) must be in (0, 100], got {value!r}.")
        if not (math.isfinite(self.lmbda) and self.lmbda >= 0):
            raise self.invalid(f"lambda must be a finite number >= 0, got {self.lmbda!r}.")
        if not 0 < self.o <= 1:
            raise self.invalid(f"o (fraction of input elements perturbed) must be in (0, 1], got {self.o!r}.")

    def fit_shifts(self, forward: ForwardWithFeatures, x: Tensor) -> Tensor:
        """Q' (B,) of an ID fit batch; gather them over the fit data for :meth:`fit`."""
        features, _, perturbed = perturbed_pass(forward, x, self.o)
        dtype = compute_dtype(features)
        return adascale_shift(features.to(dtype), perturbed.to(dtype), self.k1, self.k2, self.lmbda)

    def fit(self, shifts: Tensor) -> FittedDetector:
        """Fitted on the Q' values (N,) of the ID fit data (at least one)."""
        if shifts.ndim != 1 or shifts.numel() == 0:
            raise self.invalid(
                f"needs the Q' values of the ID fit data as a non-empty (N,) tensor, got shape {tuple(shifts.shape)}."
            )
        return FittedDetector(self, {"fit_shifts": shifts.sort().values})

    def score_fitted(self, stats: Mapping[str, Tensor], *inputs: Any) -> Tensor:
        forward, x, weight, bias = inputs
        features, _, perturbed = perturbed_pass(forward, x, self.o)
        dtype = compute_dtype(features)
        features, perturbed = features.to(dtype), perturbed.to(dtype)
        shift = adascale_shift(features, perturbed, self.k1, self.k2, self.lmbda)
        fit_shifts = stats["fit_shifts"].to(features.device, dtype)
        percentiles = adaptive_percentiles(shift, fit_shifts, self.p_min, self.p_max)
        return torch.logsumexp(adascale_logits(features, percentiles, weight, bias), dim=1)
