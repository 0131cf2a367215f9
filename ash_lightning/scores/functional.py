"""OOD scores: pure functions from logits ``(B, K)`` to a per-sample score ``(B,)``.

Higher scores mean "more in-distribution". Half-precision (and integer) logits are
upcast to float32 before any arithmetic, so the result is float32 (float64 for
float64 input) and cannot overflow where the half-precision version would.

Spec strings naming these functions (``"energy@2.0"``) are resolved by ``ash_lightning.scores.specs.get_score``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["energy", "gen", "max_logit", "msp", "neg_entropy"]


def _upcast(logits: Tensor) -> Tensor:
    """Check the ``(B, K)`` shape and return the logits in float32 or wider."""
    if logits.ndim != 2:
        raise ValueError(
            f"OOD scores expect logits of shape (batch, classes), got shape {tuple(logits.shape)}; "
            "flatten or index the extra dimensions first."
        )
    if logits.dtype in (torch.float32, torch.float64):
        return logits
    return logits.float()


def _check_positive(name: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}.")


def _check_gen_args(gamma: float, m: int) -> None:
    _check_positive("gamma", gamma)
    if m < 1:
        raise ValueError(f"m (number of top classes) must be >= 1, got {m!r}.")


def energy(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Negative free energy: ``T * logsumexp(logits / T)`` over classes."""
    _check_positive("temperature", temperature)
    return temperature * torch.logsumexp(_upcast(logits) / temperature, dim=1)


def msp(logits: Tensor) -> Tensor:
    """Maximum softmax probability: ``max_k softmax(logits)_k``."""
    return torch.softmax(_upcast(logits), dim=1).amax(dim=1)


def max_logit(logits: Tensor) -> Tensor:
    """Maximum logit: ``max_k logits_k``."""
    return _upcast(logits).amax(dim=1)


def gen(logits: Tensor, gamma: float = 0.1, m: int = 100) -> Tensor:
    """GEN (Liu et al., CVPR 2023): ``-sum_{top min(m, K) p} p^gamma * (1 - p)^gamma``, p = softmax."""
    _check_gen_args(gamma, m)
    probs = torch.softmax(_upcast(logits), dim=1)
    if m < probs.shape[1]:
        probs = probs.topk(m, dim=1, sorted=False).values
    return -(probs.pow(gamma) * (1.0 - probs).pow(gamma)).sum(dim=1)


def neg_entropy(logits: Tensor) -> Tensor:
    """Negative entropy of the softmax: ``sum_k p_k log p_k``, computed from ``log_softmax``."""
    log_probs = torch.log_softmax(_upcast(logits), dim=1)
    return (log_probs.exp() * log_probs).sum(dim=1)
