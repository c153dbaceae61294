"""One-call detectors on ResNet-18/34 pyramids: Faster R-CNN, Mask R-CNN, RetinaNet, FCOS.

The heads are torchvision's own; what is built here is the part users otherwise get
wrong by hand: anchors sized from the backbone's real output levels (so any
``returned_layers`` works), RoI poolers reading exactly the pyramid levels that exist,
the background convention of ``num_classes``, and a record of the build arguments so a
checkpoint can rebuild its own model (``load_detector``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Sequence

from torch import nn
from torchvision.models.detection import FCOS, FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor
from torchvision.ops import FrozenBatchNorm2d

from backbones.fpn import ResNetFPN, resnet_fpn
from backbones.weights import Source

from .checkpoint import atomic_save, read_checkpoint
from .ops import MultiScaleRoIAlign  # torchvision's pooler with a faster CPU RoIAlign; same results

__all__ = ["ARCHS", "BACKBONES", "NORMS", "build_detector", "load_detector", "save_detector", "anchor_generator_for"]

ARCHS = ("faster_rcnn", "mask_rcnn", "retinanet", "fcos")
BACKBONES = {"resnet18": 18, "resnet34": 34}
NORMS: dict[str, Any] = {
    "bn": nn.BatchNorm2d,
    "frozen_bn": FrozenBatchNorm2d,
    "gn": lambda channels: nn.GroupNorm(32, channels),
}
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
        **kwargs: passed to the torchvision model (``box_score_thresh``,
            ``box_detections_per_img``, ``rpn_batch_size_per_image``, ``score_thresh``,
            ``detections_per_img``, ...).

    Returns:
        The model, with ``model.build_args`` holding what ``load_detector`` needs to
        build it again.
    """
    _check(arch, backbone, num_classes, norm)
    user_kwargs = dict(kwargs)
    if norm is None:
        norm = "frozen_bn" if weights_backbone is not None else "bn"
    if trainable_layers is None:
        trainable_layers = 3 if weights_backbone is not None else 5
    two_stage = arch in _TWO_STAGE
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
        if representation_size != 1024:
            resolution = box_pool.output_size[0]
            kwargs["box_head"] = TwoMLPHead(out_channels * resolution**2, representation_size)
            kwargs["box_predictor"] = FastRCNNPredictor(representation_size, num_classes)
            if arch == "mask_rcnn":
                # torchvision's default mask predictor, which it only builds itself when given num_classes.
                kwargs["mask_predictor"] = MaskRCNNPredictor(256, 256, num_classes)
            kwargs["num_classes"] = None
        if arch == "faster_rcnn":
            model: nn.Module = FasterRCNN(body, rpn_anchor_generator=anchors, box_roi_pool=box_pool, **size_args, **{"num_classes": num_classes, **kwargs})
        else:
            mask_pool = MultiScaleRoIAlign(featmap_names=stage_levels, output_size=14, sampling_ratio=2)
            model = MaskRCNN(
                body, rpn_anchor_generator=anchors, box_roi_pool=box_pool, mask_roi_pool=mask_pool,
                **size_args, **{"num_classes": num_classes, **kwargs},
            )
    elif arch == "retinanet":
        model = RetinaNet(body, num_classes=num_classes, anchor_generator=anchors, **size_args, **kwargs)
    else:
        model = FCOS(body, num_classes=num_classes, anchor_generator=anchors, **size_args, **kwargs)

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
        # Provenance only: a rebuilt model gets its weights from the checkpoint.
        "weights_backbone": weights_backbone if isinstance(weights_backbone, str) else None,
        "kwargs": dict(user_kwargs),
    }
    return model


def rebuild_detector(build_args: Mapping[str, Any]) -> nn.Module:
    """Build an untrained model from a ``build_args`` record (no weights are fetched)."""
    args = dict(build_args)
    kwargs = dict(args.pop("kwargs", {}) or {})
    args.pop("weights_backbone", None)
    arch = args.pop("arch")
    model = build_detector(arch, **args, **kwargs)
    model.build_args["weights_backbone"] = build_args.get("weights_backbone")
    return model


def save_detector(model: nn.Module, path: str | os.PathLike, **extra: Any) -> None:
    """Write ``{"model": state_dict, "build_args": ..., **extra}`` atomically.

    Args:
        model: a model from ``build_detector`` (possibly wrapped in DDP).
        path: destination file.
        **extra: more plain data to store, e.g. ``category_mapping``.
    """
    model = getattr(model, "module", model)
    if not hasattr(model, "build_args"):
        raise ValueError("model has no build_args: build it with detection.build_detector to make it reloadable")
    atomic_save({"model": model.state_dict(), "build_args": model.build_args, **extra}, path)


def load_detector(checkpoint: str | os.PathLike | Mapping[str, Any], *, device: str = "cpu") -> nn.Module:
    """Rebuild a detector from a checkpoint that stores its ``build_args``.

    Args:
        checkpoint: a file written by ``save_detector`` or by ``tools/train_det.py``
            (``model_final.pth`` or ``checkpoint.pth``), or such a dict already loaded.
        device: where to put the model.

    Returns:
        The model in eval mode; ``model.category_mapping`` holds the data set's
        category mapping when the checkpoint has one (else ``None``).
    """
    ckpt = read_checkpoint(checkpoint) if not isinstance(checkpoint, Mapping) else checkpoint
    if not isinstance(ckpt, Mapping) or "build_args" not in ckpt or "model" not in ckpt:
        keys = list(ckpt)[:8] if isinstance(ckpt, Mapping) else type(ckpt).__name__
        raise ValueError(f"{checkpoint} is not a detector checkpoint: expected keys 'model' and 'build_args', found {keys}")
    model = rebuild_detector(ckpt["build_args"])
    model.load_state_dict(ckpt["model"], strict=True)
    model.category_mapping = ckpt.get("category_mapping")
    return model.to(device).eval()
