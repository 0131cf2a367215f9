"""Shaping spec strings: ``name[@arg...]`` resolved to a ``Shaper`` by ``get_shaping``, names added with
``register_shaping`` and listed by ``list_shapings`` (the math is in ``ash_lightning.shaping.functional``).

Built-in specs: ``"none"``, ``"ash_p@90"``, ``"ash_b@65"``, ``"ash_s@90"``, ``"ash_rand@65"``,
``"react_and_ash@1.0@90"``, ``"scale@85"``; a name alone uses the function's defaults.
``ash_lightning.shaping.calibrated`` adds ReAct (``react@1.0``, or calibrated ``react@p90``) and the other
calibrated and logit shapers (``vra``, ``dice``, ``lts``). Spec strings are parsed by ``SHAPINGS.parse``
(``ash_lightning._registry``), as scores' and detectors'.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from ash_lightning._registry import Registered, Registry, SpecParam, describe, format_number, parse_params, spec_form
from ash_lightning.shaping.functional import (
    ash_b,
    ash_p,
    ash_rand,
    ash_s,
    check_percentile,
    check_threshold,
    react_and_ash,
    scale,
)

__all__ = [
    "SHAPINGS",
    "FunctionFactory",
    "Shaper",
    "get_shaping",
    "list_shapings",
    "register_shaping",
]

ShapingFactory = Callable[..., Callable[..., Tensor]]

#: name -> factory: ``get_shaping("name@a@b")`` returns ``factory("a", "b")``.
SHAPINGS: Registry[ShapingFactory] = Registry("shaping")


@dataclass(frozen=True, repr=False)
class Shaper:
    """A picklable shaping callable, ``shaper(x) == fn(x)``, labelled by its normalised ``spec`` string.

    ``params`` holds its numeric parameters and ``percentile`` its pruning percentile (None if it has none).
    """

    fn: Callable[..., Tensor]  # (x) -> shaped x; LogitShaper's takes (features, logits, classifier)
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


def register_shaping(
    name: str, form: str | None = None, *, description: str | None = None, replace: bool = False
) -> Callable[[ShapingFactory], ShapingFactory]:
    """Decorator: ``get_shaping("name@a@b")`` returns ``factory("a", "b")``. The factory gets the raw string args,
    parses them itself and raises ValueError for bad ones; it may return a ``Shaper`` (kept as is) or any callable
    (wrapped, with the spec string as given). ``form`` is listed in error messages and by ``list_shapings``
    (e.g. ``"clip@<threshold>"``); the description defaults to the factory's docstring's first line. An existing
    name is replaced only with ``replace=True``."""
    return SHAPINGS.register(name, form, description=description, replace=replace)


def list_shapings() -> list[Registered[ShapingFactory]]:
    """Every shaping name with its form and description, in registration order."""
    return SHAPINGS.entries()


@dataclass(frozen=True)
class FunctionFactory:
    """Factory of a shaping function: parses numeric string args for ``param_names`` of ``fn``; trailing
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

    def register(self) -> None:
        """Register this factory under its name and form, described by ``fn``'s docstring."""
        register_shaping(self.name, spec_form(self.name, self.fn, self.param_names), description=describe(self.fn))(
            self
        )

    def __call__(self, *args: str) -> Shaper:
        defaults = self.defaults
        n_required = len(self.param_names) - len(defaults)
        params = [SpecParam(p, optional=i >= n_required) for i, p in enumerate(self.param_names)]
        values = (*parse_params(self.name, args, params), *defaults[len(args) - n_required :])
        kwargs = dict(zip(self.param_names, values, strict=True))
        percentile = kwargs.get("percentile")
        if percentile is not None:
            check_percentile(percentile, self.name)
        if "threshold" in kwargs:
            check_threshold(kwargs["threshold"], self.name)
        spec = "@".join([self.name, *map(format_number, values)])
        return Shaper(functools.partial(self.fn, **kwargs), spec, values, percentile)


def _no_shaping(x: Tensor) -> Tensor:
    """No shaping: the baseline, activations as they are."""
    return x


for _factory in (
    FunctionFactory("none", _no_shaping),
    FunctionFactory("ash_p", ash_p, ("percentile",)),
    FunctionFactory("ash_b", ash_b, ("percentile",)),
    FunctionFactory("ash_s", ash_s, ("percentile",)),
    FunctionFactory("ash_rand", ash_rand, ("percentile",)),
    FunctionFactory("react_and_ash", react_and_ash, ("threshold", "percentile")),
    FunctionFactory("scale", scale, ("percentile",)),
):
    _factory.register()
del _factory


def get_shaping(spec: str | Callable[[Tensor], Tensor]) -> Shaper:
    """Resolve a spec string such as ``"ash_s@90"`` (``name@arg@...``) to a ``Shaper``; a UserError (a ValueError)
    naming the valid forms for a bad one.

    A ``Shaper`` is returned as is; any other callable is wrapped with its ``__name__`` as spec.

    Example:
        >>> import torch
        >>> from ash_lightning import get_shaping
        >>> shaper = get_shaping("ash_p@50")
        >>> shaper, shaper.params, shaper.percentile
        (Shaper('ash_p@50'), (50.0,), 50.0)
        >>> shaper(torch.tensor([[1.0, 4.0, 2.0, 3.0]]))
        tensor([[0., 4., 0., 3.]])
    """
    if isinstance(spec, Shaper):
        return spec
    if not isinstance(spec, str):
        if callable(spec):
            return Shaper(spec, getattr(spec, "__name__", type(spec).__name__))
        raise TypeError(f"shaping must be a spec string or a callable, got {type(spec).__name__}.")
    return SHAPINGS.parse(spec, _build_shaper)


def _build_shaper(name: str, factory: ShapingFactory, args: list[str]) -> Shaper:
    """``factory(*args)`` as a ``Shaper`` (a plain callable labelled by the spec as given)."""
    shaper = factory(*args)
    return shaper if isinstance(shaper, Shaper) else Shaper(shaper, "@".join([name, *args]))
