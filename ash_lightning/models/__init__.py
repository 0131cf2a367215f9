"""Backbones that timm does not ship; importing this package registers them in timm's registry."""
from ash_lightning.models.cifar_resnet import CifarResNet

__all__ = ["CifarResNet"]
