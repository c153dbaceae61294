"""Open any model file the project writes: the one place that decides, for every task, whether a path is a
PyTorch checkpoint or an exported file, which task's model it holds, and where it runs (``open_model``)."""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from detection.checkpoint import load_detector
from detection.models import has_masks
from engine.config import resolve_device

from .files import RUNTIMES, resolve_runtime

__all__ = ["TASK_NOUNS", "TASK_TOOLS", "OpenedModel", "load_model", "open_model"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OpenedModel:
    """A model file opened by :func:`open_model`: the model, what it is, where it runs.

    Attributes:
        model: a detector (``model(images) -> list of dicts``) or a segmenter
            (``model(batch) -> {"out": logits}``), eager or exported, in eval mode.
        task: ``"detection"`` or ``"segmentation"``.
        runtime: ``"torch"``, ``"onnxruntime"``, ``"openvino"`` or ``"torchscript"``.
        device: where it runs (the CPU for exported files).
        path: the file.
    """

    model: Any
    task: str
    runtime: str
    device: torch.device
    path: Path

    @property
    def exported(self) -> bool:
        """Whether an exported file's runtime runs it (CPU only, precision fixed at export)."""
        return self.runtime != "torch"

    def moved_to(self, device: str | torch.device) -> "OpenedModel":
        """The same model on ``device`` (a process's own GPU under torchrun); exported files stay on the CPU.

        Args:
            device: where the PyTorch model should run.
        """
        device = torch.device(device)
        if self.exported:
            if device.type != "cpu":
                raise ValueError(f"{self.path} is an exported file, which runs on the CPU; got device {str(device)!r}")
            return self
        return dataclasses.replace(self, model=self.model.to(device), device=device)


TASK_TOOLS = {"detection": "score it with tools/eval_coco.py, draw it with tools/infer.py",
          "segmentation": "score it with tools/eval_seg.py, draw it with tools/infer_seg.py"}
TASK_NOUNS = {"detection": "detector", "segmentation": "segmenter"}
_TRAINED_BY = {"detection": "tools/train_det.py", "segmentation": "tools/train_seg.py", None: "tools/train_det.py or tools/train_seg.py"}


def open_model(
    source: str | os.PathLike,
    *,
    task: str | None = None,
    runtime: str | None = None,
    device: str | torch.device = "auto",
    precision: str | None = None,
) -> OpenedModel:
    """Open any model file the project writes: the one place that decides checkpoint or exported file, detector or segmenter.

    What a file is comes from its bytes (``deploy.files``), never its name: a detector or
    segmenter checkpoint (``model_final.pth`` / ``checkpoint.pth``, pruned ones included)
    is rebuilt in PyTorch; an exported ONNX or TorchScript file (``tools/export.py``, fp32
    or int8) is run by its runtime on the CPU, behind the eager model's call.

    Args:
        source: the file.
        task: ``"detection"`` or ``"segmentation"`` to refuse a file of the other task
            (the message names the tools that take it); ``None``: either.
        runtime: one of ``RUNTIMES``; default ``"torch"`` for checkpoints, ``"onnxruntime"``
            for ONNX, ``"torchscript"`` for TorchScript.
        device: ``"auto"`` (CUDA when available, the CPU for exported files), ``"cpu"`` or
            ``"cuda"``.
        precision: OpenVINO only: ``"fp32"`` (default) or ``"bf16"`` for what is not int8.

    Returns:
        An :class:`OpenedModel`.

    Raises:
        FileNotFoundError: no such file.
        FileFormatError: its bytes are no detector or segmenter file (junk, truncated, a
            classifier, trunk weights), or a file of the other ``task``; names the file.
        ValueError: an unknown runtime or task, a runtime that does not run this file, a
            GPU for an exported file, or a ``precision`` without ``runtime="openvino"``.
        RuntimeUnavailableError: the runtime is not installed.
    """
    from engine.files import CheckpointError, read_torch_file

    from .files import KIND_DESCRIPTIONS, KIND_TASKS, TASKS, kind_of

    path = Path(source)
    if task is not None and task not in TASKS:
        raise ValueError(f"task must be one of {list(TASKS)} or None, got {task!r}")
    if runtime is not None and runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {list(RUNTIMES)}, got {runtime!r}")
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} not found (a model_final.pth from tools/train_det.py or tools/train_seg.py, "
                                "or a file from tools/export.py)")
    runtime = resolve_runtime(path, runtime)  # a runtime that does not run these bytes: said before anything is read
    if precision is not None and runtime != "openvino":
        raise ValueError(f"precision={precision!r} is for exported files run with runtime='openvino' (--precision with --runtime openvino); "
                         "a PyTorch checkpoint takes --fast --dtype (detectors) or --amp (eval_seg.py) instead")
    if runtime != "torch":
        if str(device) not in ("auto", "cpu"):
            raise ValueError(f"exported files run on the CPU (ONNX Runtime / OpenVINO / TorchScript), got device {str(device)!r}: "
                             "drop --device cuda, or use the .pth checkpoint")
        from .runtime import ExportedSegmenter, load_exported

        model = load_exported(path, runtime=runtime, precision=precision, task=task)
        found = "segmentation" if isinstance(model, ExportedSegmenter) else "detection"
        return OpenedModel(model, found, runtime, torch.device("cpu"), path)
    device = resolve_device(device) if isinstance(device, str) else device  # "cuda" without CUDA: ConfigError
    ckpt = read_torch_file(path)
    kind = kind_of(ckpt)
    found = KIND_TASKS.get(kind)
    if found is None:
        what = KIND_DESCRIPTIONS[kind] if kind else "no file this project reads"
        wanted = f"a {TASK_NOUNS[task]}" if task else "a detector or a segmenter"
        raise CheckpointError(f"{path} is {what}, not {wanted}: pass model_final.pth / checkpoint.pth from "
                              f"{_TRAINED_BY[task]}, or a file from tools/export.py")
    if task is not None and found != task:
        raise CheckpointError(f"{path} is a {TASK_NOUNS[found]} file ({_TRAINED_BY[found]}), not a {TASK_NOUNS[task]}: {TASK_TOOLS[found]}")
    if found == "detection":
        model = load_detector(ckpt, device=device)
    else:
        from segmentation.checkpoint import load_segmenter  # here: segmentation imports albumentations, which detection tools need not pay for

        model = load_segmenter(ckpt, device=device)
    return OpenedModel(model, found, "torch", torch.device(device), path)


