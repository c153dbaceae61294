"""Deployment files for trained detectors and segmenters: TorchScript, ONNX, and int8 ONNX.

What a checkpoint holds decides what is exported (``export_checkpoint``): a detector as
below, a semantic segmenter as ``deploy.segmenter`` describes (a batch of images in [0, 1]
in, logits out); ``export_onnx``, ``export_torchscript`` and ``quantize_onnx`` take either.

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
convention, the architecture and the size it was traced at (``read_metadata``).
A Faster/Mask R-CNN file runs with the test-time proposal counts and the cap on
candidates entering the box NMS (``detection.postprocess``) of the model it was exported
from: they are baked in, and recorded in the metadata (``test_options``).

Export uses torch's TorchScript-based exporter (``dynamo=False``): the dynamo exporter
does not handle torchvision's detectors. Opset 16 or newer is required: its
``RoiAlign`` states its coordinate mode (``output_half_pixel`` for torchvision's
poolers, ``half_pixel`` for aligned ones), which older opsets leave implicit.

Int8 (``quantize_onnx``) is post-training static quantisation of every convolution
(trunk, pyramid, RPN head, mask head), calibrated on training images; the box head,
NMS and the rest stay float32, unless ``linear=True`` makes the box head's fully
connected layers int8 as well (a quarter of their bytes: most of a pruned model's file).
"""

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.onnx import operators
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from .files import NMS_WITHOUT_BRANCH, FileFormatError, decode_metadata, publish, read_onnx_metadata, temporary_folder
from detection.models import has_masks as _predicts_masks
from detection.postprocess import check_test_options, read_test_options, set_test_options

__all__ = [
    "DEFAULT_OPSET",
    "EXPORT_FORMATS",
    "INT8_METHODS",
    "MIN_OPSET",
    "DeployedDetector",
    "ExportError",
    "calibration_images",
    "check_export_args",
    "check_opset",
    "decode_metadata",
    "export_checkpoint",
    "export_detector",
    "export_onnx",
    "export_torchscript",
    "load_checkpoint_for_export",
    "quantize_onnx",
    "read_metadata",
]

log = logging.getLogger(__name__)

EXPORT_FORMATS = ("onnx", "torchscript")
MIN_OPSET = 16
MAX_OPSET = 20
DEFAULT_OPSET = 17
INT8_METHODS = ("onnxruntime", "nncf")
METADATA_VERSION = "1"
INPUT_CONVENTION = {"name": "image", "layout": "CHW", "batch": 1, "color": "RGB", "dtype": "float32", "range": [0.0, 1.0]}


class ExportError(ValueError):
    """An export that cannot be done as asked; the message says what to pass or install."""


def _require(module: str, extra: str = "deploy") -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ExportError(f"{module} is not installed: pip install {module.split('.')[0]} (or pip install -e '.[{extra}]')") from None


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


def _max_opset() -> int:
    try:
        from torch.onnx._constants import ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET

        return int(ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET)
    except ImportError:  # pragma: no cover - older torch
        return MAX_OPSET


def check_opset(opset: int) -> int:
    """Return ``opset`` if the exporter can write it and it carries RoIAlign's coordinate mode.

    Args:
        opset: ONNX opset version.
    """
    top = _max_opset()
    if not isinstance(opset, int) or isinstance(opset, bool) or not MIN_OPSET <= opset <= top:
        raise ExportError(
            f"opset must be an integer in [{MIN_OPSET}, {top}], got {opset!r}: opset {MIN_OPSET} is the first whose "
            f"RoiAlign states its coordinate mode (aligned or not), which the R-CNN poolers need; pass --opset {DEFAULT_OPSET}"
        )
    return opset


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


def _set_metadata(proto: Any, metadata: Mapping[str, str]) -> None:
    kept = [p for p in proto.metadata_props if p.key not in metadata]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value


def read_metadata(path: "str | os.PathLike[str]") -> dict[str, Any]:
    """The ``resfpn.*`` metadata of an exported ONNX file, JSON values decoded (the graph is not loaded).

    Args:
        path: an ``.onnx`` file written by ``export_onnx`` or ``quantize_onnx``.

    Returns:
        ``{key without the "resfpn." prefix: value}``; empty when the file has none.

    Raises:
        FileFormatError: the file is not an ONNX model.
    """
    return decode_metadata(read_onnx_metadata(path))


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


