"""Activation shaping (ASH, ReAct, SCALE) as pure, out-of-place tensor functions.

Every function takes a batch-first floating-point tensor ``x`` of shape (B, ...) -- e.g. (B, C),
(B, C, H, W) or (B, N, C) -- and works per sample over all ``n`` non-batch elements. It returns a new
tensor of the same shape and dtype and never modifies ``x``.

Pruning (ASH family, Djurisic et al., ICLR 2023): keep the ``k = n - round(n * percentile / 100)``
largest values of each sample (round half to even, as ``np.round`` in the authors' code; one
``torch.topk``) and zero the rest. ``k`` is clamped to at least 1, so a single-element sample always
keeps its element. ``percentile`` must lie in [0, 100).

Numerics:

* Sums and exponentials are computed in float32 (float64 for float64 input), so float16/bfloat16
  inputs neither overflow nor underflow there. Results are cast back to the input dtype, saturating at
  the dtype's largest finite value instead of becoming inf.
* An all-zero sample comes back as zeros, never NaN (ASH-S and SCALE use the factor 1 when the kept
  sum is 0); only ASH-rand, as in the authors' code, still draws values for its k survivors.
  Constant, all-negative and single-element samples and a batch of one give finite results.
* ASH assumes non-negative (post-ReLU) activations. The ASH family (``ash_*``, ``react_and_ash``,
  ``scale``) warns once per process when it sees negative values, e.g. post-LayerNorm ViT/Swin tokens.

Spec strings naming these functions (``"ash_s@90"``) are resolved by ``ash_lightning.shaping.specs.get_shaping``.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

__all__ = [
    "accumulation_dtype",
    "ash_b",
    "ash_p",
    "ash_rand",
    "ash_s",
    "check_percentile",
    "keep_count",
    "prune_top_k",
    "react",
    "react_and_ash",
    "saturate_",
    "scale",
]

_negative_warned = False


def _reset_negative_warning() -> None:
    """Re-arm the once-per-process warning about negative activations (for tests)."""
    global _negative_warned
    _negative_warned = False


def _warn_if_negative(x: Tensor, caller: str) -> None:
    """Warn once per process if ``x`` has negative values; costs one reduction until it has warned."""
    global _negative_warned
    if _negative_warned or not bool(x.min() < 0):
        return
    _negative_warned = True
    percent = 100.0 * (x < 0).float().mean().item()
    warnings.warn(
        f"ASH assumes non-negative activations (post-ReLU); {percent:.1f}% of the values passed to "
        f"{caller} are negative (e.g. post-LayerNorm ViT/Swin tokens): pruning by magnitude rank is "
        "then not what the paper evaluated. Shape at a post-ReLU layer or use placement=<module name>.",
        UserWarning,
        stacklevel=4,  # the caller of ash_p & co. (warn <- _warn_if_negative <- prune_top_k <- ash_p)
    )


def check_percentile(percentile: float, caller: str) -> None:
    """A ValueError naming ``caller`` unless 0 <= ``percentile`` < 100."""
    if not 0 <= percentile < 100:
        raise ValueError(
            f"{caller}: percentile={percentile!r} is outside the valid range [0, 100); "
            "pass the percentage of each sample to prune, e.g. percentile=90."
        )


def check_threshold(threshold: float, caller: str) -> None:
    """A ValueError naming ``caller`` unless ``threshold`` > 0: clipping at t <= 0 turns every non-negative
    activation into t, so every sample gets the same score and nothing can be detected."""
    if not threshold > 0:
        cause = (
            "is not a number"
            if math.isnan(threshold)
            else f"<= 0 clips every activation (non-negative after ReLU) to {threshold:g}, so every sample gets the "
            "same score (AUROC 0.5)"
        )
        raise ValueError(
            f"{caller}: threshold {threshold:g} {cause}. Fix: use a positive threshold, e.g. {caller}@1.0"
            f"{'@90' if caller == 'react_and_ash' else ''}, or react@p90 (the 90th percentile of the ID activations)"
        )


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32, or the input dtype when it is wider."""
    return torch.promote_types(dtype, torch.float32)


def keep_count(n: int, percentile: float) -> int:
    """k = n - round(n * percentile / 100), at least 1: how many of ``n`` values pruning at ``percentile`` keeps."""
    return max(1, n - round(n * percentile / 100))


def prune_top_k(x: Tensor, percentile: float, caller: str) -> tuple[Tensor, Tensor, Tensor]:
    """One top-k per sample: ``(flat, values, indices)`` with ``flat`` = ``x`` reshaped to (B, n)."""
    check_percentile(percentile, caller)
    if x.dim() < 2 or not x.is_floating_point():
        raise ValueError(
            f"{caller} expects a batch-first floating-point tensor (B, ...) with at least 2 dims; got "
            f"shape {tuple(x.shape)} and dtype {x.dtype}. Add a feature dim (x[:, None]) or call x.float()."
        )
    _warn_if_negative(x, caller)
    n = math.prod(x.shape[1:])
    flat = x.reshape(x.shape[0], n)
    values, indices = flat.topk(keep_count(n, percentile), dim=1, sorted=False)
    return flat, values, indices


