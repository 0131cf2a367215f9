"""OptFS (Zhao et al., "Towards Optimal Feature-Shaping Methods for Out-of-Distribution Detection", ICLR 2024):
the spec ``optfs``, a piecewise-constant shaping of the penultimate features fitted on ID data and the
classifier's weight W (K, D).

Checked against Qinyu-Allen-Zhao/OptFSOOD ``detector/ours.py`` (``Ours.setup``, ``get_lc_fv_list``,
``postprocess``) with its defaults (``dynamic_weight=False``, the ID features of ``utils/func.py``
``get_feature_train``: the ID training set, so set ``data.fit`` to it):

* bins: left edges b_k = ``np.arange(lo, hi, w)``, lo and hi the 1e-3 and 1 - 1e-3 quantiles (``np.quantile``) of
  all ID feature values, w = (hi - lo) / 100; bin k is [b_k, b_k + w) (100 bins, or 101 where the division
  rounds so);
* I(b_k) = mean over ID samples of Σ_d 1[h_d in bin k] · W[pred, d] · h_d, pred the sample's predicted class
  (argmax of its logits);
* θ = 1000 · I / ‖I‖₂ (the code's scale; the energy score depends on it);
* shaping: h_d ↦ θ_k · h_d for h_d in bin k (both θ's where rounding makes adjacent bins overlap), 0 outside every
  bin; NaN and ±inf features become NaN, as ``mask * feature`` makes them in the authors' code.

The authors' default score (``-o vanilla``, "Ours (V)") is Σ_d W[pred, d] · shaped h_d without the bias, pred from
the unshaped logits; ``-o energy`` is logsumexp of the classifier on the shaped features, i.e. ``optfs`` with score
``energy``, which is what this spec is evaluated with here. The authors' ``setup`` then prints the share of
predictions the shaping changes on 10,000 random training samples (``np.random.choice`` without replacement, which
fails on fewer samples); a diagnostic that leaves θ as it is, not reproduced. The ID statistics follow
``ash_lightning.shaping.calibration``: the authors read every training feature; here the quantiles and I are exact
while the fit features hold at most ``MAX_VALUES`` values, else taken over the same seeded random subset of samples
as the percentiles (I is a mean over samples, so the subset's is unbiased); the quantiles are computed in float64
(the authors' in float32), the shaping compares in the features' dtype (float32 or wider), as their PyTorch code.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch import Tensor, nn

from ash_lightning._registry import parse_params
from ash_lightning.errors import UserError
from ash_lightning.shaping.calibrated import BinContributions, IDStats, StatsRequest, calibrated, linear_weight
from ash_lightning.shaping.functional import accumulation_dtype, saturate_
from ash_lightning.shaping.specs import Shaper, register_shaping

__all__ = ["QUANTILES", "THETA_NORM", "bin_contributions", "bin_edges", "optfs", "optfs_theta"]

QUANTILES = (1e-3, 1 - 1e-3)  # the range the bins span, as quantiles of all ID feature values
BINS = 100.0  # the bin width is (hi - lo) / BINS
THETA_NORM = 1000.0
_USE = "weighs each penultimate feature by a linear classifier's (K, D) weight"
_CHUNK = 1 << 20  # values per step of the fit's binning


def bin_edges(low: float, high: float) -> np.ndarray:
    """The left edges (float64) of OptFS's bins: ``np.arange(low, high, (high - low) / 100)``; each bin is
    [edge, edge + (high - low) / 100)."""
    return np.arange(low, high, (high - low) / BINS)


def _bins_of(x: Tensor, lefts: Tensor, rights: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(j, in_j, in_before)`` per value of ``x``: j the last bin whose left edge is <= x (clamped to 0), whether
    x lies in bin j and whether it also lies in bin j - 1 (bins overlap by rounding at most there)."""
    j = torch.searchsorted(lefts, x.contiguous(), right=True) - 1
    found = j >= 0
    j = j.clamp_(min=0)
    in_j = found & (x < rights[j])
    in_before = (j >= 1) & (x < rights[(j - 1).clamp_(min=0)])
    return j, in_j, in_before