def export_onnx(
    model: nn.Module,
    output: "str | os.PathLike[str]",
    *,
    opset: int = DEFAULT_OPSET,
    category_mapping: Optional[Mapping[str, Any]] = None,
    export_size: Optional[tuple[int, int]] = None,
) -> Path:
    """Export a detector (batch 1, any image size) or a segmenter (any batch and size) to one ONNX file, written atomically.

    Args:
        model: a detector from ``build_detector`` / ``load_detector``, or a segmenter from
            ``build_segmenter`` / ``load_segmenter`` (``deploy.segmenter``); it is not modified.
        output: destination ``.onnx`` file.
        opset: ONNX opset, ``MIN_OPSET`` (16) or newer.
        category_mapping: detectors only: ``{"cat_ids", "names"}`` to record; default
            ``model.category_mapping``.
        export_size: ``(height, width)`` of the sample traced; default the detector's own
            scale (short side ``min_size``, 4:3), for segmenters 256x320. The file accepts any size.

    Returns:
        The output path.
    """
    output, size = _export_onnx(model, output, opset=opset, category_mapping=category_mapping, export_size=export_size)
    log.info("wrote %s (opset %d, traced at %dx%d)", output, opset, *size)
    return output


def _export_onnx(
    model: nn.Module, output: "str | os.PathLike[str]", *, opset: int, category_mapping: Optional[Mapping[str, Any]], export_size: Optional[tuple[int, int]],
) -> tuple[Path, tuple[int, int]]:
    """``export_onnx`` without its log line (the int8 path writes an fp32 file nobody keeps)."""
    import copy
    import warnings

    onnx = _require("onnx")
    check_opset(opset)
    if _is_segmenter(model):
        from .segmenter import export_segmenter_onnx

        if category_mapping is not None:
            raise ExportError("category_mapping is a detector's (category ids); a segmenter file records its class_names")
        return export_segmenter_onnx(model, output, opset=opset, export_size=export_size)
    if not hasattr(model, "transform") or not hasattr(model, "backbone"):
        raise ExportError(f"expected a torchvision detector from detection.build_detector (or a segmenter from "
                          f"segmentation.build_segmenter), got {type(model).__name__}")
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
        _set_metadata(proto, meta)
        proto.producer_name, proto.doc_string = "resfpn", f"{meta['resfpn.arch']} {meta['resfpn.backbone']}: image [3,H,W] RGB 0..1 -> boxes, labels, scores"
        final = tmp / "model.onnx"
        onnx.save(proto, str(final))
        publish(final, output)
    return output, size


