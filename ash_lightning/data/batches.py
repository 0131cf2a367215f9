"""The parts of a user's batch: images, labels and sample index.

A batch is a tensor (images alone), a tuple or list ``(images, labels, index)`` (trailing parts optional) or a
dict naming each part by one of the common keys in ``KEYS``. A part a batch does not hold as a tensor is None.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from torch import Tensor

from ash_lightning.errors import UserError

Part = Literal["images", "labels", "index"]
KEYS: dict[str, tuple[str, ...]] = {
    "images": ("image", "images", "x", "input"),
    "labels": ("label", "labels", "y", "target", "targets"),
    "index": ("index", "idx"),
}
POSITIONS: dict[str, int] = {"images": 0, "labels": 1, "index": 2}


def batch_part(batch: Any, part: Part) -> Tensor | None:
    """The ``part`` of ``batch`` (see the module docstring), or None when it holds no such tensor."""
    if isinstance(batch, Tensor):
        value = batch if part == "images" else None
    elif isinstance(batch, Mapping):
        value = next((batch[key] for key in KEYS[part] if key in batch), None)
    elif isinstance(batch, (list, tuple)):
        value = batch[POSITIONS[part]] if len(batch) > POSITIONS[part] else None
    else:
        value = None
    return value if isinstance(value, Tensor) else None


def describe_batch(batch: Any) -> str:
    """What ``batch`` is, for messages: ``a dict with keys ['a', 'b']``, ``a tuple of 1 item``, ..."""
    if isinstance(batch, Mapping):
        return f"a dict with keys {list(batch)}"
    if isinstance(batch, (list, tuple)):
        return f"a {type(batch).__name__} of {len(batch)} item{'s' * (len(batch) != 1)}"
    return f"a {type(batch).__name__}"


def expected_layout(part: Part) -> str:
    """How a batch can hold ``part``, for messages."""
    return f"item {POSITIONS[part]} of a tuple (images, labels, index) or a dict key {'/'.join(KEYS[part])}"


def fit_images(batch: Any) -> tuple[Tensor, Tensor | None]:
    """The images of a batch of ID fit data and the mask of the samples to keep (False for a negative index: a
    corrupt file the data module skipped), None when all are kept; a UserError when the batch holds no images."""
    images, index = batch_part(batch, "images"), batch_part(batch, "index")
    if images is None:
        raise UserError(
            f"cannot find the images in a batch of the ID fit data ({describe_batch(batch)}). "
            f"Fix: yield them as {expected_layout('images')}."
        )
    return images, (index >= 0 if index is not None and index.shape == images.shape[:1] else None)
