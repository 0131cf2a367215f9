"""Activation shaping (ASH, ReAct, SCALE) as pure, out-of-place tensor functions, plus spec strings.

Every function takes a batch-first floating-point tensor ``x`` of shape (B, ...) -- e.g. (B, C),
(B, C, H, W) or (B, N, C) -- and works per sample over all ``n`` non-batch elements. It returns a new
tensor of the same shape and dtype and never modifies ``x``.

Pruning (ASH family, Djurisic et al., ICLR 2023): keep the ``k = n - round(n * percentile / 100)``
largest values of each sample (round half to even, as ``np.round`` in the authors' code; one
``torch.topk``) and zero the rest. ``k`` is clamped to at least 1, so a single-element sample always
keeps its element. ``percentile`` must lie in [0, 100).

Numerics:

* Sums and exponentials are computed in float32 (float64 for float64 input), so float16/bfloat16
  inputs neither overflow nor underflow there. Results are cast back to the input dtype, saturating at
  the dtype's largest finite value instead of becoming inf.
* An all-zero sample comes back as zeros, never NaN (ASH-S and SCALE use the factor 1 when the kept
  sum is 0); only ASH-rand, as in the authors' code, still draws values for its k survivors.
  Constant, all-negative and single-element samples and a batch of one give finite results.
* ASH assumes non-negative (post-ReLU) activations. The ASH family (``ash_*``, ``react_and_ash``,
  ``scale``) warns once per process when it sees negative values, e.g. post-LayerNorm ViT/Swin tokens.

Spec strings (``get_shaping``): ``"none"``, ``"ash_p@90"``, ``"ash_b@65"``, ``"ash_s@90"``,
``"ash_rand@65"``, ``"react@1.0"``, ``"react_and_ash@1.0@90"``, ``"scale@85"``; a name alone uses the
function's defaults. New names are added with ``register_shaping``.
"""

from __future__ import annotations

import functools
import inspect
import math
import warnings
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
from torch import Tensor

__all__ = [
    "Shaper",
    "ash_b",
    "ash_p",
    "ash_rand",
    "ash_s",
    "get_shaping",
    "react",
    "react_and_ash",
    "register_shaping",
    "scale",
]

_negative_warned = False


def _reset_negative_warning() -> None:
    """Re-arm the once-per-process warning about negative activations (for tests)."""
    global _negative_warned
    _negative_warned = False


def _warn_if_negative(x: Tensor, caller: str) -> None:
    """Warn once per process if ``x`` has negative values; costs one reduction until it has warned."""
    global _negative_warned
    if _negative_warned or not bool(x.min() < 0):
        return
    _negative_warned = True
    percent = 100.0 * (x < 0).float().mean().item()
    warnings.warn(
        f"ASH assumes non-negative activations (post-ReLU); {percent:.1f}% of the values passed to "
        f"{caller} are negative (e.g. post-LayerNorm ViT/Swin tokens): pruning by magnitude rank is "
        "then not what the paper evaluated. Shape at a post-ReLU layer or use placement=<module name>.",
        UserWarning,
    )


def _check_percentile(percentile: float, caller: str) -> None:
    if not 0 <= percentile < 100:
        raise ValueError(
            f"{caller}: percentile={percentile!r} is outside the valid range [0, 100); "
            "pass the percentage of each sample to prune, e.g. percentile=90."
        )


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32, or the input dtype when it is wider."""
    return torch.promote_types(dtype, torch.float32)


def keep_count(n: int, percentile: float) -> int:
    """k = n - round(n * percentile / 100), at least 1: how many of ``n`` values pruning at ``percentile`` keeps."""
    return max(1, n - round(n * percentile / 100))


def _prune(x: Tensor, percentile: float, caller: str) -> tuple[Tensor, Tensor, Tensor]:
    """One top-k per sample: ``(flat, values, indices)`` with ``flat`` = ``x`` reshaped to (B, n)."""
    _check_percentile(percentile, caller)
    if x.dim() < 2 or not x.is_floating_point():
        raise ValueError(
            f"{caller} expects a batch-first floating-point tensor (B, ...) with at least 2 dims; got "
            f"shape {tuple(x.shape)} and dtype {x.dtype}. Add a feature dim (x[:, None]) or call x.float()."
        )
    _warn_if_negative(x, caller)
    n = math.prod(x.shape[1:])
    flat = x.reshape(x.shape[0], n)
    values, indices = flat.topk(keep_count(n, percentile), dim=1, sorted=False)
    return flat, values, indices


def _place(flat: Tensor, indices: Tensor, values: Tensor, shape: torch.Size) -> Tensor:
    """A new tensor of ``shape``: ``values`` at ``indices`` of each flattened sample, zeros elsewhere."""
    return flat.new_zeros(flat.shape).scatter_(1, indices, values).view(shape)


def _saturate_(t: Tensor, dtype: torch.dtype) -> Tensor:
    """Cast the temporary ``t`` to ``dtype``, clamping it in place so that overflow saturates at
    ``dtype``'s largest finite value instead of becoming inf."""
    info = torch.finfo(dtype)
    return t.clamp_(info.min, info.max).to(dtype)


