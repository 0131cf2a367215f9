"""Backbones that timm does not ship; importing this package registers them in timm's registry."""

from ash_lightning.models.cifar_resnet import CifarResNet
from ash_lightning.models.openood_resnet import OpenOODResNet18x32

__all__ = ["CifarResNet", "OpenOODResNet18x32"]
