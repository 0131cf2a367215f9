"""``residual@D``: Residual, ViM's residual alone (Wang et al., "ViM: Out-Of-Distribution with Virtual-logit
Matching", CVPR 2022): -||r(h)||, r the part of h + pinv(W) b outside the top-D principal subspace (OpenOOD v1.5
``residual_postprocessor.py``).

Fit as ``vim@D`` (``ash_lightning.detectors.vim``): the origin u = -pinv(W) b, the principal subspace P of
dimension D of the uncentred covariance (1/N) sum (h - u)(h - u)^T of the fit features; r(h) is the part of
h - u orthogonal to P. Score:

    score(h) = -||r(h)||.

Transcribed from OpenOOD v1.5, ``openood/postprocessors/residual_postprocessor.py`` (sklearn
``EmpiricalCovariance(assume_centered=True)``, ``np.linalg.eig``; OpenOOD fits on the ID validation set, we on
``data.fit``). D has no default here: ``configs/postprocessors/residual.yml`` sets ``dim: 512``, which leaves no
residual for 512-d features (OpenOOD's CIFAR ResNet-18, where every score is then 0); D must be below the
feature dimension (refused before any backbone pass) and below the fit features' rank (refused at the fit).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from ash_lightning.detectors.vim import ResidualSubspace, residual_norm

__all__ = ["Residual"]


@dataclass(frozen=True)
class Residual(ResidualSubspace):
    """``residual@D``, 0 < D < feature dim: -||r(h)||. Stats: ``origin`` u (D_feat,), ``residual_basis``
    (D_feat, D_feat - D)."""

    name: ClassVar[str] = "residual"

    def fit_stats(
        self, features: Tensor, logits: Tensor, labels: Tensor | None, weight: Tensor | None, bias: Tensor | None
    ) -> dict[str, Tensor]:
        assert weight is not None and bias is not None  # checked by fit()
        stats = self.residual_stats(features, weight, bias, "every sample would score (numerically) 0")
        del stats["mean_residual"]
        return stats

    def score_batch(self, stats: Mapping[str, Tensor], features: Tensor, logits: Tensor) -> Tensor:
        return -residual_norm(stats, features)
