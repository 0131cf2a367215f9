"""Backbones whose weights come only from a local checkpoint: asking timm to download them is a user error."""

from __future__ import annotations

from ash_lightning.errors import UserError


def refuse_download(name: str, pretrained: bool, checkpoint: str) -> None:
    """A UserError when ``pretrained`` asks timm for ``name``'s weights; ``checkpoint`` says which file to use."""
    if pretrained:
        raise UserError(
            f"model.pretrained: true, but {name} has no weights timm can download. "
            f"Fix: set model.pretrained: false and model.checkpoint_path: {checkpoint}."
        )
