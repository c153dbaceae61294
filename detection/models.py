"""One-call detectors on ResNet-18/34 pyramids: Faster R-CNN, Mask R-CNN, RetinaNet, FCOS.

The heads are torchvision's own; what is built here is the part users otherwise get
wrong by hand: anchors sized from the backbone's real output levels (so any
``returned_layers`` works), RoI poolers reading exactly the pyramid levels that exist,
the background convention of ``num_classes``, and a record of the build arguments so a
checkpoint can rebuild its own model (``load_detector``).
"""

from __future__ import annotations

import difflib
import inspect
from functools import partial
from collections.abc import Mapping
from typing import Any, Sequence

from torch import nn
from torchvision.models.detection import FCOS, FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.retinanet import RetinaNetHead

from backbones.fpn import ResNetFPN, resnet_fpn
from backbones.resnet import BACKBONES, NORMS
from backbones.weights import Source

from .ops import MultiScaleRoIAlign  # torchvision's pooler with a faster CPU RoIAlign; same results
from .postprocess import DEFAULT_TOPK_CANDIDATES, cap_box_candidates, check_topk_candidates

__all__ = [
    "ARCHS",
    "BACKBONES",
    "NORMS",
    "anchor_generator_for",
    "build_detector",
    "check_detector_options",
    "count_parameters",
    "detector_options",
    "has_masks",
    "rebuild_detector",
]

ARCHS = ("faster_rcnn", "mask_rcnn", "retinanet", "fcos")
_TWO_STAGE = ("faster_rcnn", "mask_rcnn")
_ASPECT_RATIOS = (0.5, 1.0, 2.0)


def anchor_generator_for(arch: str, backbone: ResNetFPN, anchor_scale: float = 8.0) -> AnchorGenerator:
    """Anchors for every output level of ``backbone``, sized from its strides.

    R-CNN RPNs get one size per level, ``anchor_scale`` x the stride (default 8: 32
    at stride 4, doubling per level, torchvision's defaults on the standard pyramid);
    RetinaNet gets three octave scales from ``anchor_scale / 2`` x the stride; FCOS
    one point per location (size = stride). All but FCOS use aspect ratios 0.5, 1, 2.

    Args:
        arch: one of ``ARCHS``.
        backbone: the pyramid whose ``feature_info`` decides the levels.
        anchor_scale: anchor size over stride; lower it for small images (e.g. 2 for
            128-pixel inputs whose objects are 10-100 pixels).
    """
    if anchor_scale <= 0:
        raise ValueError(f"anchor_scale must be positive, got {anchor_scale}")
    strides = [f.stride for f in backbone.feature_info]
    if arch in _TWO_STAGE:
        sizes = tuple((int(round(anchor_scale * s)),) for s in strides)
        ratios = (_ASPECT_RATIOS,) * len(strides)
    elif arch == "retinanet":
        sizes = tuple(tuple(int(anchor_scale / 2 * s * 2 ** (i / 3)) for i in range(3)) for s in strides)
        ratios = (_ASPECT_RATIOS,) * len(strides)
    elif arch == "fcos":
        sizes = tuple((s,) for s in strides)
        ratios = ((1.0,),) * len(strides)
    else:
        raise ValueError(f"arch must be one of {list(ARCHS)}, got {arch!r}")
    return AnchorGenerator(sizes=sizes, aspect_ratios=ratios)


# torchvision's RetinaNet regression losses (its head's _loss_type).
BOX_LOSSES = ("l1", "smooth_l1", "giou", "diou", "ciou")
_CLASSES = {"faster_rcnn": FasterRCNN, "mask_rcnn": MaskRCNN, "retinanet": RetinaNet, "fcos": FCOS}
# Set by build_detector from its own arguments; passing them again would collide.
_BUILT_HERE = {"self", "backbone", "kwargs", "rpn_anchor_generator", "anchor_generator", "box_roi_pool", "mask_roi_pool"}
# build_detector arguments that a training config sets as top-level keys, not as model_kwargs.
_CONFIG_KEYS = {"backbone", "weights_backbone", "trainable_layers", "returned_layers", "min_size", "max_size", "norm"}


def detector_options(arch: str) -> set[str]:
    """Keyword options ``build_detector(arch, ...)`` accepts: its own and those of torchvision's class.

    Args:
        arch: one of ``ARCHS``.
    """
    if arch not in _CLASSES:
        raise ValueError(f"arch must be one of {list(ARCHS)}, got {arch!r}")
    own = set(inspect.signature(build_detector).parameters) - {"arch"}
    theirs = set(inspect.signature(_CLASSES[arch].__init__).parameters)
    # The models pass their **kwargs on to GeneralizedRCNNTransform.
    transform = set(inspect.signature(GeneralizedRCNNTransform.__init__).parameters)
    return (own | theirs | transform) - _BUILT_HERE


