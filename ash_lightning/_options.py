"""Option checks run where an option is parsed: each failure is one ``UserError`` naming the key, the bad value,
the valid range and a fix, so a typo stops the run before anything is evaluated."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from ash_lightning.errors import UserError


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


#: How FPR@TPR and the AUPRs pick the positive class: ``"paper"``: ID is the positive class (ASH, ReAct, Energy
#: papers); ``"openood"``: OOD is the positive class (OpenOOD v1.5).
CONVENTIONS = ("paper", "openood")


def check_int(key: str, value: Any, minimum: int, *, example: int) -> int:
    """``value`` as an int if it is an integer >= ``minimum``, else a UserError whose fix sets ``example``."""
    if not (_is_number(value) and float(value).is_integer()) or value < minimum:
        raise UserError(f"{key}: {value!r} is out of range; valid: an integer >= {minimum}. Fix: set {key}: {example}.")
    return int(value)


def check_range(
    key: str, value: Any, low: float, high: float, *, low_open: bool, high_open: bool, example: float
) -> float:
    """``value`` as a float if it lies in the interval from ``low`` to ``high`` (open or closed ends), else a
    UserError, e.g. ``tpr`` in (0, 1]."""
    inside = (
        _is_number(value)
        and math.isfinite(value)
        and (value > low if low_open else value >= low)
        and (value < high if high_open else value <= high)
    )
    if not inside:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise UserError(f"{key}: {value!r} is out of range; valid: a number in {interval}. Fix: set {key}: {example}.")
    return float(value)


def check_choice(key: str, value: Any, choices: Sequence[str]) -> str:
    """``value`` if it is one of ``choices``, else a UserError listing them."""
    if value not in choices:
        raise UserError(
            f"{key}: {value!r} is not a valid choice; valid: one of {', '.join(map(repr, choices))}. "
            f"Fix: set {key}: {choices[0]}."
        )
    return value


def check_tpr(key: str, value: Any) -> float:
    """``value`` as a float if it is a TPR for FPR@TPR, in (0, 1], else a UserError (e.g. 0.95 for FPR95)."""
    return check_range(key, value, 0, 1, low_open=True, high_open=False, example=0.95)


def check_convention(key: str, value: Any) -> str:
    """``value`` if it is one of ``CONVENTIONS``, else a UserError listing them."""
    return check_choice(key, value, CONVENTIONS)
