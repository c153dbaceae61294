"""ResNet-18/34 feature-pyramid backbones that describe their own outputs.

Built on torchvision's ``BackboneWithFPN`` so the module tree and state-dict keys
(``body.*``, ``fpn.*``) are exactly torchvision's: detector checkpoints move between
the two in both directions. What this adds is what users of torchvision, detectron2
and MMDetection keep tripping over:

* ``feature_info`` publishes every output level's name, channels and stride, derived
  from the built modules (as detectron2's ``output_shape()`` and timm's
  ``feature_info`` do), so heads and anchor generators size themselves;
* freezing follows the weights: a pretrained trunk gets FrozenBatchNorm2d and three
  trainable stages, a random trunk gets BatchNorm2d and every stage trainable
  (torchvision's ``resnet_fpn_backbone`` freezes random layers when given no weights);
* a dilated trunk (``replace_stride_with_dilation``) makes a pyramid whose top levels
  share a stride, and ``feature_info`` says so (strides never shrink, as timm asserts).
"""

import logging
from typing import Dict, Literal, Optional, Sequence

from torch import Tensor, nn
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from .resnet import DEPTHS, FeatureInfo, NormLayer, ResNet, freeze_trunk, resnet
from .weights import LoadReport, Source, load_pretrained

__all__ = ["ResNetFPN", "resnet_fpn", "resnet18_fpn", "resnet34_fpn", "EXTRA_BLOCKS"]

log = logging.getLogger(__name__)

ExtraBlocks = Literal["pool", "p6p7"] | None
EXTRA_BLOCKS = ("pool", "p6p7", None)


class ResNetFPN(BackboneWithFPN):
    """A ResNet trunk plus a feature pyramid, with torchvision's ``BackboneWithFPN`` keys.

    Use the builders (``resnet18_fpn``, ``resnet34_fpn``, ``resnet_fpn``) rather than this
    class directly.

    Args:
        trunk: the ResNet; its ``feature_info`` gives channels and strides.
        returned_layers: stages (1..4) that feed the pyramid.
        out_channels: channels of every pyramid level.
        extra_blocks: ``"pool"`` (P6 by stride-2 max-pool), ``"p6p7"`` (two stride-2
            convolutions from P5, as in RetinaNet/FCOS) or ``None``.

    Attributes:
        out_channels: channels of every output level (what torchvision heads read).
        feature_info: one ``FeatureInfo(name, channels, stride)`` per output, in order.
        load_report: the ``LoadReport`` of the trunk's weights, or ``None``.
    """

    # Python-side descriptions: TorchScript (torch.jit.script) compiles forward only.
    __jit_unused_properties__ = ["strides", "channels"]
    __jit_ignored_attributes__ = ["feature_info", "load_report"]

    def __init__(self, trunk: ResNet, returned_layers: Sequence[int], out_channels: int, extra_blocks: ExtraBlocks) -> None:
        stage_info = [trunk.feature_info[i - 1] for i in returned_layers]
        blocks = tuple(len(getattr(trunk, name)) for name in ("layer1", "layer2", "layer3", "layer4"))
        depth = {layers: d for d, layers in DEPTHS.items()}.get(blocks)
        if extra_blocks == "pool":
            extra: Optional[nn.Module] = LastLevelMaxPool()
        elif extra_blocks == "p6p7":
            extra = LastLevelP6P7(out_channels, out_channels)
        else:
            extra = None
        return_layers = {info.name: str(i) for i, info in enumerate(stage_info)}
        super().__init__(trunk, return_layers, [info.channels for info in stage_info], out_channels, extra_blocks=extra)
        if extra is None:
            # BackboneWithFPN substitutes a max-pool for None; "no extra level" must mean none.
            self.fpn.extra_blocks = None
        self.depth = depth
        self.returned_layers = tuple(returned_layers)
        self.load_report: Optional[LoadReport] = None
        self.feature_info: list[FeatureInfo] = self._describe_outputs(stage_info)

    def _describe_outputs(self, stage_info: list[FeatureInfo]) -> list[FeatureInfo]:
        channels = self.out_channels
        info = [FeatureInfo(str(i), channels, s.stride) for i, s in enumerate(stage_info)]
        extra = self.fpn.extra_blocks
        last = info[-1].stride
        if isinstance(extra, LastLevelMaxPool):
            # LastLevelMaxPool is F.max_pool2d(kernel 1, stride 2) on the last level.
            info.append(FeatureInfo("pool", channels, last * 2))
        elif isinstance(extra, LastLevelP6P7):
            p6 = last * extra.p6.stride[0]
            info += [FeatureInfo("p6", channels, p6), FeatureInfo("p7", channels, p6 * extra.p7.stride[0])]
        strides = [f.stride for f in info]
        # A dilated trunk repeats a stride (levels at 4, 8, 8, 8); a stride never shrinks.
        if any(b < a for a, b in zip(strides, strides[1:])):
            raise AssertionError(f"pyramid strides must not decrease level to level, got {strides}")
        return info

    @property
    def strides(self) -> Dict[str, int]:
        """``{level name: stride}`` for every output."""
        return {f.name: f.stride for f in self.feature_info}

    @property
    def channels(self) -> Dict[str, int]:
        """``{level name: channels}`` for every output."""
        return {f.name: f.channels for f in self.feature_info}

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        """Return the pyramid levels ``{"0": P2, ..., "pool": P6}`` (names per ``feature_info``)."""
        return self.fpn(self.body(x))


