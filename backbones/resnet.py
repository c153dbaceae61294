"""ResNet-18 and ResNet-34 (He et al., "Deep Residual Learning for Image Recognition", 2016).

The module tree and every parameter/buffer name follow ``torchvision.models.resnet``
(``conv1``, ``bn1``, ``layer1.0.conv1``, ``layer2.0.downsample.0``, ``fc``) so that
torchvision's official ImageNet files load with ``strict=True`` and give torchvision's
logits. The stem keeps the 3x3/2 max-pool: without it every stage stride halves and
ImageNet weights no longer see the scales they were trained on.

Beyond torchvision, the trunk describes its own multi-stage outputs: ``feature_info``
lists each stage's name, channels and stride, computed from the modules that were
built, and ``forward_features`` returns the stages as an ordered dict.

Dilation (``replace_stride_with_dilation``, torchvision's argument) works for
``BasicBlock``, where torchvision raises ``NotImplementedError``. A dilated stage keeps
its parameters (ImageNet files load strictly) and trades its stride-2 for dilated
3x3 convolutions, giving output stride 16 or 8 for semantic segmentation. Where the
dilation goes follows timm's ``BasicBlock`` and torchvision's own ``Bottleneck``: the
first block's ``conv1`` (the convolution that used to stride) keeps the *previous*
dilation, every 3x3 convolution after it takes the new one. That placement is the
"algorithme a trous": the dilated stage computes exactly the undilated stage's
features, densely -- ``dilated[..., ::f, ::f] == undilated`` with ``f`` the removed
stride, borders included -- so ImageNet weights see the geometry they were trained
on. MMSegmentation's ``BasicBlock`` dilates ``conv1`` only (``conv2`` stays at
dilation 1, and with ``contract_dilation`` its first block takes half the dilation);
that is a different network for the same weights, with a smaller receptive field.
"""

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

import torch
from torch import Tensor, nn
from torchvision.ops import FrozenBatchNorm2d

__all__ = [
    "BasicBlock",
    "FeatureInfo",
    "ResNet",
    "STAGE_NAMES",
    "resnet18",
    "resnet34",
    "resnet",
    "BACKBONES",
    "DEPTHS",
    "NORMS",
    "freeze_trunk",
]

NormLayer = Callable[[int], nn.Module]

STAGE_NAMES = ("layer1", "layer2", "layer3", "layer4")

# Blocks per stage for each supported depth.
DEPTHS: dict[int, tuple[int, int, int, int]] = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}
# The names every task's recipes use for them.
BACKBONES: dict[str, int] = {f"resnet{depth}": depth for depth in DEPTHS}
# Trunk normalisation by name: trainable BN, FrozenBN (fine-tuning from ImageNet), GroupNorm(32).
NORMS: dict[str, NormLayer] = {
    "bn": nn.BatchNorm2d,
    "frozen_bn": FrozenBatchNorm2d,
    "gn": lambda channels: nn.GroupNorm(32, channels),
}


@dataclass(frozen=True)
class FeatureInfo:
    """One output level of a backbone.

    Args:
        name: key of the level in the backbone's output dict.
        channels: number of channels of that output.
        stride: total down-sampling factor relative to the input image.
    """

    name: str
    channels: int
    stride: int


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=dilation, dilation=dilation, bias=False)


