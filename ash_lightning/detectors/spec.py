"""Detector spec strings: ``name[@param...]``, parameters in the order of the detector's spec fields, trailing
ones optional when they have defaults. ``parse_detector("knn@50@0.1") == KNN(k=50, fraction=0.1)``.

Detector classes are registered in ``DETECTORS`` (an ``ash_lightning._registry.Registry``: name -> class) with
``register_detector``, resolved by ``get_detector`` (also ``parse_detector``) and listed by ``list_detectors``.
Spec strings are parsed by ``DETECTORS.parse``, as shapings' and scores'.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping
from typing import Any

from ash_lightning._registry import Registered, Registry, SpecParam, describe, parse_params
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
    return DETECTORS.recognises(spec)


def get_detector(spec: str) -> Detector:
    """The detector a spec names (``mds``, ``knn@50@0.1``, ``odin@1000@0.0014`` ...); a ``UserError`` (a
    ValueError) naming the valid forms for an unknown name, a wrong parameter count or a bad value."""
    return DETECTORS.parse(spec, _build_detector)


def _build_detector(name: str, cls: type[Detector], texts: list[str]) -> Detector:
    """``cls`` with its spec fields set from ``texts``, in order; trailing ones with defaults may be left out."""
    fields = cls.spec_fields()
    params = [
        SpecParam(
            _PARAM_LABELS.get(f.name, f.name),
            int if f.type in (int, "int") else float,
            f.default is not dataclasses.MISSING,
        )
        for f in fields
    ]
    values = parse_params(name, texts, params)
    return cls(**{f.name: value for f, value in zip(fields, values, strict=False)})


# the name ``ash_lightning.detectors`` exports; detectors/fitting.py, detectors/scoring.py and
# evaluation/tensorboard.py call it
parse_detector = get_detector


def load_fitted(state: Mapping[str, Any]) -> FittedDetector:
    """The fitted detector saved by ``FittedDetector.state_dict()``."""
    return FittedDetector(parse_detector(state["spec"]), dict(state["stats"]))