def export_torchscript(model: nn.Module, output: "str | os.PathLike[str]", *, category_mapping: Optional[Mapping[str, Any]] = None) -> Path:
    """Script a detector or a segmenter with ``torch.jit.script`` and save it atomically, metadata in ``resfpn.json``.

    The file loads with ``torch.jit.load`` (no resfpn needed); called on a list of
    images a detector returns ``(losses, detections)`` as scripted torchvision detectors
    do; a segmenter takes a batch in [0, 1] and returns logits (``deploy.segmenter``).

    Args:
        model: a detector from ``build_detector`` / ``load_detector``, or a segmenter.
        output: destination ``.pt`` file.
        category_mapping: detectors only: ``{"cat_ids", "names"}`` to record; default ``model.category_mapping``.

    Returns:
        The output path.
    """
    import copy
    import warnings

    if _is_segmenter(model):
        from .segmenter import export_segmenter_torchscript

        if category_mapping is not None:
            raise ExportError("category_mapping is a detector's (category ids); a segmenter file records its class_names")
        output = export_segmenter_torchscript(model, output)
        log.info("wrote %s (TorchScript)", output)
        return output
    if not hasattr(model, "transform") or not hasattr(model, "backbone"):
        raise ExportError(f"expected a torchvision detector from detection.build_detector, got {type(model).__name__}")
    output = Path(output)
    mapping = _category_mapping(model, category_mapping)
    has_masks = _predicts_masks(model)
    meta = _metadata(model, has_masks=has_masks, opset=0, export_size=_export_size(model), mapping=mapping)
    meta.pop("resfpn.opset")
    meta["resfpn.outputs"] = json.dumps(["boxes", "labels", "scores"] + (["masks"] if has_masks else []))  # pasted by the model
    meta["resfpn.masks"] = json.dumps("masks [N, 1, H, W] probabilities in the image" if has_masks else None)
    meta["resfpn.input"] = json.dumps(dict(INPUT_CONVENTION, layout="list of CHW", batch="any"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.script's deprecation notice
        scripted = torch.jit.script(copy.deepcopy(model).cpu().eval())
    with temporary_folder(output) as tmp:
        final = tmp / "model.pt"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit.save's deprecation notice
            torch.jit.save(scripted, str(final), _extra_files={"resfpn.json": json.dumps(meta)})
        publish(final, output)
    log.info("wrote %s (TorchScript)", output)
    return output


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
    from detection.data import CocoDetection
    from engine.roots import prepare_data_root

    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise ExportError(f"int8 needs calibration images: calib_images must be a positive integer (e.g. 64), got {count!r}")
    if config is None and data_path is None:
        raise ExportError("int8 needs calibration images and the checkpoint records no training data: pass data_path (--data-path DIR)")
    from detection.config import DEFAULTS

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


def _is_segmenter(model: Any) -> bool:
    from .segmenter import is_segmenter

    return is_segmenter(model)


def _graph_input(proto: Any) -> tuple[str, bool]:
    """The graph's input name, and whether it takes a batch (``[N, 3, H, W]``: segmenters) rather than one image."""
    first = proto.graph.input[0]
    return first.name, len(first.type.tensor_type.shape.dim) == 4


def _feed(image: Tensor, name: str, batched: bool) -> dict[str, Any]:
    x = image.float().contiguous()
    return {name: (x[None] if batched else x).numpy()}


class _Images:
    """Calibration images as ONNX inputs, once through."""

    def __init__(self, images: Sequence[Tensor], name: str = "image", batched: bool = False) -> None:
        self.images = list(images)
        self.name, self.batched = name, batched
        self.next = 0

    def get_next(self) -> Optional[dict[str, Any]]:
        if self.next >= len(self.images):
            return None
        self.next += 1
        return _feed(self.images[self.next - 1], self.name, self.batched)

    def rewind(self) -> None:
        self.next = 0


class _quiet_root_logger:
    def __enter__(self) -> None:
        self.level = logging.getLogger().level
        logging.getLogger().setLevel(logging.ERROR)

    def __exit__(self, *exc: Any) -> None:
        logging.getLogger().setLevel(self.level)


def _conv_nodes(proto: Any) -> list[str]:
    return [n.name for n in proto.graph.node if n.op_type == "Conv"]


def quantize_onnx(
    model_path: "str | os.PathLike[str]",
    output: "str | os.PathLike[str]",
    images: Sequence[Tensor],
    *,
    method: str = "onnxruntime",
    linear: bool = False,
) -> Path:
    """Post-training static int8 quantisation of every convolution of an exported file.

    Trunk, pyramid, RPN head and (Mask R-CNN) mask head convolutions become int8
    (weights per channel, activations per tensor, QDQ format that ONNX Runtime and
    OpenVINO both run as int8 kernels); the box head, NMS and post-processing stay
    float32 unless ``linear``. In a segmenter file every convolution (trunk, pyramid,
    head) becomes int8; the resizes stay float32. Written atomically, with the input
    file's metadata plus ``precision`` ``int8``, the method and the operators quantised.

    Args:
        model_path: an fp32 file from ``export_onnx``.
        output: destination ``.onnx`` file.
        images: calibration images (``calibration_images``, ``seg_calibration_images``),
            float32 ``[3, H, W]`` in [0, 1]; a segmenter file gets each as a batch of one.
        method: ``"onnxruntime"`` (``onnxruntime.quantization.quantize_static``, min-max
            calibration) or ``"nncf"`` (``nncf.quantize``, OpenVINO's toolkit).
        linear: also quantise the fully connected layers (``Gemm``/``MatMul``: the box
            head's ``fc6``/``fc7`` and predictor), weights per output channel.

    Returns:
        The output path.

    Raises:
        FileFormatError: ``model_path`` is not an ONNX file.
    """
    onnx = _require("onnx")
    if method not in INT8_METHODS:
        raise ExportError(f"int8 method must be one of {list(INT8_METHODS)}, got {method!r}")
    if not images:
        raise ExportError("int8 needs calibration images: got none (pass calib_images >= 1 and a training split with images)")
    meta = read_onnx_metadata(model_path)
    if meta.get("resfpn.precision", "fp32") != "fp32":
        raise ExportError(f"{model_path} is already {meta['resfpn.precision']}; quantize the fp32 export")
    try:
        proto = onnx.load(str(model_path))
    except Exception as e:  # noqa: BLE001  (a damaged graph: the file cannot be read as ONNX)
        raise FileFormatError(f"{model_path} is not a readable ONNX file ({type(e).__name__}: {str(e)[:200]})") from None
    convs = _conv_nodes(proto)
    ops = ["Conv", "Gemm", "MatMul"] if linear else ["Conv"]
    name, batched = _graph_input(proto)
    output = Path(output)
    with temporary_folder(output) as tmp:
        quantized = tmp / "int8.onnx"
        if method == "onnxruntime":
            q = _require("onnxruntime.quantization")
            with _quiet_root_logger():  # quantize_static logs pre-processing advice on the root logger
                q.quantize_static(
                    str(model_path), str(quantized), _Images(images, name, batched), quant_format=q.QuantFormat.QDQ, op_types_to_quantize=ops,
                    per_channel=True, activation_type=q.QuantType.QUInt8, weight_type=q.QuantType.QInt8,
                    calibrate_method=q.CalibrationMethod.MinMax,
                )
            result = onnx.load(str(quantized))
        else:
            nncf = _require("nncf", extra="nncf")
            dataset = nncf.Dataset(list(images), lambda img: _feed(img, name, batched))
            others = sorted({n.op_type for n in proto.graph.node if n.op_type not in ops})
            result = nncf.quantize(proto, dataset, subset_size=len(images), ignored_scope=nncf.IgnoredScope(types=others, validate=False))
        _set_metadata(result, {**meta, "resfpn.precision": "int8", "resfpn.int8": json.dumps(
            {"method": method, "calibration_images": len(images), "quantized": ",".join(ops), "convolutions": len(convs)})})
        final = tmp / "model.onnx"
        onnx.save(result, str(final))
        publish(final, output)
    log.info("wrote %s (int8, %s, %d calibration images)", output, method, len(images))
    return output


def load_checkpoint_for_export(checkpoint: "str | os.PathLike[str]") -> tuple[nn.Module, Optional[dict[str, Any]]]:
    """Rebuild the detector or segmenter of a checkpoint; return it with its training config (or ``None``).

    What the file holds decides (``deploy.files.kind_of``): a segmenter file (from
    ``save_segmenter`` or ``tools/train_seg.py``) rebuilds a segmenter, anything else is
    read as a detector checkpoint (and refused as one when it is not).

    Args:
        checkpoint: ``model_final.pth`` / ``checkpoint.pth`` from ``tools/train_det.py``
            or ``tools/train_seg.py``, or a file from ``save_detector`` / ``save_segmenter``.
    """
    from backbones.weights import WeightsError

    from detection.checkpoint import load_detector
    from engine.files import read_torch_file

    from .files import kind_of

    try:
        if kind_of(read_torch_file(checkpoint)) in ("segmenter", "segmenter_training_state"):
            from segmentation.checkpoint import load_segmenter

            model = load_segmenter(checkpoint)
        else:
            model = load_detector(checkpoint)
    except WeightsError as e:  # names the file and what is wrong with it, whatever its bytes
        raise ExportError(f"{e} (pass --checkpoint model_final.pth written by tools/train_det.py or tools/train_seg.py)") from None
    config = getattr(model, "train_config", None)
    return model, dict(config) if isinstance(config, Mapping) else None


def check_export_args(
    *, format: str, opset: int, int8: bool, calib_images: int, int8_method: str = "onnxruntime", int8_linear: bool = False
) -> None:
    """Raise ``ExportError`` for arguments that cannot work, before any model is loaded."""
    if int8_linear and not int8:
        raise ExportError("--int8-linear quantises the fully connected layers of an int8 file: pass it with --int8")
    if format not in EXPORT_FORMATS:
        raise ExportError(f"format must be one of {list(EXPORT_FORMATS)}, got {format!r}")
    if format == "onnx":
        check_opset(opset)
    if int8:
        if format != "onnx":
            raise ExportError("int8 is an ONNX export: pass --format onnx with --int8")
        if not isinstance(calib_images, int) or isinstance(calib_images, bool) or calib_images < 1:
            raise ExportError(f"int8 needs calibration images: pass --calib-images N with N >= 1 (e.g. 64), got {calib_images!r}")
        if int8_method not in INT8_METHODS:
            raise ExportError(f"int8 method must be one of {list(INT8_METHODS)}, got {int8_method!r}")
        if int8_method == "onnxruntime":
            _require("onnxruntime")
        else:
            _require("nncf", extra="nncf")
    if format == "onnx":
        _require("onnx")


def export_checkpoint(
    checkpoint: "str | os.PathLike[str]",
    output: "str | os.PathLike[str]",
    *,
    format: str = "onnx",
    opset: int = DEFAULT_OPSET,
    int8: bool = False,
    calib_images: int = 64,
    data_path: "Optional[str | os.PathLike[str]]" = None,
    int8_method: str = "onnxruntime",
    int8_linear: bool = False,
    export_size: Optional[tuple[int, int]] = None,
    test_options: Optional[Mapping[str, int]] = None,
) -> Path:
    """Export a training checkpoint, detector or segmenter (its content decides): what ``tools/export.py`` does.

    Args:
        checkpoint: ``model_final.pth`` (or any detector or segmenter checkpoint).
        output: destination file; nothing is written there unless the export succeeds.
        format: ``"onnx"`` or ``"torchscript"``.
        opset: ONNX opset (>= 16).
        int8: quantise the convolutions to int8 (ONNX only).
        calib_images: training images to calibrate int8 on.
        data_path: root for calibration (default the checkpoint's training data): COCO
            layout for detectors, VOC or COCO layout for segmenters.
        int8_method: ``"onnxruntime"`` or ``"nncf"`` (see ``quantize_onnx``).
        int8_linear: with ``int8``, the fully connected layers too (``quantize_onnx``'s ``linear``).
        export_size: ``(height, width)`` traced (see ``export_onnx``).
        test_options: Faster/Mask R-CNN: test-time proposal counts and candidate cap
            to bake into the file (``detection.postprocess.set_test_options``), e.g.
            ``{"rpn_post_nms_top_n_test": 300}``; default the checkpoint's.

    Returns:
        The output path.
    """
    check_export_args(format=format, opset=opset, int8=int8, calib_images=calib_images, int8_method=int8_method, int8_linear=int8_linear)
    test_options = check_test_options(test_options or {})
    model, config = load_checkpoint_for_export(checkpoint)
    if test_options:
        set_test_options(model, test_options)
    if format == "torchscript":
        return export_torchscript(model, output)
    if not int8:
        return export_onnx(model, output, opset=opset, export_size=export_size)
    if _is_segmenter(model):
        from .segmenter import seg_calibration_images

        images = seg_calibration_images(config=config, data_path=data_path, count=calib_images, class_names=model.class_names)
    else:
        images = calibration_images(config=config, data_path=data_path, count=calib_images)
    output = Path(output)
    with temporary_folder(output) as tmp:
        fp32, _ = _export_onnx(model, tmp / "fp32.onnx", opset=opset, category_mapping=None, export_size=export_size)
        return quantize_onnx(fp32, output, images, method=int8_method, linear=int8_linear)


def export_detector(checkpoint: "str | os.PathLike[str]", output: "str | os.PathLike[str]", **kwargs: Any) -> Path:
    """``export_checkpoint``'s first name, kept for callers; it exports segmenter checkpoints too.

    Args:
        checkpoint: a detector or segmenter checkpoint.
        output: destination file.
        **kwargs: ``export_checkpoint``'s options.
    """
    return export_checkpoint(checkpoint, output, **kwargs)
