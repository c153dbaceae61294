"""A faster CPU RoIAlign, equal to ``torchvision.ops.roi_align``, and a pooler that uses it.

RoIAlign is linear in the features: every output bin is a weighted sum of at most
``4 * grid_h * grid_w`` feature pixels, with the same weights for every channel. The
weights (torchvision's bilinear rules, boundary handling and adaptive grid, transcribed
from its CPU kernel ``roi_align_kernel.cpp``) are built here as one vectorised index and
weight table, and the sums are done by ``torch.nn.functional.embedding_bag`` over a
channels-last copy of the features, so each gathered pixel is a contiguous ``C``-vector
and the work is multi-threaded. The backward pass is the transposed operator: the same
table sorted by pixel, run through ``embedding_bag`` again. torchvision's CPU backward
re-derives the weights for every (RoI, channel, bin) on one thread, which is where the
time went (see ``tools/bench_roi_align.py``).

Anything the fast path does not cover (CUDA and other devices, dtypes other than float32
and float64, quantized tensors, scripting, tracing, ``torch.compile``) is handed to
torchvision unchanged, so ``MultiScaleRoIAlign`` here is always a safe drop-in. Under CPU
autocast, as in torchvision's AutocastCPU kernel, pooling runs in float32 and the result
takes the features' dtype.
"""

from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.nn.modules.utils import _pair

try:  # private helpers of torchvision.ops; present from 0.13 through 0.29 at least
    from torchvision.ops._utils import check_roi_boxes_shape, convert_boxes_to_roi_format
    from torchvision.ops.poolers import _convert_to_roi_format, _filter_input, _multiscale_roi_align, _setup_scales

    _HAS_TV_HELPERS = True
except ImportError:  # pragma: no cover - a torchvision that renamed them keeps its own path
    _HAS_TV_HELPERS = False

__all__ = ["MultiScaleRoIAlign", "roi_align", "use_fast_roi_align"]

_FAST_DTYPES = (torch.float32, torch.float64)
# Index/weight entries built at once; bounds the temporary memory (about 40 bytes an entry).
_MAX_ENTRIES_PER_CHUNK = 1 << 22
# One RoI is never split; beyond this its adaptive grid is taken for a unit error, not a request.
_MAX_ENTRIES_PER_ROI = 1 << 25
_BINS_PER_SLICE = 1 << 14


def _fast_path_ok(tensors: list[Tensor]) -> bool:
    """Whether the embedding_bag path may replace torchvision's kernel for these tensors."""
    if torch.jit.is_scripting() or torch.jit.is_tracing() or torch.compiler.is_compiling():
        return False
    if torch.is_autocast_enabled("cpu"):
        return False
    dtype = tensors[0].dtype
    for t in tensors:
        if type(t) is not Tensor and not isinstance(t, nn.Parameter):
            return False  # fx proxies, tensor subclasses
        if t.device.type != "cpu" or t.dtype != dtype or t.is_quantized or t.layout != torch.strided:
            return False
    return dtype in _FAST_DTYPES


def _cpu_autocast(tensors: list[Tensor]) -> bool:
    """Whether CPU autocast applies, where torchvision's kernel pools in float32."""
    if torch.jit.is_scripting() or torch.jit.is_tracing() or torch.compiler.is_compiling():
        return False
    if not torch.is_autocast_enabled("cpu"):
        return False
    return all(type(t) is Tensor and t.device.type == "cpu" for t in tensors)


def _autocast_to_float(t: Tensor) -> Tensor:
    # Autocast's rule for float32 ops: lower-precision floats are cast up, float64 is kept.
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


@dataclass
class _Chunk:
    """Entries of RoIs ``roi_start, roi_start + 1, ...`` or, when given, of RoIs ``roi_ids``."""

    roi_start: int
    roi_ids: Optional[Tensor]  # [n] int64
    index: Tensor  # [n * ph * pw, E] int32/int64 rows of the channels-last feature table
    weight: Tensor  # [n * ph * pw, E] bilinear weight / sample count


@dataclass
class _Plan:
    num_rois: int
    bins_per_roi: int
    table_rows: int
    chunks: list[_Chunk]
    covers_all: bool  # every RoI is in a chunk (else the others pool to zeros)


