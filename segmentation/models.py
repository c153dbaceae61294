"""One-call semantic segmenters on ResNet-18/34: DeepLabV3, FCN and a semantic FPN.

``deeplabv3`` and ``fcn`` are torchvision's own classes and heads (``DeepLabV3`` /
``FCN``, ``DeepLabHead`` / ``FCNHead``) on this project's trunk, dilated to output stride
8 or 16 (torchvision cannot dilate a ``BasicBlock``, so its segmentation builders stop at
ResNet-50). The module tree is torchvision's: ``backbone.*`` (an
``IntermediateLayerGetter`` over the trunk), ``classifier.*`` and, with ``aux_loss``,
``aux_classifier.*`` (an ``FCNHead`` on ``layer3``), so state dicts move between the two.

``semantic_fpn`` is the semantic branch of Panoptic FPN (Kirillov et al., 2019; detectron2's
``SemSegFPNHead``) on this project's pyramid: every level is brought to stride 4 by
3x3 conv-GroupNorm-ReLU stages, each followed by a 2x bilinear upsampling, the levels are
summed and a 1x1 convolution classifies; the logits are upsampled to the input.

Every model takes ImageNet-normalised images (N, 3, H, W), as torchvision's segmentation
models do (``segmentation.data`` normalises), and returns ``{"out": logits}`` (plus
``"aux"`` with ``aux_loss``), logits of shape (N, num_classes, H, W). ``model.build_args``
records what ``rebuild_segmenter`` needs, so a checkpoint rebuilds its own model.
"""

import difflib
import inspect
import math
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, Dict, List, Optional, Sequence

import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.segmentation.deeplabv3 import ASPP, DeepLabHead, DeepLabV3
from torchvision.models.segmentation.fcn import FCN, FCNHead

from backbones.fpn import ResNetFPN, resnet_fpn
from backbones.resnet import FeatureInfo, freeze_trunk, resnet
from backbones.weights import LoadReport, Source, load_pretrained
from backbones.resnet import NORMS

__all__ = [
    "ARCHS",
    "BACKBONES",
    "OUTPUT_STRIDES",
    "SemanticFPN",
    "SemanticFPNHead",
    "build_segmenter",
    "check_segmenter_options",
    "rebuild_segmenter",
    "segmenter_options",
]

ARCHS = ("deeplabv3", "fcn", "semantic_fpn")
BACKBONES = {"resnet18": 18, "resnet34": 34}
# torchvision's replace_stride_with_dilation for each output stride (deeplabv3_resnet50 uses 8).
OUTPUT_STRIDES: Dict[int, tuple] = {32: (False, False, False), 16: (False, False, True), 8: (False, True, True)}
# deeplabv3/fcn: torchvision's output stride 8; semantic_fpn: Panoptic FPN's plain pyramid.
_DEFAULT_OUTPUT_STRIDE = {"deeplabv3": 8, "fcn": 8, "semantic_fpn": 32}
# torchvision's DeepLabHead (ASPP 256) and FCNHead (512 // 4); detectron2's SEM_SEG_HEAD.CONVS_DIM.
_DEFAULT_HEAD_CHANNELS = {"deeplabv3": 256, "fcn": 128, "semantic_fpn": 128}
# Options that only one architecture reads.
_ONLY_FOR = {"atrous_rates": "deeplabv3", "fpn_channels": "semantic_fpn"}
_TRUNK_CHANNELS = 512
_AUX_CHANNELS = 256  # layer3 of ResNet-18/34
_GN_GROUPS = 32
_COMMON_STRIDE = 4


def _c2_msra_fill(conv: nn.Conv2d) -> None:
    # detectron2's weight_init.c2_msra_fill, which SemSegFPNHead uses.
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


