"""A check for score columns that cannot rank anything: every sample of a batch got the same score."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor


def constant_score_warning(scores: Tensor, runs: Sequence[Mapping[str, str]]) -> str | None:
    """A warning naming the runs whose column of ``scores`` (B, R) is one value for all B >= 2 samples, with the
    likely cause, or None. Equal scores give AUROC 0.5 and FPR 100% whatever the data: typically the shaping
    removed every activation (``react@t`` with t <= 0 clips all of them, ``ash_*@p`` with p close to 100 keeps
    nothing of a small feature vector) or the backbone outputs the same logits for every input."""
    scores = scores.reshape(len(scores), -1)
    if len(scores) < 2:
        return None
    constant = (scores == scores[:1]).all(dim=0) & torch.isfinite(scores[0])
    names = [
        f"{runs[r]['shaping']} + {runs[r]['score']}" if r < len(runs) else f"run {r}"
        for r in torch.nonzero(constant).flatten().tolist()
    ]
    if not names:
        return None
    return (
        f"every sample of the first batch has the same score under {', '.join(names)}: such a score cannot "
        "separate ID from OOD data (AUROC 0.5). Likely cause: the shaping removes every activation (e.g. "
        "react@t with t <= 0, or a percentile that keeps nothing), or the backbone gives the same logits for "
        "every input (untrained or wrong checkpoint). Fix: check model.shaping and the weights."
    )