def _axis_samples(
    start: Tensor,
    size: Tensor,
    pooled: int,
    grid: Tensor,
    grid_max: int,
    fixed_grid: bool,
    length: Tensor,
    index_dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """Sample rows (or columns) of every bin along one axis, as torchvision's kernel does.

    Returns ``index`` and ``weight`` of shape [n, pooled, grid_max, 2] (low and high corner).
    Out-of-range samples, and grid slots beyond a RoI's own grid, get weight 0.
    """
    dtype = start.dtype
    bin_size = size / pooled
    # Same operation order as the C++ kernel, so sample positions round identically:
    # start + p * bin + ((i + 0.5) * bin) / grid.
    base = start[:, None] + torch.arange(pooled, dtype=dtype)[None, :] * bin_size[:, None]
    step = (torch.arange(grid_max, dtype=dtype)[None, :] + 0.5) * bin_size[:, None] / grid.to(dtype)[:, None]
    pos = base[:, :, None] + step[:, None, :]
    length_f = length.to(dtype)[:, None, None]
    valid = (pos >= -1.0) & (pos <= length_f)
    if not fixed_grid:
        valid &= torch.arange(grid_max)[None, None, :] < grid[:, None, None]
    # Invalid samples (also NaN ones) read pixel 0 with weight 0, like the kernel.
    pos = torch.where(valid, pos, 0.0).clamp(min=0.0)
    low = pos.to(index_dtype)
    last = (length - 1).to(index_dtype)[:, None, None]
    at_edge = low >= last
    low = torch.where(at_edge, last, low)
    high = torch.where(at_edge, low, low + 1)
    frac = torch.where(at_edge, torch.zeros((), dtype=dtype), pos - low.to(dtype))
    zero = torch.zeros((), dtype=dtype)
    weight = torch.stack([torch.where(valid, 1.0 - frac, zero), torch.where(valid, frac, zero)], dim=-1)
    index = torch.stack([low, high], dim=-1)
    return index, weight


def _chunk_entries(
    params: dict[str, Tensor],
    pooled: tuple[int, int],
    grid_h: int,
    grid_w: int,
    fixed_grid: bool,
    index_dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """Table rows and weights of every (bin, sample, corner) of the RoIs in ``params``."""
    ph, pw = pooled
    n = params["x1"].shape[0]
    iy, wy = _axis_samples(
        params["y1"], params["h"], ph, params["grid_h"], grid_h, fixed_grid, params["height"], index_dtype
    )  # [n, ph, gh, 2]
    ix, wx = _axis_samples(
        params["x1"], params["w"], pw, params["grid_w"], grid_w, fixed_grid, params["width"], index_dtype
    )  # [n, pw, gw, 2]
    wy = wy / params["count"][:, None, None, None]
    row_start = params["offset"].to(index_dtype)[:, None, None, None] + iy * params["width"].to(index_dtype)[
        :, None, None, None
    ]
    # Entry order (sample y, sample x, corner y, corner x) within a bin is the kernel's
    # summation order. Each axis is expanded to all of a bin's entries first, so the final
    # broadcast runs over contiguous rows of entries instead of 7-d strides of 2.
    entries = grid_h * grid_w * 4
    y_shape = (n, ph, 1, grid_h, grid_w, 2, 2)
    x_shape = (n, 1, pw, grid_h, grid_w, 2, 2)
    row_start = row_start[:, :, None, :, None, :, None].expand(y_shape).reshape(n, ph, 1, entries)
    wy = wy[:, :, None, :, None, :, None].expand(y_shape).reshape(n, ph, 1, entries)
    ix = ix[:, None, :, None, :, None, :].expand(x_shape).reshape(n, 1, pw, entries)
    wx = wx[:, None, :, None, :, None, :].expand(x_shape).reshape(n, 1, pw, entries)
    index = row_start + ix
    weight = wy * wx
    return index.reshape(n * ph * pw, entries), weight.reshape(n * ph * pw, entries)


def _grid_class(grid: Tensor) -> Tensor:
    # Groups adaptive grids by size within a factor of sqrt(2), so padding every RoI of a
    # group to the group's largest grid wastes at most half the work.
    return torch.ceil(2.0 * torch.log2(grid.clamp(min=1).double())).to(torch.int64)


def _build_plan(
    features: list[Tensor],
    rois: Tensor,
    levels: Optional[Tensor],
    scales: list[float],
    output_size: tuple[int, int],
    sampling_ratio: int,
    aligned: bool,
) -> _Plan:
    """Index and weight tables of RoIAlign for ``rois`` [K, 5] over one or more levels."""
    dtype = features[0].dtype
    ph, pw = output_size
    num_rois = rois.shape[0]
    sizes = [f.shape[0] * f.shape[2] * f.shape[3] for f in features]
    table_rows = sum(sizes)
    index_dtype = torch.int32 if table_rows < 2**31 - 1 else torch.int64

    level_offset = torch.tensor([0] + sizes[:-1], dtype=torch.int64).cumsum(0)
    level_height = torch.tensor([f.shape[2] for f in features], dtype=torch.int64)
    level_width = torch.tensor([f.shape[3] for f in features], dtype=torch.int64)
    level_scale = torch.tensor(scales, dtype=dtype)
    if levels is None:
        levels = torch.zeros(num_rois, dtype=torch.int64)
    # torchvision's level mapper assumes consecutive pyramid levels; RoIs it maps past the
    # last map given are left as zeros there, and so here.
    on_a_level = levels < len(features)
    levels = levels.clamp(max=len(features) - 1)

    rois = rois.detach()
    batch = rois[:, 0].to(torch.int64)
    num_images = features[0].shape[0]
    if num_rois and (int(batch.min()) < 0 or int(batch.max()) >= num_images):
        raise ValueError(
            f"RoI batch indices must lie in [0, {num_images - 1}] for {num_images} images, "
            f"got {int(batch.min())}..{int(batch.max())}"
        )
    height = level_height[levels]
    width = level_width[levels]
    scale = level_scale[levels]
    offset = 0.5 if aligned else 0.0
    x1 = rois[:, 1] * scale - offset
    y1 = rois[:, 2] * scale - offset
    w = rois[:, 3] * scale - offset - x1
    h = rois[:, 4] * scale - offset - y1
    if not aligned:
        w = w.clamp(min=1.0)
        h = h.clamp(min=1.0)

    if sampling_ratio > 0:
        grid_h = torch.full((num_rois,), sampling_ratio, dtype=torch.int64)
        grid_w = grid_h
    else:
        # NaN boxes give no samples, as in the kernel's range test.
        grid_h = torch.nan_to_num(torch.ceil(h / ph), nan=0.0).clamp(0, 2**30).to(torch.int64)
        grid_w = torch.nan_to_num(torch.ceil(w / pw), nan=0.0).clamp(0, 2**30).to(torch.int64)
        per_roi = grid_h * grid_w * (ph * pw * 4)
        if num_rois and int(per_roi.max()) > _MAX_ENTRIES_PER_ROI:
            k = int(per_roi.argmax())
            raise ValueError(
                f"adaptive sampling (sampling_ratio={sampling_ratio}) would take {int(grid_h[k])}x{int(grid_w[k])} "
                f"samples per bin for RoI {k} of {float(h[k]):.4g}x{float(w[k]):.4g} feature pixels; "
                f"check the box coordinates and spatial_scale, or pass sampling_ratio > 0"
            )
    params = {
        "x1": x1,
        "y1": y1,
        "w": w,
        "h": h,
        "grid_h": grid_h,
        "grid_w": grid_w,
        "count": (grid_h * grid_w).clamp(min=1).to(dtype),
        "height": height,
        "width": width,
        "offset": level_offset[levels] + batch * height * width,
    }

    groups: list[tuple[Optional[Tensor], int, int]]
    if sampling_ratio > 0:
        members = None if bool(on_a_level.all()) else torch.nonzero(on_a_level).flatten()
        groups = [(members, sampling_ratio, sampling_ratio)]
    else:
        has_samples = (grid_h > 0) & (grid_w > 0) & on_a_level
        key = _grid_class(grid_h) * 64 + _grid_class(grid_w)
        key = torch.where(has_samples, key, -1)
        groups = []
        for k in torch.unique(key).tolist():
            if k < 0:
                continue  # RoIs without samples pool to zeros
            members = torch.nonzero(key == k).flatten()
            groups.append((members, int(grid_h[members].max()), int(grid_w[members].max())))

    bins_per_roi = ph * pw
    chunks: list[_Chunk] = []
    for members, gh, gw in groups:
        count = num_rois if members is None else members.numel()
        per_chunk = max(1, _MAX_ENTRIES_PER_CHUNK // (bins_per_roi * gh * gw * 4))
        for start in range(0, count, per_chunk):
            stop = min(start + per_chunk, count)
            roi_ids = None if members is None else members[start:stop]
            sel = slice(start, stop) if roi_ids is None else roi_ids
            index, weight = _chunk_entries(
                {k: v[sel] for k, v in params.items()}, output_size, gh, gw, sampling_ratio > 0, index_dtype
            )
            chunks.append(_Chunk(start, roi_ids, index, weight))
    covers_all = len(groups) == 1 and groups[0][0] is None
    return _Plan(num_rois, bins_per_roi, table_rows, chunks, covers_all)


def _channels_last_table(features: tuple[Tensor, ...]) -> Tensor:
    channels = features[0].shape[1]
    flat = [f.permute(0, 2, 3, 1).reshape(-1, channels) for f in features]
    return flat[0].contiguous() if len(flat) == 1 else torch.cat(flat, dim=0)


def _pool(plan: _Plan, table: Tensor, output_size: tuple[int, int]) -> Tensor:
    """[K, C, ph, pw] weighted sums of table rows."""
    channels = table.shape[1]
    shape = (plan.num_rois, channels, output_size[0], output_size[1])
    out = table.new_empty(shape) if plan.covers_all else table.new_zeros(shape)
    bins = plan.bins_per_roi
    # Pooling a few hundred RoIs at a time keeps each slice's [bins, C] result in cache
    # for its transpose into [K, C, ph, pw] (a third faster than one pass, measured).
    rois_per_slice = max(1, _BINS_PER_SLICE // bins)
    for chunk in plan.chunks:
        num = chunk.index.shape[0] // bins
        for start in range(0, num, rois_per_slice):
            stop = min(start + rois_per_slice, num)
            pooled = F.embedding_bag(
                chunk.index[start * bins : stop * bins],
                table,
                mode="sum",
                per_sample_weights=chunk.weight[start * bins : stop * bins],
            )
            pooled = pooled.view(stop - start, output_size[0], output_size[1], channels).permute(0, 3, 1, 2)
            if chunk.roi_ids is None:
                out[chunk.roi_start + start : chunk.roi_start + stop].copy_(pooled)
            else:
                out.index_copy_(0, chunk.roi_ids[start:stop], pooled)
    return out


def _unpool(plan: _Plan, grad: Tensor) -> Tensor:
    """[table_rows, C] transpose of ``_pool``: each table row sums the bins that read it."""
    chunks = plan.chunks
    if not chunks:
        return grad.new_zeros(plan.table_rows, grad.shape[1])
    single = len(chunks) == 1 and chunks[0].roi_ids is None
    index = chunks[0].index.flatten() if single else torch.cat([c.index.flatten() for c in chunks])
    weight = chunks[0].weight.flatten() if single else torch.cat([c.weight.flatten() for c in chunks])
    # Stable, so every pixel adds its bins in the kernel's (RoI, bin, sample) order.
    order = torch.argsort(index, stable=True)
    sorted_weight = weight[order]
    if single:
        bins = order.div_(chunks[0].index.shape[1], rounding_mode="floor")
    else:
        bin_ids = []
        for c in chunks:
            num = c.index.shape[0] // plan.bins_per_roi
            rois = torch.arange(c.roi_start, c.roi_start + num) if c.roi_ids is None else c.roi_ids
            first_bin = rois[:, None] * plan.bins_per_roi + torch.arange(plan.bins_per_roi)
            bin_ids.append(first_bin.reshape(-1, 1).expand_as(c.index).flatten())
        bins = torch.cat(bin_ids)[order]
    starts = torch.zeros(plan.table_rows, dtype=torch.int64)
    torch.cumsum(torch.bincount(index, minlength=plan.table_rows)[:-1], 0, out=starts[1:])
    return F.embedding_bag(bins, grad, starts, mode="sum", per_sample_weights=sorted_weight)


class _RoIAlignFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, plan: _Plan, output_size: tuple[int, int], *features: Tensor) -> Tensor:  # type: ignore[override]
        ctx.plan = plan
        ctx.shapes = [f.shape for f in features]
        return _pool(plan, _channels_last_table(features), output_size)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Optional[Tensor], ...]:  # type: ignore[override]
        channels = grad_output.shape[1]
        grad = grad_output.permute(0, 2, 3, 1).reshape(-1, channels)
        with torch.autocast("cpu", enabled=False):
            grad_table = _unpool(ctx.plan, grad)
        grads: list[Optional[Tensor]] = [None, None]
        start = 0
        for n, c, h, w in ctx.shapes:
            part = grad_table[start : start + n * h * w]
            grads.append(part.view(n, h, w, c).permute(0, 3, 1, 2).contiguous())
            start += n * h * w
        return tuple(grads)


def _pool_levels(
    features: list[Tensor],
    rois: Tensor,
    levels: Optional[Tensor],
    scales: list[float],
    output_size: tuple[int, int],
    sampling_ratio: int,
    aligned: bool,
) -> Tensor:
    plan = _build_plan(features, rois, levels, scales, output_size, sampling_ratio, aligned)
    return _RoIAlignFunction.apply(plan, output_size, *features)


@torch.fx.wrap
def roi_align(
    input: Tensor,
    boxes: Union[Tensor, list[Tensor]],
    output_size: Union[int, tuple[int, int], list[int]],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
) -> Tensor:
    """RoIAlign with exactly ``torchvision.ops.roi_align``'s arguments and results.

    On CPU float32/float64 tensors it runs the vectorised path of this module (forward
    and the gradient w.r.t. ``input``; like torchvision, no gradient reaches ``boxes``),
    and under CPU autocast also float16/bfloat16 ones, pooled in float32 as torchvision
    does; everything else goes to ``torchvision.ops.roi_align``.

    Args:
        input: Features [N, C, H, W].
        boxes: Tensor[K, 5] of (batch index, x1, y1, x2, y2), or a list of N Tensor[L, 4]
            of (x1, y1, x2, y2) per image, in the coordinates ``spatial_scale`` maps to
            ``input``.
        output_size: Pooled (height, width), or one int for both.
        spatial_scale: Factor from box coordinates to feature coordinates, e.g. 1/4.
        sampling_ratio: Sample points per bin along each axis; <= 0 uses
            ``ceil(roi_size / output_size)`` per RoI.
        aligned: Shift boxes by -0.5 pixel (Detectron2's RoIAlign) instead of the legacy
            rule that stretches RoIs to at least 1x1.

    Returns:
        Tensor[K, C, output_size[0], output_size[1]].
    """
    if not isinstance(boxes, Tensor):
        if not isinstance(boxes, (list, tuple)) or not all(isinstance(b, Tensor) for b in boxes):
            return torchvision.ops.roi_align(input, boxes, output_size, spatial_scale, sampling_ratio, aligned)
        tensors = [input, *boxes]
    else:
        tensors = [input, boxes]
    if _cpu_autocast(tensors):
        # As torchvision's AutocastCPU kernel: pool in float32, return the input's dtype.
        with torch.autocast("cpu", enabled=False):
            float_boxes = (
                _autocast_to_float(boxes) if isinstance(boxes, Tensor) else [_autocast_to_float(b) for b in boxes]
            )
            out = roi_align(_autocast_to_float(input), float_boxes, output_size, spatial_scale, sampling_ratio, aligned)
        return out.to(input.dtype)
    if not _HAS_TV_HELPERS or not _fast_path_ok(tensors):
        return torchvision.ops.roi_align(input, boxes, output_size, spatial_scale, sampling_ratio, aligned)
    check_roi_boxes_shape(boxes)
    rois = boxes if isinstance(boxes, Tensor) else convert_boxes_to_roi_format(boxes)
    if input.dim() != 4 or input.numel() == 0 or rois.dim() != 2 or rois.shape[1] != 5:
        return torchvision.ops.roi_align(input, boxes, output_size, spatial_scale, sampling_ratio, aligned)
    size = _pair(output_size)
    return _pool_levels([input], rois, None, [spatial_scale], (int(size[0]), int(size[1])), sampling_ratio, aligned)


class MultiScaleRoIAlign(torchvision.ops.MultiScaleRoIAlign):
    """``torchvision.ops.MultiScaleRoIAlign`` whose CPU pooling uses this module's RoIAlign.

    Same constructor, state and results; all levels are pooled in one pass over a joint
    channels-last table instead of one kernel call per level. Inputs the fast path does
    not cover fall back to torchvision's forward.

    Args:
        featmap_names: Names of the feature maps used for pooling.
        output_size: Pooled (height, width), or one int for both.
        sampling_ratio: Sample points per bin along each axis; <= 0 for adaptive.
        canonical_scale: ``canonical_scale`` of the FPN level mapper (224 in the paper).
        canonical_level: ``canonical_level`` of the FPN level mapper (k0 = 4).
    """

    def forward(
        self,
        x: dict[str, Tensor],
        boxes: list[Tensor],
        image_shapes: list[tuple[int, int]],
    ) -> Tensor:
        """Pool ``boxes`` from the level the FPN heuristic assigns to each.

        Args:
            x: Feature maps by name; those in ``featmap_names`` are used, in ``x``'s order.
            boxes: Per image, Tensor[L, 4] of (x1, y1, x2, y2) in image coordinates.
            image_shapes: (height, width) of each image before the backbone.

        Returns:
            Tensor[sum L, C, output_size[0], output_size[1]].
        """
        if torch.jit.is_scripting():
            # TorchScript cannot compile the autograd.Function path (or super()); this is
            # torchvision's own forward, so a scripted model behaves as torchvision's.
            x_filtered = _filter_input(x, self.featmap_names)
            if self.scales is None or self.map_levels is None:
                self.scales, self.map_levels = _setup_scales(
                    x_filtered, image_shapes, self.canonical_scale, self.canonical_level
                )
            return _multiscale_roi_align(
                x_filtered, boxes, self.output_size, self.sampling_ratio, self.scales, self.map_levels
            )
        return self._forward_eager(x, boxes, image_shapes)

    @torch.jit.unused
    def _forward_eager(
        self,
        x: dict[str, Tensor],
        boxes: list[Tensor],
        image_shapes: list[tuple[int, int]],
    ) -> Tensor:
        if (
            not _HAS_TV_HELPERS
            or not isinstance(x, dict)
            or not isinstance(boxes, (list, tuple))
            or not all(isinstance(v, Tensor) for v in x.values())  # fx proxies
        ):
            return super().forward(x, boxes, image_shapes)
        x_filtered = _filter_input(x, self.featmap_names)
        if x_filtered and _cpu_autocast([*x_filtered, *boxes]):
            dtype = x_filtered[0].dtype
            if any(f.dtype != dtype for f in x_filtered):
                return super().forward(x, boxes, image_shapes)
            # torchvision pools each level in float32 (its AutocastCPU kernel) and stores
            # the result in the first level's dtype; one float32 pass gives the same.
            with torch.autocast("cpu", enabled=False):
                out = self._forward_eager(
                    {k: _autocast_to_float(v) for k, v in x.items()},
                    [_autocast_to_float(b) for b in boxes],
                    image_shapes,
                )
            return out.to(dtype)
        if (
            not x_filtered
            or not boxes
            or not _fast_path_ok([*x_filtered, *boxes])
            or any(f.dim() != 4 or f.numel() == 0 or f.shape[:2] != x_filtered[0].shape[:2] for f in x_filtered)
            or any(b.dim() != 2 or b.shape[1] != 4 for b in boxes)
        ):
            return super().forward(x, boxes, image_shapes)
        if self.scales is None or self.map_levels is None:
            self.scales, self.map_levels = _setup_scales(
                x_filtered, image_shapes, self.canonical_scale, self.canonical_level
            )
        rois = _convert_to_roi_format(boxes)
        levels = None if len(x_filtered) == 1 else self.map_levels(boxes)
        return _pool_levels(
            x_filtered, rois, levels, self.scales, self.output_size, self.sampling_ratio, aligned=False
        )


def use_fast_roi_align(model: nn.Module) -> int:
    """Swap every ``torchvision.ops.MultiScaleRoIAlign`` in ``model`` for this module's.

    Settings (featmap names, output size, sampling ratio, canonical scale and level) and
    already inferred scales carry over, so results are unchanged; on CUDA the new pooler
    defers to torchvision, so the swap is always safe. Subclasses of torchvision's pooler
    are left alone, since their forward may differ.

    Args:
        model: Any module, e.g. a torchvision ``FasterRCNN`` or ``MaskRCNN``
            (``roi_heads.box_roi_pool`` and ``roi_heads.mask_roi_pool``).

    Returns:
        How many poolers were replaced.
    """
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not torchvision.ops.MultiScaleRoIAlign:
                continue
            fast = MultiScaleRoIAlign(
                list(child.featmap_names),
                child.output_size,
                child.sampling_ratio,
                canonical_scale=child.canonical_scale,
                canonical_level=child.canonical_level,
            )
            fast.featmap_names = child.featmap_names
            fast.scales = child.scales
            fast.map_levels = child.map_levels
            fast.train(child.training)
            setattr(parent, name, fast)
            replaced += 1
    return replaced
