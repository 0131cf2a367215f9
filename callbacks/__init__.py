"""Lightning callbacks of ash-lightning: drop them into any Lightning project's Trainer."""
from callbacks.activation_shaping import ActivationShapingCallback
from callbacks.ood_metrics import OODMetricsCallback

__all__ = ["ActivationShapingCallback", "OODMetricsCallback"]
