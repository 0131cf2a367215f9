"""``caref``: CARef (Ling et al., "CADRef: Robust Out-of-Distribution Detection via Class-Aware Decoupled Relative
Feature Leveraging", CVPR 2025): -||h - mu_m||_1 / ||h||_1, mu_c the mean fit feature of the samples predicted c,
m = argmax l (LingAndZero/CADRef ``ood_methods/CARef.py``).

Fit: mu_c, the mean penultimate feature of the fit samples *predicted* c (argmax of the logits; no labels are
read). Score, for the predicted class m = argmax_k l_k:

    score(h) = -||h - mu_m||_1 / ||h||_1.

Transcribed from the authors' LingAndZero/CADRef, ``ood_methods/CARef.py`` with the class means of
``utils/get_stat.py`` (``get_features`` groups the training features by predicted class; no parameters; they fit
on the training set, we on ``data.fit``). A class that no fit sample is predicted as makes the authors' code stop
(the mean of an empty tensor does not stack); its mean is zero here, with a warning naming the classes.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from ash_lightning.detectors.base import Detector, FeatureDetector, class_means

__all__ = ["CARef", "predicted_class_means"]


def predicted_class_means(detector: Detector, features: Tensor, logits: Tensor) -> Tensor:
    """(K, D) float64 mean fit feature per predicted class; zero, with a warning, for a class never predicted."""
    means, counts = class_means(features.double(), logits.argmax(1), logits.shape[1])
    empty = (counts == 0).nonzero().flatten().tolist()
    if empty:
        shown = ", ".join(map(str, empty[:10])) + (", ..." if len(empty) > 10 else "")
        warnings.warn(
            f"{detector.spec}: no fit sample is predicted as {len(empty)} of {logits.shape[1]} classes (classes "
            f"{shown}); their mean feature is zero. Fit on more ID data (e.g. the training set) for a mean per class.",
            stacklevel=4,
        )
    return means


@dataclass(frozen=True)
class CARef(FeatureDetector):
    """``caref`` (no parameters): -||h - mu_m||_1 / ||h||_1. Stats: ``means`` (K, D) per predicted class."""

    name: ClassVar[str] = "caref"

    def fit_stats(
        self, features: Tensor, logits: Tensor, labels: Tensor | None, weight: Tensor | None, bias: Tensor | None
    ) -> dict[str, Tensor]:
        return {"means": predicted_class_means(self, features, logits)}

    def score_batch(self, stats: Mapping[str, Tensor], features: Tensor, logits: Tensor) -> Tensor:
        error = (features - stats["means"][logits.argmax(1)]).abs().sum(1)
        return -error / features.abs().sum(1)
