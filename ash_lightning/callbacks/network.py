"""Which network inside a user's LightningModule the callbacks hook."""

from __future__ import annotations

from torch import nn

from ash_lightning.errors import UserError
from ash_lightning.shaping.hooks import find_classifier


def find_network(pl_module: nn.Module, module: str | None, owner: str) -> nn.Module:
    """The submodule named ``module``; without a name, the first child that has a classifier (timm's
    ``get_classifier()`` or a final ``nn.Linear``), else ``pl_module`` itself. ``owner`` names the caller in errors."""
    if module is None:
        return next((child for child in pl_module.children() if find_classifier(child) is not None), pl_module)
    try:
        return pl_module.get_submodule(module)
    except AttributeError as err:
        children = [name for name, _ in pl_module.named_children()]
        raise UserError(
            f"{owner}: {type(pl_module).__name__} has no submodule {module!r}; its children are {children}. "
            "Fix: pass module=<one of them>."
        ) from err
