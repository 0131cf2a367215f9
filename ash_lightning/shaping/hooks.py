"""Attach a shaping function to any ``nn.Module`` through forward hooks.

Placements (where the activations are shaped):

* ``"penultimate"``: the pooled features fed to the classifier, i.e. the input of the classifier: timm's
  ``model.get_classifier()``, or for networks without one the last ``nn.Linear`` in ``model.modules()``
  order (torchvision: ResNet ``fc``, DenseNet ``classifier``, MobileNet/EfficientNet/ConvNeXt/VGG
  ``classifier[-1]``, ViT ``heads.head``).
* ``"pre_pool"``: the feature map entering global pooling, i.e. the input of ``model.global_pool``,
  ``model.head.global_pool`` (timm) or ``model.avgpool`` (torchvision).
* any dotted module name (``"layer4"``, ``"head.fc"``): that module's output.

A ``LogitShaper`` (DICE, LTS) shapes the classifier's output instead of activations: it is hooked onto
the classifier, gets the classifier's input (the penultimate features h) and output (the logits)
and returns new logits. Only placement ``"penultimate"`` is valid for it.

A ``StageShaper`` (RankFeat) shapes the feature maps of a ResNet's last two stages, whatever the placement: it is
hooked onto the last stage (``last_stage``: the direct child ``layer<N>`` with the largest N; its input is the
output of ``layer<N-1>``) and replaces its output y = stage(x) by (fn(y) + stage(fn(x))) / 2. Average pooling and a
linear classifier follow the stage, so the logits are the mean of the two branches' logits.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ash_lightning.errors import UserError
from ash_lightning.shaping.specs import Shaper, get_shaping

__all__ = [
    "LogitShaper",
    "ShapingHandle",
    "StageShaper",
    "activation_tensor",
    "attach_shaping",
    "classifier_of",
    "find_classifier",
    "find_last_stage",
    "last_stage",
    "resolve_hook_point",
]

_POOL_NAMES = ("global_pool", "head.global_pool", "avgpool")
_STAGE_NAME = re.compile(r"layer(\d+)")
_AVERAGE_POOLS = ("avg", "fast", "fastavg")  # timm SelectAdaptivePool2d pool types that average


def _last_children(model: nn.Module, count: int = 4) -> str:
    """The names of the last ``count`` top-level children, for error messages."""
    return ", ".join(repr(name) for name, _ in list(model.named_children())[-count:])


def _feature_candidates(model: nn.Module, count: int = 4) -> str:
    """Names of the outermost global pooling and flattening modules (their output could be the feature vector),
    else of the last top-level children, for error messages."""
    names: list[str] = []
    for name, module in model.named_modules():
        kind = type(module).__name__
        if ("Adaptive" in kind or "Global" in kind or kind == "Flatten") and not any(
            name.startswith(f"{outer}.") for outer in names
        ):
            names.append(name)
    return ", ".join(map(repr, names[-count:])) or _last_children(model, count)


def find_classifier(model: nn.Module) -> nn.Module | None:
    """``model``'s classifier: timm's ``get_classifier()`` if the model has that method (None when it returns no
    module or ``nn.Identity``), else the last ``nn.Linear`` among its submodules (None without one)."""
    get_classifier = getattr(model, "get_classifier", None)
    if callable(get_classifier):
        classifier = get_classifier()
        return classifier if isinstance(classifier, nn.Module) and not isinstance(classifier, nn.Identity) else None
    linears = [module for module in model.modules() if isinstance(module, nn.Linear) and module is not model]
    return linears[-1] if linears else None


def classifier_of(model: nn.Module) -> nn.Module:
    """``find_classifier(model)``, or a ValueError saying why there is none and which module to name instead."""
    classifier = find_classifier(model)
    if classifier is not None:
        return classifier
    get_classifier = getattr(model, "get_classifier", None)
    if callable(get_classifier):
        problem = f"has no classifier (get_classifier() returned {type(get_classifier()).__name__}, e.g. num_classes=0)"
    else:
        problem = "has neither get_classifier() (timm) nor an nn.Linear layer"
    raise ValueError(
        f"placement 'penultimate' needs the classifier module, but {type(model).__name__} {problem}. "
        "Pass the name of the module whose output is the pooled feature vector instead, "
        f"e.g. one of {_feature_candidates(model)}."
    )


def _find_global_pool(model: nn.Module) -> nn.Module | None:
    for name in _POOL_NAMES:
        try:
            return model.get_submodule(name)
        except AttributeError:
            continue
    return None


def _global_pool(model: nn.Module) -> nn.Module:
    pool = _find_global_pool(model)
    if pool is not None:
        return pool
    raise ValueError(
        f"placement 'pre_pool' needs a global pooling module, but {type(model).__name__} has none "
        f"(looked for {', '.join(_POOL_NAMES)}). Pass the name of the module whose output is the "
        f"feature map instead, e.g. one of {_last_children(model)}."
    )


def _stages(model: nn.Module) -> list[tuple[int, str, nn.Module]]:
    """The direct children named ``layer<N>`` (ResNet stages), by N."""
    found = [(_STAGE_NAME.fullmatch(name), name, child) for name, child in model.named_children()]
    return sorted((int(match.group(1)), name, child) for match, name, child in found if match)


def find_last_stage(model: nn.Module) -> nn.Module | None:
    """``model``'s last ResNet stage: the direct child ``layer<N>`` with the largest N, where there are at least two
    (its input is then the output of the stage before); else None."""
    stages = _stages(model)
    return stages[-1][2] if len(stages) >= 2 else None


def _averages(pool: nn.Module | None) -> bool:
    """Whether ``pool`` is a global average pooling (torch's adaptive average pooling, or timm's at type avg)."""
    if isinstance(pool, (nn.AdaptiveAvgPool2d, nn.AvgPool2d)):
        return True
    return type(pool).__name__ == "SelectAdaptivePool2d" and getattr(pool, "pool_type", None) in _AVERAGE_POOLS


def last_stage(model: nn.Module, spec: str) -> nn.Module:
    """``find_last_stage(model)``, or a ValueError where ``spec`` (a ``StageShaper``) cannot work on ``model``: no
    ResNet stages, a global pooling that is not an average, or a classifier that is not an ``nn.Linear``."""
    stages, name = _stages(model), type(model).__name__
    pool, classifier = _find_global_pool(model), find_classifier(model)
    problem = None
    if len(stages) < 2:
        problem = f"{name} has no ResNet stages layer1..layerN as direct children (its last: {_last_children(model)})"
    elif not _averages(pool):
        pool_type = getattr(pool, "pool_type", None)
        problem = f"{name}'s global pooling is {type(pool).__name__ if pool is not None else 'not found'}"
        problem += f" (pool_type {pool_type!r})" if pool_type is not None else ""
        problem += ", not an average, where the two branches' logits are averaged through the pooled maps"
    elif not isinstance(classifier, nn.Linear):
        problem = f"{name}'s classifier is {type(classifier).__name__}, not an nn.Linear"
    if problem is not None:
        raise ValueError(
            f"{spec} removes the top singular component of the feature maps of a ResNet's last two stages (block 3 "
            f"and block 4 in OpenOOD), but {problem}. Fix: use {spec} with a ResNet backbone (timm resnet*, "
            "cifar_resnet*, openood_resnet*, with global_pool='avg'), or another shaping."
        )
    return stages[-1][2]


def resolve_hook_point(model: nn.Module, placement: str) -> tuple[nn.Module, str]:
    """The module where ``placement`` shapes activations and which side: ``"input"`` for
    ``"penultimate"`` and ``"pre_pool"``, ``"output"`` for a dotted module name."""
    if placement == "penultimate":
        return classifier_of(model), "input"
    if placement == "pre_pool":
        return _global_pool(model), "input"
    try:
        return model.get_submodule(placement), "output"
    except AttributeError:
        raise ValueError(
            f"Unknown placement {placement!r} for {type(model).__name__}: valid placements are "
            "'penultimate', 'pre_pool' or a dotted module name from model.named_modules(), e.g. one of "
            f"{', '.join(repr(name) for name, _ in model.named_children())}."
        ) from None


@dataclass(frozen=True, repr=False)
class LogitShaper(Shaper):
    """A shaper of the classifier's output: ``shaper(features, logits, classifier) == fn(features, logits,
    classifier)``, the new logits from the classifier's input ``features`` (B, D), its output ``logits`` (B, K)
    and the classifier module. It must not modify its arguments in place."""

    fn: Callable[[Tensor, Tensor, nn.Module], Tensor]

    def __call__(self, features: Tensor, logits: Tensor, classifier: nn.Module) -> Tensor:  # type: ignore[override]
        return self.fn(features, logits, classifier)

    def __repr__(self) -> str:
        return f"LogitShaper({self.spec!r})"


def _feature_map(x: Tensor, spec: str, which: str) -> Tensor:
    """``x``, or a UserError where it is not a feature map (B, C, H, W)."""
    if not (isinstance(x, Tensor) and x.dim() == 4):
        got = f"shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
        raise UserError(
            f"{spec} removes the top singular component of feature maps (B, C, H, W), but the last stage's {which} "
            f"has {got}. Fix: use {spec} with a convolutional ResNet backbone, or another shaping."
        )
    return x


@dataclass(frozen=True, repr=False)
class StageShaper(Shaper):
    """A shaper of the feature maps of a ResNet's last two stages (RankFeat): ``fn`` shapes one map (B, C, H, W);
    attached, it replaces the last stage's output y = stage(x) by ``branches(stage, x, y)``."""

    def branches(self, stage: nn.Module, block3: Tensor, block4: Tensor) -> Tensor:
        """(fn(block4) + stage(fn(block3))) / 2: ``block3`` is the last stage's input and ``block4`` its output; the
        stage's own forward hooks do not run again."""
        block3, block4 = _feature_map(block3, self.spec, "input"), _feature_map(block4, self.spec, "output")
        return (self.fn(block4) + stage.forward(self.fn(block3))) / 2

    def __repr__(self) -> str:
        return f"StageShaper({self.spec!r})"


