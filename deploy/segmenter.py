"""Deployment files for semantic segmenters: the exported graph, ONNX and TorchScript export, int8 calibration.

An exported segmenter takes a batch of images, ``images``: float32 ``[N, 3, H, W]``, RGB,
values in [0, 1], any batch size, height and width; it normalises them inside the
graph with the mean and std the model was trained with (ImageNet's, recorded in the
file) and returns ``out``: float32 logits ``[N, num_classes, H, W]`` at the input's
size (the argmax over dim 1 is the class map; label ``i`` is ``class_names[i]``). The
auxiliary head, a training aid, is left out of the file. ``metadata_props`` carry what
a runtime needs: ``task`` (``"segmentation"``), class names and their number, mean and
std, the input convention, architecture, backbone, output stride, the size it was
traced at, opset, precision, build arguments and the checkpoint's training config
(``deploy.onnx_meta.read_metadata``). ``deploy.runtime.load_exported`` runs such a file
behind the eager model's own call (normalised batch in, ``{"out": logits}`` out), so
``segmentation.evaluation`` and ``deploy.seg_predictor`` take it unchanged.

Export uses torch's TorchScript-based exporter (``dynamo=False``), as for detectors.
Batch, height and width are dynamic axes; every resize inside the models takes its
size from a tensor's shape, so nothing of the traced size is left in the graph (the
tests run each architecture at sizes other than the traced one). Int8 is
``deploy.export.quantize_onnx``, the detectors' quantiser: static quantisation of every
convolution, calibrated on training images in [0, 1] (``seg_calibration_images``).

``deploy.export`` calls this module for segmenters and ``deploy.detector`` for detectors;
both build on ``deploy.onnx_meta`` and neither imports the other.
"""

import copy
import json
import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn

from engine.images import IMAGENET_MEAN, IMAGENET_STD
from segmentation.models import ARCHS as SEGMENTER_ARCHS

from .files import publish, temporary_folder
from .onnx_meta import METADATA_VERSION, ExportError, check_opset, require, set_metadata, write_torchscript

__all__ = [
    "SEG_EXPORT_SIZE",
    "SEG_INPUT_CONVENTION",
    "DeployedSegmenter",
    "export_segmenter_onnx",
    "export_segmenter_torchscript",
    "is_segmenter",
    "seg_calibration_images",
]

log = logging.getLogger(__name__)

SEG_INPUT_CONVENTION = {"name": "images", "layout": "NCHW", "batch": "any", "color": "RGB", "dtype": "float32", "range": [0.0, 1.0]}
# The sample traced (any size runs): not square, so a height/width mix-up in the graph could not hide.
SEG_EXPORT_SIZE = (256, 320)
_DYNAMIC = {0: "batch", 2: "height", 3: "width"}


def is_segmenter(model: Any) -> bool:
    """Whether ``model`` is a segmenter from ``segmentation.build_segmenter`` (by its ``build_args``)."""
    build_args = getattr(model, "build_args", None)
    return isinstance(build_args, Mapping) and build_args.get("arch") in SEGMENTER_ARCHS


class DeployedSegmenter(nn.Module):
    """Images in [0, 1] in, logits out: what an exported segmenter file computes.

    Args:
        model: a segmenter from ``build_segmenter`` (eval mode); its auxiliary head is
            dropped (pass a copy to keep the original whole).
        mean: per-channel mean the model's input is normalised with.
        std: per-channel std.
    """

    def __init__(self, model: nn.Module, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        super().__init__()
        if getattr(model, "aux_classifier", None) is not None:
            # torchvision's segmentation models and SemanticFPN skip the aux head when it is None. Deleted first:
            # a None left in the submodule table clashes with the TorchScript constant of the same name.
            del model.aux_classifier
            model.aux_classifier = None
        self.model = model
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, images: Tensor) -> Tensor:
        return self.model((images - self.mean) / self.std)["out"]


