"""ResNet-18/34 trunks and feature-pyramid backbones with torchvision's names."""

from .resnet import BasicBlock, FeatureInfo, ResNet, freeze_trunk, resnet, resnet18, resnet34
from .weights import IMAGENET_WEIGHTS, LoadReport, WeightsError, load_pretrained

__all__ = [
    "BasicBlock",
    "FeatureInfo",
    "IMAGENET_WEIGHTS",
    "LoadReport",
    "ResNet",
    "WeightsError",
    "freeze_trunk",
    "load_pretrained",
    "resnet",
    "resnet18",
    "resnet34",
]

from .fpn import ResNetFPN, resnet18_fpn, resnet34_fpn, resnet_fpn  # noqa: E402

__all__ += ["ResNetFPN", "resnet18_fpn", "resnet34_fpn", "resnet_fpn"]
