"""``she``: SHE (Zhang et al., "Out-of-Distribution Detection based on In-Distribution Data Patterns Memorization
with Modern Hopfield Energy", ICLR 2023): <h, s_m>, s_c the mean feature of the correctly classified fit samples
of class c, m = argmax l (OpenOOD v1.5 ``she_postprocessor.py``).

Fit: the stored pattern s_c of class c is the mean penultimate feature of the fit samples labelled c *and*
predicted c (argmax of the logits). Score, for the predicted class m = argmax_k l_k:

    score(h) = <h, s_m>.

Transcribed from OpenOOD v1.5, ``openood/postprocessors/she_postprocessor.py`` with ``configs/postprocessors/
she.yml`` (``metric: inner_product``, the only metric offered here; OpenOOD fits on the training set, we on
``data.fit``). Needs the class labels of the fit data. Where no fit sample of a class is both labelled and
predicted c, OpenOOD's pattern is the mean of nothing (NaN, so every sample predicted c would score NaN); ours
is zero (those samples score 0), with a warning naming the classes.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from ash_lightning.detectors.base import FeatureDetector, class_means

__all__ = ["SHE"]


@dataclass(frozen=True)
class SHE(FeatureDetector):
    """``she`` (no parameters): <h, s_m>, s_c the mean fit feature of the correctly classified samples of class c.
    Stats: ``patterns`` (K, D)."""

    name: ClassVar[str] = "she"
    needs_labels: ClassVar[bool] = True

    def fit_stats(
        self, features: Tensor, logits: Tensor, labels: Tensor | None, weight: Tensor | None, bias: Tensor | None
    ) -> dict[str, Tensor]:
        assert labels is not None  # checked by fit()
        labels = labels.to(features.device)
        correct = logits.argmax(1) == labels
        patterns, counts = class_means(features[correct].double(), labels[correct], logits.shape[1])
        empty = (counts == 0).nonzero().flatten().tolist()
        if empty:
            shown = ", ".join(map(str, empty[:10])) + (", ..." if len(empty) > 10 else "")
            warnings.warn(
                f"{self.spec}: {len(empty)} of {logits.shape[1]} classes have no correctly classified fit sample "
                f"(classes {shown}); their stored pattern is zero, so samples predicted as them score 0. "
                "Fit on more labelled ID data (e.g. the training set) for a pattern per class.",
                stacklevel=3,
            )
        return {"patterns": patterns}

    def score_batch(self, stats: Mapping[str, Tensor], features: Tensor, logits: Tensor) -> Tensor:
        return (features * stats["patterns"][logits.argmax(1)]).sum(1)
