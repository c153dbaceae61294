"""Run a trained detector on pictures: paths, PIL images or numpy arrays in; pixels, names and ids out.

One call for every way a model ships: a PyTorch checkpoint (``model_final.pth``), the
same model on the fast inference path, or an exported file run by ONNX Runtime or
OpenVINO (``deploy.runtime``). The data set's category ids and names travel with the
model, so users never map labels back by hand.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np
import torch
from torch import nn

from detection.checkpoint import load_detector
from engine.images import image_to_tensor, read_image_rgb
from .files import RUNTIMES, is_exported, resolve_runtime
from detection.models import has_masks

__all__ = ["EXPORTED_SUFFIXES", "RUNTIMES", "Prediction", "Predictor", "load_model"]

# Kept for callers that guess by name; what a file is comes from its bytes (deploy.files).
EXPORTED_SUFFIXES = (".onnx",)

ImageInput = Union[str, os.PathLike, np.ndarray, torch.Tensor, Any]  # Any: a PIL image


@dataclass
class Prediction:
    """Detections on one image, in that image's pixels.

    Attributes:
        boxes: float32 N x 4, ``x0, y0, x1, y1``.
        scores: float32 N.
        labels: int64 N, the model's contiguous labels (1..K).
        names: class name per detection.
        category_ids: the data set's original category id per detection (``None``
            when the model carries no mapping).
        masks: bool N x H x W (Mask R-CNN), else ``None``.
        image_size: ``(height, width)``.
        raw: the model's own output dict (tensors), e.g. for ``visualize.draw_detections``.
    """

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    names: list[str]
    category_ids: list[int] | None
    masks: np.ndarray | None
    image_size: tuple[int, int]
    raw: dict[str, torch.Tensor] = field(repr=False, default_factory=dict)

    def __len__(self) -> int:
        return len(self.scores)

    def to_list(self) -> list[dict[str, Any]]:
        """JSON-ready detections: ``box_xyxy``, ``score``, ``label``, ``name`` and ``category_id``."""
        out = []
        for i in range(len(self)):
            item: dict[str, Any] = {
                "box_xyxy": [round(float(v), 2) for v in self.boxes[i]], "score": round(float(self.scores[i]), 4),
                "label": int(self.labels[i]), "name": self.names[i],
            }
            if self.category_ids is not None:
                item["category_id"] = self.category_ids[i]
            out.append(item)
        return out


def load_model(
    source: str | os.PathLike | nn.Module,
    *,
    runtime: str | None = None,
    device: str | torch.device = "cpu",
    fast: bool = False,
    dtype: torch.dtype | None = None,
) -> Any:
    """Load a detector from a checkpoint or an exported file, ready to call like a torchvision detector.

    What a file is comes from its bytes (``deploy.files``), not its name.

    Args:
        source: ``model_final.pth`` / ``checkpoint.pth``, an exported ONNX or TorchScript
            file from ``tools/export.py``, or a model already built.
        runtime: ``"torch"``, ``"onnxruntime"``, ``"openvino"`` or ``"torchscript"``; default
            ``"torch"`` for checkpoints, ``"onnxruntime"`` for ONNX, ``"torchscript"`` for TorchScript.
        device: where a PyTorch model runs (exported files run on the CPU).
        fast: PyTorch only: ``deploy.fast.optimize_for_inference``.
        dtype: with ``fast``, the trunk's reduced precision (``torch.bfloat16``, ...).

    Returns:
        A callable taking a list of CHW float images in [0, 1] and returning torchvision
        detection dicts, with ``category_mapping`` (or ``None``) and ``has_masks``.

    Raises:
        FileNotFoundError: no such file.
        FileFormatError: its bytes are no model file (junk, truncated, ...); names the file.
        ValueError: a runtime that does not run this file, or a GPU for an exported file.
    """
    if isinstance(source, nn.Module):
        model: Any = source.to(device).eval()
    else:
        path = Path(source)
        if runtime is not None and runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {list(RUNTIMES)}, got {runtime!r}")
        if not path.is_file():
            raise FileNotFoundError(f"model file {path} not found (a model_final.pth from tools/train_det.py, or a file from tools/export.py)")
        runtime = resolve_runtime(path, runtime)
        if runtime != "torch":
            if torch.device(device).type != "cpu":
                raise ValueError(f"exported models run on the CPU here, got device {device!r}")
            from .runtime import load_exported

            return load_exported(path, runtime=runtime, task="detection")
        _refuse_segmenter(path)
        model = load_detector(path, device=device)
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


def _refuse_segmenter(path: Path) -> None:
    """A segmenter file holds a detector file's keys (and class_names): say what it is rather than fail to rebuild it."""
    from engine.files import CheckpointError, read_torch_file

    from .files import kind_of

    if kind_of(read_torch_file(path)) in ("segmenter", "segmenter_training_state"):
        raise CheckpointError(f"{path} is a segmenter file (tools/train_seg.py), not a detector: score it with tools/eval_seg.py, "
                              "draw it with tools/infer_seg.py")


