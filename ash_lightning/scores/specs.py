"""Score spec strings: ``name[@param...]`` resolved to a ``Score`` by ``get_score``, names added with
``register_score`` and listed by ``list_scores`` (the math is in ``ash_lightning.scores.functional``).

A score is a function ``fn(logits, *params) -> (B,)``; its spec parameters are the ones after the logits, in order,
typed by their annotations (``float`` or ``int``), trailing ones optional when they have defaults:
``"energy"``, ``"energy@2.0"``, ``"gen@0.1@100"``. Spec strings are parsed by ``SCORES.parse``
(``ash_lightning._registry``), as shapings' and detectors'.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable

import torch
from torch import Tensor

from ash_lightning._registry import Registered, Registry, SpecParam, parse_params, spec_form
from ash_lightning.scores.functional import energy, gen, max_logit, msp, neg_entropy

__all__ = ["SCORES", "Score", "get_score", "list_scores", "register_score"]

ScoreFn = Callable[..., Tensor]

#: name -> score function.
SCORES: Registry[ScoreFn] = Registry("score")


class Score:
    """A named, picklable score callable: ``Score(fn, args, name)(logits) == fn(logits, *args)``."""

    def __init__(self, fn: ScoreFn, args: tuple = (), name: str | None = None) -> None:
        self.fn = fn
        self.args = tuple(args)
        self.name = name if name is not None else getattr(fn, "__name__", type(fn).__name__)

    def __call__(self, logits: Tensor) -> Tensor:
        return self.fn(logits, *self.args)

    def __repr__(self) -> str:
        return f"Score({self.name!r})"


def _params(fn: ScoreFn) -> list[inspect.Parameter]:
    """The spec parameters of a score function: those after the logits."""
    return list(inspect.signature(fn).parameters.values())[1:]


def register_score(name: str, *, description: str | None = None, replace: bool = False) -> Callable[[ScoreFn], ScoreFn]:
    """Decorator: ``get_score("name@a@b")`` returns ``Score(fn, (a, b))``, ``a`` and ``b`` converted to the types
    annotated on ``fn``'s parameters after the logits. The form (``name[@<param>=default]``) comes from the
    signature, the description from the docstring's first line. An existing name is replaced only with
    ``replace=True``."""
    SCORES.check_name(name, replace=replace)

    def add(fn: ScoreFn) -> ScoreFn:
        form = spec_form(name, fn, [p.name for p in _params(fn)])
        return SCORES.register(name, form, description=description, replace=replace)(fn)

    return add


def list_scores() -> list[Registered[ScoreFn]]:
    """Every score name with its form and description, in registration order."""
    return SCORES.entries()


for _name, _fn in (
    ("energy", energy),
    ("msp", msp),
    ("max_logit", max_logit),
    ("gen", gen),
    ("neg_entropy", neg_entropy),
):
    register_score(_name)(_fn)
del _name, _fn


def get_score(name: str | Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """Resolve a score spec (``"energy"``, ``"energy@2.0"``, ``"gen@0.1@100"``, ...) to a :class:`Score`; a
    UserError (a ValueError) naming the valid forms for a bad one.

    A callable is returned as is when it has a ``.name``, else wrapped so that ``.name`` is its
    ``__name__``. The name of a resolved spec is normalised, e.g. ``"energy@2"`` -> ``"energy@2.0"``.

    Example:
        >>> import torch
        >>> from ash_lightning import get_score
        >>> score = get_score("energy@2")
        >>> score
        Score('energy@2.0')
        >>> score(torch.tensor([[0.0, 0.0]]))  # 2 * logsumexp([0, 0] / 2) = 2 log 2
        tensor([1.3863])
    """
    if callable(name):
        return name if hasattr(name, "name") else Score(name)
    return SCORES.parse(name, _build_score)


def _build_score(base: str, fn: ScoreFn, texts: list[str]) -> Score:
    """``Score(fn, args)`` of the spec ``base@texts...``, its values checked by ``fn`` itself on a dummy batch."""
    hints = typing.get_type_hints(fn)
    params = [
        SpecParam(p.name, int if hints.get(p.name) is int else float, p.default is not inspect.Parameter.empty)
        for p in _params(fn)
    ]
    args = tuple(parse_params(base, texts, params))
    fn(torch.zeros(1, 1), *args)  # validates the parameter values with the function's own checks
    return Score(fn, args, "@".join([base, *map(repr, args)]))
