"""One registry per kind of spec string (shapings, scores, detectors), as timm's ``register_model``/``list_models``.

A ``Registry`` maps a name (the part of a spec before the first ``@``) to what resolves it, and keeps for each the
form users write (``ash_s[@<percentile>=65]``) and a one-line description: the first sentence of
its docstring (a leading ``form``: restating the spec is left out). Each kind offers one decorator, one ``get_*``
and one ``list_*`` on top of its registry (``shaping.specs``, ``scores.specs``, ``detectors.spec``).

Every spec string is parsed here, by ``Registry.parse``: ``name@arg@...`` split at ``@``, the name looked up, the
args read by ``parse_params``; every mistake is one ``UserError`` of one shape,
``Invalid <kind> spec '<spec>': <reason>. Valid forms: <every form>.``
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from ash_lightning.errors import UserError

__all__ = [
    "Registered",
    "Registry",
    "SpecParam",
    "describe",
    "format_number",
    "parse_number",
    "parse_params",
    "spec_form",
]

T = TypeVar("T")
R = TypeVar("R")

_LEADING_FORM = re.compile(r"^``[^`]+``:\s*")


def describe(obj: object) -> str:
    """The first sentence of ``obj``'s docstring (its first paragraph, unwrapped), without a leading ````form````:
    and without the ```` quotes; empty when it has none."""
    paragraph = " ".join((inspect.getdoc(obj) or "").strip().split("\n\n", 1)[0].split())
    return _LEADING_FORM.sub("", paragraph).split(". ", 1)[0].rstrip(".").replace("``", "")


def format_number(value: float) -> str:
    """A spec number as written: ``90`` for 90.0, ``0.5`` for 0.5."""
    value = float(value)
    return str(int(value)) if value.is_integer() else repr(value)


def parse_number(arg: str, param: str, kind: type[float] | type[int] = float) -> float:
    """The spec argument ``arg`` of ``<param>`` as a ``kind`` (float or int); a ValueError naming it when it is
    not one."""
    try:
        return kind(arg)
    except ValueError:
        raise ValueError(f"<{param}> must be {'an integer' if kind is int else 'a number'}, got {arg!r}") from None


@dataclass(frozen=True)
class SpecParam:
    """One numeric parameter of a spec: its ``label`` in messages, its type, and whether it may be left out (only
    trailing ones may)."""

    label: str
    kind: type[float] | type[int] = float
    optional: bool = False


def parse_params(name: str, args: Sequence[str], params: Sequence[SpecParam]) -> list[float]:
    """The numbers ``args`` of spec ``name`` for ``params``, in order; trailing optional ones may be left out. A
    ValueError for a wrong count or a value of the wrong type."""
    required = sum(not p.optional for p in params)
    if not required <= len(args) <= len(params):
        count = str(required) if required == len(params) else f"{required} to {len(params)}"
        raise ValueError(f"{name} takes {count} parameter(s), got {len(args)}")
    # strict=False: trailing optional parameters may be left out (checked above)
    return [parse_number(arg, p.label, p.kind) for arg, p in zip(args, params, strict=False)]


def spec_form(name: str, fn: Callable[..., object], params: Sequence[str]) -> str:
    """``name@<required>[@<optional>=default]`` for the parameters ``params`` of ``fn``, in that order."""
    signature = inspect.signature(fn).parameters
    parts = [
        f"@<{p}>"
        if signature[p].default is inspect.Parameter.empty
        else f"[@<{p}>={format_number(signature[p].default)}]"
        for p in params
    ]
    return name + "".join(parts)


@dataclass(frozen=True)
class Registered(Generic[T]):
    """One registered name: what resolves it (``target``), the ``form`` users write and a one-line description."""

    name: str
    target: T
    form: str
    description: str


class Registry(Mapping[str, T]):
    """Name -> registered target of one ``kind`` (``"shaping"``, ``"score"``, ``"detector"``), in registration
    order; ``entries()`` gives each with its form and description."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Registered[T]] = {}

    def register(
        self, name: str, form: str | None = None, *, description: str | None = None, replace: bool = False
    ) -> Callable[[T], T]:
        """A decorator adding its target under ``name`` (``form`` defaults to the name, ``description`` to the
        target's docstring's first line) and returning it unchanged. A ValueError for a name that is empty, holds
        ``@`` or is registered already (unless ``replace=True``)."""
        self.check_name(name, replace=replace)

        def add(target: T) -> T:
            text = describe(target) if description is None else description
            self._entries[name] = Registered(name, target, form or name, text)
            return target

        return add

    def check_name(self, name: str, *, replace: bool = False) -> None:
        """A ValueError unless ``name`` can be registered: non-empty, without ``@``, new or ``replace=True``."""
        if not name or "@" in name:
            raise ValueError(f"{self.kind.capitalize()} name {name!r} must be non-empty and must not contain '@'.")
        if name in self._entries and not replace:
            raise ValueError(
                f"{self.kind.capitalize()} {name!r} is already registered ({self._entries[name].form}); pass "
                "replace=True to override it."
            )

    def entries(self) -> list[Registered[T]]:
        """Every registered name with its target, form and description, in registration order."""
        return list(self._entries.values())

    def forms(self) -> str:
        """Every form, comma-separated, for error messages."""
        return ", ".join(entry.form for entry in self._entries.values())

    def invalid(self, spec: object, reason: str) -> UserError:
        """The error for a bad spec: ``Invalid <kind> spec '<spec>': <reason>. Valid forms: <forms>.``, without the
        forms when ``reason`` names its own fix (``Fix: ...``: the form is right, the value is not)."""
        forms = "" if "Fix:" in reason else f" Valid forms: {self.forms()}."
        return UserError(f"Invalid {self.kind} spec {spec!r}: {reason.rstrip('.')}.{forms}")

    def recognises(self, spec: str) -> bool:
        """Whether ``spec`` (valid or not) starts with a registered name: its text before the first ``@``."""
        return spec.strip().split("@", 1)[0] in self._entries

    def parse(self, spec: object, build: Callable[[str, T, list[str]], R]) -> R:
        """``build(name, target, args)`` for ``spec`` = ``name@arg@...`` (``args`` the raw strings); a UserError
        (``invalid``) for a spec that is not a string, an unknown name, or a ValueError ``build`` raises."""
        if not isinstance(spec, str):
            raise self.invalid(spec, f"a {self.kind} spec must be a string, got {type(spec).__name__}")
        name, *args = spec.strip().split("@")
        if name not in self._entries:
            raise self.invalid(spec, f"unknown {self.kind} name {name!r}")
        try:
            return build(name, self._entries[name].target, args)
        except ValueError as err:
            raise self.invalid(spec, str(err)) from None

    def __getitem__(self, name: str) -> T:
        return self._entries[name].target

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {list(self._entries)})"
