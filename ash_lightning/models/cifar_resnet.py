"""CIFAR ResNets (He et al. 2016, option-A shortcuts), registered in timm's model registry.

``timm.create_model("cifar_resnet20")`` builds the 3-stage network (16/32/64 channels, n = (depth-2)/6
BasicBlocks per stage, global average pooling, ``linear`` classifier). Parameter names match the
akamaster/pytorch_resnet_cifar10 checkpoints once their ``module.`` prefix is stripped. Those weights
expect 32x32 inputs in [0, 1] normalised with the ImageNet mean and std, which the pretrained config says.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import SelectAdaptivePool2d
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import Tensor, nn

from ash_lightning.models.local_weights import refuse_download

__all__ = ["CifarResNet"]


class _OptionAShortcut(nn.Module):
    """Parameter-free shortcut: subsample by 2 and zero-pad the channels by planes // 4 on each side."""

    def __init__(self, planes: int) -> None:
        super().__init__()
        self.pad = planes // 4

    def forward(self, x: Tensor) -> Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock32(nn.Module):
    """Two 3x3 conv + BN layers with a residual ``shortcut``: the given module, else (He et al.'s option A, as the
    akamaster CIFAR ResNets) a parameter-free subsample-and-pad when the shape changes and identity otherwise."""

    def __init__(self, in_planes: int, planes: int, stride: int, shortcut: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if shortcut is None:
            shortcut = _OptionAShortcut(planes) if stride != 1 or in_planes != planes else nn.Identity()
        self.shortcut = shortcut

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 images with timm's model interface."""

    layer1: nn.Sequential  # added by name in __init__
    layer2: nn.Sequential
    layer3: nn.Sequential

    def __init__(
        self, depth: int = 20, num_classes: int = 10, in_chans: int = 3, global_pool: str = "avg", **_: object
    ) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, 110), got {depth}")
        blocks = (depth - 2) // 6
        self.num_classes = num_classes
        self.num_features = self.head_hidden_size = 64
        self.conv1 = nn.Conv2d(in_chans, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        in_planes = 16
        for stage, planes in enumerate((16, 32, 64), start=1):
            layers = []
            for b in range(blocks):
                stride = 2 if stage > 1 and b == 0 else 1
                layers.append(BasicBlock32(in_planes, planes, stride))
                in_planes = planes
            self.add_module(f"layer{stage}", nn.Sequential(*layers))
        self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=True)
        self.linear = nn.Linear(64, num_classes) if num_classes > 0 else nn.Identity()
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)
        self.feature_info = [
            dict(num_chs=c, reduction=r, module=f"layer{i}")
            for i, (c, r) in enumerate(((16, 1), (32, 2), (64, 4)), start=1)
        ]

    def get_classifier(self) -> nn.Module:
        return self.linear

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=True)
        self.linear = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        return self.layer3(self.layer2(self.layer1(x)))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.global_pool(x)
        return x if pre_logits else self.linear(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def _cfg(**kwargs: Any) -> dict:
    return {
        "num_classes": 10,
        "input_size": (3, 32, 32),
        "pool_size": (8, 8),
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "conv1",
        "classifier": "linear",
        "license": "bsd-2-clause",
        **kwargs,
    }


_AKAMASTER = "https://github.com/akamaster/pytorch_resnet_cifar10 (pretrained_models/resnet{}-*.th)"
default_cfgs = generate_default_cfgs(
    {f"cifar_resnet{d}.akamaster_cifar10": _cfg(origin_url=_AKAMASTER.format(d)) for d in (20, 32, 44, 56)}
)


def _create(depth: int, pretrained: bool, **kwargs: Any) -> CifarResNet:
    refuse_download(
        f"cifar_resnet{depth}", pretrained, f"<akamaster resnet{depth} .th file, e.g. under $DATASETS/checkpoints>"
    )
    return build_model_with_cfg(
        CifarResNet,
        f"cifar_resnet{depth}",
        pretrained,
        depth=depth,
        feature_cfg=dict(flatten_sequential=True),
        **kwargs,
    )


@register_model
def cifar_resnet20(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-20 for CIFAR (0.27M parameters)."""
    return _create(20, pretrained, **kwargs)


@register_model
def cifar_resnet32(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-32 for CIFAR (0.46M parameters)."""
    return _create(32, pretrained, **kwargs)


@register_model
def cifar_resnet44(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-44 for CIFAR (0.66M parameters)."""
    return _create(44, pretrained, **kwargs)


@register_model
def cifar_resnet56(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-56 for CIFAR (0.85M parameters)."""
    return _create(56, pretrained, **kwargs)
