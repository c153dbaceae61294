"""Detector export: the graph an exported detector file computes, its metadata, and int8 calibration images.

An exported ONNX file is self-contained: it takes one image as float32 ``[3, H, W]``
RGB in [0, 1] of any size, and returns ``boxes`` (``[N, 4]`` xyxy in that image's
pixels), ``labels`` (int64 contiguous labels 1..K, as the PyTorch model gives),
``scores`` and, for Mask R-CNN, ``mask_probs`` (``[N, 1, 28, 28]`` probabilities inside
each box, which ``deploy.runtime`` pastes into the image as torchvision does: a
few lines outside the graph, much faster than ONNX's per-detection loop). The
detector's own resize and normalisation are inside the graph, with the resize factor
computed in float64 as eager PyTorch computes it (torchvision's traced path uses
float32, which resizes some sizes one pixel differently). The file's ``metadata_props``
carry what a runtime needs: class names, the data set's category ids, the input
convention, the architecture and the size it was traced at (``deploy.onnx_meta.read_metadata``).
A Faster/Mask R-CNN file runs with the test-time proposal counts and the cap on
candidates entering the box NMS (``detection.postprocess``) of the model it was exported
from: they are baked in, and recorded in the metadata (``test_options``).

``deploy.export`` calls this module for detectors (``export_onnx``, ``export_torchscript``,
``export_checkpoint``) and ``deploy.segmenter`` for segmenters; both build on
``deploy.onnx_meta`` and neither imports the other.
"""

import copy
import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.onnx import operators
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from detection.config import DEFAULTS
from detection.data import CocoDetection
from detection.models import has_masks as _predicts_masks
from detection.postprocess import read_test_options
from engine.roots import prepare_data_root

from .files import NMS_WITHOUT_BRANCH, publish, temporary_folder
from .onnx_meta import METADATA_VERSION, ExportError, check_opset, require, set_metadata, write_torchscript

__all__ = [
    "INPUT_CONVENTION",
    "DeployedDetector",
    "calibration_images",
    "export_detector_onnx",
    "export_detector_torchscript",
    "is_detector",
]

INPUT_CONVENTION = {"name": "image", "layout": "CHW", "batch": 1, "color": "RGB", "dtype": "float32", "range": [0.0, 1.0]}


def is_detector(model: Any) -> bool:
    """Whether ``model`` looks like a torchvision detector from ``detection.build_detector`` (a ``transform`` and a ``backbone``)."""
    return hasattr(model, "transform") and hasattr(model, "backbone")


class _ExportTransform(GeneralizedRCNNTransform):
    """torchvision's transform whose traced resize computes the new size in float64, as eager does."""

    def resize(self, image: Tensor, target: Optional[dict[str, Tensor]] = None) -> tuple[Tensor, Optional[dict[str, Tensor]]]:
        if not torch.jit.is_tracing() or self.fixed_size is not None:
            return super().resize(image, target)
        if target is not None:
            raise ExportError("export traces inference only (no targets)")
        shape = operators.shape_as_tensor(image)[-2:]
        short, long = shape.amin(0, keepdim=True), shape.amax(0, keepdim=True)
        # One-element tensors, not Python scalars (the exporter does scalar arithmetic in float32). The branch
        # is chosen in exact integers, then eager's float64 factor and floor reproduce its size exactly.
        min_size = torch.full((1,), int(self.min_size[-1]), dtype=torch.int64)
        max_size = torch.full((1,), int(self.max_size), dtype=torch.int64)
        by_short = min_size * long <= max_size * short
        scale = torch.where(by_short, min_size, max_size).to(torch.float64) / torch.where(by_short, short, long).to(torch.float64)
        size = torch.floor(shape.to(torch.float64) * scale).to(torch.int64)
        image = F.interpolate(image[None], size=(size[0], size[1]), mode="bilinear", align_corners=False)[0]
        return image, target