def check_detector_options(arch: str, options: Mapping[str, Any], *, config: bool = True) -> None:
    """Raise for an option name ``build_detector(arch, ...)`` would not use.

    Args:
        arch: one of ``ARCHS``.
        options: option names (and values) meant for the detector.
        config: the options come from a training config's ``model_kwargs``, where the
            arguments that have a top-level config key (``min_size``, ``backbone``, ...)
            are refused with a pointer to that key.

    Raises:
        ValueError: naming the unknown option and the closest valid ones.
    """
    valid = detector_options(arch) - (_CONFIG_KEYS | {"num_classes"} if config else set())
    for name in options:
        if config and name == "num_classes":
            raise ValueError("num_classes comes from the training data's categories (plus the background); it cannot be set")
        if config and name in _CONFIG_KEYS:
            raise ValueError(f"{name!r} is a config key of its own: set {name} at the top level, not in model_kwargs")
        if name not in valid:
            close = difflib.get_close_matches(name, sorted(valid), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"unknown option {name!r} for {arch}{hint} (valid: {', '.join(sorted(valid))})")


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(total, trainable)`` parameter counts.

    Args:
        model: any module (a DDP wrapper is fine).
    """
    params = list(getattr(model, "module", model).parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def _check_pyramid(arch: str, returned_layers: Sequence[int] | None) -> None:
    if arch not in _TWO_STAGE or returned_layers is None:
        return
    stages = sorted(set(int(i) for i in returned_layers))
    if stages and stages != list(range(stages[0], stages[-1] + 1)):
        # torchvision's RoI level mapper numbers pooled levels consecutively from the finest:
        # with a gap, RoIs meant for the missing level pool the wrong map, or zeros.
        valid = ", ".join(str(list(range(a, 5))) for a in range(1, 5)) + ", or any other run of consecutive stages"
        raise ValueError(f"returned_layers for {arch} must be consecutive stages, got {list(returned_layers)}: valid choices are {valid}")


def _check(arch: str, backbone: str, num_classes: int, norm: str | None) -> None:
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {list(ARCHS)}, got {arch!r}")
    if backbone not in BACKBONES:
        raise ValueError(f"backbone must be one of {list(BACKBONES)}, got {backbone!r}")
    if norm is not None and norm not in NORMS:
        raise ValueError(f"norm must be one of {list(NORMS)} or None, got {norm!r}")
    minimum = 2 if arch in _TWO_STAGE else 1
    if not isinstance(num_classes, int) or num_classes < minimum:
        hint = " (it counts the background class 0, so K object classes need num_classes=K+1)" if arch in _TWO_STAGE else ""
        raise ValueError(f"num_classes for {arch} must be an integer >= {minimum}{hint}, got {num_classes!r}")


def build_detector(
    arch: str,
    *,
    backbone: str = "resnet18",
    num_classes: int,
    weights_backbone: Source | None = None,
    trainable_layers: int | None = None,
    returned_layers: Sequence[int] | None = None,
    min_size: int | Sequence[int] = 800,
    max_size: int = 1333,
    norm: str | None = None,
    out_channels: int = 256,
    representation_size: int = 1024,
    anchor_scale: float = 8.0,
    mask_head_channels: int = 256,
    mask_head_layers: int = 4,
    mask_roi_size: int = 14,
    box_topk_candidates: int | None = None,
    head_norm: str | None = None,
    box_loss: str | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build a torchvision detector on a ResNet-18/34 feature pyramid.

    Args:
        arch: ``"faster_rcnn"``, ``"mask_rcnn"``, ``"retinanet"`` or ``"fcos"``.
        backbone: ``"resnet18"`` or ``"resnet34"``.
        num_classes: number of classes **including the background class 0**, exactly
            as torchvision counts them: K object classes labelled 1..K need
            ``num_classes=K+1`` (COCO: 91, its ids run 1..90). For RetinaNet and FCOS
            index 0 is simply a class that never occurs, so the same labels work for
            every architecture.
        weights_backbone: trunk weights: ``None``, ``"imagenet"``, a path or a state dict.
        trainable_layers: trunk stages to train, 0..5 from the top; default 3 with
            weights, 5 without.
        returned_layers: trunk stages (subset of 1..4) feeding the pyramid; default
            1-4 (+P6 pool) for the R-CNNs, 2-4 (+P6, P7) for RetinaNet/FCOS. Anchors
            and RoI poolers follow whatever levels result.
        min_size: shorter image side after the model's internal resize (an int, or a
            sequence to sample from in training).
        max_size: cap on the longer side.
        norm: trunk normalisation, ``"bn"``, ``"frozen_bn"`` or ``"gn"``; default
            ``"frozen_bn"`` with weights, ``"bn"`` without.
        out_channels: channels of every pyramid level (256 as in the FPN paper).
        representation_size: width of the R-CNN box head's two fully connected
            layers (1024 as in torchvision/detectron2); its first layer dominates
            the cost of the box head, so small CPU recipes lower it.
        anchor_scale: anchor size over stride (see ``anchor_generator_for``); the
            default 8 suits COCO-sized images.
        mask_head_channels: Mask R-CNN only: width of the mask head's 3x3
            convolutions and of the predictor's deconvolution (256 in torchvision).
        mask_head_layers: Mask R-CNN only: number of 3x3 convolutions in the mask
            head (4 in torchvision; 0 feeds the pooled features to the predictor).
        mask_roi_size: Mask R-CNN only: side of the mask RoIAlign output (14 in
            torchvision); predicted masks are twice this size.
        box_topk_candidates: Faster/Mask R-CNN only: per image, the most
            (class, box) candidates that enter the box NMS, the highest-scoring
            after the score threshold (``detection.postprocess``); default 5000 (or
            ``box_detections_per_img`` if larger), which a trained model's candidates
            at the default score threshold rarely reach, so results equal
            torchvision's, while a score threshold of 0 (90,000 candidates with 91
            classes) no longer makes NMS take seconds.
        head_norm: RetinaNet only: ``"gn"`` puts GroupNorm (32 groups) after every
            convolution of the classification and box towers, as torchvision's
            ``retinanet_resnet50_fpn_v2`` does; default ``None``, the original head
            without normalisation. The normalised head is what trains from a random
            trunk (docs/training.md).
        box_loss: RetinaNet only: the box regression loss, ``"l1"`` (torchvision's
            default), ``"smooth_l1"``, ``"giou"`` (``retinanet_resnet50_fpn_v2``),
            ``"diou"`` or ``"ciou"``.
        **kwargs: passed to the torchvision model (``box_score_thresh``,
            ``box_detections_per_img``, ``rpn_batch_size_per_image``, ``score_thresh``,
            ``detections_per_img``, ...).

    Returns:
        The model, with ``model.build_args`` holding what ``load_detector`` needs to
        build it again.
    """
    _check(arch, backbone, num_classes, norm)
    check_detector_options(arch, kwargs, config=False)
    _check_pyramid(arch, returned_layers)
    user_kwargs = dict(kwargs)
    if norm is None:
        norm = "frozen_bn" if weights_backbone is not None else "bn"
    if trainable_layers is None:
        trainable_layers = 3 if weights_backbone is not None else 5
    two_stage = arch in _TWO_STAGE
    mask_options = {"mask_head_channels": mask_head_channels, "mask_head_layers": mask_head_layers, "mask_roi_size": mask_roi_size}
    for name, value in mask_options.items():
        lowest = 0 if name == "mask_head_layers" else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
            raise ValueError(f"{name} must be an integer >= {lowest}, got {value!r}")
    custom_mask_head = (mask_head_channels, mask_head_layers) != (256, 4)
    if arch != "mask_rcnn" and (custom_mask_head or mask_roi_size != 14):
        raise ValueError(f"mask_head_channels, mask_head_layers and mask_roi_size only apply to mask_rcnn, got them for {arch!r}")
    if arch != "retinanet" and (head_norm is not None or box_loss is not None):
        raise ValueError(f"head_norm and box_loss only apply to retinanet, got them for {arch!r}")
    if head_norm not in (None, "gn"):
        raise ValueError(f"head_norm must be None or 'gn', got {head_norm!r}")
    if box_loss not in (None, *BOX_LOSSES):
        raise ValueError(f"box_loss must be one of {list(BOX_LOSSES)}, got {box_loss!r}")
    if head_norm == "gn" and out_channels % 32:
        raise ValueError(f"head_norm 'gn' needs out_channels divisible by its 32 groups, got {out_channels}")
    if not two_stage and box_topk_candidates is not None:
        raise ValueError(f"box_topk_candidates only applies to faster_rcnn and mask_rcnn, got it for {arch!r} "
                         f"(RetinaNet and FCOS cap their candidates per level with topk_candidates)")
    if two_stage:
        detections = kwargs.get("box_detections_per_img", inspect.signature(_CLASSES[arch].__init__).parameters["box_detections_per_img"].default)
        if box_topk_candidates is None:
            box_topk_candidates = max(DEFAULT_TOPK_CANDIDATES, detections) if isinstance(detections, int) else DEFAULT_TOPK_CANDIDATES
        check_topk_candidates(box_topk_candidates, detections if isinstance(detections, int) else None)
    body = resnet_fpn(
        BACKBONES[backbone],
        weights=weights_backbone,
        trainable_layers=trainable_layers,
        returned_layers=returned_layers,
        extra_blocks="pool" if two_stage else "p6p7",
        norm_layer=NORMS[norm],
        out_channels=out_channels,
    )
    anchors = anchor_generator_for(arch, body, anchor_scale)
    size_args = dict(min_size=tuple(min_size) if isinstance(min_size, (list, tuple)) else min_size, max_size=max_size)
    if two_stage:
        # Pool only the stage levels, as torchvision does: the P6 "pool" level only feeds the RPN.
        stage_levels = [f.name for f in body.feature_info if f.name not in ("pool", "p6", "p7")]
        box_pool = MultiScaleRoIAlign(featmap_names=stage_levels, output_size=7, sampling_ratio=2)
        if representation_size != 1024 or (arch == "mask_rcnn" and custom_mask_head):
            resolution = box_pool.output_size[0]
            kwargs["box_head"] = TwoMLPHead(out_channels * resolution**2, representation_size)
            kwargs["box_predictor"] = FastRCNNPredictor(representation_size, num_classes)
            if arch == "mask_rcnn":
                if custom_mask_head:
                    kwargs["mask_head"] = MaskRCNNHeads(out_channels, [mask_head_channels] * mask_head_layers, 1)
                # torchvision's predictor, which it only builds itself when given num_classes.
                predictor_in = mask_head_channels if mask_head_layers else out_channels
                kwargs["mask_predictor"] = MaskRCNNPredictor(predictor_in, mask_head_channels, num_classes)
            kwargs["num_classes"] = None
        if arch == "faster_rcnn":
            model: nn.Module = FasterRCNN(body, rpn_anchor_generator=anchors, box_roi_pool=box_pool, **size_args, **{"num_classes": num_classes, **kwargs})
        else:
            mask_pool = MultiScaleRoIAlign(featmap_names=stage_levels, output_size=mask_roi_size, sampling_ratio=2)
            model = MaskRCNN(
                body, rpn_anchor_generator=anchors, box_roi_pool=box_pool, mask_roi_pool=mask_pool,
                **size_args, **{"num_classes": num_classes, **kwargs},
            )
    elif arch == "retinanet":
        head = RetinaNetHead(out_channels, anchors.num_anchors_per_location()[0], num_classes,
                             norm_layer=partial(nn.GroupNorm, 32) if head_norm == "gn" else None)
        if box_loss is not None:
            # torchvision's own switch (retinanet_resnet50_fpn_v2 sets it the same way).
            head.regression_head._loss_type = box_loss
        model = RetinaNet(body, num_classes=num_classes, anchor_generator=anchors, head=head, **size_args, **kwargs)
    else:
        model = FCOS(body, num_classes=num_classes, anchor_generator=anchors, **size_args, **kwargs)
    if two_stage:
        cap_box_candidates(model, box_topk_candidates)

    model.build_args = {
        "arch": arch,
        "backbone": backbone,
        "num_classes": num_classes,
        "trainable_layers": trainable_layers,
        "returned_layers": list(body.returned_layers),
        "min_size": list(min_size) if isinstance(min_size, (list, tuple)) else min_size,
        "max_size": max_size,
        "norm": norm,
        "out_channels": out_channels,
        "representation_size": representation_size,
        "anchor_scale": anchor_scale,
        **(mask_options if arch == "mask_rcnn" else {}),
        **({"box_topk_candidates": box_topk_candidates} if two_stage else {}),
        **({"head_norm": head_norm, "box_loss": box_loss} if arch == "retinanet" else {}),
        # Provenance only: a rebuilt model gets its weights from the checkpoint.
        "weights_backbone": weights_backbone if isinstance(weights_backbone, str) else None,
        "kwargs": dict(user_kwargs),
    }
    return model


def rebuild_detector(build_args: Mapping[str, Any]) -> nn.Module:
    """Build an untrained model from a ``build_args`` record (no weights are fetched).

    Args:
        build_args: ``model.build_args`` of a model from ``build_detector``.
    """
    args = dict(build_args)
    kwargs = dict(args.pop("kwargs", {}) or {})
    args.pop("weights_backbone", None)
    arch = args.pop("arch")
    model = build_detector(arch, **args, **kwargs)
    model.build_args["weights_backbone"] = build_args.get("weights_backbone")
    return model


def has_masks(model: Any) -> bool:
    """Whether a detector predicts instance masks: its own ``has_masks`` when it says (exported files), else a mask head.

    Args:
        model: a detector from ``build_detector`` (possibly DDP-wrapped), or one from
            ``detection.load_exported``.
    """
    model = getattr(model, "module", model)
    if isinstance(getattr(model, "has_masks", None), bool):
        return model.has_masks
    roi_heads = getattr(model, "roi_heads", None)
    return roi_heads is not None and getattr(roi_heads, "mask_predictor", None) is not None