def resnet_fpn(
    depth: int,
    *,
    weights: Source | None = None,
    trainable_layers: int | None = None,
    returned_layers: Sequence[int] | None = None,
    extra_blocks: ExtraBlocks = "pool",
    out_channels: int = 256,
    norm_layer: NormLayer | None = None,
    download: bool = True,
    replace_stride_with_dilation: Sequence[bool] | None = None,
) -> ResNetFPN:
    """Build a ResNet-18/34 feature-pyramid backbone.

    Args:
        depth: 18 or 34.
        weights: ``None`` (random init), ``"imagenet"`` (torchvision's official file,
            from the torch hub cache), a checkpoint path or a state dict; loaded with
            ``backbones.load_pretrained`` and the report logged and kept on
            ``model.load_report``.
        trainable_layers: trunk stages left trainable, counted from the top like
            torchvision (0: none ... 5: all, stem included). Default 3 with weights,
            5 without.
        returned_layers: non-empty subset of 1..4 (C2..C5) fed to the pyramid. Default
            (1, 2, 3, 4); with ``extra_blocks="p6p7"`` default (2, 3, 4), i.e. P3-P7.
        extra_blocks: ``"pool"`` adds ``"pool"`` (P6 by max-pool, what torchvision's
            R-CNNs expect), ``"p6p7"`` adds ``"p6"`` and ``"p7"`` (RetinaNet/FCOS),
            ``None`` adds nothing.
        out_channels: channels of each pyramid level.
        norm_layer: trunk normalisation. Default FrozenBatchNorm2d with weights,
            BatchNorm2d without.
        download: for ``weights="imagenet"``, fetch the file when it is not cached.
        replace_stride_with_dilation: three booleans for ``layer2``..``layer4`` (see
            ``backbones.ResNet``): dilated stages keep the stride of the stage below,
            and ``feature_info`` reports it. ``None``: no dilation.

    Returns:
        A ``ResNetFPN`` whose forward returns an ``OrderedDict`` of pyramid levels.
    """
    if depth not in DEPTHS:
        raise ValueError(f"depth must be one of {sorted(DEPTHS)}, got {depth!r}")
    if extra_blocks not in EXTRA_BLOCKS:
        raise ValueError(f"extra_blocks must be one of {list(EXTRA_BLOCKS)}, got {extra_blocks!r}")
    if trainable_layers is None:
        trainable_layers = 3 if weights is not None else 5
    if not isinstance(trainable_layers, int) or not 0 <= trainable_layers <= 5:
        raise ValueError(f"trainable_layers must be an integer in the range [0, 5], got {trainable_layers!r}")
    if returned_layers is None:
        returned_layers = (2, 3, 4) if extra_blocks == "p6p7" else (1, 2, 3, 4)
    returned = sorted(set(int(i) for i in returned_layers))
    if not returned or returned[0] < 1 or returned[-1] > 4:
        raise ValueError(f"returned_layers must be a non-empty subset of [1, 2, 3, 4], got {list(returned_layers)}")
    if not isinstance(out_channels, int) or out_channels < 1:
        raise ValueError(f"out_channels must be a positive integer, got {out_channels!r}")
    if norm_layer is None:
        norm_layer = FrozenBatchNorm2d if weights is not None else nn.BatchNorm2d

    trunk = resnet(depth, norm_layer=norm_layer, replace_stride_with_dilation=replace_stride_with_dilation)
    report = None
    if weights is not None:
        report = load_pretrained(trunk, weights, download=download)  # logs its report
    freeze_trunk(trunk, trainable_layers)
    model = ResNetFPN(trunk, returned, out_channels, extra_blocks)
    model.load_report = report
    return model


def resnet18_fpn(
    *,
    weights: Source | None = None,
    trainable_layers: int | None = None,
    returned_layers: Sequence[int] | None = None,
    extra_blocks: ExtraBlocks = "pool",
    out_channels: int = 256,
    norm_layer: NormLayer | None = None,
    download: bool = True,
    replace_stride_with_dilation: Sequence[bool] | None = None,
) -> ResNetFPN:
    """ResNet-18 feature-pyramid backbone. Args as in ``resnet_fpn``."""
    return resnet_fpn(
        18, weights=weights, trainable_layers=trainable_layers, returned_layers=returned_layers,
        extra_blocks=extra_blocks, out_channels=out_channels, norm_layer=norm_layer, download=download,
        replace_stride_with_dilation=replace_stride_with_dilation,
    )


def resnet34_fpn(
    *,
    weights: Source | None = None,
    trainable_layers: int | None = None,
    returned_layers: Sequence[int] | None = None,
    extra_blocks: ExtraBlocks = "pool",
    out_channels: int = 256,
    norm_layer: NormLayer | None = None,
    download: bool = True,
    replace_stride_with_dilation: Sequence[bool] | None = None,
) -> ResNetFPN:
    """ResNet-34 feature-pyramid backbone. Args as in ``resnet_fpn``."""
    return resnet_fpn(
        34, weights=weights, trainable_layers=trainable_layers, returned_layers=returned_layers,
        extra_blocks=extra_blocks, out_channels=out_channels, norm_layer=norm_layer, download=download,
        replace_stride_with_dilation=replace_stride_with_dilation,
    )
