"""Channel plans: a narrowed network's layer widths as data, and the surgery that gives a built network those widths.

A pruned model is data, not code: its **channel plan** lists the widths that differ from
the architecture it was built from (``{module name: {width attribute: value}}``, e.g.
``{"backbone.body.layer1.0.conv1": {"in_channels": 32, "out_channels": 16}}``). A
checkpoint stores the plan beside the state dict; ``apply_channel_plan`` narrows a freshly
built standard model to it before ``load_state_dict(strict=True)``. No module is ever
pickled.

This module knows ``nn.Module`` widths only (``Conv``, ``ConvTranspose``, ``Linear``,
``BatchNorm``, ``FrozenBatchNorm2d``, ``GroupNorm``), not which model they belong to: the
task that owns a model rebuilds its standard architecture and passes it to
``plan_against`` (``detection.pruning.channel_plan``), and its checkpoint loader calls
``apply_channel_plan`` (``detection.checkpoint``). It sits below both, so the pruning
algorithm and the file format share it without importing each other.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torchvision.ops import FrozenBatchNorm2d

from .files import unwrap

__all__ = ["WIDTH_KEYS", "apply_channel_plan", "plan_against", "sync_descriptions", "width_keys", "widths"]

# The attributes that hold a layer's widths, per layer type: what a channel plan records.
WIDTH_KEYS: tuple[tuple[type, tuple[str, ...]], ...] = (
    (_ConvNd, ("in_channels", "out_channels")),
    (nn.Linear, ("in_features", "out_features")),
    (_BatchNorm, ("num_features",)),
    (FrozenBatchNorm2d, ("num_features",)),
    (nn.GroupNorm, ("num_channels",)),
)


def width_keys(module: nn.Module) -> tuple[str, ...] | None:
    """The width attributes a channel plan records for ``module``, or ``None`` for a layer without widths.

    Args:
        module: any module.
    """
    for kind, keys in WIDTH_KEYS:
        if isinstance(module, kind):
            return keys
    return None


def widths(module: nn.Module) -> dict[str, int]:
    """``{width attribute: value}`` of a layer (empty for a module without widths).

    Args:
        module: any module; a ``FrozenBatchNorm2d``'s width is read from its buffers.
    """
    if isinstance(module, FrozenBatchNorm2d):
        return {"num_features": int(module.weight.shape[0])}
    return {key: int(getattr(module, key)) for key in width_keys(module) or ()}


def plan_against(model: nn.Module, reference: nn.Module) -> dict[str, dict[str, int]]:
    """The layer widths of ``model`` that differ from ``reference``, its standard architecture.

    Args:
        model: a network, narrowed or not (possibly DDP-wrapped).
        reference: the same architecture built at its standard widths.

    Returns:
        ``{module name: {width attribute: value}}``; empty when no width differs.

    Raises:
        ValueError: ``model`` has a layer with widths that ``reference`` lacks or holds as
            another type: only widths may differ.
    """
    ref_modules = dict(unwrap(reference).named_modules())
    plan: dict[str, dict[str, int]] = {}
    for name, module in unwrap(model).named_modules():
        if width_keys(module) is None:
            continue
        ref = ref_modules.get(name)
        if ref is None or type(ref) is not type(module):
            raise ValueError(f"{name} ({type(module).__name__}) is not in the architecture build_args describe: only widths may differ")
        found = widths(module)
        if found != widths(ref):
            plan[name] = found
    return plan


def _new_parameter(old: nn.Parameter, shape: Sequence[int]) -> nn.Parameter:
    return nn.Parameter(torch.zeros(tuple(shape), dtype=old.dtype, device=old.device), requires_grad=old.requires_grad)


def _resize(name: str, module: nn.Module, planned: Mapping[str, Any]) -> None:
    """Give ``module`` the widths of a plan entry: attributes and zero-filled tensors of the new shapes."""
    keys = width_keys(module)
    if keys is None:
        raise ValueError(f"channel plan entry {name} is a {type(module).__name__}, which has no widths to set")
    if not isinstance(planned, Mapping) or set(planned) != set(keys):
        raise ValueError(f"channel plan entry {name} ({type(module).__name__}) must set {list(keys)}, got {planned!r}")
    for key, value in planned.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"channel plan entry {name}: {key} must be a positive integer, got {value!r}")
    if isinstance(module, _ConvNd):
        cin, cout, groups = planned["in_channels"], planned["out_channels"], module.groups
        if cin % groups or cout % groups:
            raise ValueError(f"channel plan entry {name}: {cin} -> {cout} channels do not divide into {groups} groups")
        shape = (cin, cout // groups) if module.transposed else (cout, cin // groups)
        module.in_channels, module.out_channels = cin, cout
        module.weight = _new_parameter(module.weight, (*shape, *module.kernel_size))
        if module.bias is not None:
            module.bias = _new_parameter(module.bias, (cout,))
    elif isinstance(module, nn.Linear):
        module.in_features, module.out_features = planned["in_features"], planned["out_features"]
        module.weight = _new_parameter(module.weight, (module.out_features, module.in_features))
        if module.bias is not None:
            module.bias = _new_parameter(module.bias, (module.out_features,))
    elif isinstance(module, nn.GroupNorm):
        n = planned["num_channels"]
        if n % module.num_groups:
            raise ValueError(f"channel plan entry {name}: {n} channels do not divide into {module.num_groups} GroupNorm groups")
        module.num_channels = n
        if module.affine:
            module.weight, module.bias = _new_parameter(module.weight, (n,)), _new_parameter(module.bias, (n,))
    else:  # BatchNorm (parameters and statistics) or FrozenBatchNorm2d (buffers only)
        n = planned["num_features"]
        if isinstance(module, _BatchNorm):
            module.num_features = n
            if module.affine:
                module.weight, module.bias = _new_parameter(module.weight, (n,)), _new_parameter(module.bias, (n,))
            stats = ("running_mean", "running_var") if module.track_running_stats else ()
        else:
            stats = ("weight", "bias", "running_mean", "running_var")
        for buffer in stats:
            old = getattr(module, buffer)
            setattr(module, buffer, torch.zeros(n, dtype=old.dtype, device=old.device))


def sync_descriptions(model: nn.Module) -> None:
    """Make a backbone's published widths (``out_channels``, ``feature_info``) say what its pyramid now outputs.

    Args:
        model: a model with a ``backbone.fpn`` (``backbones.fpn.ResNetFPN``); others are left alone.
    """
    backbone = getattr(unwrap(model), "backbone", None)
    fpn = getattr(backbone, "fpn", None)
    if fpn is None:
        return
    convs = [m for m in fpn.layer_blocks[0].modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        return
    width = convs[0].out_channels
    backbone.out_channels = width
    info = getattr(backbone, "feature_info", None)
    if isinstance(info, list):
        backbone.feature_info = [dataclasses.replace(f, channels=width) if dataclasses.is_dataclass(f) else f for f in info]


def apply_channel_plan(model: nn.Module, plan: Mapping[str, Any]) -> nn.Module:
    """Narrow a standard model to a channel plan, in place, so a narrowed state dict loads with ``strict=True``.

    The weights become zeros of the planned shapes: load the narrowed state dict next.

    Args:
        model: a model built from the narrowed model's build arguments (possibly DDP-wrapped).
        plan: ``{module name: {width attribute: value}}``, what ``plan_against`` returned
            for the narrowed model.

    Returns:
        ``model``, with ``channel_plan`` set on the unwrapped model.

    Raises:
        ValueError: the plan is not a mapping of module names to widths, names a module the
            model lacks, or sets widths a layer cannot take.
    """
    if not isinstance(plan, Mapping):
        raise ValueError(f"a channel plan is a mapping of module names to widths, got {type(plan).__name__}")
    inner = unwrap(model)
    modules = dict(inner.named_modules())
    for name, planned in plan.items():
        if name not in modules:
            raise ValueError(f"the channel plan names {name!r}, which this {type(inner).__name__} has no module of")
        _resize(name, modules[name], planned)
    sync_descriptions(inner)
    inner.channel_plan = {name: dict(planned) for name, planned in plan.items()}
    return model