def bin_contributions(features: Tensor, preds: Tensor, weight: Tensor) -> BinContributions:
    """OptFS's ID statistic from ``features`` (N, D) with predicted classes ``preds`` (N,) and the classifier's
    ``weight`` (K, D): the 1e-3 and 1 - 1e-3 quantiles of all values and I(b_k) per bin (``bin_edges``), in
    float64 (see the module docstring); no bins when the two quantiles are equal."""
    features = features.detach().cpu().double()
    low, high = (float(q) for q in np.quantile(features.numpy(), QUANTILES))
    if not high > low:
        return BinContributions(low, high, ())
    lefts = torch.from_numpy(bin_edges(low, high))
    rights = lefts + (high - low) / BINS
    weight, preds = weight.detach().cpu().double(), preds.cpu()
    totals = torch.zeros(len(lefts), dtype=torch.float64)
    step = max(1, _CHUNK // max(1, features.shape[1]))
    for start in range(0, len(features), step):
        h = features[start : start + step]
        contribution = weight[preds[start : start + step]] * h
        j, in_j, in_before = _bins_of(h, lefts, rights)
        totals.index_add_(0, j[in_j], contribution[in_j])
        totals.index_add_(0, j[in_before] - 1, contribution[in_before])
    return BinContributions(low, high, tuple((totals / len(features)).tolist()))


def optfs_theta(values: tuple[float, ...], spec: str = "optfs") -> Tensor:
    """θ = 1000 · I / ‖I‖₂ (float64) from I(b_k) ``values``; a UserError where I is empty or zero (the ID features
    do not vary, or contribute nothing to the logits)."""
    contributions = torch.tensor(values, dtype=torch.float64)
    norm = contributions.norm()
    if not len(values) or not norm > 0 or not torch.isfinite(norm):
        raise UserError(
            f"{spec}: the ID fit features give no usable bins (their 0.1% and 99.9% quantiles are equal, or their "
            f"contributions to the logits are all 0 or not finite: I = {values[:5]}...), so OptFS's shaping is "
            "undefined. Fix: fit on ID data whose penultimate features vary (data.fit: the ID training set)."
        )
    return contributions / norm * THETA_NORM


def optfs(x: Tensor, lefts: Tensor, rights: Tensor, theta: Tensor) -> Tensor:
    """OptFS: ``θ_k · x`` for each value x in bin k = [lefts_k, rights_k), 0 outside every bin; compared and
    multiplied in float32 or wider, saturating in ``x``'s dtype."""
    acc = accumulation_dtype(x.dtype)
    values = x.to(acc)
    lefts, rights, theta = (t.to(device=x.device, dtype=acc) for t in (lefts, rights, theta))
    j, in_j, in_before = _bins_of(values, lefts, rights)
    factor = torch.where(in_j, theta[j], 0.0) + torch.where(in_before, theta[(j - 1).clamp_(min=0)], 0.0)
    return saturate_(values * factor, x.dtype)


def _check_optfs(model: nn.Module, placement: str, *, spec: str) -> None:
    if placement != "penultimate":
        raise ValueError(
            f"{spec} {_USE} (the row of the predicted class), so it only works at placement 'penultimate', not "
            f"{placement!r}. Fix: set placement: penultimate."
        )
    linear_weight(model, spec, _USE)


def _fit_optfs(stats: IDStats, model: nn.Module, *, spec: str) -> Shaper:
    found = stats.bin_contributions
    assert found is not None, "optfs's StatsRequest(bin_contributions=True) makes calibrate_shapers collect them"
    theta = optfs_theta(found.values, spec)
    lefts = torch.from_numpy(bin_edges(found.low, found.high))
    rights = lefts + (found.high - found.low) / BINS
    return Shaper(functools.partial(optfs, lefts=lefts, rights=rights, theta=theta), spec, (found.low, found.high))


@register_shaping("optfs", "optfs")
def _optfs_factory(*args: str) -> Shaper:
    """OptFS (Zhao et al., "Towards Optimal Feature-Shaping Methods for Out-of-Distribution Detection", ICLR 2024):
    h_d ↦ θ_k h_d on 100 equal bins k between the ID 0.1% and 99.9% quantiles, θ ∝ the mean ID W[pred]·h per bin,
    0 outside (calibrated, penultimate; Qinyu-Allen-Zhao/OptFSOOD detector/ours.py)."""
    parse_params("optfs", args, [])
    return calibrated(
        Shaper,
        "optfs",
        (),
        StatsRequest(bin_contributions=True),
        functools.partial(_fit_optfs, spec="optfs"),
        check=functools.partial(_check_optfs, spec="optfs"),
    )
