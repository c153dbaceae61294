"""Structured channel pruning of trained detectors, and pruned detectors as data.

Pruning removes whole channels (filters), so a pruned model is an ordinary network of
narrower ``Conv2d`` / ``BatchNorm2d`` / ``Linear`` layers that every runtime runs at full
speed. What makes it hard in a detector is coupling: channels that meet must go together.
Torch-Pruning's dependency graph (Fang et al., "DepGraph", CVPR 2023) finds the groups of
coupled channels by tracing autograd; this module decides what it traces and what each
group may lose:

* the **trunk**: a stage's residual sums tie the stem (for ``layer1``) or the projection
  shortcut to every block's second convolution and to every reader of the stage (the next
  stage, the pyramid's lateral); each block's inner width is a group of its own;
* the **pyramid**: the top-down sums tie every lateral (1x1) output together, and the
  heads, which are shared across levels, tie every level's output (the 3x3 convolutions,
  P6/P7) to the RPN head's (or RetinaNet's / FCOS's) input and to the box and mask heads'
  inputs: one width for every level, its importance summed over the levels;
* the **heads**: the RPN head's 3x3 convolution, the box head's two fully connected layers
  (``fc6``, ``fc7``), the mask head's convolutions and deconvolution, RetinaNet's and FCOS's
  towers.

Never pruned: the layers whose outputs leave the network (class logits, box deltas, the
RPN's per-anchor outputs, mask logits, centre-ness) and the stem's three input channels.
Torch-Pruning's detection example skips ``backbone.fpn`` and ``roi_heads`` and cannot
handle ``FrozenBatchNorm2d``: its graph cannot follow anchor sampling, NMS and RoI pooling.
Here the trace runs a forward of our own (``_trace_forward``) that calls the same modules
with the same channel flow and none of that logic, and FrozenBatchNorm2d layers become
BatchNorm2d for the trace (eval-mode BatchNorm is the same affine map) and return after.

A pruned model is data, not code: ``channel_plan`` lists the widths that differ from the
architecture its ``build_args`` describe (``{module name: {"out_channels": 64, ...}}``),
``detection.checkpoint`` stores it beside the state dict, and ``engine.channels.apply_channel_plan``
narrows a freshly built standard model to it before ``load_state_dict(strict=True)``.
No module is ever pickled. Pruning a file and fine-tuning it (``tools/prune.py``) is
``workflows.prune``.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torchvision.ops import FrozenBatchNorm2d

from engine.channels import plan_against, sync_descriptions, width_keys
from engine.files import unwrap

from .models import rebuild_detector

__all__ = [
    "IMPORTANCES",
    "MAC_SIZE",
    "SCOPES",
    "PruneResult",
    "PrunedGroup",
    "channel_plan",
    "check_prune_args",
    "count_macs",
    "prune_detector",
    "step_ratios",
]

logger = logging.getLogger(__name__)

SCOPES = ("trunk", "pyramid", "all")
IMPORTANCES = ("l1", "bn_scale", "taylor")
MAC_SIZE = (800, 1216)  # the network input the cost figures are for (height, width)
# The trace's input side: every level down to P7 (stride 128) is at least 1x1; GroupNorm layers (FCOS's
# towers, a "gn" trunk) pruned to one channel per group need more than one value, so P7 gets 2x2.
_TRACE_SIZE, _TRACE_SIZE_GN = 64, 160

@dataclass(frozen=True)
class PrunedGroup:
    """One group of coupled channels and what pruning left of it.

    Attributes:
        root: the layer whose output channels define the group.
        scope: ``"trunk"`` or ``"pyramid"`` (the feature pyramid and the heads).
        channels: its width before.
        kept: its width after.
        layers: every layer whose output (``name:out``) or input (``name:in``) channels
            the group prunes.
    """

    root: str
    scope: str
    channels: int
    kept: int
    layers: tuple[str, ...]


@dataclass
class PruneResult:
    """What ``prune_detector`` returns.

    Attributes:
        model: the pruned detector (``model.channel_plan`` holds ``plan``).
        plan: ``channel_plan(model)``: the widths that differ from the standard architecture.
        groups: every group of coupled channels in the scope, pruned or not.
        removed: ``{layer name: {"out": [indices], "in": [indices]}}``, the channels each
            layer lost, in the layer's indexing before pruning (an ``in`` of a fully
            connected layer after a flatten lists flattened features).
    """

    model: nn.Module
    plan: dict[str, dict[str, int]]
    groups: list[PrunedGroup]
    removed: dict[str, dict[str, list[int]]]


def check_prune_args(*, ratio: Any, scope: Any = "all", importance: Any = "l1", round_to: Any = 1, steps: Any = 1) -> None:
    """Raise ``ValueError`` for arguments ``prune_detector`` cannot use, naming the value and what is valid.

    Args:
        ratio: fraction of each group's channels to remove, in (0, 1).
        scope: one of ``SCOPES``.
        importance: one of ``IMPORTANCES``.
        round_to: kept widths are rounded to a multiple of this (a positive integer).
        steps: pruning steps (a positive integer).
    """
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio) or not 0 < ratio < 1:
        raise ValueError(f"ratio must be a number in (0, 1), the fraction of each layer's channels to remove, got {ratio!r}")
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {list(SCOPES)}, got {scope!r}")
    if importance not in IMPORTANCES:
        raise ValueError(f"importance must be one of {list(IMPORTANCES)}, got {importance!r}")
    for name, value in (("round_to", round_to), ("steps", steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def step_ratios(ratio: float, steps: int) -> list[float]:
    """Per-step ratios of iterative pruning: each step removes the same fraction of what is left.

    After ``steps`` steps a group keeps ``1 - ratio`` of its channels (up to rounding).

    Args:
        ratio: the overall fraction to remove, in (0, 1).
        steps: how many prune steps.
    """
    check_prune_args(ratio=ratio, steps=steps)
    per_step = 1 - (1 - ratio) ** (1 / steps)
    return [per_step] * steps


# ---------------------------------------------------------------------------------------------
# The channel plan: pruned widths as data (engine.channels), against the detector's standard architecture


def channel_plan(model: nn.Module) -> dict[str, dict[str, int]]:
    """The layer widths of ``model`` that differ from the architecture its ``build_args`` describe.

    Args:
        model: a detector from ``build_detector`` / ``load_detector``, pruned or not.

    Returns:
        ``{module name: {width attribute: value}}`` (e.g. ``{"backbone.body.layer1.0.conv1":
        {"in_channels": 32, "out_channels": 16}}``); empty for an unpruned model.

    Raises:
        ValueError: the model has no ``build_args``, or differs from its standard
            architecture in more than widths.
    """
    build_args = getattr(unwrap(model), "build_args", None)
    if not isinstance(build_args, Mapping):
        raise ValueError("model has no build_args: build it with detection.build_detector (or load_detector)")
    return plan_against(model, rebuild_detector(build_args))


# ---------------------------------------------------------------------------------------------
# Pruning


def _trace_forward(model: nn.Module, x: Tensor) -> list[Tensor]:
    """Every prunable layer, in the detector's channel flow, without its sampling, NMS or RoI pooling.

    The pyramid levels go through the heads exactly as in the real forward (one shared
    head called on each level, so every level is tied to it); the box and mask heads get
    each pooled level's features summed, as an RoI pooler feeds them whichever level an
    RoI falls on. Each returned tensor is a copy, so the graph marks the layer that made
    it as an output layer (a layer's own output tensor would be taken for the layer).
    """
    return [t.clone() for t in _head_outputs(model, x)]


def _head_outputs(model: nn.Module, x: Tensor) -> list[Tensor]:
    feats = model.backbone(x)
    levels = list(feats.values())
    outputs: list[Tensor] = []
    if hasattr(model, "rpn"):
        objectness, deltas = model.rpn.head(levels)
        outputs += objectness + deltas
        heads = model.roi_heads
        pooled = sum(F.adaptive_avg_pool2d(feats[n], heads.box_roi_pool.output_size) for n in heads.box_roi_pool.featmap_names)
        outputs += list(heads.box_predictor(heads.box_head(pooled)))
        if getattr(heads, "mask_predictor", None) is not None:
            size = heads.mask_roi_pool.output_size
            pooled = sum(F.adaptive_avg_pool2d(feats[n], size) for n in heads.mask_roi_pool.featmap_names)
            outputs.append(heads.mask_predictor(heads.mask_head(pooled)))
        return outputs
    cls_head, reg_head = model.head.classification_head, model.head.regression_head
    for level in levels:
        outputs.append(cls_head.cls_logits(cls_head.conv(level)))
        features = reg_head.conv(level)
        outputs.append(reg_head.bbox_reg(features))
        if hasattr(reg_head, "bbox_ctrness"):  # FCOS
            outputs.append(reg_head.bbox_ctrness(features))
    return outputs


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _frozen_to_batchnorm(model: nn.Module) -> list[str]:
    """Swap every FrozenBatchNorm2d for an eval-mode BatchNorm2d with the same numbers; return their names."""
    names = []
    for name, m in list(model.named_modules()):
        if isinstance(m, FrozenBatchNorm2d):
            bn = nn.BatchNorm2d(m.weight.shape[0], eps=m.eps).to(m.weight.device).eval()
            with torch.no_grad():
                bn.weight.copy_(m.weight)
                bn.bias.copy_(m.bias)
                bn.running_mean.copy_(m.running_mean)
                bn.running_var.copy_(m.running_var)
            _replace(model, name, bn)
            names.append(name)
    return names


def _batchnorm_to_frozen(model: nn.Module, names: Iterable[str]) -> None:
    for name in names:
        bn = model.get_submodule(name)
        frozen = FrozenBatchNorm2d(bn.num_features, eps=bn.eps).to(bn.weight.device)
        with torch.no_grad():
            frozen.weight.copy_(bn.weight)
            frozen.bias.copy_(bn.bias)
            frozen.running_mean.copy_(bn.running_mean)
            frozen.running_var.copy_(bn.running_var)
        _replace(model, name, frozen)


def _taylor_gradients(model: nn.Module, batches: Iterable[Any]) -> int:
    """Accumulate the training loss's gradients over ``batches``; BatchNorm statistics are left as they are."""
    model.train()
    for m in model.modules():
        if isinstance(m, _BatchNorm):
            m.eval()  # batch statistics would change the running ones and the map being scored
    count = 0
    device = next(model.parameters()).device
    for images, targets in batches:
        images = [img.to(device) for img in images]
        targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
        losses = model(images, targets)
        sum(losses.values()).backward()
        count += 1
    model.eval()
    return count


def _importance(kind: str) -> Any:
    import torch_pruning as tp

    # Summed over every layer of a group (each pyramid level's convolution, the heads' inputs):
    # channels are ranked within a group, so no normaliser is needed.
    if kind == "l1":
        return tp.importance.GroupMagnitudeImportance(p=1, group_reduction="sum", normalizer=None)
    if kind == "bn_scale":
        return tp.importance.BNScaleImportance(group_reduction="sum", normalizer=None)
    return tp.importance.GroupTaylorImportance(group_reduction="sum", normalizer=None)


def _kept(channels: int, ratio: float, round_to: int) -> int:
    keep = int(math.floor(channels * (1 - ratio) + 0.5))
    if round_to > 1 and channels > round_to:
        keep = min(channels, max(round_to, int(math.floor(keep / round_to + 0.5)) * round_to))
    return keep


def _describe(name: str, layers: Sequence[str]) -> str:
    shown = ", ".join(layers[:4]) + (f" and {len(layers) - 4} more" if len(layers) > 4 else "")
    return f"{name} (with {shown})"


def prune_detector(
    model: nn.Module,
    *,
    ratio: float,
    scope: str = "all",
    importance: str = "l1",
    batches: Iterable[Any] | None = None,
    round_to: int = 1,
    inplace: bool = False,
) -> PruneResult:
    """Remove the least important ``ratio`` of every group of coupled channels in ``scope``.

    Args:
        model: a detector from ``build_detector`` / ``load_detector`` (Faster R-CNN,
            Mask R-CNN, RetinaNet or FCOS), pruned before or not.
        ratio: fraction of each group's channels to remove, in (0, 1); a group of C
            channels keeps ``round(C * (1 - ratio))``.
        scope: ``"trunk"`` (the ResNet), ``"pyramid"`` (the feature pyramid and every
            head: where two thirds of an R18 detector's cost are) or ``"all"``.
        importance: how channels are ranked within a group: ``"l1"`` (weight magnitude,
            summed over the group's layers), ``"bn_scale"`` (BatchNorm scale |gamma|;
            groups without BatchNorm, i.e. the pyramid and heads, fall back to ``"l1"``)
            or ``"taylor"`` (|weight x gradient| of the training loss over ``batches``).
        batches: ``(images, targets)`` pairs as the detector's training forward takes
            them; needed for ``"taylor"``, ignored otherwise.
        round_to: round kept widths to a multiple of this (groups narrower than it are
            left alone); 1 keeps ``round(C * (1 - ratio))`` exactly.
        inplace: prune ``model`` itself rather than a copy.

    Returns:
        A ``PruneResult``; the model is in eval mode, with ``channel_plan`` set.

    Raises:
        ValueError: an argument out of range, ``"taylor"`` without batches, or a ratio
            that would remove every channel of a group (the message names the layer).
    """
    import torch_pruning as tp

    check_prune_args(ratio=ratio, scope=scope, importance=importance, round_to=round_to)
    batches = list(batches) if batches is not None else None
    if importance == "taylor" and not batches:
        raise ValueError("importance 'taylor' needs a few training batches (batches=[(images, targets), ...])")
    model = unwrap(model)
    if not hasattr(model, "backbone") or not (hasattr(model, "rpn") or hasattr(model, "head")):
        raise ValueError(f"expected a detector from build_detector (Faster/Mask R-CNN, RetinaNet, FCOS), got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    frozen = _frozen_to_batchnorm(model)
    for p in model.parameters():
        p.requires_grad_(True)  # the trace follows autograd; frozen stages would be invisible to it
        p.grad = None
    try:
        if importance == "taylor":
            used = _taylor_gradients(model, batches or [])
            logger.info("taylor importance from %d batches", used)
            for p in model.parameters():
                if p.grad is None:
                    p.grad = torch.zeros_like(p)  # a layer the loss did not reach: no evidence it matters
        device = next(model.parameters()).device
        side = _TRACE_SIZE_GN if any(isinstance(m, nn.GroupNorm) for m in model.modules()) else _TRACE_SIZE
        example = torch.randn(1, 3, side, side, device=device)
        with torch.enable_grad():
            graph = tp.DependencyGraph().build_dependency(model, example_inputs=example, forward_fn=_trace_forward, verbose=False)
        names = {m: n for n, m in model.named_modules()}
        # The layers whose outputs leave the network: classes, box deltas, anchors' objectness, masks.
        outputs = [node.module for node in graph.module2node.values()
                   if isinstance(node.module, nn.Module) and node.module in names
                   and any(o.type == tp.ops.OPTYPE.OUTPUT for o in node.outputs)]
        scorer, fallback = _importance(importance), _importance("l1")
        planned = []
        for group in graph.get_all_groups(ignored_layers=outputs, root_module_types=[_ConvNd, nn.Linear]):
            root_dep = group[0].dep
            root = root_dep.target.module
            layers, chunks = [], 1
            for dep, _ in group:
                target = dep.target.module
                if target in names:
                    layers.append(f"{names[target]}:{'out' if graph.is_out_channel_pruning_fn(dep.handler) else 'in'}")
                if isinstance(target, nn.GroupNorm):
                    chunks = math.lcm(chunks, target.num_groups)
            out_layers = [n for n in layers if n.endswith(":out")]
            in_scope = "trunk" if any(n.startswith("backbone.body.") for n in out_layers) else "pyramid"
            channels = graph.get_out_channels(root)
            if scope not in ("all", in_scope):
                planned.append((PrunedGroup(names[root], in_scope, channels, channels, tuple(layers)), None))
                continue
            size = channels // chunks
            keep = _kept(size, ratio, round_to if chunks == 1 else 1)
            if keep < 1:
                unit = f"each of its {chunks} GroupNorm groups of {size} channels" if chunks > 1 else f"its {channels} channels"
                raise ValueError(f"ratio {ratio} would remove every channel of {_describe(names[root], layers)}: "
                                 f"{unit} would keep none; use a ratio below {1 - 0.5 / size:.4g} or a narrower scope")
            scores = scorer(group)
            if scores is None:  # bn_scale on a group without BatchNorm
                scores = fallback(group)
            per_position = scores.float().view(chunks, size).sum(0)
            dropped = torch.argsort(per_position, stable=True)[: size - keep].tolist()
            indices = sorted(p + c * size for c in range(chunks) for p in dropped)
            planned.append((PrunedGroup(names[root], in_scope, channels, keep * chunks, tuple(layers)), (root, root_dep.handler, indices)))
        if not any(prune is not None and prune[2] for _, prune in planned):
            raise ValueError(f"ratio {ratio} with scope {scope!r} removes no channel: every group in scope is too narrow "
                             f"(raise the ratio or lower round_to)")
        order = {name: i for i, name in enumerate(names.values())}
        planned.sort(key=lambda entry: order[entry[0].root])  # the model's own order, for reports
        removed: dict[str, dict[str, list[int]]] = {}
        for _, prune in planned:
            if prune is None or not prune[2]:
                continue
            group = graph.get_pruning_group(*prune)
            for dep, idxs in group:
                target = dep.target.module
                if target in names and isinstance(target, nn.Module) and width_keys(target) is not None:
                    side = "out" if graph.is_out_channel_pruning_fn(dep.handler) else "in"
                    removed.setdefault(names[target], {}).setdefault(side, []).extend(int(i) for i in idxs)
            group.prune()
    finally:
        for p in model.parameters():
            p.grad = None
    _batchnorm_to_frozen(model, frozen)
    for name, p in model.named_parameters():
        p.requires_grad_(trainable.get(name, True))
    sync_descriptions(model)
    model.eval()
    plan = channel_plan(model)
    model.channel_plan = plan
    groups = [g for g, _ in planned]
    logger.info("pruned %d of %d groups of coupled channels (ratio %s, scope %s, importance %s)",
                sum(1 for g in groups if g.kept < g.channels), len(groups), ratio, scope, importance)
    return PruneResult(model, plan, groups, {k: {s: sorted(v) for s, v in d.items()} for k, d in removed.items()})


# ---------------------------------------------------------------------------------------------
# What it costs


def count_macs(model: nn.Module, size: tuple[int, int] = MAC_SIZE) -> dict[str, float]:
    """Multiply-accumulates of one image through each part of a detector, counted without computing (meta tensors).

    The network input is ``size`` (after the model's own resize). The R-CNN box head is
    counted on the RPN's test-time proposal count (``rpn_post_nms_top_n_test``), the mask
    head on ``box_detections_per_img`` RoIs; NMS, anchor decoding and RoI pooling are not
    counted.

    Args:
        model: a detector from ``build_detector`` / ``load_detector``, pruned or not.
        size: ``(height, width)`` of the network input.

    Returns:
        ``{"trunk", "pyramid", "rpn_head", "box_head", "mask_head", "head", "total"}`` in MACs
        (only the parts the model has).
    """
    from torch.utils.flop_counter import FlopCounterMode

    model = copy.deepcopy(unwrap(model)).to("meta").eval()
    parts: dict[str, float] = {}

    def counted(part: str, fn: Any, *args: Any) -> Any:
        with FlopCounterMode(display=False) as counter:
            out = fn(*args)
        parts[part] = parts.get(part, 0.0) + counter.get_total_flops() / 2
        return out

    with torch.no_grad():
        feats = counted("trunk", model.backbone.body, torch.empty(1, 3, *size, device="meta"))
        levels = counted("pyramid", model.backbone.fpn, feats)
        channels = next(iter(levels.values())).shape[1]
        if hasattr(model, "rpn"):
            counted("rpn_head", model.rpn.head, list(levels.values()))
            heads = model.roi_heads
            rois = int(model.rpn._post_nms_top_n["testing"])
            pooled = torch.empty(rois, channels, *heads.box_roi_pool.output_size, device="meta")
            counted("box_head", lambda t: heads.box_predictor(heads.box_head(t)), pooled)
            if getattr(heads, "mask_predictor", None) is not None:
                pooled = torch.empty(int(heads.detections_per_img), channels, *heads.mask_roi_pool.output_size, device="meta")
                counted("mask_head", lambda t: heads.mask_predictor(heads.mask_head(t)), pooled)
        else:
            counted("head", model.head, list(levels.values()))
    parts["total"] = sum(parts.values())
    return parts
