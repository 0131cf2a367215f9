"""``nci[@alpha]``: NCI (Liu & Qin, "Detecting Out-of-Distribution through the Lens of Neural Collapse", CVPR
2025): <w_m, h - mu> / ||h - mu|| + alpha ||h||_1, mu the fit mean, m = argmax l, alpha = 0.0001 (OpenOOD v1.5
and litianliu/NCI-OOD ``nci_postprocessor.py``).

Fit: mu, the mean fit feature. Score, for the predicted class m = argmax_k l_k and w_m the classifier's row:

    score(h) = <w_m, h - mu> / ||h - mu|| + alpha * ||h||_1.

Transcribed from OpenOOD v1.5, ``openood/postprocessors/nci_postprocessor.py`` (identical in the authors'
litianliu/NCI-OOD), default alpha = 0.0001 from ``configs/postprocessors/nci.yml``. That config sets
``APS_mode: True``, under which OpenOOD picks alpha from [0.0001, 0.001, 0.01, 0.1] on its OOD validation
sets; we take the given alpha (no search). The bias of the classifier is not used.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from ash_lightning.detectors.base import FeatureDetector

__all__ = ["NCI"]


@dataclass(frozen=True)
class NCI(FeatureDetector):
    """``nci[@alpha]`` (alpha >= 0, default 0.0001). Stats: ``mean`` (D,) of the fit features, ``weight`` (K, D)
    of the classifier."""

    name: ClassVar[str] = "nci"
    needs_classifier: ClassVar[bool] = True
    alpha: float = 0.0001

    def __post_init__(self) -> None:
        if not (math.isfinite(self.alpha) and self.alpha >= 0):
            raise self.invalid(f"alpha (weight of the L1 norm) must be a finite number >= 0, got {self.alpha!r}.")

    def fit_stats(
        self, features: Tensor, logits: Tensor, labels: Tensor | None, weight: Tensor | None, bias: Tensor | None
    ) -> dict[str, Tensor]:
        assert weight is not None  # checked by fit()
        return {"mean": features.double().mean(0), "weight": weight.double()}

    def score_batch(self, stats: Mapping[str, Tensor], features: Tensor, logits: Tensor) -> Tensor:
        centered = features - stats["mean"]
        alignment = (stats["weight"][logits.argmax(1)] * centered).sum(1) / centered.norm(dim=1)
        return alignment + self.alpha * features.norm(p=1, dim=1)