def _exp_ratio(flat: Tensor, values: Tensor) -> Tensor:
    """``exp(s1 / s2)`` per sample with s1 = ``flat.sum(1)``, s2 = ``values.sum(1)`` (kept values), summed
    in float32 or wider; 1 where ``s2 == 0``; capped at the largest finite value."""
    acc = _accumulation_dtype(flat.dtype)
    s1, s2 = flat.sum(1, dtype=acc), values.sum(1, dtype=acc)
    ratio = torch.where(s2 != 0, s1 / s2, 0.0)
    return ratio.exp().clamp(max=torch.finfo(acc).max)


def ash_p(x: Tensor, percentile: float = 65) -> Tensor:
    """ASH-P: keep the top-k values of each sample unchanged, zero the rest."""
    flat, values, indices = _prune(x, percentile, "ash_p")
    return _place(flat, indices, values, x.shape)


def ash_b(x: Tensor, percentile: float = 65) -> Tensor:
    """ASH-B: set the top-k positions of each sample to ``s1 / k`` (s1 = sum before pruning), zero the rest."""
    flat, values, indices = _prune(x, percentile, "ash_b")
    s1 = flat.sum(1, dtype=_accumulation_dtype(x.dtype))
    fill = _saturate_(s1 / values.shape[1], x.dtype)
    return _place(flat, indices, fill[:, None].expand_as(values), x.shape)


def _ash_s(x: Tensor, percentile: float, caller: str) -> Tensor:
    flat, values, indices = _prune(x, percentile, caller)
    factor = _exp_ratio(flat, values)
    return _place(flat, indices, _saturate_(values * factor[:, None], x.dtype), x.shape)


def ash_s(x: Tensor, percentile: float = 65) -> Tensor:
    """ASH-S: keep the top-k values of each sample times ``exp(s1 / s2)`` (s1, s2 = sums before and
    after pruning), zero the rest."""
    return _ash_s(x, percentile, "ash_s")