@dataclass(frozen=True)
class _ShapeStage:
    """Forward hook on the last stage: replaces its output with ``shaping.branches(stage, input, output)``."""

    shaping: StageShaper

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> Tensor:
        return self.shaping.branches(module, args[0], output)


@dataclass(frozen=True)
class _ShapeInput:
    """Forward pre-hook: replaces the module's first positional input with ``shaping(input)``."""

    shaping: Shaper

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (self.shaping(args[0]), *args[1:])


def activation_tensor(output: Any, module: nn.Module, placement: str) -> Tensor:
    """``output`` of the module at ``placement``, which must be a tensor."""
    if not isinstance(output, Tensor):
        raise ValueError(
            f"placement {placement!r} ({type(module).__name__}) outputs a "
            f"{type(output).__name__}, not a tensor; choose a module whose output is the activation tensor."
        )
    return output


@dataclass(frozen=True)
class _ShapeOutput:
    """Forward hook: replaces the module's output with ``shaping(output)``."""

    shaping: Shaper
    placement: str

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> Tensor:
        return self.shaping(activation_tensor(output, module, self.placement))


@dataclass(frozen=True)
class _ShapeLogits:
    """Forward hook on the classifier: replaces its output with ``shaping(input, output, classifier)``."""

    shaping: LogitShaper

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor:
        return self.shaping(args[0], output, module)