class DeployedDetector(nn.Module):
    """One image in, detections out: what an exported file computes.

    Args:
        model: a torchvision detector from ``build_detector`` (eval mode).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        t = model.transform
        transform = _ExportTransform(t.min_size, t.max_size, t.image_mean, t.image_std, size_divisible=t.size_divisible, fixed_size=t.fixed_size)
        self.model = model
        self.model.transform = transform
        self.has_masks = _predicts_masks(model)

    def forward(self, image: Tensor) -> tuple[Tensor, ...]:
        if not self.has_masks:
            out = self.model([image])[0]
            return out["boxes"], out["labels"], out["scores"]
        # GeneralizedRCNN.forward, stopping before the masks are pasted into the image: pasting is a
        # per-detection Loop in ONNX that took longer than the whole network (Mask R-CNN R18 at
        # 800x1216: 4.3 s in OpenVINO vs 2.0 s eager), and a few lines of numpy/torch outside.
        m = self.model
        shape = image.shape[-2:]
        images, _ = m.transform([image])
        features = m.backbone(images.tensors)
        proposals, _ = m.rpn(images, features)
        detections, _ = m.roi_heads(features, proposals, images.image_sizes)
        det = detections[0]
        mask_probs = det.pop("masks")
        out = m.transform.postprocess([det], images.image_sizes, [(shape[0], shape[1])])[0]
        return out["boxes"], out["labels"], out["scores"], mask_probs


def _batched_nms_without_branch(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """torchvision's ``batched_nms`` (coordinate trick) with no ``if boxes.numel() == 0`` branch, for tracing.

    torchvision returns an empty constant from that branch, which exports as an ONNX
    ``If``; OpenVINO (2026.x CPU) gives such an ``If`` one element instead of none, so an
    image with no detection came out of it with one invented row (label 0, a zero box).
    Here the maximum is taken over the boxes and a zero, which is defined when there is
    no box and equal to torchvision's otherwise (boxes are clipped to the image, so >= 0);
    ``nms`` of no box keeps none.
    """
    import torchvision

    max_coordinate = torch.cat([boxes.reshape(-1), boxes.new_zeros(1)]).max()
    offsets = idxs.to(boxes) * (max_coordinate + 1)
    return torchvision.ops.nms(boxes + offsets[:, None], scores, iou_threshold)


class _branchless_nms:
    """While tracing, torchvision's detectors call ``_batched_nms_without_branch`` (they look ``batched_nms`` up at call time)."""

    def __enter__(self) -> None:
        from torchvision.ops import boxes as box_ops

        self.box_ops, self.saved = box_ops, box_ops.batched_nms
        box_ops.batched_nms = _batched_nms_without_branch

    def __exit__(self, *exc: Any) -> None:
        self.box_ops.batched_nms = self.saved


def _output_names(has_masks: bool) -> list[str]:
    return ["boxes", "labels", "scores"] + (["mask_probs"] if has_masks else [])


