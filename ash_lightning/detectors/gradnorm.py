"""``gradnorm``: GradNorm (Huang, Geng & Li, "On the Importance of Gradients for Detecting Distributional Shifts
in the Wild", NeurIPS 2021), in closed form, without a backward pass.

GradNorm is the L1 norm of the gradient of L = KL(u || softmax(z)) with respect to the last layer's weight W,
u the uniform distribution over the K classes and z = W h + b the logits. Closed form:

    L = sum_k u_k log u_k - (1/K) sum_k log p_k,    p = softmax(z)
    dL/dz_j = -(1/K) sum_k (delta_kj - p_j) = p_j - 1/K
    dL/dW_jd = (dL/dz_j) h_d = (p_j - 1/K) h_d
    ||dL/dW||_1 = sum_j sum_d |p_j - 1/K| |h_d| = ||p - 1/K||_1 * ||h||_1

so score = ||h||_1 * ||softmax(l) - 1/K||_1, from the features and logits the forward pass already has
(tests check it against ``torch.autograd``). The authors' code (deeplearning-wisc/gradnorm_ood) and OpenOOD v1.5
(``openood/postprocessors/gradnorm_postprocessor.py``) use targets of ones instead of 1/K, i.e. K times this
loss, so their score is K times ours (same ranking); both use temperature 1, as we do.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from ash_lightning.detectors.base import FeatureDetector

__all__ = ["GradNorm", "gradnorm"]


def gradnorm(features: Tensor, logits: Tensor) -> Tensor:
    """GradNorm (B,): ``||h||_1 * ||softmax(logits) - 1/K||_1`` (see the module docstring for the derivation)."""
    uniform_gap = (logits.softmax(1) - 1.0 / logits.shape[1]).abs().sum(1)
    return features.abs().sum(1) * uniform_gap


@dataclass(frozen=True)
class GradNorm(FeatureDetector):
    """``gradnorm`` (no parameters, no fit data: ``fit`` ignores its inputs and returns empty statistics)."""

    name: ClassVar[str] = "gradnorm"
    needs_fit: ClassVar[bool] = False

    def fit_stats(
        self, features: Tensor, logits: Tensor, labels: Tensor | None, weight: Tensor | None, bias: Tensor | None
    ) -> dict[str, Tensor]:
        return {}

    def score_batch(self, stats: Mapping[str, Tensor], features: Tensor, logits: Tensor) -> Tensor:
        return gradnorm(features, logits)
