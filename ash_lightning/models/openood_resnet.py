"""OpenOOD v1.5's ResNet-18 classifiers, registered in timm's model registry so its checkpoints load unchanged.

OpenOOD v1.5 (Jingkang50/OpenOOD, README "Pre-trained checkpoints"; ``scripts/download/download.py
--contents checkpoints --checkpoints ood_v1.5``) releases cross-entropy ResNet-18s, three training runs each, as
``results/<benchmark>_resnet18_<size>_base_e<epochs>_lr0.1_default/s{0,1,2}/best.ckpt`` (a bare state_dict):

* CIFAR-10 / CIFAR-100: ``openood/networks/resnet18_32x32.py`` (``ResNet18_32x32``): a 3x3 stride-1 stem without
  max pooling, four stages of two BasicBlocks (64-512 channels) whose projection shortcut is ``shortcut.0`` (1x1
  conv) and ``shortcut.1`` (BN), global average pooling, classifier ``fc``. Registered here as
  ``openood_resnet18_32x32`` (tags ``.openood_v15_cifar10`` and ``.openood_v15_cifar100``).
* ImageNet-200: ``openood/networks/resnet18_224x224.py`` (``ResNet18_224x224``), a torchvision ResNet-18, whose
  parameter names timm's ``ResNet`` shares. Registered as ``openood_resnet18_224x224.openood_v15_imagenet200``.

The pretrained configs carry OpenOOD's test transform (``openood/evaluation_api/preprocessor.py``): resize the
short side to ``pre_size`` and centre-crop ``img_size`` (32/32 for CIFAR, 256/224 for ImageNet-200), bilinear,
normalised with the per-benchmark mean and std given there.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import SelectAdaptivePool2d
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.resnet import BasicBlock, ResNet
from torch import Tensor, nn

from ash_lightning.models.cifar_resnet import BasicBlock32
from ash_lightning.models.local_weights import refuse_download

_OPENOOD_CHECKPOINT = "<OpenOOD v1.5 best.ckpt, see the README's OpenOOD v1.5 section>"

__all__ = ["OpenOODResNet18x32"]

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)


def _block(in_planes: int, planes: int, stride: int) -> BasicBlock32:
    """OpenOOD's BasicBlock: a 1x1 conv + BN projection as ``shortcut`` when the shape changes (else an empty
    ``nn.Sequential``, OpenOOD's identity), so its state_dict keys (``shortcut.0``, ``shortcut.1``) load unchanged."""
    shortcut = nn.Sequential()
    if stride != 1 or in_planes != planes:
        shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes))
    return BasicBlock32(in_planes, planes, stride, shortcut)


class OpenOODResNet18x32(nn.Module):
    """OpenOOD's ResNet18_32x32 with timm's model interface (``forward_features`` gives the 512x4x4 map)."""

    layer1: nn.Sequential  # added by name in __init__
    layer2: nn.Sequential
    layer3: nn.Sequential
    layer4: nn.Sequential

    def __init__(self, num_classes: int = 10, in_chans: int = 3, global_pool: str = "avg", **_: object) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.num_features = self.head_hidden_size = 512
        self.conv1 = nn.Conv2d(in_chans, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        in_planes, self.feature_info = 64, []
        for stage, planes in enumerate((64, 128, 256, 512), start=1):
            stride = 1 if stage == 1 else 2
            self.add_module(
                f"layer{stage}", nn.Sequential(_block(in_planes, planes, stride), _block(planes, planes, 1))
            )
            in_planes = planes
            self.feature_info.append(dict(num_chs=planes, reduction=2 ** (stage - 1), module=f"layer{stage}"))
        self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=True)
        self.fc = nn.Linear(512, num_classes) if num_classes > 0 else nn.Identity()

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=True)
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.global_pool(x)
        return x if pre_logits else self.fc(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


_ORIGIN = (
    "https://github.com/Jingkang50/OpenOOD (README 'Pre-trained checkpoints', {0}_res18_v1.5.zip: "
    "results/{0}_resnet18_{1}_base_e{2}_lr0.1_default/s*/best.ckpt)"
)


def _cfg(benchmark: str, size: int, epochs: int, **kwargs: Any) -> dict:
    return {
        "input_size": (3, size, size),
        "interpolation": "bilinear",
        "first_conv": "conv1",
        "classifier": "fc",
        "origin_url": _ORIGIN.format(benchmark, f"{size}x{size}", epochs),
        "license": "mit",
        **kwargs,
    }


default_cfgs = generate_default_cfgs(
    {
        "openood_resnet18_32x32.openood_v15_cifar10": _cfg(
            "cifar10", 32, 100, num_classes=10, pool_size=(4, 4), crop_pct=1.0, mean=CIFAR10_MEAN, std=CIFAR10_STD
        ),
        "openood_resnet18_32x32.openood_v15_cifar100": _cfg(
            "cifar100", 32, 100, num_classes=100, pool_size=(4, 4), crop_pct=1.0, mean=CIFAR100_MEAN, std=CIFAR100_STD
        ),
        "openood_resnet18_224x224.openood_v15_imagenet200": _cfg(
            "imagenet200",
            224,
            90,
            num_classes=200,
            pool_size=(7, 7),
            crop_pct=224 / 256,
            mean=IMAGENET_DEFAULT_MEAN,
            std=IMAGENET_DEFAULT_STD,
        ),
    }
)


@register_model
def openood_resnet18_32x32(pretrained: bool = False, **kwargs: Any) -> OpenOODResNet18x32:
    """OpenOOD v1.5's CIFAR ResNet-18 (11.2M parameters), 32x32 inputs."""
    refuse_download("openood_resnet18_32x32", pretrained, _OPENOOD_CHECKPOINT)
    return build_model_with_cfg(
        OpenOODResNet18x32, "openood_resnet18_32x32", pretrained, feature_cfg=dict(out_indices=(0, 1, 2, 3)), **kwargs
    )


@register_model
def openood_resnet18_224x224(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """OpenOOD v1.5's ImageNet-200 ResNet-18 (a torchvision ResNet-18 with 200 classes), 224x224 inputs."""
    refuse_download("openood_resnet18_224x224", pretrained, _OPENOOD_CHECKPOINT)
    return build_model_with_cfg(
        ResNet, "openood_resnet18_224x224", pretrained, block=BasicBlock, layers=(2, 2, 2, 2), **kwargs
    )
