"""Detector spec strings: ``name[@param...]``, parameters in the order of the detector's spec fields, trailing
ones optional when they have defaults. ``parse_detector("knn@50@0.1") == KNN(k=50, fraction=0.1)``.

Detector classes are registered in ``DETECTORS`` (an ``ash_lightning._registry.Registry``: name -> class) with
``register_detector``, resolved by ``get_detector`` (also ``parse_detector``) and listed by ``list_detectors``.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping
from typing import Any

from ash_lightning._registry import Registered, Registry, describe
from ash_lightning.detectors.adascale import AdaScale
from ash_lightning.detectors.base import Detector, FittedDetector
from ash_lightning.detectors.cadref import CADRef
from ash_lightning.detectors.caref import CARef
from ash_lightning.detectors.fdbd import FDBD
from ash_lightning.detectors.gradnorm import GradNorm
from ash_lightning.detectors.klm import KLM
from ash_lightning.detectors.knn import KNN, NNGuide
from ash_lightning.detectors.mahalanobis import MDS, RMDS
from ash_lightning.detectors.mdspp import MDSPP
from ash_lightning.detectors.nci import NCI
from ash_lightning.detectors.neco import NECO
from ash_lightning.detectors.odin import ODIN
from ash_lightning.detectors.residual import Residual
from ash_lightning.detectors.she import SHE
from ash_lightning.detectors.vim import ViM
from ash_lightning.errors import UserError

__all__ = [
    "DETECTORS",
    "get_detector",
    "is_detector_spec",
    "list_detectors",
    "load_fitted",
    "parse_detector",
    "register_detector",
    "valid_forms",
]

#: name -> detector class.
DETECTORS: Registry[type[Detector]] = Registry("detector")
_PARAM_LABELS = {"k": "K", "dim": "D", "temperature": "T", "epsilon": "eps", "lmbda": "lambda"}


def _form(cls: type[Detector]) -> str:
    """``knn@K[@fraction]``: required parameters plain, optional ones bracketed."""
    form, optional = cls.name, 0
    for f in cls.spec_fields():
        label = _PARAM_LABELS.get(f.name, f.name)
        if f.default is dataclasses.MISSING:
            form += f"@{label}"
        else:
            form += f"[@{label}"
            optional += 1
    return form + "]" * optional


def register_detector(cls: type[Detector], *, replace: bool = False) -> type[Detector]:
    """Register a detector class under its ``name``, with the form of its spec fields, described by the first
    sentence of its module's docstring (which names the method and paper; the class docstring states the formula);
    usable as a class decorator."""
    return DETECTORS.register(cls.name, _form(cls), description=describe(inspect.getmodule(cls)), replace=replace)(cls)


def list_detectors() -> list[Registered[type[Detector]]]:
    """Every detector name with its form and description, in registration order."""
    return DETECTORS.entries()


for _cls in (
    MDS,
    RMDS,
    KNN,
    ViM,
    FDBD,
    NNGuide,
    ODIN,
    GradNorm,
    AdaScale,
    SHE,
    KLM,
    Residual,
    NCI,
    NECO,
    MDSPP,
    CADRef,
    CARef,
):
    register_detector(_cls)
del _cls


def valid_forms() -> str:
    """Every detector's spec form, for error messages."""
    return DETECTORS.forms()


def is_detector_spec(spec: str) -> bool:
    """Whether ``spec`` names a detector (its text before the first ``@``), valid or not."""
    return spec.strip().split("@")[0] in DETECTORS


def _parse_value(spec: str, f: dataclasses.Field, text: str) -> Any:
    kind = int if f.type in (int, "int") else float
    try:
        return kind(text)
    except ValueError:
        label = _PARAM_LABELS.get(f.name, f.name)
        raise UserError(
            f"bad detector spec {spec!r}: {label} must be {'an integer' if kind is int else 'a number'}"
            f", got {text!r}. Valid forms: {valid_forms()}."
        ) from None


def get_detector(spec: str) -> Detector:
    """The detector a spec names (``mds``, ``knn@50@0.1``, ``odin@1000@0.0014`` ...); a ``UserError`` (a
    ValueError) naming the valid forms for an unknown name, a wrong parameter count or a bad value."""
    if not isinstance(spec, str):
        raise UserError(f"a detector spec must be a string, got {type(spec).__name__}. Valid forms: {valid_forms()}.")
    name, *texts = spec.strip().split("@")
    if name not in DETECTORS:
        raise UserError(f"unknown detector {spec!r}. Valid forms: {valid_forms()}.")
    cls = DETECTORS[name]
    params = cls.spec_fields()
    required = sum(f.default is dataclasses.MISSING for f in params)
    if not required <= len(texts) <= len(params):
        count = str(required) if required == len(params) else f"{required} to {len(params)}"
        raise UserError(
            f"bad detector spec {spec!r}: {name} takes {count} parameter(s), got {len(texts)} "
            f"(form {_form(cls)}). Valid forms: {valid_forms()}."
        )
    values = {
        f.name: _parse_value(spec, f, text) for f, text in zip(params, texts, strict=False)
    }  # trailing ones may be left out
    try:
        return cls(**values)
    except UserError as err:
        raise UserError(f"bad detector spec {spec!r}: {err} Valid forms: {valid_forms()}.") from None


parse_detector = get_detector  # the name module.py and sweep.py call


def load_fitted(state: Mapping[str, Any]) -> FittedDetector:
    """The fitted detector saved by ``FittedDetector.state_dict()``."""
    return FittedDetector(parse_detector(state["spec"]), dict(state["stats"]))
