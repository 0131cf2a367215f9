"""``neco[@D]``: NECO (Ammar et al., "NECO: NEural Collapse Based Out-of-distribution detection", ICLR 2024):
max l * ||PCA_D(s(h))|| / ||s(h)||, s the fit standardisation, D by default explaining 90% of the fit variance
(mueller-mp/maha-norm ``NINCO/detection_methods.py`` evaluate_neco).

Fit: s(h) = (h - m) / sigma, the fit features standardised per unit (sklearn ``StandardScaler``: sigma the
standard deviation with ddof 0, 1 for a constant unit); P_D the projection on the top-D principal components of
the standardised fit features (sklearn ``PCA``: around their mean c, ~0). Score:

    score(h) = max_k l_k * ||(s(h) - c) V_D|| / ||s(h)||,   V_D the (D_feat, D) top principal directions.

Without D (``neco``, D = 0 in the dataclass), D is the authors' rule: the fewest components explaining at least
90% of the standardised fit variance. Transcribed from the NECO function in mueller-mp/maha-norm,
``NINCO/detection_methods.py`` (``evaluate_neco``, ``use_logit=True``: the max logit). The OpenOOD port in the same
repository (``OpenOOD/openood/postprocessors/neco_postprocessor.py``) fits the PCA on standardised features but
projects and normalises the raw test features (it skips the scaler at test time); we follow ``evaluate_neco``,
where fit and test features are standardised alike. D must be below the feature dimension (refused before any
backbone pass).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ash_lightning.detectors.base import FeatureDetector

__all__ = ["EXPLAINED_VARIANCE", "NECO", "standard_scale"]

EXPLAINED_VARIANCE = 0.90  # the share of the standardised fit variance the automatic D explains (authors' code)


def standard_scale(features: Tensor) -> tuple[Tensor, Tensor]:
    """sklearn ``StandardScaler``'s ``mean_`` and ``scale_`` of ``features`` (N, D): the standard deviation
    (ddof 0), 1 for the units its ``_is_constant_feature`` calls constant (var <= N eps var + (N mean eps)^2)."""
    mean = features.mean(0)
    var = (features - mean).square().mean(0)
    n, eps = features.shape[0], torch.finfo(torch.float64).eps
    constant = var <= n * eps * var + (n * mean * eps).square()
    return mean, torch.where(constant, 1.0, var.sqrt())


@dataclass(frozen=True)
class NECO(FeatureDetector):
    """``neco[@D]`` (D >= 1, or 0 for the 90%-variance rule: the default). Stats: ``mean``, ``scale`` (D_feat,) of
    the scaler, ``center`` (D_feat,) of the PCA, ``components`` (D_feat, D)."""

    name: ClassVar[str] = "neco"
    dim: int = 0

    def __post_init__(self) -> None:
        if self.dim < 0:
            raise self.invalid(
                f"D (principal components kept) must be an integer >= 1 (or 0: explain 90% of the fit variance), "
                f"got {self.dim!r}."
            )

    def check_feature_dim(self, dim: int) -> None:
        if self.dim >= dim:
            raise self.invalid(
                f"D = {self.dim} must be smaller than the feature dimension {dim} (e.g. {self.name}@{dim // 2}, "
                f"or {self.name} for the components explaining 90% of the variance)."
            )

    def fit_stats(
        self, features: Tensor, logits: Tensor, labels: Tensor | None, weight: Tensor | None, bias: Tensor | None
    ) -> dict[str, Tensor]:
        h = features.double()
        mean, scale = standard_scale(h)
        scaled = (h - mean) / scale
        center = scaled.mean(0)
        values, vectors = torch.linalg.eigh((scaled - center).T @ (scaled - center))  # ascending
        values, vectors = values.flip(0).clamp_min(0), vectors.flip(1)
        dim = self.dim or int((values.cumsum(0) / values.sum() < EXPLAINED_VARIANCE).sum()) + 1
        return {"mean": mean, "scale": scale, "center": center, "components": vectors[:, :dim]}

    def score_batch(self, stats: Mapping[str, Tensor], features: Tensor, logits: Tensor) -> Tensor:
        scaled = (features - stats["mean"]) / stats["scale"]
        reduced = ((scaled - stats["center"]) @ stats["components"]).norm(dim=1)
        return logits.amax(1) * reduced / scaled.norm(dim=1)
