"""OOD scores from logits: pure functions (``functional``) and spec strings (``specs``)."""

from ash_lightning.scores.functional import energy, gen, max_logit, msp, neg_entropy
from ash_lightning.scores.specs import get_score, list_scores, register_score

__all__ = ["energy", "gen", "get_score", "list_scores", "max_logit", "msp", "neg_entropy", "register_score"]
