"""Activation shaping: pure tensor functions (``functional``), spec strings (``specs``), forward hooks
(``hooks``), shapers fitted on ID statistics (``calibrated``, ``calibration``) and one-pass sweeps (``sweep``)."""

from ash_lightning.shaping.functional import ash_b, ash_p, ash_rand, ash_s, react, react_and_ash, scale
from ash_lightning.shaping.specs import Shaper, get_shaping, list_shapings, register_shaping

__all__ = [
    "Shaper",
    "ash_b",
    "ash_p",
    "ash_rand",
    "ash_s",
    "get_shaping",
    "list_shapings",
    "react",
    "react_and_ash",
    "register_shaping",
    "scale",
]
