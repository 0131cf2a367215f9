"""``recorded``: a value as the JSON files of a run can hold it, whatever a user's hyper-parameters contain."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any


def recorded(value: Any) -> Any:
    """``value`` with mappings as dicts (string keys) and lists/tuples as lists; JSON scalars as they are (a
    non-finite float as its string); anything else (modules, partials, OmegaConf containers' leaves, paths,
    dtypes, devices) as ``str(value)``."""
    if isinstance(value, Mapping):
        return {str(k): recorded(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)) or type(value).__name__ == "ListConfig":
        return [recorded(v) for v in value]
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    return str(value)