def _export_size(model: nn.Module) -> tuple[int, int]:
    """A landscape sample at the model's own scale (short side ``min_size``, 4:3, within ``max_size``)."""
    t = model.transform
    short = int(t.min_size[-1])
    return short, min(int(t.max_size), (short * 4 + 2) // 3)


def _category_mapping(model: nn.Module, category_mapping: Optional[Mapping[str, Any]]) -> Optional[dict[str, Any]]:
    mapping = category_mapping if category_mapping is not None else getattr(model, "category_mapping", None)
    if mapping is None:
        return None
    if not isinstance(mapping, Mapping) or "cat_ids" not in mapping:
        raise ExportError(f"category_mapping must be a dict with 'cat_ids' (and 'names'), got {mapping!r}")
    return {"cat_ids": [int(c) for c in mapping["cat_ids"]], "names": [str(n) for n in mapping.get("names", [])]}


def _metadata(model: nn.Module, *, has_masks: bool, opset: int, export_size: tuple[int, int], mapping: Optional[dict[str, Any]]) -> dict[str, str]:
    import torchvision

    build_args = getattr(model, "build_args", {}) or {}
    t = model.transform
    return {
        "resfpn.metadata_version": METADATA_VERSION,
        "resfpn.task": "detection",
        "resfpn.arch": str(build_args.get("arch", type(model).__name__)),
        "resfpn.backbone": str(build_args.get("backbone", "")),
        "resfpn.num_classes": str(build_args.get("num_classes", "")),
        "resfpn.category_mapping": json.dumps(mapping),
        "resfpn.class_names": json.dumps(mapping["names"] if mapping else None),
        "resfpn.category_ids": json.dumps(mapping["cat_ids"] if mapping else None),
        "resfpn.input": json.dumps(INPUT_CONVENTION),
        "resfpn.outputs": json.dumps(_output_names(has_masks)),
        "resfpn.labels": "contiguous 1..K; label i is class_names[i-1] and category_ids[i-1]",
        "resfpn.masks": json.dumps(
            "mask_probs [N, 1, M, M]: each detection's mask probabilities inside its box; paste them into the image "
            "as torchvision.models.detection.roi_heads.paste_masks_in_image does (deploy.runtime.load_exported does)"
            if has_masks else None),
        "resfpn.resize": json.dumps({"min_size": int(t.min_size[-1]), "max_size": int(t.max_size), "size_divisible": int(t.size_divisible),
                                     "image_mean": list(t.image_mean), "image_std": list(t.image_std)}),
        "resfpn.export_size": json.dumps(list(export_size)),
        "resfpn.opset": str(opset),
        "resfpn.precision": "fp32",
        "resfpn.build_args": json.dumps(build_args, default=str),
        # What the file runs with, baked in at export (set_test_options may have changed them since the build).
        "resfpn.test_options": json.dumps(read_test_options(model)),
        # The checkpoint's training config (data path and splits): evaluation finds the validation split by it.
        "resfpn.train_config": json.dumps(getattr(model, "train_config", None), default=str),
        "resfpn.exporter": f"torch {torch.__version__}, torchvision {torchvision.__version__}, TorchScript-based exporter",
    }


def _check_roi_align(proto: Any, model: nn.Module) -> list[str]:
    """Every exported RoiAlign must state the coordinate mode of the pooler it came from."""
    from torchvision.ops import RoIAlign

    aligned = {bool(m.aligned) for m in model.modules() if isinstance(m, RoIAlign)}
    # torchvision's MultiScaleRoIAlign always pools with aligned=False.
    expected = "half_pixel" if aligned == {True} else "output_half_pixel"
    modes = []
    for node in proto.graph.node:
        if node.op_type == "RoiAlign":
            attrs = {a.name: a for a in node.attribute}
            mode = attrs["coordinate_transformation_mode"].s.decode() if "coordinate_transformation_mode" in attrs else None
            if mode != expected:
                raise ExportError(f"exported RoiAlign {node.name} has coordinate_transformation_mode={mode!r}, expected {expected!r}")
            modes.append(mode)
    return modes


def export_detector_onnx(
    model: nn.Module,
    output: "str | os.PathLike[str]",
    *,
    opset: int,
    category_mapping: Optional[Mapping[str, Any]] = None,
    export_size: Optional[tuple[int, int]] = None,
) -> tuple[Path, tuple[int, int]]:
    """Export a detector to one ONNX file (batch 1, any image size), written atomically; no log line.

    ``deploy.export.export_onnx`` calls it for detectors (and logs).

    Args:
        model: a detector from ``build_detector`` / ``load_detector``; it is not modified.
        output: destination ``.onnx`` file.
        opset: ONNX opset (``deploy.onnx_meta.check_opset``).
        category_mapping: ``{"cat_ids", "names"}`` to record; default ``model.category_mapping``.
        export_size: ``(height, width)`` of the sample traced; default the detector's own
            scale (short side ``min_size``, 4:3). The file accepts any size.

    Returns:
        The output path and the size traced.
    """
    onnx = require("onnx")
    check_opset(opset)
    if not is_detector(model):
        raise ExportError(f"expected a torchvision detector from detection.build_detector, got {type(model).__name__}")
    if hasattr(model, "optimized_for_inference"):
        raise ExportError("export the model itself, not an optimize_for_inference copy (its autocast and wrappers do not export)")
    output = Path(output)
    mapping = _category_mapping(model, category_mapping)
    deployed = DeployedDetector(copy.deepcopy(model).cpu().float().eval()).eval()
    size = tuple(export_size) if export_size is not None else _export_size(model)
    names = _output_names(deployed.has_masks)
    with temporary_folder(output) as tmp:
        raw = tmp / "raw.onnx"
        sample = torch.rand(3, *size, generator=torch.Generator().manual_seed(0))
        with warnings.catch_warnings(), torch.no_grad(), _branchless_nms():
            warnings.simplefilter("ignore")  # tracer and legacy-exporter notices about code paths torchvision handles
            torch.onnx.export(
                deployed, (sample,), str(raw), dynamo=False, opset_version=opset, input_names=["image"], output_names=names,
                dynamic_axes={"image": {1: "height", 2: "width"}, **{n: {0: "detections"} for n in names}},
                do_constant_folding=True,
            )
        proto = onnx.load(str(raw))
        modes = _check_roi_align(proto, model)
        meta = _metadata(model, has_masks=deployed.has_masks, opset=opset, export_size=size, mapping=mapping)
        meta["resfpn.roi_align"] = json.dumps(sorted(set(modes)))
        meta["resfpn.nms"] = NMS_WITHOUT_BRANCH
        set_metadata(proto, meta)
        proto.producer_name, proto.doc_string = "resfpn", f"{meta['resfpn.arch']} {meta['resfpn.backbone']}: image [3,H,W] RGB 0..1 -> boxes, labels, scores"
        final = tmp / "model.onnx"
        onnx.save(proto, str(final))
        publish(final, output)
    return output, size


def export_detector_torchscript(
    model: nn.Module, output: "str | os.PathLike[str]", *, category_mapping: Optional[Mapping[str, Any]] = None,
) -> Path:
    """Script a detector with ``torch.jit.script`` and save it atomically, metadata in ``resfpn.json``; no log line.

    The file loads with ``torch.jit.load`` (no resfpn needed); called on a list of images
    it returns ``(losses, detections)`` as scripted torchvision detectors do.
    ``deploy.export.export_torchscript`` calls it for detectors (and logs).

    Args:
        model: a detector from ``build_detector`` / ``load_detector``; it is not modified.
        output: destination ``.pt`` file.
        category_mapping: ``{"cat_ids", "names"}`` to record; default ``model.category_mapping``.

    Returns:
        The output path.
    """
    if not is_detector(model):
        raise ExportError(f"expected a torchvision detector from detection.build_detector, got {type(model).__name__}")
    mapping = _category_mapping(model, category_mapping)
    has_masks = _predicts_masks(model)
    meta = _metadata(model, has_masks=has_masks, opset=0, export_size=_export_size(model), mapping=mapping)
    meta.pop("resfpn.opset")
    meta["resfpn.outputs"] = json.dumps(["boxes", "labels", "scores"] + (["masks"] if has_masks else []))  # pasted by the model
    meta["resfpn.masks"] = json.dumps("masks [N, 1, H, W] probabilities in the image" if has_masks else None)
    meta["resfpn.input"] = json.dumps(dict(INPUT_CONVENTION, layout="list of CHW", batch="any"))
    return write_torchscript(copy.deepcopy(model).cpu().eval(), output, meta)


def calibration_images(
    *,
    config: Optional[Mapping[str, Any]] = None,
    data_path: "Optional[str | os.PathLike[str]]" = None,
    split: Optional[str] = None,
    count: int = 64,
) -> list[Tensor]:
    """Training images for int8 calibration, spread evenly over the split (deterministic).

    Args:
        config: the checkpoint's training config (``data_path``, ``train_split``,
            ``shapes_*``); with no ``data_path`` in it, the shapes set it was trained on.
        data_path: a COCO-layout root that overrides the config's.
        split: the split to read (default the config's training split).
        count: how many images (the split's size if smaller).

    Returns:
        float32 ``[3, H, W]`` images in [0, 1], at their own size.
    """
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise ExportError(f"int8 needs calibration images: calib_images must be a positive integer (e.g. 64), got {count!r}")
    if config is None and data_path is None:
        raise ExportError("int8 needs calibration images and the checkpoint records no training data: pass data_path (--data-path DIR)")
    cfg: dict[str, Any] = {**DEFAULTS, **dict(config or {})}
    if data_path is not None:
        cfg.update(data_path=str(data_path), train_split=split, val_split=None)
    try:
        root, train_split, _ = prepare_data_root(cfg)
        dataset = CocoDetection(root, split or train_split, exif_transpose=cfg["exif_transpose"])
    except (OSError, ValueError, KeyError) as e:
        raise ExportError(f"int8 needs calibration images; reading them failed: {e}. Pass --data-path DIR with a COCO-layout training split") from None
    if len(dataset) == 0:
        raise ExportError(f"int8 needs calibration images, but {root}/{split or train_split} has none: pass --data-path DIR")
    n = min(count, len(dataset))
    indices = sorted({int(i * len(dataset) / n) for i in range(n)})
    return [dataset[i][0] for i in indices]
