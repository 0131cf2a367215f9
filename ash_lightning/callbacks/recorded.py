"""``recorded``: a value as the JSON files of a run can hold it, whatever a user's hyper-parameters contain."""

from __future__ import annotations

import math
from typing import Any


def recorded(value: Any) -> Any:
    """``value`` with dicts (string keys) and lists/tuples kept as such, JSON scalars as they are (a non-finite
    float as its string), and anything else in its string form, ``str(value)``: modules, partials, OmegaConf
    containers, paths, dtypes, devices."""
    if isinstance(value, dict):
        return {str(k): recorded(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [recorded(v) for v in value]
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    return str(value)