def load_model(
    source: str | os.PathLike | nn.Module,
    *,
    runtime: str | None = None,
    device: str | torch.device = "cpu",
    fast: bool = False,
    dtype: torch.dtype | None = None,
    precision: str | None = None,
) -> Any:
    """Load a detector from a checkpoint or an exported file, ready to call like a torchvision detector.

    Files are opened by :func:`open_model` (with ``task="detection"``), as every tool does.

    Args:
        source: ``model_final.pth`` / ``checkpoint.pth``, an exported ONNX or TorchScript
            file from ``tools/export.py``, or a model already built.
        runtime: ``"torch"``, ``"onnxruntime"``, ``"openvino"`` or ``"torchscript"``; default
            ``"torch"`` for checkpoints, ``"onnxruntime"`` for ONNX, ``"torchscript"`` for TorchScript.
        device: where a PyTorch model runs (exported files run on the CPU).
        fast: PyTorch only: ``deploy.fast.optimize_for_inference``.
        dtype: with ``fast``, the trunk's reduced precision (``torch.bfloat16``, ...).
        precision: OpenVINO only: ``"fp32"`` (default) or ``"bf16"`` for what is not int8
            (``deploy.runtime.load_exported``).

    Returns:
        A callable taking a list of CHW float images in [0, 1] and returning torchvision
        detection dicts, with ``category_mapping`` (or ``None``) and ``has_masks``.

    Raises:
        FileNotFoundError: no such file.
        FileFormatError: its bytes are no detector file (junk, truncated, a segmenter, ...); names the file.
        ValueError: a runtime that does not run this file, a GPU for an exported file, or a
            ``precision`` for a model that is not run by OpenVINO.
    """
    if isinstance(source, nn.Module):
        if precision is not None:
            raise ValueError(f"precision={precision!r} is for exported files run with runtime='openvino'; "
                             "a PyTorch model takes fast=True with a dtype instead")
        model: Any = source.to(device).eval()
    else:
        opened = open_model(source, task="detection", runtime=runtime, device=device, precision=precision)
        if opened.exported:
            return opened.model
        model = opened.model
    if fast:
        from .fast import optimize_for_inference

        carried = {k: getattr(model, k, None) for k in ("category_mapping", "train_config")}
        model = optimize_for_inference(model, dtype=dtype)
        for k, v in carried.items():
            setattr(model, k, v)
    if not hasattr(model, "category_mapping"):
        model.category_mapping = None
    model.has_masks = has_masks(model)
    return model
