"""OOD scores: pure functions from logits ``(B, K)`` to a per-sample score ``(B,)``.

Higher scores mean "more in-distribution". Half-precision (and integer) logits are
upcast to float32 before any arithmetic, so the result is float32 (float64 for
float64 input) and cannot overflow where the half-precision version would.

``get_score`` resolves a score by name, with parameters in the same ``"@"`` syntax
as the shaping specs: ``"energy"``, ``"energy@2.0"``, ``"gen@0.1@100"``.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

__all__ = ["Score", "energy", "gen", "get_score", "max_logit", "msp", "neg_entropy"]


def _upcast(logits: Tensor) -> Tensor:
    """Check the ``(B, K)`` shape and return the logits in float32 or wider."""
    if logits.ndim != 2:
        raise ValueError(
            f"OOD scores expect logits of shape (batch, classes), got shape {tuple(logits.shape)}; "
            "flatten or index the extra dimensions first."
        )
    if logits.dtype in (torch.float32, torch.float64):
        return logits
    return logits.float()


def _check_positive(name: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}.")


def _check_gen_args(gamma: float, m: int) -> None:
    _check_positive("gamma", gamma)
    if m < 1:
        raise ValueError(f"m (number of top classes) must be >= 1, got {m!r}.")


def energy(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Negative free energy: ``T * logsumexp(logits / T)`` over classes."""
    _check_positive("temperature", temperature)
    return temperature * torch.logsumexp(_upcast(logits) / temperature, dim=1)


def msp(logits: Tensor) -> Tensor:
    """Maximum softmax probability: ``max_k softmax(logits)_k``."""
    return torch.softmax(_upcast(logits), dim=1).amax(dim=1)


def max_logit(logits: Tensor) -> Tensor:
    """Maximum logit: ``max_k logits_k``."""
    return _upcast(logits).amax(dim=1)


def gen(logits: Tensor, gamma: float = 0.1, m: int = 100) -> Tensor:
    """GEN (Liu et al., CVPR 2023): ``-sum_{top min(m, K) p} p^gamma * (1 - p)^gamma``, p = softmax."""
    _check_gen_args(gamma, m)
    probs = torch.softmax(_upcast(logits), dim=1)
    if m < probs.shape[1]:
        probs = probs.topk(m, dim=1, sorted=False).values
    return -(probs.pow(gamma) * (1.0 - probs).pow(gamma)).sum(dim=1)


def neg_entropy(logits: Tensor) -> Tensor:
    """Negative entropy of the softmax: ``sum_k p_k log p_k``, computed from ``log_softmax``."""
    log_probs = torch.log_softmax(_upcast(logits), dim=1)
    return (log_probs.exp() * log_probs).sum(dim=1)


# name -> (function, ((parameter name, type), ...)) in positional order after the logits.
_REGISTRY: dict[str, tuple[Callable[..., Tensor], tuple[tuple[str, type], ...]]] = {
    "energy": (energy, (("temperature", float),)),
    "msp": (msp, ()),
    "max_logit": (max_logit, ()),
    "gen": (gen, (("gamma", float), ("m", int))),
    "neg_entropy": (neg_entropy, ()),
}
_VALID_FORMS = "'energy', 'energy@T', 'msp', 'max_logit', 'gen', 'gen@gamma', 'gen@gamma@m', 'neg_entropy'"


class Score:
    """A named, picklable score callable: ``Score(fn, args, name)(logits) == fn(logits, *args)``."""

    def __init__(self, fn: Callable[..., Tensor], args: tuple = (), name: str | None = None) -> None:
        self.fn = fn
        self.args = tuple(args)
        self.name = name if name is not None else getattr(fn, "__name__", type(fn).__name__)

    def __call__(self, logits: Tensor) -> Tensor:
        return self.fn(logits, *self.args)

    def __repr__(self) -> str:
        return f"Score({self.name!r})"


def _parse_arg(spec: str, param: str, kind: type, text: str) -> float | int:
    try:
        return kind(text)
    except ValueError:
        raise ValueError(
            f"Bad score spec {spec!r}: {param} must be {kind.__name__}, got {text!r}. Valid forms: {_VALID_FORMS}."
        ) from None


def get_score(name: str | Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """Resolve a score spec (``"energy"``, ``"energy@2.0"``, ``"gen@0.1@100"``, ...) to a :class:`Score`.

    A callable is returned as is when it has a ``.name``, else wrapped so that ``.name`` is its
    ``__name__``. The name of a resolved spec is normalised, e.g. ``"energy@2"`` -> ``"energy@2.0"``.
    """
    if callable(name):
        return name if hasattr(name, "name") else Score(name)
    if not isinstance(name, str):
        raise ValueError(f"Score must be a name or a callable, got {type(name).__name__}. Valid forms: {_VALID_FORMS}.")
    base, *texts = name.strip().split("@")
    if base not in _REGISTRY:
        raise ValueError(f"Unknown score {name!r}. Valid forms: {_VALID_FORMS}.")
    fn, params = _REGISTRY[base]
    if len(texts) > len(params):
        raise ValueError(
            f"Bad score spec {name!r}: {base!r} takes at most {len(params)} parameter(s). Valid forms: {_VALID_FORMS}."
        )
    args = tuple(_parse_arg(name, param, kind, text) for (param, kind), text in zip(params, texts))
    try:
        fn(torch.zeros(1, 1), *args)  # validates the parameter values with the function's own checks
    except ValueError as err:
        raise ValueError(f"Bad score spec {name!r}: {err} Valid forms: {_VALID_FORMS}.") from None
    return Score(fn, args, "@".join([base, *map(repr, args)]))