def _conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with an identity or 1x1 projection shortcut.

    Args:
        inplanes: input channels.
        planes: output channels (``expansion`` is 1).
        stride: stride of the first convolution (and of the projection).
        downsample: shortcut projection; built by ``ResNet`` when the stride or the
            channel count changes, otherwise ``None`` (identity).
        norm_layer: normalisation constructor taking the channel count.
        dilation: dilation of ``conv2`` (and of ``conv1`` unless ``first_dilation`` is given).
        first_dilation: dilation of ``conv1``; a dilated stage's first block gets the
            previous stage's dilation here (see the module docstring for why).
    """

    expansion: int = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: Optional[nn.Module] = None,
        norm_layer: Optional[NormLayer] = None,
        *,
        dilation: int = 1,
        first_dilation: Optional[int] = None,
    ) -> None:
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        self.conv1 = _conv3x3(inplanes, planes, stride, first_dilation or dilation)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes, dilation=dilation)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x if self.downsample is None else self.downsample(x)
        return self.relu(out)


def _module_stride(module: nn.Module) -> int:
    """Product of the strides of every conv and pool on the main path of ``module``."""
    stride = 1
    for m in module.modules():
        if isinstance(m, BasicBlock):
            stride *= m.conv1.stride[0]
        elif isinstance(m, (nn.MaxPool2d,)):
            s = m.stride
            stride *= s if isinstance(s, int) else s[0]
    return stride


class ResNet(nn.Module):
    """A ResNet of BasicBlocks with torchvision's module names.

    Args:
        layers: number of blocks in each of the four stages, e.g. ``(2, 2, 2, 2)``.
        num_classes: classifier outputs; ``fc`` is always built so that ImageNet files
            load strictly (set ``num_classes`` to fine-tune a new head).
        zero_init_residual: initialise each block's last BN weight to zero so every
            residual branch starts as identity (Goyal et al., 2017).
        norm_layer: normalisation constructor (``nn.BatchNorm2d`` by default;
            ``torchvision.ops.FrozenBatchNorm2d`` for detection fine-tuning).
        replace_stride_with_dilation: three booleans for ``layer2``..``layer4``, as in
            torchvision: each ``True`` replaces that stage's stride 2 by dilation, halving
            the output stride (``[False, True, True]``: 8, ``[False, False, True]``: 16).
            Parameters are unchanged, so ImageNet files still load strictly.
    """

    # Python-side descriptions; TorchScript compiles forward only.
    __jit_ignored_attributes__ = ["feature_info", "replace_stride_with_dilation"]

    def __init__(
        self,
        layers: Sequence[int],
        num_classes: int = 1000,
        zero_init_residual: bool = False,
        norm_layer: NormLayer | None = None,
        replace_stride_with_dilation: Sequence[bool] | None = None,
    ) -> None:
        super().__init__()
        if len(layers) != 4 or any(int(n) < 1 for n in layers):
            raise ValueError(f"layers must be four positive block counts, got {list(layers)}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if replace_stride_with_dilation is None:
            replace_stride_with_dilation = (False, False, False)
        dilate = tuple(replace_stride_with_dilation) if isinstance(replace_stride_with_dilation, (list, tuple)) else ()
        if len(dilate) != 3 or not all(isinstance(d, bool) for d in dilate):
            raise ValueError(
                "replace_stride_with_dilation must be None or three booleans (layer2, layer3, layer4), "
                f"got {replace_stride_with_dilation!r}"
            )
        self.replace_stride_with_dilation: tuple[bool, bool, bool] = dilate  # type: ignore[assignment]
        self._norm_layer: NormLayer = norm_layer or nn.BatchNorm2d
        self.inplanes = 64
        self.dilation = 1
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = self._norm_layer(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(64, layers[0])
        self.layer2 = self._make_layer(128, layers[1], stride=2, dilate=dilate[0])
        self.layer3 = self._make_layer(256, layers[2], stride=2, dilate=dilate[1])
        self.layer4 = self._make_layer(512, layers[3], stride=2, dilate=dilate[2])
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * BasicBlock.expansion, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, BasicBlock) and getattr(m.bn2, "weight", None) is not None:
                    nn.init.constant_(m.bn2.weight, 0)

        self.feature_info: list[FeatureInfo] = self._describe_stages()

    def _make_layer(self, planes: int, blocks: int, stride: int = 1, dilate: bool = False) -> nn.Sequential:
        # torchvision's rule: a dilated stage multiplies the running dilation by the stride it drops.
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        downsample = None
        if stride != 1 or self.inplanes != planes * BasicBlock.expansion:
            downsample = nn.Sequential(
                _conv1x1(self.inplanes, planes * BasicBlock.expansion, stride),
                self._norm_layer(planes * BasicBlock.expansion),
            )
        blocks_ = [
            BasicBlock(self.inplanes, planes, stride, downsample, self._norm_layer,
                       dilation=self.dilation, first_dilation=previous_dilation)
        ]
        self.inplanes = planes * BasicBlock.expansion
        blocks_ += [
            BasicBlock(self.inplanes, planes, norm_layer=self._norm_layer, dilation=self.dilation) for _ in range(1, blocks)
        ]
        return nn.Sequential(*blocks_)

    def _describe_stages(self) -> list[FeatureInfo]:
        stride = self.conv1.stride[0] * _module_stride(self.maxpool)
        info = []
        for name in STAGE_NAMES:
            stage: nn.Sequential = getattr(self, name)
            stride *= _module_stride(stage)
            info.append(FeatureInfo(name=name, channels=stage[-1].conv2.out_channels, stride=stride))
        return info

    def stem(self, x: Tensor) -> Tensor:
        """conv1, bn1, relu, max-pool: the stride-4 input to ``layer1``."""
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def forward_features(self, x: Tensor, stages: Iterable[int] = (1, 2, 3, 4)) -> "OrderedDict[str, Tensor]":
        """Run the trunk and return the requested stage outputs (C2..C5).

        Args:
            x: images, shape (N, 3, H, W).
            stages: stage numbers 1..4 to return; computation stops after the last one.

        Returns:
            Ordered dict ``{"layer1": C2, ...}`` for the requested stages, in order.
        """
        wanted = sorted(set(int(s) for s in stages))
        if not wanted or any(s not in (1, 2, 3, 4) for s in wanted):
            raise ValueError(f"stages must be a non-empty subset of (1, 2, 3, 4), got {list(stages)}")
        out: OrderedDict[str, Tensor] = OrderedDict()
        x = self.stem(x)
        for i, name in enumerate(STAGE_NAMES, start=1):
            x = getattr(self, name)(x)
            if i in wanted:
                out[name] = x
            if i == wanted[-1]:
                break
        return out

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def resnet(
    depth: int,
    *,
    num_classes: int = 1000,
    zero_init_residual: bool = False,
    norm_layer: NormLayer | None = None,
    replace_stride_with_dilation: Sequence[bool] | None = None,
) -> ResNet:
    """Build a ResNet-18 or ResNet-34 with random weights.

    Args:
        depth: 18 or 34.
        num_classes: classifier outputs.
        zero_init_residual: zero the last BN of every block (see ``ResNet``).
        norm_layer: normalisation constructor (BatchNorm2d by default).
        replace_stride_with_dilation: three booleans for ``layer2``..``layer4`` (see
            ``ResNet``); ``None`` keeps every stride (output stride 32).

    Returns:
        The model; load weights with ``backbones.load_pretrained``.
    """
    if depth not in DEPTHS:
        raise ValueError(f"depth must be one of {sorted(DEPTHS)}, got {depth!r}")
    return ResNet(
        DEPTHS[depth], num_classes=num_classes, zero_init_residual=zero_init_residual, norm_layer=norm_layer,
        replace_stride_with_dilation=replace_stride_with_dilation,
    )


def resnet18(
    num_classes: int = 1000,
    *,
    zero_init_residual: bool = False,
    norm_layer: NormLayer | None = None,
    replace_stride_with_dilation: Sequence[bool] | None = None,
) -> ResNet:
    """ResNet-18 (11,689,512 parameters with 1000 classes). Args as in ``resnet``."""
    return resnet(18, num_classes=num_classes, zero_init_residual=zero_init_residual, norm_layer=norm_layer,
                  replace_stride_with_dilation=replace_stride_with_dilation)


def resnet34(
    num_classes: int = 1000,
    *,
    zero_init_residual: bool = False,
    norm_layer: NormLayer | None = None,
    replace_stride_with_dilation: Sequence[bool] | None = None,
) -> ResNet:
    """ResNet-34 (21,797,672 parameters with 1000 classes). Args as in ``resnet``."""
    return resnet(34, num_classes=num_classes, zero_init_residual=zero_init_residual, norm_layer=norm_layer,
                  replace_stride_with_dilation=replace_stride_with_dilation)


_TRAINABLE_ORDER = ("layer4", "layer3", "layer2", "layer1", "conv1")


def freeze_trunk(trunk: nn.Module, trainable_layers: int) -> None:
    """Stop gradients to all but the top ``trainable_layers`` stages, counted as torchvision counts them.

    Args:
        trunk: a ``ResNet`` (or a module holding its children under the same names,
            such as torchvision's ``IntermediateLayerGetter``).
        trainable_layers: 0 (everything frozen) .. 5 (nothing frozen; 5 also trains ``bn1``).
    """
    if isinstance(trainable_layers, bool) or not isinstance(trainable_layers, int) or not 0 <= trainable_layers <= 5:
        raise ValueError(f"trainable_layers must be an integer in the range [0, 5], got {trainable_layers!r}")
    layers_to_train = list(_TRAINABLE_ORDER[:trainable_layers])
    if trainable_layers == 5:
        layers_to_train.append("bn1")
    for name, param in trunk.named_parameters():
        if not any(name.startswith(layer) for layer in layers_to_train):
            param.requires_grad_(False)
