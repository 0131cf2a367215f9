"""Shapers fitted on ID statistics (ReAct at a percentile, VRA, DICE) and logit shapers (DICE, LTS), and what
every calibrated shaper is made of (``StatsRequest``, ``IDStats``, ``calibrated``).

Spec strings, registered when this module (or ``ash_lightning.shaping.calibration``) is imported:

* ``react@1.0``: ReAct with a fixed threshold (``ash_lightning.shaping.functional.react``);
  ``react@p90``: ReAct (Sun et al., NeurIPS 2021) with the threshold set to the 90th percentile of the ID
  activations at the placement, over all units and samples (``np.percentile`` of the flattened activations).
  Checked against deeplearning-wisc/react ``compute_threshold.py`` and OpenOOD's
  ``openood/postprocessors/react_postprocessor.py``, which both take the percentile on ID validation data
  (the paper: "estimated on ID data"); set ``data.fit`` to the ID validation or training set.
* ``vra@10@90``: VRA (Xu et al., NeurIPS 2023) with alpha, beta = the 10th and 90th percentiles of the ID
  activations at the placement, taken like ReAct's. Checked against OpenOOD's
  ``openood/postprocessors/vra_postprocessor.py`` (percentiles on its ID validation split); ``data.fit``: the ID
  validation or training set.
* ``dice@90``: DICE (Sun & Li, ECCV 2022) with sparsity p = 90: the classifier keeps the weights whose
  contribution W ⊙ mean_ID(h) (h the penultimate features) is strictly above ``np.percentile`` of all
  contributions at p. Checked against deeplearning-wisc/dice ``models/route.py`` (``RouteDICE``; the mean from
  ``precompute.py``) and OpenOOD's ``openood/postprocessors/dice_postprocessor.py``, which both average h over the
  ID training set; set ``data.fit`` to the ID training set.
* ``lts@90``: LTS (Djurisic et al.) logit scaling; needs no ID data. Checked against andrijazz/lts ``lts.py``.

OptFS (``optfs``), BFAct (``bfact@95``) and RAS (``ras``) live in their own modules (``ash_lightning.shaping.optfs``,
``bfact``, ``ras``), registered when ``ash_lightning.shaping.calibration`` is imported.

DICE and LTS are ``LogitShaper``s (placement ``"penultimate"`` only). ``react@p..``, ``vra`` and ``dice`` come
from ``get_shaping`` unfitted: their ``params`` are the spec's numbers and using them raises a ValueError until
``ash_lightning.shaping.calibration.calibrate`` replaces them by fitted shapers. A fitted shaper keeps the requested
spec (``react@p90`` stays ``react@p90``) and records the fitted values in ``params``: the threshold for ReAct,
(alpha, beta) for VRA, the sparsity for DICE (its mask is ``fn.mask``), (τ, n) for BFAct, OptFS's quantiles
(lo, hi), none for RAS.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ash_lightning._registry import SpecParam, format_number, parse_params
from ash_lightning.errors import UserError
from ash_lightning.shaping.functional import accumulation_dtype, check_percentile, prune_top_k, react, saturate_
from ash_lightning.shaping.hooks import LogitShaper, classifier_of
from ash_lightning.shaping.specs import FunctionFactory, Shaper, register_shaping

__all__ = [
    "BinContributions",
    "IDStats",
    "StatsRequest",
    "calibrated",
    "check_id_percentile",
    "dice_logits",
    "dice_mask",
    "lts",
    "linear_weight",
    "lts_factor",
    "missing_fit_data_message",
    "needs_calibration",
    "vra",
]


def vra(x: Tensor, alpha: float, beta: float) -> Tensor:
    """VRA, elementwise: 0 where ``x < alpha``, ``x`` where ``alpha <= x <= beta``, ``beta`` where ``x > beta``.

    This is the paper's map; OpenOOD's implementation instead clips from below (``alpha``, not 0, under alpha).
    """
    return x.clamp(max=beta).masked_fill(x < alpha, 0)


def dice_mask(weight: Tensor, mean: Tensor, sparsity: float) -> Tensor:
    """DICE's mask M (bool, shaped like ``weight`` (K, D)): True where the contribution ``weight * mean`` (``mean``
    (D,) broadcast over the K rows, in float64) is strictly above ``np.percentile`` of all K·D contributions at
    ``sparsity`` (linear interpolation), as ``RouteDICE.calculate_mask_weight`` in deeplearning-wisc/dice."""
    contributions = (weight.detach().double() * mean.detach().double()).cpu().numpy()
    mask = contributions > np.percentile(contributions, sparsity)
    return torch.from_numpy(mask).to(weight.device)


def dice_logits(features: Tensor, weight: Tensor, bias: Tensor | None, mask: Tensor) -> Tensor:
    """DICE logits: ``(W ⊙ M) h + b``."""
    return F.linear(features, weight * mask, bias)


def lts_factor(features: Tensor, percentile: float) -> Tensor:
    """LTS factor per sample, ``(s1 / s2)²`` with s1 the sum of ``relu(features)`` and s2 the sum of its top-k
    values (k as in ASH, at least 1), as ``lts`` in andrijazz/lts ``lts.py``; 1 where s2 = 0 (no positive feature,
    where the authors' code divides 0 by 0). Computed in float32 or wider."""
    flat, values, _ = prune_top_k(F.relu(features), percentile, "lts")
    acc = accumulation_dtype(features.dtype)
    s1, s2 = flat.sum(1, dtype=acc), values.sum(1, dtype=acc)
    return torch.where(s2 != 0, s1 / s2, 1.0).square()


def lts(features: Tensor, logits: Tensor, percentile: float) -> Tensor:
    """LTS logit scaling: ``logits * lts_factor(features, percentile)`` per sample, saturating in the logits' dtype."""
    factor = lts_factor(features, percentile)
    return saturate_(logits.to(factor.dtype) * factor[:, None], logits.dtype)


@dataclass(frozen=True)
class StatsRequest:
    """The ID statistics calibrated shapers need: ``percentiles`` (0-100) of the placement's activations over
    all units and samples; ``mean``, the per-unit mean of the penultimate features (DICE); ``sorted_mean``, the
    mean of each sample's activations at the placement sorted ascending (RAS); ``bin_contributions``, OptFS's
    mean classifier contribution per bin of feature values (``BinContributions``)."""

    percentiles: frozenset[float] = frozenset()
    mean: bool = False
    sorted_mean: bool = False
    bin_contributions: bool = False

    def __or__(self, other: StatsRequest) -> StatsRequest:
        return StatsRequest(
            self.percentiles | other.percentiles,
            self.mean or other.mean,
            self.sorted_mean or other.sorted_mean,
            self.bin_contributions or other.bin_contributions,
        )

    def __bool__(self) -> bool:
        return bool(self.percentiles) or self.mean or self.sorted_mean or self.bin_contributions


@dataclass(frozen=True)
class BinContributions:
    """OptFS's ID statistic: ``low`` and ``high``, the 1e-3 and 1 - 1e-3 quantiles of all penultimate feature
    values, and ``values``, I(b_k) for each bin of ``ash_lightning.shaping.optfs.bin_edges(low, high)``: the mean
    over ID samples of the sum of W[pred, d] · h_d over the features h_d in bin k (empty when high <= low)."""

    low: float
    high: float
    values: tuple[float, ...]


@dataclass(frozen=True, eq=False)
class IDStats:
    """ID statistics: ``percentiles`` maps q to the q-th percentile of the placement's activations; ``mean`` is
    the per-unit mean (D,), float64, of the penultimate features; ``sorted_mean`` (U,), float64, the mean sorted
    activation profile at the placement; ``bin_contributions`` OptFS's statistic (each None if not collected);
    ``n_samples`` the samples seen."""

    percentiles: Mapping[float, float] = field(default_factory=dict)
    mean: Tensor | None = None
    n_samples: int = 0
    sorted_mean: Tensor | None = None
    bin_contributions: BinContributions | None = None

    def missing(self, request: StatsRequest) -> StatsRequest:
        """The part of ``request`` these statistics do not hold."""
        return StatsRequest(
            request.percentiles - self.percentiles.keys(),
            request.mean and self.mean is None,
            request.sorted_mean and self.sorted_mean is None,
            request.bin_contributions and self.bin_contributions is None,
        )

    def merged(self, newer: IDStats) -> IDStats:
        """These statistics updated with ``newer``'s (collected on the same data)."""
        return IDStats(
            {**self.percentiles, **newer.percentiles},
            newer.mean if newer.mean is not None else self.mean,
            newer.n_samples,
            newer.sorted_mean if newer.sorted_mean is not None else self.sorted_mean,
            newer.bin_contributions if newer.bin_contributions is not None else self.bin_contributions,
        )


def missing_fit_data_message(specs: list[str]) -> str:
    """The error for calibrated shapers without ID fit data."""
    return (
        f"{', '.join(specs)} need{'s' if len(specs) == 1 else ''} ID statistics: set data.fit (ID fit data, "
        "e.g. the ID training set: data.fit: {kind: npz, path: ...}) so that they are estimated before "
        "testing, or use a setting without calibration (e.g. react@1.0 instead of react@p90)."
    )


@dataclass(frozen=True)
class _Unfitted:
    """``fn`` of a calibrated shaper before calibration: raises when called; ``fit(stats, model)`` returns the
    fitted shaper; ``check(model, placement)``, when given, raises a ValueError before any fit pass where the
    shaper cannot work on that model or at that placement."""

    spec: str
    request: StatsRequest
    fit: Callable[[IDStats, nn.Module], Shaper]
    check: Callable[[nn.Module, str], None] | None = None

    def __call__(self, *_: object) -> Tensor:
        raise UserError(missing_fit_data_message([self.spec]))


def unfitted(shaper: Shaper) -> _Unfitted | None:
    """The unfitted ``fn`` (with its ``request`` and ``fit``) of a calibrated shaper not fitted yet; else None."""
    return shaper.fn if isinstance(shaper.fn, _Unfitted) else None


def needs_calibration(shaper: Shaper) -> bool:
    """True for a calibrated shaper that has not been fitted yet (``calibrate`` fits it)."""
    return unfitted(shaper) is not None


@dataclass(frozen=True, eq=False)
class _DiceHead:
    """``LogitShaper.fn`` of a fitted DICE: the classifier's logits with its weight masked by ``mask``."""

    mask: Tensor

    def __call__(self, features: Tensor, logits: Tensor, classifier: nn.Module) -> Tensor:
        weight, bias = classifier.weight, classifier.bias
        assert isinstance(weight, Tensor) and (bias is None or isinstance(bias, Tensor)), "checked by _fit_dice"
        return dice_logits(features, weight, bias, self.mask.to(weight.device))


def _lts_head(features: Tensor, logits: Tensor, classifier: nn.Module, *, percentile: float) -> Tensor:
    """``LogitShaper.fn`` of LTS."""
    return lts(features, logits, percentile)


def _fit_react(stats: IDStats, model: nn.Module, *, spec: str, q: float) -> Shaper:
    threshold = stats.percentiles[q]
    return Shaper(functools.partial(react, threshold=threshold), spec, (threshold,), q)


def _fit_vra(stats: IDStats, model: nn.Module, *, spec: str, low: float, high: float) -> Shaper:
    alpha, beta = stats.percentiles[low], stats.percentiles[high]
    return Shaper(functools.partial(vra, alpha=alpha, beta=beta), spec, (alpha, beta))


def linear_weight(model: nn.Module, spec: str, use: str) -> Tensor:
    """The (K, D) weight of ``model``'s classifier, or a ValueError saying that ``spec`` ``use``s one."""
    classifier = classifier_of(model)
    weight = getattr(classifier, "weight", None)
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise ValueError(
            f"{spec} {use}, but {type(model).__name__}'s classifier is {type(classifier).__name__} with weight of "
            f"shape {None if not isinstance(weight, Tensor) else tuple(weight.shape)}. Fix: use {spec} on a model "
            "whose get_classifier() is an nn.Linear on the pooled features."
        )
    return weight


_DICE_USE = "masks a linear classifier's (K, D) weight by the mean of its D inputs"


def _check_dice(model: nn.Module, placement: str, *, spec: str) -> None:
    linear_weight(model, spec, _DICE_USE)


def _fit_dice(stats: IDStats, model: nn.Module, *, spec: str, sparsity: float) -> LogitShaper:
    weight, mean = linear_weight(model, spec, _DICE_USE), stats.mean
    assert mean is not None, "dice's StatsRequest(mean=True) makes calibrate_shapers collect the mean"
    if weight.shape[1] != mean.numel():
        raise ValueError(
            f"{spec} {_DICE_USE}, but the classifier's weight has shape {tuple(weight.shape)} and its inputs "
            f"{mean.numel()} values. Fix: use DICE on a model whose get_classifier() is an nn.Linear on the pooled "
            "features."
        )
    mask = dice_mask(weight, mean, sparsity)
    return LogitShaper(_DiceHead(mask), spec, (sparsity,), sparsity)


def _expect(usage: str, args: tuple[str, ...], names: tuple[str, ...]) -> tuple[float, ...]:
    """Parse ``args`` as the numbers ``names`` of ``usage``."""
    return tuple(parse_params(usage, args, [SpecParam(name) for name in names]))


def check_id_percentile(q: float, name: str) -> None:
    """A ValueError unless the ID percentile ``q`` of parameter ``<name>`` lies in [0, 100]."""
    if not 0 <= q <= 100:
        raise ValueError(f"<{name}>={format_number(q)} is outside [0, 100]; pass a percentile, e.g. 90")


def calibrated(
    cls: type[Shaper],
    spec: str,
    params: tuple[float, ...],
    request: StatsRequest,
    fit: Callable[[IDStats, nn.Module], Shaper],
    percentile: float | None = None,
    check: Callable[[nn.Module, str], None] | None = None,
) -> Shaper:
    """A ``cls`` shaper of ``spec`` that ``calibrate_shapers`` fits: ``fit(stats, model)`` gets the ID statistics
    of ``request``; ``check(model, placement)`` refuses a model or placement it cannot work on before any pass."""
    return cls(_Unfitted(spec, request, fit, check), spec, params, percentile)


_FIXED_REACT = FunctionFactory("react", react, ("threshold",))


@register_shaping("react", "react@<threshold>|react@p<percentile>")
def _react_factory(*args: str) -> Shaper:
    """ReAct: clip activations at a fixed threshold, or at a percentile of the ID activations (calibrated)."""
    if not (args and args[0].startswith("p")):
        return _FIXED_REACT(*args)
    (q,) = _expect("react@p<percentile>", (args[0][1:], *args[1:]), ("percentile",))
    check_id_percentile(q, "percentile")
    spec = f"react@p{format_number(q)}"
    return calibrated(
        Shaper, spec, (q,), StatsRequest(frozenset({q})), functools.partial(_fit_react, spec=spec, q=q), q
    )


@register_shaping("vra", "vra@<low_percentile>@<high_percentile>")
def _vra_factory(*args: str) -> Shaper:
    """VRA: zero activations below the low ID percentile, clip them at the high one (calibrated)."""
    low, high = _expect("vra", args, ("low_percentile", "high_percentile"))
    check_id_percentile(low, "low_percentile")
    check_id_percentile(high, "high_percentile")
    if low > high:
        raise ValueError(
            f"vra needs <low_percentile> <= <high_percentile>, got {format_number(low)} > {format_number(high)}"
        )
    spec = f"vra@{format_number(low)}@{format_number(high)}"
    return calibrated(
        Shaper,
        spec,
        (low, high),
        StatsRequest(frozenset({low, high})),
        functools.partial(_fit_vra, spec=spec, low=low, high=high),
    )


@register_shaping("dice", "dice@<sparsity>")
def _dice_factory(*args: str) -> Shaper:
    """DICE: mask the classifier's weights with the smallest contributions on ID features (calibrated)."""
    (sparsity,) = _expect("dice", args, ("sparsity",))
    check_percentile(sparsity, "dice")
    spec = f"dice@{format_number(sparsity)}"
    return calibrated(
        LogitShaper,
        spec,
        (sparsity,),
        StatsRequest(mean=True),
        functools.partial(_fit_dice, spec=spec, sparsity=sparsity),
        sparsity,
        functools.partial(_check_dice, spec=spec),
    )


@register_shaping("lts", "lts@<percentile>")
def _lts_factory(*args: str) -> LogitShaper:
    """LTS: scale the logits by (s1 / s2)² of the penultimate features, as ASH-S prunes them."""
    (percentile,) = _expect("lts", args, ("percentile",))
    check_percentile(percentile, "lts")
    return LogitShaper(
        functools.partial(_lts_head, percentile=percentile),
        f"lts@{format_number(percentile)}",
        (percentile,),
        percentile,
    )
