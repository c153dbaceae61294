"""Deployment files for trained detectors and segmenters: TorchScript, ONNX, and int8 ONNX; what ``tools/export.py`` does.

What a model is decides how it is exported, in one place (``model_export``): a detector
as ``deploy.detector`` describes (one image in [0, 1] in, boxes, labels, scores and
masks out), a semantic segmenter as ``deploy.segmenter`` describes (a batch of images in
[0, 1] in, logits out). Both build on ``deploy.onnx_meta`` (the metadata every file
carries, the opsets, ``ExportError``) and neither imports the other. ``export_onnx``,
``export_torchscript`` and ``quantize_onnx`` take either kind; ``export_checkpoint``
reads a checkpoint and lets its content decide.

Int8 (``quantize_onnx``) is post-training static quantisation of every convolution
(trunk, pyramid, RPN head, mask head), calibrated on training images; the box head,
NMS and the rest stay float32, unless ``linear=True`` makes the box head's fully
connected layers int8 as well (a quarter of their bytes: most of a pruned model's file).
"""

import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Optional

from torch import Tensor, nn

from backbones.weights import WeightsError
from detection.checkpoint import load_detector
from detection.postprocess import check_test_options, set_test_options
from engine.files import read_torch_file
from segmentation.checkpoint import load_segmenter

from .detector import DeployedDetector, calibration_images, export_detector_onnx, export_detector_torchscript, is_detector
from .files import FileFormatError, decode_metadata, kind_of, publish, read_onnx_metadata, temporary_folder
from .onnx_meta import DEFAULT_OPSET, MIN_OPSET, ExportError, check_opset, read_metadata, require, set_metadata
from .segmenter import export_segmenter_onnx, export_segmenter_torchscript, is_segmenter, seg_calibration_images

__all__ = [
    "DEFAULT_OPSET",
    "EXPORT_FORMATS",
    "INT8_METHODS",
    "MIN_OPSET",
    "DeployedDetector",
    "ExportError",
    "ModelExport",
    "calibration_images",
    "check_export_args",
    "check_opset",
    "decode_metadata",
    "export_checkpoint",
    "export_detector",
    "export_onnx",
    "export_torchscript",
    "load_checkpoint_for_export",
    "model_export",
    "quantize_onnx",
    "read_metadata",
]

log = logging.getLogger(__name__)

EXPORT_FORMATS = ("onnx", "torchscript")
INT8_METHODS = ("onnxruntime", "nncf")


@dataclass(frozen=True)
class ModelExport:
    """How one kind of model is exported: its writers and its int8 calibration images.

    Attributes:
        kind: ``"detector"`` or ``"segmenter"``.
        onnx: ``(model, output, *, opset, export_size)`` -> ``(path, size traced)``, no log line.
        torchscript: ``(model, output)`` -> path, no log line.
        calibration_images: ``(*, config, data_path, count)`` -> float32 ``[3, H, W]`` images in [0, 1].
    """

    kind: str
    onnx: Callable[..., tuple[Path, tuple[int, int]]]
    torchscript: Callable[..., Path]
    calibration_images: Callable[..., list[Tensor]]


def model_export(model: Any, *, category_mapping: Optional[Mapping[str, Any]] = None) -> ModelExport:
    """The one place a model's kind picks its exporter: ``deploy.segmenter`` or ``deploy.detector``.

    Args:
        model: a segmenter from ``build_segmenter`` / ``load_segmenter`` or a detector from
            ``build_detector`` / ``load_detector``.
        category_mapping: detectors only: ``{"cat_ids", "names"}`` to record; default
            ``model.category_mapping``.

    Raises:
        ExportError: the model is neither, or a segmenter was given a category mapping.
    """
    if is_segmenter(model):
        if category_mapping is not None:
            raise ExportError("category_mapping is a detector's (category ids); a segmenter file records its class_names")
        return ModelExport("segmenter", export_segmenter_onnx, export_segmenter_torchscript,
                           partial(seg_calibration_images, class_names=getattr(model, "class_names", None)))
    if is_detector(model):
        return ModelExport("detector", partial(export_detector_onnx, category_mapping=category_mapping),
                           partial(export_detector_torchscript, category_mapping=category_mapping), calibration_images)
    raise ExportError(f"expected a torchvision detector from detection.build_detector (or a segmenter from "
                      f"segmentation.build_segmenter), got {type(model).__name__}")


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
    require("onnx")
    check_opset(opset)
    return model_export(model, category_mapping=category_mapping).onnx(model, output, opset=opset, export_size=export_size)


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
    output = model_export(model, category_mapping=category_mapping).torchscript(model, output)
    log.info("wrote %s (TorchScript)", output)
    return output


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
    onnx = require("onnx")
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
            q = require("onnxruntime.quantization")
            with _quiet_root_logger():  # quantize_static logs pre-processing advice on the root logger
                q.quantize_static(
                    str(model_path), str(quantized), _Images(images, name, batched), quant_format=q.QuantFormat.QDQ, op_types_to_quantize=ops,
                    per_channel=True, activation_type=q.QuantType.QUInt8, weight_type=q.QuantType.QInt8,
                    calibrate_method=q.CalibrationMethod.MinMax,
                )
            result = onnx.load(str(quantized))
        else:
            nncf = require("nncf", extra="nncf")
            dataset = nncf.Dataset(list(images), lambda img: _feed(img, name, batched))
            others = sorted({n.op_type for n in proto.graph.node if n.op_type not in ops})
            result = nncf.quantize(proto, dataset, subset_size=len(images), ignored_scope=nncf.IgnoredScope(types=others, validate=False))
        set_metadata(result, {**meta, "resfpn.precision": "int8", "resfpn.int8": json.dumps(
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
    try:
        if kind_of(read_torch_file(checkpoint)) in ("segmenter", "segmenter_training_state"):
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
            require("onnxruntime")
        else:
            require("nncf", extra="nncf")
    if format == "onnx":
        require("onnx")


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
    images = model_export(model).calibration_images(config=config, data_path=data_path, count=calib_images)
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
