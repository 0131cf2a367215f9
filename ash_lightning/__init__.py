"""ash-lightning: activation shaping (ASH and friends) for OOD detection on any timm backbone.

The functional API mirrors the original ASH code: ``from ash_lightning import ash_b, get_score``.
"""

import ash_lightning.shaping.calibration  # noqa: F401  (registers react@p<q>, dice, vra, lts)
from ash_lightning.deploy import OODDetector, load_detector
from ash_lightning.evaluation.metrics import OODMetrics, ood_metrics, summarize, unique_by_index
from ash_lightning.scores.functional import energy, gen, max_logit, msp, neg_entropy
from ash_lightning.scores.specs import get_score, list_scores, register_score
from ash_lightning.shaping.functional import ash_b, ash_p, ash_rand, ash_s, react, react_and_ash, scale
from ash_lightning.shaping.hooks import ShapingHandle, attach_shaping, resolve_hook_point
from ash_lightning.shaping.specs import Shaper, get_shaping, list_shapings, register_shaping

__version__ = "0.1.0"
__all__ = [
    "OODDetector",
    "OODMetrics",
    "Shaper",
    "ShapingHandle",
    "ash_b",
    "ash_p",
    "ash_rand",
    "ash_s",
    "attach_shaping",
    "energy",
    "gen",
    "get_score",
    "get_shaping",
    "list_scores",
    "list_shapings",
    "load_detector",
    "max_logit",
    "msp",
    "neg_entropy",
    "ood_metrics",
    "react",
    "react_and_ash",
    "register_score",
    "register_shaping",
    "resolve_hook_point",
    "scale",
    "summarize",
    "unique_by_index",
]