class SemanticFPNHead(nn.Module):
    """Panoptic FPN's semantic head (detectron2's ``SemSegFPNHead``): pyramid levels -> stride-4 logits.

    A level of stride ``s`` gets ``max(1, log2(s / 4))`` stages of 3x3 conv (no bias) -
    GroupNorm(32) - ReLU; every stage of a level coarser than stride 4 is followed by a
    bilinear upsampling to the size of the pyramid level one octave finer (2x when the
    input divides by the coarsest stride; exact sizes otherwise, where detectron2 needs
    padded inputs). The stride-4 maps are summed and a 1x1 convolution classifies.

    Args:
        feature_info: the pyramid's levels (name, channels, stride); it must have a
            stride-4 level and every octave between 4 and its coarsest stride.
        num_classes: output channels.
        channels: width of the stage convolutions (a multiple of 32, for GroupNorm(32)).
    """

    # Declared for TorchScript, which cannot infer the type of an empty nested list.
    in_features: List[str]
    upsample_to: List[List[str]]

    def __init__(self, feature_info: Sequence[FeatureInfo], num_classes: int, channels: int = 128) -> None:
        super().__init__()
        levels = sorted(feature_info, key=lambda f: f.stride)
        strides = [f.stride for f in levels]
        first_of_stride = {}
        for f in levels:
            first_of_stride.setdefault(f.stride, f.name)
        self.in_features = [f.name for f in levels]
        self.upsample_to = []
        self.scale_heads = nn.ModuleList()
        for f in levels:
            octaves = math.log2(f.stride / _COMMON_STRIDE)
            if f.stride < _COMMON_STRIDE or not octaves.is_integer():
                raise ValueError(f"semantic FPN levels need strides 4 * 2^k, got {strides}")
            targets = [_COMMON_STRIDE * 2 ** k for k in range(int(octaves) - 1, -1, -1)]
            missing = [t for t in targets if t not in first_of_stride]
            if missing:
                raise ValueError(f"semantic FPN needs a pyramid level at every stride from 4 up, got strides {strides} (missing {missing})")
            self.upsample_to.append([first_of_stride[t] for t in targets])
            stages = nn.ModuleList()
            for k in range(max(1, len(targets))):
                conv = nn.Conv2d(f.channels if k == 0 else channels, channels, 3, padding=1, bias=False)
                _c2_msra_fill(conv)
                stages.append(nn.Sequential(conv, nn.GroupNorm(_GN_GROUPS, channels), nn.ReLU(inplace=True)))
            self.scale_heads.append(stages)
        self.predictor = nn.Conv2d(channels, num_classes, 1)
        _c2_msra_fill(self.predictor)

    def forward(self, features: Dict[str, Tensor]) -> Tensor:
        out: Optional[Tensor] = None
        for i, stages in enumerate(self.scale_heads):
            x = features[self.in_features[i]]
            targets = self.upsample_to[i]
            for k, stage in enumerate(stages):
                x = stage(x)
                if k < len(targets):
                    x = F.interpolate(x, size=features[targets[k]].shape[-2:], mode="bilinear", align_corners=False)
            out = x if out is None else out + x
        assert out is not None
        return self.predictor(out)


