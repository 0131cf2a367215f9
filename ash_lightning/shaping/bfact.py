"""BFAct (Kong & Li, "BFAct: Out-of-Distribution Detection with Butterworth Filter Rectified Activations", 2023): the
spec ``bfact[@<percentile>=95][@<n>=2]``, a smooth clip of the activations with a Butterworth filter's gain,
``x / sqrt(1 + (x / τ)^(2n))``, τ the ID ``percentile``-th percentile of the activations at the placement.

Checked against the reimplementation in Qinyu-Allen-Zhao/OptFSOOD ``detector/bfact.py`` (``BFact.softcap``,
``setup`` without the surrogate search): τ = ``np.percentile`` of the flattened ID training features at 95, n = 2.
τ is taken like ReAct's threshold (``ash_lightning.shaping.calibration``: over all units and samples at the
placement, any placement); set ``data.fit`` to the ID training set. The authors' ``use_surrogate`` option (a
search of percentile and n on Gaussian noise as OOD data) is not offered: give both in the spec instead.
"""

from __future__ import annotations

import functools

from torch import Tensor, nn

from ash_lightning._registry import SpecParam, format_number, parse_params
from ash_lightning.errors import UserError
from ash_lightning.shaping.calibrated import IDStats, StatsRequest, calibrated, check_id_percentile
from ash_lightning.shaping.functional import accumulation_dtype, saturate_
from ash_lightning.shaping.specs import Shaper, register_shaping

__all__ = ["bfact"]

_DEFAULTS = [95.0, 2.0]  # percentile, n


def bfact(x: Tensor, threshold: float, n: int = 2) -> Tensor:
    """BFAct: ``x / sqrt(1 + (x / threshold)^(2n))`` elementwise, computed in float32 or wider as the authors'
    ``softcap`` orders it, saturating in ``x``'s dtype."""
    values = x.to(accumulation_dtype(x.dtype))
    return saturate_((1 / ((1 + ((values / threshold) ** (2 * n))) ** 0.5)) * values, x.dtype)


def _fit_bfact(stats: IDStats, model: nn.Module, *, spec: str, q: float, n: int) -> Shaper:
    threshold = stats.percentiles[q]
    if threshold == 0:
        raise UserError(
            f"{spec}: the ID {format_number(q)}th percentile of the activations is 0, where BFAct divides by "
            "zero. Fix: use a percentile above the ID activations' zeros, e.g. bfact@95."
        )
    return Shaper(functools.partial(bfact, threshold=threshold, n=n), spec, (threshold, float(n)), q)


@register_shaping("bfact", "bfact[@<percentile>=95][@<n>=2]")
def _bfact_factory(*args: str) -> Shaper:
    """BFAct (Kong & Li, "BFAct: Out-of-Distribution Detection with Butterworth Filter Rectified Activations", 2023):
    x / sqrt(1 + (x / τ)^(2n)), τ the ID percentile-th percentile of the activations (calibrated; OptFSOOD
    detector/bfact.py)."""
    params = [SpecParam("percentile", optional=True), SpecParam("n", int, optional=True)]
    values = parse_params("bfact", args, params)
    q, n = [*values, *_DEFAULTS[len(values) :]]
    check_id_percentile(q, "percentile")
    if n < 1:
        raise ValueError(f"<n>={format_number(n)} is not a filter order; pass a positive integer, e.g. 2")
    spec = f"bfact@{format_number(q)}@{int(n)}"
    return calibrated(
        Shaper,
        spec,
        (q, n),
        StatsRequest(frozenset({q})),
        functools.partial(_fit_bfact, spec=spec, q=q, n=int(n)),
        q,
    )
