"""``vim@D``: ViM, Virtual-logit Matching (Wang et al., "ViM: Out-Of-Distribution with Virtual-logit Matching",
CVPR 2022).

Fit: the origin u = -pinv(W) b (so that W(h - u) = Wh + b), the principal subspace P of dimension D of the
uncentred covariance (1/N) sum (h - u)(h - u)^T of the fit features, and alpha = mean_fit(max_k l_k) /
mean_fit(||r(h)||), r(h) the part of h - u orthogonal to P (the residual). Fit data whose centred features lie
(numerically) inside P, mean ||r(h)|| < RESIDUAL_TOLERANCE * mean ||h - u|| (e.g. features spanning at most D
dimensions), would make alpha explode: ``fit`` refuses it with a UserError naming a smaller D. Score:

    score(h) = logsumexp(l) - alpha * ||r(h)||.

The paper scores OOD-ness as the softmax probability of the virtual logit l_0 = alpha * ||r(h)|| appended to
the logits, p_0 = exp(l_0) / (exp(l_0) + sum_k exp(l_k)) = sigmoid(l_0 - logsumexp(l)); -p_0 is a strictly
increasing function of our score, so both rank samples identically. Our form is OpenOOD v1.5's
(``openood/postprocessors/vim_postprocessor.py``), which does not saturate; the paper's authors' code
(haoqiwang/vim) computes the same ``energy - vlogit``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ash_lightning.detectors.base import FeatureDetector

__all__ = ["RESIDUAL_TOLERANCE", "ResidualSubspace", "ViM", "residual_norm", "vim_residual_basis"]

RESIDUAL_TOLERANCE = 1e-6  # the fit's mean residual norm, relative to its mean centred feature norm, below which
# the principal subspace holds (numerically) all of the features and alpha is undefined


def vim_residual_basis(centered: Tensor, dim: int) -> Tensor:
    """An orthonormal basis (D_feat, D_feat - dim) of the complement of the top-``dim`` principal subspace of
    ``centered`` (N, D_feat), from the eigenvectors of its uncentred covariance (1/N) X^T X."""
    values, vectors = torch.linalg.eigh(centered.T @ centered / centered.shape[0])  # ascending eigenvalues
    return vectors[:, : centered.shape[1] - dim]


@dataclass(frozen=True)
class ResidualSubspace(FeatureDetector):
    """Shared by ``vim@D`` and ``residual@D``: the origin u = -pinv(W) b and the residual basis of the top-D
    principal subspace of the fit features around it."""

    needs_classifier: ClassVar[bool] = True
    dim: int

    def __post_init__(self) -> None:
        if self.dim < 1:
            raise self.invalid(f"D (principal subspace dimension) must be an integer >= 1, got {self.dim!r}.")

    def check_feature_dim(self, dim: int) -> None:
        if self.dim >= dim:
            raise self.invalid(
                f"D = {self.dim} must be smaller than the feature dimension {dim} (e.g. {self.name}@{dim // 2})."
            )

    def residual_stats(self, features: Tensor, weight: Tensor, bias: Tensor, what: str) -> dict[str, Tensor]:
        """``origin``, ``residual_basis`` and the fit's mean residual norm ``mean_residual``; a UserError naming a
        smaller D when the residual vanishes (``what`` is then undefined)."""
        origin = -torch.linalg.pinv(weight.double()) @ bias.double()
        centered = features.double() - origin
        basis = vim_residual_basis(centered, self.dim)
        residual = (centered @ basis).norm(dim=1).mean()
        if residual < RESIDUAL_TOLERANCE * centered.norm(dim=1).mean():
            rank = int(torch.linalg.matrix_rank(centered))
            raise self.invalid(
                f"the centred fit features have (numerically) no residual outside the principal subspace of "
                f"dimension D = {self.dim}: they span only {rank} dimensions, so {what}. Fix: choose D below the "
                f"features' rank, e.g. {self.name}@{max(1, rank // 2)}, or fit on more varied ID data."
            )
        return {"origin": origin, "residual_basis": basis, "mean_residual": residual}


def residual_norm(stats: Mapping[str, Tensor], features: Tensor) -> Tensor:
    """||r(h)|| (B,): the norm of the part of h - origin in the span of the residual basis."""
    return ((features - stats["origin"]) @ stats["residual_basis"]).norm(dim=1)


@dataclass(frozen=True)
class ViM(ResidualSubspace):
    """``vim@D``, 0 < D < feature dim (the paper uses D = 1000 for 2048-d features, OpenOOD 256 for 512-d).
    Stats: ``origin`` u (D_feat,), ``residual_basis`` (D_feat, D_feat - D), ``alpha`` (0-d)."""

    name: ClassVar[str] = "vim"

    def fit_stats(
        self, features: Tensor, logits: Tensor, labels: Tensor | None, weight: Tensor | None, bias: Tensor | None
    ) -> dict[str, Tensor]:
        assert weight is not None and bias is not None  # checked by fit()
        stats = self.residual_stats(features, weight, bias, "alpha (mean max logit / mean residual norm) is undefined")
        alpha = logits.double().amax(1).mean() / stats.pop("mean_residual")
        return {**stats, "alpha": alpha}

    def score_batch(self, stats: Mapping[str, Tensor], features: Tensor, logits: Tensor) -> Tensor:
        return torch.logsumexp(logits, dim=1) - stats["alpha"] * residual_norm(stats, features)
