"""``fdbd``: fDBD, feature distance to the decision boundaries (Liu & Qin, "Fast Decision Boundary based
Out-of-Distribution Detector", ICML 2024).

For the predicted class m = argmax_k l_k, the distance of h to the boundary between m and class c of the linear
classifier l = W h + b is |l_m - l_c| / ||w_m - w_c||. fDBD averages it over the K - 1 other classes and divides
by the distance of h to the mean ID fit feature mu:

    score(h) = (1 / (K - 1)) sum_{c != m} |l_m - l_c| / ||w_m - w_c||  /  ||h - mu||.

Checked against OpenOOD v1.5, ``openood/postprocessors/fdbd_postprocessor.py``: it sums instead of averaging
(our score times K - 1; same ranking) and, with ``distance_as_normalizer: False``, may divide by ||h|| instead;
we keep the paper's ||h - mu||. Identical weight rows give an infinite distance term (as in OpenOOD).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ash_lightning.detectors.base import FeatureDetector

__all__ = ["FDBD", "boundary_norms"]


def boundary_norms(weight: Tensor) -> Tensor:
    """(K, K) matrix of ||w_i - w_j|| for the classifier rows ``weight`` (K, D), computed pairwise
    (``torch.cdist``'s exact mode), with 1 on the diagonal (the zero logit gap of c = m is divided by it)."""
    norms = torch.cdist(weight[None], weight[None], compute_mode="donot_use_mm_for_euclid_dist")[0]
    return norms.fill_diagonal_(1.0)


@dataclass(frozen=True)
class FDBD(FeatureDetector):
    """``fdbd`` (no parameters). Stats: ``mean`` (D,) of the fit features, ``boundary_norms`` (K, K)."""

    name: ClassVar[str] = "fdbd"
    needs_classifier: ClassVar[bool] = True

    def fit_stats(
        self, features: Tensor, logits: Tensor, labels: Tensor | None, weight: Tensor | None, bias: Tensor | None
    ) -> dict[str, Tensor]:
        assert weight is not None  # checked by fit()
        if weight.shape[0] < 2:
            raise self.invalid("needs a classifier with at least 2 classes.")
        return {"mean": features.double().mean(0), "boundary_norms": boundary_norms(weight.double())}

    def score_batch(self, stats: Mapping[str, Tensor], features: Tensor, logits: Tensor) -> Tensor:
        top, predicted = logits.max(1)
        distances = (top[:, None] - logits) / stats["boundary_norms"][predicted]
        return distances.sum(1) / (logits.shape[1] - 1) / (features - stats["mean"]).norm(dim=1)
