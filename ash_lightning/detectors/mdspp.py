"""``mdspp``: Mahalanobis++ (Mueller & Hein, "Mahalanobis++: Improving OOD Detection via Feature Normalization",
ICML 2025): -min_c (z - mu_c)^T pinv(Sigma) (z - mu_c) on z = h / ||h||, needs fit labels (mueller-mp/maha-norm
``NINCO/detection_methods.py`` evaluate_Mahalanobis_norm).

With z = h / ||h||, class means mu_c and one covariance Sigma shared by the classes, fitted on the normalised
labelled ID fit data (``1/N``, around the class means), the score is that of ``mds``
(``ash_lightning.detectors.mahalanobis``) on z:

    score(h) = -min_c (z - mu_c)^T pinv(Sigma) (z - mu_c).

Transcribed from the authors' mueller-mp/maha-norm, ``NINCO/detection_methods.py`` (``evaluate_Mahalanobis_norm``,
also the README's listing: float64, sklearn ``EmpiricalCovariance(assume_centered=True)`` of the class-centred
features, whose precision is ``scipy.linalg.pinvh``; we mirror its cutoff as ``mds`` does). Needs the class
labels of the fit data. The authors' code loops over all 1000 ImageNet classes and would give NaN for a class
without fit samples; such a class gets no Gaussian here (the minimum runs over the others), as in ``mds``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch.nn.functional as F
from torch import Tensor

from ash_lightning.detectors.mahalanobis import MDS

__all__ = ["MDSPP"]


@dataclass(frozen=True)
class MDSPP(MDS):
    """``mdspp`` (no parameters): ``mds`` on h / ||h||. Stats: those of ``mds``, of the normalised features."""

    name: ClassVar[str] = "mdspp"

    def fit_stats(
        self, features: Tensor, logits: Tensor, labels: Tensor | None, weight: Tensor | None, bias: Tensor | None
    ) -> dict[str, Tensor]:
        return super().fit_stats(F.normalize(features.double(), dim=1), logits, labels, weight, bias)

    def score_batch(self, stats: Mapping[str, Tensor], features: Tensor, logits: Tensor) -> Tensor:
        return super().score_batch(stats, F.normalize(features, dim=1), logits)