def _class_names(model: nn.Module) -> list[str]:
    num_classes = int(model.build_args["num_classes"])
    names = getattr(model, "class_names", None)
    if names is None:
        return [str(i) for i in range(num_classes)]
    names = [str(n) for n in names]
    if len(names) != num_classes:
        raise ExportError(f"the model has {len(names)} class names for num_classes={num_classes}")
    return names


def _seg_metadata(model: nn.Module, *, opset: Optional[int], export_size: Optional[tuple[int, int]]) -> dict[str, str]:
    import torchvision

    build_args = dict(model.build_args)
    meta = {
        "resfpn.metadata_version": METADATA_VERSION,
        "resfpn.task": "segmentation",
        "resfpn.arch": str(build_args["arch"]),
        "resfpn.backbone": str(build_args.get("backbone", "")),
        "resfpn.num_classes": str(build_args["num_classes"]),
        "resfpn.output_stride": json.dumps(build_args.get("output_stride")),
        "resfpn.class_names": json.dumps(_class_names(model)),
        "resfpn.input": json.dumps(SEG_INPUT_CONVENTION),
        "resfpn.normalize": json.dumps({"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "where": "inside the graph: (images - mean) / std"}),
        "resfpn.outputs": json.dumps(["out"]),
        "resfpn.out": "logits [N, num_classes, H, W] at the input's size; the argmax over dim 1 is the class map, label i is class_names[i]",
        "resfpn.precision": "fp32",
        "resfpn.build_args": json.dumps(build_args, default=str),
        # The checkpoint's training config (data path and splits): evaluation and calibration find the data by it.
        "resfpn.train_config": json.dumps(getattr(model, "train_config", None), default=str),
        "resfpn.exporter": f"torch {torch.__version__}, torchvision {torchvision.__version__}, "
                           + ("TorchScript-based exporter" if opset is not None else "torch.jit.script"),
    }
    if opset is not None:
        meta["resfpn.opset"] = str(opset)
    if export_size is not None:
        meta["resfpn.export_size"] = json.dumps(list(export_size))
    return meta


def _check(model: Any) -> None:
    if not is_segmenter(model):
        raise ExportError(f"expected a segmenter from segmentation.build_segmenter, got {type(model).__name__}")


def export_segmenter_onnx(
    model: nn.Module, output: "str | os.PathLike[str]", *, opset: int, export_size: Optional[tuple[int, int]] = None,
) -> tuple[Path, tuple[int, int]]:
    """Export a segmenter to one ONNX file (any batch, height and width), written atomically; no log line.

    ``deploy.export.export_onnx`` calls it for segmenters (and logs).

    Args:
        model: a segmenter from ``build_segmenter`` / ``load_segmenter``; it is not modified.
        output: destination ``.onnx`` file.
        opset: ONNX opset (``deploy.onnx_meta.check_opset``).
        export_size: ``(height, width)`` of the sample traced (default ``SEG_EXPORT_SIZE``).

    Returns:
        The output path and the size traced.
    """
    onnx = require("onnx")
    check_opset(opset)
    _check(model)
    output = Path(output)
    deployed = DeployedSegmenter(copy.deepcopy(model).cpu().float().eval()).eval()
    size = (int(export_size[0]), int(export_size[1])) if export_size is not None else SEG_EXPORT_SIZE
    with temporary_folder(output) as tmp:
        raw = tmp / "raw.onnx"
        sample = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(0))
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer notices about shapes read as Python numbers (they stay dynamic)
            torch.onnx.export(
                deployed, (sample,), str(raw), dynamo=False, opset_version=opset, input_names=["images"], output_names=["out"],
                dynamic_axes={"images": _DYNAMIC, "out": _DYNAMIC}, do_constant_folding=True,
            )
        proto = onnx.load(str(raw))
        meta = _seg_metadata(model, opset=opset, export_size=size)
        set_metadata(proto, meta)
        proto.producer_name = "resfpn"
        proto.doc_string = f"{meta['resfpn.arch']} {meta['resfpn.backbone']}: images [N,3,H,W] RGB 0..1 -> out [N,K,H,W] logits"
        final = tmp / "model.onnx"
        onnx.save(proto, str(final))
        publish(final, output)
    return output, size


def export_segmenter_torchscript(model: nn.Module, output: "str | os.PathLike[str]") -> Path:
    """Script a segmenter (``DeployedSegmenter``: images in [0, 1] -> logits) and save it atomically.

    The file loads with ``torch.jit.load`` (no resfpn needed); its metadata is in
    ``resfpn.json``, as for detectors; no log line. ``deploy.export.export_torchscript`` calls it for segmenters (and logs).

    Args:
        model: a segmenter from ``build_segmenter`` / ``load_segmenter``; it is not modified.
        output: destination ``.pt`` file.

    Returns:
        The output path.
    """
    _check(model)
    meta = _seg_metadata(model, opset=None, export_size=None)
    return write_torchscript(DeployedSegmenter(copy.deepcopy(model).cpu().float().eval()).eval(), output, meta)


def seg_calibration_images(
    *,
    config: Optional[Mapping[str, Any]] = None,
    data_path: "Optional[str | os.PathLike[str]]" = None,
    split: Optional[str] = None,
    count: int = 64,
    class_names: Optional[Sequence[str]] = None,
) -> list[Tensor]:
    """Training images for int8 calibration of a segmenter, spread evenly over the split (deterministic).

    Each image is what the exported file is fed at evaluation: float32 ``[3, H, W]`` in
    [0, 1], resized as the training config's ``val_resize`` says (else at its own size).

    Args:
        config: the checkpoint's training config (``data_path``, ``data_format``,
            ``train_split``, ``shapes_*``); with no ``data_path`` in it, the shapes set it
            was trained on.
        data_path: a VOC or COCO-layout root that overrides the config's.
        split: the split to read (default the config's training split).
        count: how many images (the split's size if smaller).
        class_names: the model's labels (VOC-layout masks are checked against them).

    Raises:
        ExportError: no data is known, it cannot be read, or it has no image.
    """
    from engine.config import ConfigError
    from engine.datasets import DataPathError
    from segmentation.config import SEGMENTATION
    from segmentation.data import VOC_CLASSES, CocoSegmentation, VOCSegmentation, build_seg_transforms
    from segmentation.training import resolve_seg_data

    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise ExportError(f"int8 needs calibration images: calib_images must be a positive integer (e.g. 64), got {count!r}")
    if config is None and data_path is None:
        raise ExportError("int8 needs calibration images and the checkpoint records no training data: pass data_path (--data-path DIR)")
    cfg: dict[str, Any] = {**SEGMENTATION.defaults, **dict(config or {})}
    if data_path is not None:
        cfg.update(data_path=str(data_path), data_format="auto", train_split=split, val_split=None)
    try:
        root, fmt, train_split, _ = resolve_seg_data(cfg)
        chosen = split or train_split
        # As eval_seg.py sizes them: the recorded val_resize, none when the config records none.
        transform = build_seg_transforms(False, resize=dict(config or {}).get("val_resize"))
        if fmt == "voc":
            names = list(class_names or cfg.get("class_names") or VOC_CLASSES)
            dataset: Any = VOCSegmentation(root, chosen, transforms=transform, class_names=names)
        else:
            dataset = CocoSegmentation(root, chosen, transforms=transform)
    except (OSError, ValueError, KeyError, DataPathError, ConfigError) as e:
        raise ExportError(f"int8 needs calibration images; reading them failed: {e}. "
                          "Pass --data-path DIR with a VOC or COCO-layout training split") from None
    if len(dataset) == 0:
        raise ExportError(f"int8 needs calibration images, but {root} ({chosen}) has none: pass --data-path DIR")
    n = min(count, len(dataset))
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    indices = sorted({int(i * len(dataset) / n) for i in range(n)})
    # The data sets normalise; the file normalises inside, so it is fed (and calibrated on) the pixels in [0, 1].
    return [(dataset[i][0] * std + mean).clamp(0, 1) for i in indices]
