"""``cadref``: CADRef (Ling et al., "CADRef: Robust Out-of-Distribution Detection via Class-Aware Decoupled Relative
Feature Leveraging", CVPR 2025): -(E+(h) / logsumexp(l) + E-(h) / mean fit logsumexp), E+/E- the L1 errors
||h - mu_m||_1 / ||h||_1 where they agree/disagree with sign(w_m) (LingAndZero/CADRef ``ood_methods/CADRef.py``).

Fit: mu_c, the mean penultimate feature of the fit samples *predicted* c (as ``caref``), and the mean energy
logsumexp(l) of the fit samples. For the predicted class m = argmax_k l_k and s = sign(w_m), w_m its classifier
row, the relative error d = h - mu_m is split by the sign of the class's weights:

    E+(h) = ||max(s * d, 0)||_1 / ||h||_1,   E-(h) = ||max(-s * d, 0)||_1 / ||h||_1,
    score(h) = -(E+(h) / logsumexp(l) + E-(h) / mean_fit logsumexp(l)).

Transcribed from the authors' LingAndZero/CADRef, ``ood_methods/CADRef.py`` with the class means of
``utils/get_stat.py`` (grouped by predicted class; no labels are read), with its default logit score
``--logit_method Energy`` (``ood_eval.py``; MSP, MaxLogit and GEN are not offered here). They fit on the training
set, we on ``data.fit``. A class no fit sample is predicted as gets a zero mean, with a warning (the authors' code
stops there).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ash_lightning.detectors.base import FeatureDetector
from ash_lightning.detectors.caref import predicted_class_means

__all__ = ["CADRef"]


@dataclass(frozen=True)
class CADRef(FeatureDetector):
    """``cadref`` (no parameters). Stats: ``means`` (K, D) per predicted class, ``signs`` (K, D) of the classifier
    weight, ``mean_energy`` (0-d) of the fit samples."""

    name: ClassVar[str] = "cadref"
    needs_classifier: ClassVar[bool] = True

    def fit_stats(
        self, features: Tensor, logits: Tensor, labels: Tensor | None, weight: Tensor | None, bias: Tensor | None
    ) -> dict[str, Tensor]:
        assert weight is not None  # checked by fit()
        return {
            "means": predicted_class_means(self, features, logits),
            "signs": weight.sign().double(),
            "mean_energy": torch.logsumexp(logits.double(), 1).mean(),
        }

    def score_batch(self, stats: Mapping[str, Tensor], features: Tensor, logits: Tensor) -> Tensor:
        predicted = logits.argmax(1)
        signed = (features - stats["means"][predicted]) * stats["signs"][predicted]
        norm = features.abs().sum(1)
        positive, negative = signed.clamp_min(0).sum(1) / norm, (-signed).clamp_min(0).sum(1) / norm
        return -(positive / torch.logsumexp(logits, 1) + negative / stats["mean_energy"])
