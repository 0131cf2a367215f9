"""Any decoded image as 8-bit RGB, scaled by its value range rather than clipped.

Pillow's ``convert("RGB")`` clips 16-bit (``I;16*``, ``I``) and float (``F``) images to 0..255, which turns a
16-bit PNG near-white and a [0, 1] float TIFF black. Here integer images are scaled by their type's range
(16 bits: ``v * 255 / 65535``; 32-bit ``I`` images holding values beyond 16 bits by their own min..max) and float
images from [0, 1] when they lie inside it, else from their own min..max; every other mode is converted as is.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

_SIXTEEN_BIT = 65535.0


def _scaled_to_uint8(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """``values`` mapped linearly from [low, high] to 0..255 (all zero when high == low)."""
    span = high - low
    scaled = (values - low) * (255.0 / span) if span > 0 else np.zeros_like(values)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def to_rgb8(image: Image.Image) -> Image.Image:
    """``image`` as an 8-bit RGB image; high-bit-depth and float modes are rescaled (see the module docstring)."""
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        values = np.asarray(image, dtype=np.float64)
        low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        if image.mode == "F":
            low, high = (0.0, 1.0) if low >= 0.0 and high <= 1.0 else (low, high)
        else:
            low, high = (0.0, _SIXTEEN_BIT) if low >= 0.0 and high <= _SIXTEEN_BIT else (low, high)
        return Image.fromarray(_scaled_to_uint8(values, low, high)).convert("RGB")
    return image.convert("RGB")