class SemanticFPN(nn.Module):
    """A pyramid backbone, a ``SemanticFPNHead`` and an optional auxiliary head: torchvision's output contract.

    Args:
        backbone: a ``ResNetFPN`` over stages 1-4 (its ``body`` gives C2-C5, its ``fpn``
            the pyramid).
        classifier: the semantic head.
        aux_classifier: an ``FCNHead`` on C4 (``layer3``), as torchvision's models put it.
    """

    __constants__ = ["aux_classifier"]

    def __init__(self, backbone: ResNetFPN, classifier: SemanticFPNHead, aux_classifier: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.classifier = classifier
        self.aux_classifier = aux_classifier
        self.aux_level = backbone.body.return_layers["layer3"]

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        input_shape = x.shape[-2:]
        stages = self.backbone.body(x)
        pyramid = self.backbone.fpn(stages)
        result = OrderedDict()
        logits = self.classifier(pyramid)
        result["out"] = F.interpolate(logits, size=input_shape, mode="bilinear", align_corners=False)
        if self.aux_classifier is not None:
            aux = self.aux_classifier(stages[self.aux_level])
            result["aux"] = F.interpolate(aux, size=input_shape, mode="bilinear", align_corners=False)
        return result


def segmenter_options(arch: str) -> set[str]:
    """Keyword options ``build_segmenter(arch, ...)`` accepts.

    Args:
        arch: one of ``ARCHS``.
    """
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {list(ARCHS)}, got {arch!r}")
    own = set(inspect.signature(build_segmenter).parameters) - {"arch", "kwargs"}
    return {name for name in own if _ONLY_FOR.get(name, arch) == arch}


def check_segmenter_options(arch: str, options: Mapping[str, Any]) -> None:
    """Raise for an option name ``build_segmenter(arch, ...)`` would not use.

    Args:
        arch: one of ``ARCHS``.
        options: option names (and values) meant for the segmenter.

    Raises:
        ValueError: naming the unknown option and the closest valid ones, or the
            architecture an option belongs to.
    """
    valid = segmenter_options(arch)
    for name in options:
        if name in _ONLY_FOR and _ONLY_FOR[name] != arch:
            raise ValueError(f"option {name!r} only applies to {_ONLY_FOR[name]}, got it for {arch!r}")
        if name not in valid:
            close = difflib.get_close_matches(name, sorted(valid), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"unknown option {name!r} for {arch}{hint} (valid: {', '.join(sorted(valid))})")


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _check(arch: str, backbone: str, num_classes: Any, output_stride: Any, aux_loss: Any, norm: Any) -> None:
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {list(ARCHS)}, got {arch!r}")
    if backbone not in BACKBONES:
        raise ValueError(f"backbone must be one of {list(BACKBONES)}, got {backbone!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(
            "num_classes must be an integer >= 2 (every class the model tells apart, the background included: "
            f"K object classes on a background need num_classes=K+1), got {num_classes!r}"
        )
    if isinstance(output_stride, bool) or not isinstance(output_stride, int) or output_stride not in OUTPUT_STRIDES:
        raise ValueError(f"output_stride must be one of {sorted(OUTPUT_STRIDES)} (or None for the default), got {output_stride!r}")
    if not isinstance(aux_loss, bool):
        raise ValueError(f"aux_loss must be True or False, got {aux_loss!r}")
    if not isinstance(norm, str) or norm not in NORMS:
        raise ValueError(f"norm must be one of {list(NORMS)}, got {norm!r}")


def _deeplab_head(num_classes: int, channels: int, atrous_rates: Sequence[int]) -> DeepLabHead:
    head = DeepLabHead(_TRUNK_CHANNELS, num_classes, atrous_rates)
    if channels != 256:
        # The same modules at another width (torchvision's DeepLabHead fixes ASPP at 256): keys unchanged.
        head[0] = ASPP(_TRUNK_CHANNELS, atrous_rates, channels)
        head[1] = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        head[2] = nn.BatchNorm2d(channels)
        head[4] = nn.Conv2d(channels, num_classes, 1)
    return head


def _fcn_head(num_classes: int, channels: int) -> FCNHead:
    head = FCNHead(_TRUNK_CHANNELS, num_classes)
    if channels != _TRUNK_CHANNELS // 4:
        head[0] = nn.Conv2d(_TRUNK_CHANNELS, channels, 3, padding=1, bias=False)
        head[1] = nn.BatchNorm2d(channels)
        head[4] = nn.Conv2d(channels, num_classes, 1)
    return head


def build_segmenter(
    arch: str,
    *,
    backbone: str = "resnet18",
    num_classes: int,
    weights_backbone: Source | None = None,
    output_stride: int | None = None,
    aux_loss: bool = False,
    trainable_layers: int = 5,
    norm: str = "bn",
    head_channels: int | None = None,
    atrous_rates: Sequence[int] | None = None,
    fpn_channels: int | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build a semantic segmenter on a ResNet-18/34 trunk.

    Args:
        arch: ``"deeplabv3"``, ``"fcn"`` or ``"semantic_fpn"``.
        backbone: ``"resnet18"`` or ``"resnet34"``.
        num_classes: output channels: every class the model tells apart, the
            background included (VOC: 21; a COCO-format set with K categories: K + 1).
        weights_backbone: trunk weights: ``None``, ``"imagenet"``, a path or a state
            dict (``backbones.load_pretrained``; the report is kept on
            ``model.load_report``).
        output_stride: 8, 16 or 32: the trunk's last stages trade their stride for
            dilation (``backbones.ResNet``'s ``replace_stride_with_dilation``). Default:
            8 for ``deeplabv3`` and ``fcn`` (torchvision's choice), 32 for
            ``semantic_fpn`` (Panoptic FPN's plain pyramid; 16 or 8 dilate its top
            levels, which then share a stride).
        aux_loss: add torchvision's auxiliary ``FCNHead(256, num_classes)`` on
            ``layer3``; the output gains ``"aux"`` logits.
        trainable_layers: trunk stages to train, 0..5 from the top (default 5: all, as
            torchvision's segmentation models train).
        norm: trunk normalisation, ``"bn"`` (default, as torchvision's segmentation
            models), ``"frozen_bn"`` or ``"gn"``.
        head_channels: width of the head: ASPP and its projection for ``deeplabv3``
            (default 256), the 3x3 conv for ``fcn`` (default 128), the stage
            convolutions for ``semantic_fpn`` (default 128, a multiple of 32). Only the
            default gives torchvision's exact head.
        atrous_rates: ``deeplabv3`` only: ASPP dilation rates (default torchvision's
            ``(12, 24, 36)``; the DeepLabV3 paper uses ``(6, 12, 18)`` at output stride 16).
        fpn_channels: ``semantic_fpn`` only: channels of every pyramid level (default 256).
        **kwargs: none are accepted; a misspelt option is refused naming the closest
            valid ones.

    Returns:
        The model; ``model.build_args`` holds what ``rebuild_segmenter`` needs.
    """
    if output_stride is None and arch in _DEFAULT_OUTPUT_STRIDE:
        output_stride = _DEFAULT_OUTPUT_STRIDE[arch]
    _check(arch, backbone, num_classes, output_stride, aux_loss, norm)
    check_segmenter_options(arch, kwargs)
    given = {"atrous_rates": atrous_rates, "fpn_channels": fpn_channels}
    for name, value in given.items():
        if value is not None and _ONLY_FOR[name] != arch:
            raise ValueError(f"option {name!r} only applies to {_ONLY_FOR[name]}, got it for {arch!r}")
    if isinstance(trainable_layers, bool) or not isinstance(trainable_layers, int) or not 0 <= trainable_layers <= 5:
        raise ValueError(f"trainable_layers must be an integer in the range [0, 5], got {trainable_layers!r}")
    channels = _positive_int("head_channels", head_channels if head_channels is not None else _DEFAULT_HEAD_CHANNELS[arch])
    if arch == "semantic_fpn" and channels % _GN_GROUPS:
        raise ValueError(f"head_channels for semantic_fpn must be a multiple of {_GN_GROUPS} (GroupNorm({_GN_GROUPS})), got {channels}")
    if arch == "deeplabv3":
        rates = (12, 24, 36) if atrous_rates is None else atrous_rates
        if not isinstance(rates, (list, tuple)) or not rates or any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in rates):
            raise ValueError(f"atrous_rates must be a non-empty sequence of positive integers, got {atrous_rates!r}")
        rates = tuple(rates)
    depth = BACKBONES[backbone]
    dilation = OUTPUT_STRIDES[output_stride]
    report: Optional[LoadReport] = None

    if arch == "semantic_fpn":
        width = _positive_int("fpn_channels", fpn_channels if fpn_channels is not None else 256)
        body = resnet_fpn(
            depth, weights=weights_backbone, trainable_layers=trainable_layers, returned_layers=(1, 2, 3, 4),
            extra_blocks=None, out_channels=width, norm_layer=NORMS[norm], replace_stride_with_dilation=dilation,
        )
        report = body.load_report
        aux = FCNHead(_AUX_CHANNELS, num_classes) if aux_loss else None
        model: nn.Module = SemanticFPN(body, SemanticFPNHead(body.feature_info, num_classes, channels), aux)
    else:
        trunk = resnet(depth, norm_layer=NORMS[norm], replace_stride_with_dilation=dilation)
        if weights_backbone is not None:
            report = load_pretrained(trunk, weights_backbone)  # logs its report
        freeze_trunk(trunk, trainable_layers)
        return_layers = {"layer4": "out"}
        if aux_loss:
            return_layers["layer3"] = "aux"
        getter = IntermediateLayerGetter(trunk, return_layers=return_layers)
        aux = FCNHead(_AUX_CHANNELS, num_classes) if aux_loss else None
        if arch == "deeplabv3":
            model = DeepLabV3(getter, _deeplab_head(num_classes, channels, rates), aux)
        else:
            model = FCN(getter, _fcn_head(num_classes, channels), aux)

    model.load_report = report
    model.build_args = {
        "arch": arch,
        "backbone": backbone,
        "num_classes": num_classes,
        "output_stride": output_stride,
        "aux_loss": aux_loss,
        "trainable_layers": trainable_layers,
        "norm": norm,
        "head_channels": channels,
        **({"atrous_rates": list(rates)} if arch == "deeplabv3" else {}),
        **({"fpn_channels": width} if arch == "semantic_fpn" else {}),
        # Provenance only: a rebuilt model gets its weights from the checkpoint.
        "weights_backbone": weights_backbone if isinstance(weights_backbone, str) else None,
    }
    return model


def rebuild_segmenter(build_args: Mapping[str, Any]) -> nn.Module:
    """Build an untrained segmenter from a ``build_args`` record (no weights are fetched).

    Args:
        build_args: ``model.build_args`` of a model from ``build_segmenter``.
    """
    args = dict(build_args)
    args.pop("weights_backbone", None)
    arch = args.pop("arch")
    model = build_segmenter(arch, **args)
    model.build_args["weights_backbone"] = build_args.get("weights_backbone")
    return model