def _to_tensor(image: ImageInput) -> torch.Tensor:
    if isinstance(image, (str, os.PathLike)):
        return image_to_tensor(read_image_rgb(image))
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3 or not image.is_floating_point():
            raise ValueError(f"a tensor image must be float CHW with 3 channels in [0, 1], got {image.dtype} {tuple(image.shape)}")
        return image
    if hasattr(image, "convert") and hasattr(image, "size"):  # PIL
        from PIL import ImageOps

        # Upright, as a path is read: Image.open keeps the EXIF orientation tag unapplied.
        return image_to_tensor(np.asarray(ImageOps.exif_transpose(image).convert("RGB")))
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"a numpy image must be H x W x 3 uint8 RGB, got {image.dtype} {image.shape}")
        return image_to_tensor(np.ascontiguousarray(image))
    raise TypeError(f"expected an image path, PIL image, H x W x 3 uint8 array or CHW float tensor, got {type(image).__name__}")


class Predictor:
    """A trained detector behind one call: images in, :class:`Prediction` out.

    >>> predictor = Predictor("outputs/run/model_final.pth", score_thresh=0.5)
    >>> prediction = predictor("photo.jpg")           # or a PIL image, an H x W x 3 uint8 array
    >>> prediction.boxes, prediction.names, prediction.category_ids

    Args:
        model: a checkpoint, an exported file or a built model (see ``load_model``).
        runtime: ``"torch"``, ``"onnxruntime"`` or ``"openvino"`` (default from the file).
        device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``; exported files
            run on the CPU.
        score_thresh: detections below this score are dropped.
        mask_threshold: mask probability that counts as inside the object.
        fast: PyTorch only: the fast inference path (BN folding, channels-last).
        dtype: with ``fast``, the trunk's reduced precision.
    """

    def __init__(
        self,
        model: str | os.PathLike | nn.Module,
        *,
        runtime: str | None = None,
        device: str = "auto",
        score_thresh: float = 0.5,
        mask_threshold: float = 0.5,
        fast: bool = False,
        dtype: torch.dtype | None = None,
    ) -> None:
        if not 0.0 <= score_thresh <= 1.0:
            raise ValueError(f"score_thresh must be in [0, 1], got {score_thresh}")
        exported = not isinstance(model, nn.Module) and is_exported(model, runtime)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() and not exported else "cpu"
        self.device = torch.device(device)
        self.model = load_model(model, runtime=runtime, device=self.device, fast=fast, dtype=dtype)
        self.score_thresh = score_thresh
        self.mask_threshold = mask_threshold
        mapping = self.model.category_mapping or {}
        self.class_names: list[str] = ["__background__"] + [str(n) for n in mapping.get("names", [])]
        self.category_ids: list[int] | None = [int(c) for c in mapping["cat_ids"]] if mapping.get("cat_ids") else None

    @property
    def category_mapping(self) -> dict[str, list[Any]] | None:
        """The model's ``{"cat_ids", "names"}``, or ``None``."""
        return self.model.category_mapping

    @property
    def label_to_cat_id(self) -> dict[int, int] | None:
        """Contiguous label -> the data set's category id, or ``None`` without a mapping."""
        return {i + 1: c for i, c in enumerate(self.category_ids)} if self.category_ids else None

    def name(self, label: int) -> str:
        """Class name of a contiguous label (its number as text when unknown)."""
        return self.class_names[label] if 0 < label < len(self.class_names) else str(label)

    @torch.no_grad()
    def predict_tensors(self, images: Sequence[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """The model's raw detection dicts for CHW float images in [0, 1]."""
        return self.model([img.to(self.device) for img in images])

    def __call__(self, images: ImageInput | Sequence[ImageInput]) -> Prediction | list[Prediction]:
        """Detect objects.

        Paths and PIL images are turned upright by their EXIF orientation tag (as
        phones save photos), so boxes are in the picture as viewers show it; arrays
        and tensors are taken as given (``np.asarray(Image.open(p))`` keeps the stored
        frame: read with ``detection.data.read_image_rgb(p)`` to get it upright).

        Args:
            images: one image (a path, a PIL image, an H x W x 3 uint8 RGB array or a
                CHW float tensor in [0, 1]) or a list of them.

        Returns:
            A :class:`Prediction` for one image, a list of them for a list.
        """
        single = not isinstance(images, (list, tuple))
        batch = [_to_tensor(img) for img in ([images] if single else images)]
        if not batch:
            return []
        outputs = self.predict_tensors(batch)
        results = [self._convert(out, tuple(img.shape[-2:])) for out, img in zip(outputs, batch)]
        return results[0] if single else results

    def _convert(self, out: dict[str, torch.Tensor], size: tuple[int, int]) -> Prediction:
        keep = out["scores"].detach().cpu() >= self.score_thresh
        raw = {k: v.detach().cpu() for k, v in out.items()}
        labels = raw["labels"][keep].numpy().astype(np.int64)
        masks = (raw["masks"][keep][:, 0] > self.mask_threshold).numpy() if "masks" in raw else None
        cat_ids = [self.category_ids[label - 1] if 0 < label <= len(self.category_ids) else -1 for label in labels] if self.category_ids else None
        return Prediction(
            boxes=raw["boxes"][keep].numpy().astype(np.float32), scores=raw["scores"][keep].numpy().astype(np.float32),
            labels=labels, names=[self.name(int(label)) for label in labels], category_ids=cat_ids, masks=masks,
            image_size=(int(size[0]), int(size[1])), raw=raw,
        )
