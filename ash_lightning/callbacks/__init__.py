"""Lightning callbacks of ash-lightning: drop them into any Lightning project's Trainer."""

from ash_lightning.callbacks.activation_shaping import ActivationShapingCallback
from ash_lightning.callbacks.ood_metrics import OODMetricsCallback

__all__ = ["ActivationShapingCallback", "OODMetricsCallback"]
