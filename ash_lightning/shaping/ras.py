"""RAS (Guglielmo & Masana, "Ranked Activation Shift for Post-Hoc Out-of-Distribution Detection", ECCV 2026): the spec
``ras``, which replaces each sample's activation values by the ID mean sorted profile, keeping their ranks: the
i-th smallest activation of a sample becomes c_i, c the mean over ID samples of each one's activations sorted
ascending.

Checked against gigug/RAS ``src/ras_net.py`` (``RASNet.forward_shift``: ``torch.sort`` of the flattened
features, ``scatter_`` of the mean curve at the sorted positions) and ``src/ras_postprocessor.py`` (``setup``:
the mean curve = ``torch.sort(activation_log, dim=1)`` averaged over the ID training set, ``id_loader_dict['train']``;
the score is energy, ``logsumexp`` of the shifted logits). It has no parameter. The authors shift the penultimate
features; here any placement works (the profile is taken over each sample's flattened activations there, as their
``view(B, -1)``). The mean curve is accumulated in float64 as the fit streams (the authors hold every feature
and average in float32). Ties are ranked by position (a stable sort), where the authors' ``torch.sort`` leaves
their order unspecified; the values a tie receives then differ by ordering only. (The authors' ``run_ras.py``
reuses one ``RASPostprocessor``, whose ``setup`` runs once, for every experiment, so only the first of several gets a
mean curve; each fit here computes its own.)
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

from ash_lightning._registry import parse_params
from ash_lightning.shaping.calibrated import IDStats, StatsRequest, calibrated
from ash_lightning.shaping.specs import Shaper, register_shaping

__all__ = ["ras"]


def ras(x: Tensor, mean_curve: Tensor) -> Tensor:
    """RAS: each sample's flattened values replaced by ``mean_curve`` (ascending, one value per element) in the
    order of their ranks: the i-th smallest becomes ``mean_curve[i]`` (ties by position)."""
    flat = x.reshape(len(x), -1)
    if mean_curve.numel() != flat.shape[1]:
        raise ValueError(
            f"ras was fitted on {mean_curve.numel()} activations per sample but got {flat.shape[1]} "
            f"(shape {tuple(x.shape)}). Fix: fit and test at the same placement and image size."
        )
    order = flat.argsort(dim=1, stable=True)
    curve = mean_curve.to(device=x.device, dtype=x.dtype).expand_as(flat)
    return torch.empty_like(flat).scatter_(1, order, curve).view(x.shape)


def _fit_ras(stats: IDStats, model: nn.Module, *, spec: str) -> Shaper:
    assert stats.sorted_mean is not None, "ras's StatsRequest(sorted_mean=True) makes calibrate_shapers collect it"
    return Shaper(functools.partial(ras, mean_curve=stats.sorted_mean.float()), spec)


@register_shaping("ras", "ras")
def _ras_factory(*args: str) -> Shaper:
    """RAS (Guglielmo & Masana, "Ranked Activation Shift for Post-Hoc Out-of-Distribution Detection", ECCV 2026):
    the i-th smallest activation of a sample becomes c_i, c the ID mean of the samples' ascending-sorted
    activations (calibrated; gigug/RAS src/ras_net.py)."""
    parse_params("ras", args, [])
    return calibrated(Shaper, "ras", (), StatsRequest(sorted_mean=True), functools.partial(_fit_ras, spec="ras"))
