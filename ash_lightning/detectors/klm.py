"""``klm``: KL matching (Hendrycks et al., "Scaling Out-of-Distribution Detection for Real-World Settings", ICML
2022): -min_c KL(softmax(l) || q_c), q_c the mean fit softmax of the samples predicted c (OpenOOD v1.5
``kl_matching_postprocessor.py``).

Fit: the template q_c of class c is the mean softmax of the fit samples predicted c (argmax of the logits), the
one-hot vector e_c for a class no fit sample is predicted as. Score, with p = softmax(l):

    score(l) = -min_c KL(p || q_c),   KL(p || q) = sum_k p_k log(p_k / q_k)  (0 log 0 = 0; +inf where q_k = 0 < p_k).

Transcribed from OpenOOD v1.5, ``openood/postprocessors/kl_matching_postprocessor.py`` (``configs/
postprocessors/klm.yml``: no parameters; it fits on the ID validation set, we on ``data.fit``), whose KL is
``scipy.stats.entropy(p, q)``: p and q are first divided by their sums, as here. Needs no labels and reads the
logits only; the min over classes of the ``sklearn`` pairwise search is a (B, K) x (K, K) matrix product here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ash_lightning.detectors.base import FeatureDetector, class_means

__all__ = ["KLM", "kl_divergences"]


def kl_divergences(p: Tensor, q: Tensor) -> Tensor:
    """(B, C) KL(p_b || q_c) of the rows of ``p`` (B, K) and ``q`` (C, K), each divided by its sum first, as
    ``scipy.stats.entropy``: 0 log 0 = 0, +inf where q has a zero under mass of p."""
    p = p / p.sum(1, keepdim=True)
    q = q / q.sum(1, keepdim=True)
    log_q = torch.where(q > 0, q.log(), 0.0)
    divergences = torch.xlogy(p, p).sum(1, keepdim=True) - p @ log_q.T
    unsupported = (p > 0).to(p.dtype) @ (q == 0).to(p.dtype).T > 0
    return divergences.masked_fill(unsupported, torch.inf)


@dataclass(frozen=True)
class KLM(FeatureDetector):
    """``klm`` (no parameters): -min_c KL(softmax(l) || q_c), q_c the mean fit softmax of the samples predicted c.
    Stats: ``templates`` (K, K)."""

    name: ClassVar[str] = "klm"

    def fit_stats(
        self, features: Tensor, logits: Tensor, labels: Tensor | None, weight: Tensor | None, bias: Tensor | None
    ) -> dict[str, Tensor]:
        num_classes = logits.shape[1]
        templates, counts = class_means(torch.softmax(logits.double(), 1), logits.argmax(1), num_classes)
        one_hot = torch.eye(num_classes, dtype=templates.dtype, device=templates.device)
        return {"templates": torch.where((counts > 0)[:, None], templates, one_hot)}

    def score_batch(self, stats: Mapping[str, Tensor], features: Tensor, logits: Tensor) -> Tensor:
        return -kl_divergences(torch.softmax(logits, 1), stats["templates"]).amin(1)