def _place(flat: Tensor, indices: Tensor, values: Tensor, shape: torch.Size) -> Tensor:
    """A new tensor of ``shape``: ``values`` at ``indices`` of each flattened sample, zeros elsewhere."""
    return flat.new_zeros(flat.shape).scatter_(1, indices, values).view(shape)


def saturate_(t: Tensor, dtype: torch.dtype) -> Tensor:
    """Cast the temporary ``t`` to ``dtype``, clamping it in place so that overflow saturates at
    ``dtype``'s largest finite value instead of becoming inf."""
    info = torch.finfo(dtype)
    return t.clamp_(info.min, info.max).to(dtype)


def _exp_ratio(flat: Tensor, values: Tensor) -> Tensor:
    """``exp(s1 / s2)`` per sample with s1 = ``flat.sum(1)``, s2 = ``values.sum(1)`` (kept values), summed
    in float32 or wider; 1 where ``s2 == 0``; capped at the largest finite value."""
    acc = accumulation_dtype(flat.dtype)
    s1, s2 = flat.sum(1, dtype=acc), values.sum(1, dtype=acc)
    ratio = torch.where(s2 != 0, s1 / s2, 0.0)
    return ratio.exp().clamp(max=torch.finfo(acc).max)


def ash_p(x: Tensor, percentile: float = 65) -> Tensor:
    """ASH-P: keep the top-k values of each sample unchanged, zero the rest."""
    flat, values, indices = prune_top_k(x, percentile, "ash_p")
    return _place(flat, indices, values, x.shape)


def ash_b(x: Tensor, percentile: float = 65) -> Tensor:
    """ASH-B: set the top-k positions of each sample to ``s1 / k`` (s1 = sum before pruning), zero the rest."""
    flat, values, indices = prune_top_k(x, percentile, "ash_b")
    s1 = flat.sum(1, dtype=accumulation_dtype(x.dtype))
    fill = saturate_(s1 / values.shape[1], x.dtype)
    return _place(flat, indices, fill[:, None].expand_as(values), x.shape)


def _ash_s(x: Tensor, percentile: float, caller: str) -> Tensor:
    flat, values, indices = prune_top_k(x, percentile, caller)
    factor = _exp_ratio(flat, values)
    return _place(flat, indices, saturate_(values * factor[:, None], x.dtype), x.shape)


def ash_s(x: Tensor, percentile: float = 65) -> Tensor:
    """ASH-S: keep the top-k values of each sample times ``exp(s1 / s2)`` (s1, s2 = sums before and
    after pruning), zero the rest.

    Example:
        >>> import torch
        >>> from ash_lightning import ash_s
        >>> x = torch.tensor([[1.0, 4.0, 2.0, 3.0]])  # s1 = 10; at 50%, k = 2 keeps 4 and 3: s2 = 7
        >>> ash_s(x, percentile=50)
        tensor([[ 0.0000, 16.6909,  0.0000, 12.5182]])
        >>> torch.allclose(ash_s(x, 50)[0, 1], 4 * torch.exp(torch.tensor(10 / 7)))
        True
    """
    return _ash_s(x, percentile, "ash_s")


def ash_rand(
    x: Tensor,
    percentile: float = 65,
    low: float = 0.0,
    high: float = 10.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """ASH-rand: replace the top-k values of each sample with ``U(low, high)`` draws, zero the rest."""
    flat, values, indices = prune_top_k(x, percentile, "ash_rand")
    return _place(flat, indices, values.uniform_(low, high, generator=generator), x.shape)


def react(x: Tensor, threshold: float) -> Tensor:
    """ReAct (Sun et al., NeurIPS 2021): ``min(x, threshold)`` elementwise."""
    return x.clamp(max=threshold)


def react_and_ash(x: Tensor, threshold: float, percentile: float) -> Tensor:
    """ReAct clipping at ``threshold``, then ASH-S at ``percentile``."""
    return _ash_s(react(x, threshold), percentile, "react_and_ash")


def scale(x: Tensor, percentile: float = 85) -> Tensor:
    """SCALE (Xu et al., ICLR 2024): the unpruned ``x`` times ``exp(s1 / s2)`` per sample, with s1 the
    sum of the sample and s2 the sum of its top-k values."""
    flat, values, _ = prune_top_k(x, percentile, "scale")
    factor = _exp_ratio(flat, values)
    return saturate_(x * factor.view(-1, *[1] * (x.dim() - 1)), x.dtype)