def ash_rand(
    x: Tensor,
    percentile: float = 65,
    low: float = 0.0,
    high: float = 10.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """ASH-rand: replace the top-k values of each sample with ``U(low, high)`` draws, zero the rest."""
    flat, values, indices = _prune(x, percentile, "ash_rand")
    return _place(flat, indices, values.uniform_(low, high, generator=generator), x.shape)


def react(x: Tensor, threshold: float) -> Tensor:
    """ReAct (Sun et al., NeurIPS 2021): ``min(x, threshold)`` elementwise."""
    return x.clamp(max=threshold)


def react_and_ash(x: Tensor, threshold: float, percentile: float) -> Tensor:
    """ReAct clipping at ``threshold``, then ASH-S at ``percentile``."""
    return _ash_s(react(x, threshold), percentile, "react_and_ash")


def scale(x: Tensor, percentile: float = 85) -> Tensor:
    """SCALE (Xu et al., ICLR 2024): the unpruned ``x`` times ``exp(s1 / s2)`` per sample, with s1 the
    sum of the sample and s2 the sum of its top-k values."""
    flat, values, _ = _prune(x, percentile, "scale")
    factor = _exp_ratio(flat, values)
    return _saturate_(x * factor.view(-1, *[1] * (x.dim() - 1)), x.dtype)


def _no_shaping(x: Tensor) -> Tensor:
    """Identity: the baseline without shaping."""
    return x


def _format_number(value: float) -> str:
    return str(int(value)) if value.is_integer() else repr(value)


@dataclass(frozen=True, repr=False)
class Shaper:
    """A picklable shaping callable, ``shaper(x) == fn(x)``, labelled by its normalised ``spec`` string.

    ``params`` holds its numeric parameters and ``percentile`` its pruning percentile (None if it has none).
    """

    fn: Callable[[Tensor], Tensor]
    spec: str
    params: tuple[float, ...] = ()
    percentile: float | None = None

    @property
    def name(self) -> str:
        """The spec's name part, e.g. ``"ash_s"`` for ``"ash_s@90"``."""
        return self.spec.split("@", 1)[0]

    def __call__(self, x: Tensor) -> Tensor:
        return self.fn(x)

    def __repr__(self) -> str:
        return f"Shaper({self.spec!r})"


class _Registration(NamedTuple):
    factory: Callable[..., Callable[[Tensor], Tensor]]
    usage: str


_REGISTRY: dict[str, _Registration] = {}


def register_shaping(
    name: str,
    factory: Callable[..., Callable[[Tensor], Tensor]],
    usage: str,
    *,
    replace: bool = False,
) -> None:
    """Make ``get_shaping("name@a@b")`` return ``factory("a", "b")``: the factory gets the raw string
    args, parses them itself and raises ValueError for bad ones. ``usage`` is the form listed in error
    messages, e.g. ``"ash_s@<percentile>"``. A factory may return a ``Shaper`` (kept as is) or any
    callable (wrapped, with the spec string as given). An existing name is replaced only with ``replace=True``.
    """
    if not name or "@" in name:
        raise ValueError(f"Shaping name {name!r} must be non-empty and must not contain '@'.")
    if name in _REGISTRY and not replace:
        raise ValueError(
            f"Shaping {name!r} is already registered ({_REGISTRY[name].usage}); pass replace=True to override it."
        )
    _REGISTRY[name] = _Registration(factory, usage)


@dataclass(frozen=True)
class _BuiltinFactory:
    """Factory of a built-in: parses numeric string args for ``param_names`` of ``fn``; trailing
    parameters that ``fn`` gives a default may be omitted."""

    name: str
    fn: Callable[..., Tensor]
    param_names: tuple[str, ...] = ()

    @property
    def defaults(self) -> tuple[float, ...]:
        signature = inspect.signature(self.fn).parameters
        return tuple(
            float(signature[p].default) for p in self.param_names if signature[p].default is not inspect.Parameter.empty
        )

    @property
    def usage(self) -> str:
        n_required = len(self.param_names) - len(self.defaults)
        parts = [f"@<{p}>" for p in self.param_names[:n_required]]
        parts += [f"[@<{p}>={_format_number(d)}]" for p, d in zip(self.param_names[n_required:], self.defaults)]
        return self.name + "".join(parts)

    def __call__(self, *args: str) -> Shaper:
        defaults = self.defaults
        n_required = len(self.param_names) - len(defaults)
        if not n_required <= len(args) <= len(self.param_names):
            expected = str(n_required) if not defaults else f"{n_required} to {len(self.param_names)}"
            raise ValueError(f"{self.name} takes {expected} argument(s), got {len(args)}")
        values = tuple(_parse_number(a, p) for a, p in zip(args, self.param_names))
        values += defaults[len(args) - n_required :]
        kwargs = dict(zip(self.param_names, values))
        percentile = kwargs.get("percentile")
        if percentile is not None:
            _check_percentile(percentile, self.name)
        spec = "@".join([self.name, *map(_format_number, values)])
        return Shaper(functools.partial(self.fn, **kwargs), spec, values, percentile)


def _parse_number(arg: str, param: str) -> float:
    try:
        return float(arg)
    except ValueError:
        raise ValueError(f"<{param}> must be a number, got {arg!r}") from None


for _builtin in (
    _BuiltinFactory("none", _no_shaping),
    _BuiltinFactory("ash_p", ash_p, ("percentile",)),
    _BuiltinFactory("ash_b", ash_b, ("percentile",)),
    _BuiltinFactory("ash_s", ash_s, ("percentile",)),
    _BuiltinFactory("ash_rand", ash_rand, ("percentile",)),
    _BuiltinFactory("react", react, ("threshold",)),
    _BuiltinFactory("react_and_ash", react_and_ash, ("threshold", "percentile")),
    _BuiltinFactory("scale", scale, ("percentile",)),
):
    register_shaping(_builtin.name, _builtin, _builtin.usage)
del _builtin


def get_shaping(spec: str | Callable[[Tensor], Tensor]) -> Shaper:
    """Resolve a spec string such as ``"ash_s@90"`` (``name@arg@...``) to a ``Shaper``.

    A ``Shaper`` is returned as is; any other callable is wrapped with its ``__name__`` as spec.
    """
    if isinstance(spec, Shaper):
        return spec
    if not isinstance(spec, str):
        if callable(spec):
            return Shaper(spec, getattr(spec, "__name__", type(spec).__name__))
        raise TypeError(f"shaping must be a spec string or a callable, got {type(spec).__name__}.")
    name, *args = spec.strip().split("@")
    registration = _REGISTRY.get(name)
    if registration is None:
        raise ValueError(_invalid_spec(spec, f"unknown shaping name {name!r}"))
    try:
        shaper = registration.factory(*args)
    except ValueError as err:
        raise ValueError(_invalid_spec(spec, str(err))) from None
    return shaper if isinstance(shaper, Shaper) else Shaper(shaper, "@".join([name, *args]))


def _invalid_spec(spec: str, reason: str) -> str:
    forms = ", ".join(r.usage for r in _REGISTRY.values())
    return (
        f"Invalid shaping spec {spec!r}: {reason.rstrip('.')}. Valid forms: {forms} "
        "(e.g. 'ash_s@90', 'react@1.0', 'react_and_ash@1.0@90')."
    )
