"""Score columns that cannot rank anything: every sample got the same score. Checked on the first batch (a
warning at once) and on the whole ID test set (``equal_id_scores`` of each run in the results, a flag in the
table, ``EQUAL_SCORES_LEGEND``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from torch import Tensor

#: Why a column of equal scores happens and what to do, for the warning and the table's legend.
EQUAL_SCORES_CAUSE = (
    "Likely cause: the shaping removes every activation (e.g. a percentile that keeps nothing of a small feature "
    "vector), or the backbone gives the same logits for every input (untrained or wrong checkpoint). Fix: check "
    "model.shaping and the weights."
)
#: The flag of such a setting in the results table, and its legend line.
EQUAL_SCORES_FLAG = "⚠"
EQUAL_SCORES_LEGEND = (
    f"{EQUAL_SCORES_FLAG} every ID test sample has the same score under this setting: it cannot separate ID from "
    f"OOD data, so its metrics mean nothing (AUROC 0.5). {EQUAL_SCORES_CAUSE}"
)


def equal_columns(scores: np.ndarray) -> list[int]:
    """The columns of ``scores`` (N, R) whose N >= 2 values are one finite number."""
    scores = np.asarray(scores).reshape(len(scores), -1)
    if len(scores) < 2:
        return []
    equal = (scores == scores[:1]).all(axis=0) & np.isfinite(scores[0])
    return [int(r) for r in np.flatnonzero(equal)]


def constant_score_warning(scores: Tensor, runs: Sequence[Mapping[str, str]]) -> str | None:
    """A warning naming the runs whose column of ``scores`` (B, R) is one value for all B >= 2 samples
    (``equal_columns``), with the likely cause, or None. Equal scores give AUROC 0.5 and FPR 100% whatever the
    data."""
    names = [
        f"{runs[r]['shaping']} + {runs[r]['score']}" if r < len(runs) else f"run {r}"
        for r in equal_columns(scores.detach().double().cpu().numpy())
    ]
    if not names:
        return None
    return (
        f"every sample of the first batch has the same score under {', '.join(names)}: such a score cannot "
        f"separate ID from OOD data (AUROC 0.5). {EQUAL_SCORES_CAUSE}"
    )