class ShapingHandle:
    """An attached shaping: ``remove()`` detaches it; as a context manager it detaches on exit.

    ``module`` is the hooked submodule, ``placement`` the placement asked for, ``shaping`` the ``Shaper``.
    """

    def __init__(self, module: nn.Module, placement: str, shaping: Shaper, hook: RemovableHandle) -> None:
        self.module = module
        self.placement = placement
        self.shaping = shaping
        self._hook = hook

    def remove(self) -> None:
        """Detach the hook (idempotent); the model then computes exactly what it did before."""
        self._hook.remove()

    def __enter__(self) -> ShapingHandle:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"ShapingHandle({self.shaping.spec!r}, placement={self.placement!r})"


def attach_shaping(
    model: nn.Module,
    shaping: str | Callable[[Tensor], Tensor],
    placement: str = "penultimate",
) -> ShapingHandle:
    """Shape ``model``'s activations at ``placement`` with ``shaping`` (a spec string such as
    ``"ash_s@90"`` or a callable) on every forward pass, until the returned handle is removed. A
    ``LogitShaper`` replaces the classifier's output instead and needs ``placement="penultimate"``; a
    ``StageShaper`` (``rankfeat``) replaces the last stage's output, whatever the placement.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from ash_lightning import attach_shaping
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> x = torch.randn(2, 4)
        >>> with attach_shaping(model, "react@0.1") as handle:  # clips the input of the last nn.Linear
        ...     shaped = model(x)
        >>> handle
        ShapingHandle('react@0.1', placement='penultimate')
        >>> clipped = model[2](model[1](model[0](x)).clamp(max=0.1))
        >>> torch.allclose(shaped, clipped), torch.allclose(model(x), clipped)  # removed on exit
        (True, False)
    """
    shaper = get_shaping(shaping)
    if isinstance(shaper, LogitShaper):
        if placement != "penultimate":
            raise ValueError(
                f"{shaper.spec} shapes the logits from the penultimate features and the classifier, so it only "
                f"works at placement 'penultimate', not {placement!r}. Fix: set placement: penultimate."
            )
        module = classifier_of(model)
        hook = module.register_forward_hook(_ShapeLogits(shaper))
    elif isinstance(shaper, StageShaper):
        module = last_stage(model, shaper.spec)
        hook = module.register_forward_hook(_ShapeStage(shaper))
    else:
        module, side = resolve_hook_point(model, placement)
        if side == "input":
            hook = module.register_forward_pre_hook(_ShapeInput(shaper))
        else:
            hook = module.register_forward_hook(_ShapeOutput(shaper, placement))
    return ShapingHandle(module, placement, shaper, hook)
