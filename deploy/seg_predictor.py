"""Run a trained segmenter on pictures: paths, PIL images or numpy arrays in; a class map out.

The image is read the way a viewer shows it (EXIF orientation applied, for paths and PIL
images), normalised as in training, and the model's logits are brought back to the
image's own size, so ``result.class_map[y, x]`` is the label of pixel ``(x, y)`` of the
picture as displayed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch import nn

from engine.images import IMAGENET_MEAN, IMAGENET_STD, image_to_tensor
from segmentation.checkpoint import load_segmenter

__all__ = ["SegmentationPredictor", "SegmentationResult", "read_image_exif"]

ImageInput = Union[str, os.PathLike, np.ndarray, torch.Tensor, Any]  # Any: a PIL image


@dataclass
class SegmentationResult:
    """One image's segmentation, in that image's pixels.

    Attributes:
        class_map: H x W int64 labels.
        confidence: H x W float32 softmax probability of the chosen label.
        class_names: name per label (the model's, or the label numbers).
        image_size: ``(height, width)``.
    """

    class_map: np.ndarray
    confidence: np.ndarray
    class_names: list[str]
    image_size: tuple[int, int]
    logits: torch.Tensor | None = field(default=None, repr=False)

    def pixel_counts(self) -> dict[str, int]:
        """Pixels per label present, by name, largest first."""
        labels, counts = np.unique(self.class_map, return_counts=True)
        pairs = sorted(zip(labels.tolist(), counts.tolist()), key=lambda p: -p[1])
        return {self._name(label): int(count) for label, count in pairs}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary: image size and, per label present, its name, pixels and share."""
        total = max(1, self.class_map.size)
        labels, counts = np.unique(self.class_map, return_counts=True)
        return {
            "image_size": list(self.image_size),
            "classes": [
                {"label": int(label), "name": self._name(int(label)), "pixels": int(count), "fraction": round(int(count) / total, 6)}
                for label, count in zip(labels.tolist(), counts.tolist())
            ],
        }

    def _name(self, label: int) -> str:
        return self.class_names[label] if 0 <= label < len(self.class_names) else str(label)


def read_image_exif(image: str | os.PathLike | Any) -> np.ndarray:
    """A path or PIL image as H x W x 3 RGB uint8, turned upright by its EXIF orientation.

    Args:
        image: an image file or a PIL image.

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: the file is not a readable image.
    """
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"image not found: {path}")
        try:
            with Image.open(path) as pil:
                pil.load()
                return np.asarray(ImageOps.exif_transpose(pil).convert("RGB"))
        # PIL raises many exception types for corrupt files; any of them means "not an image".
        except Exception as exc:  # noqa: BLE001
            raise ValueError(f"could not read {path} as an image ({type(exc).__name__}: {exc})") from None
    return np.asarray(ImageOps.exif_transpose(image).convert("RGB"))


def _to_tensor(image: ImageInput) -> torch.Tensor:
    """CHW float in [0, 1]."""
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3 or not image.is_floating_point():
            raise ValueError(f"a tensor image must be float CHW with 3 channels in [0, 1], got {image.dtype} {tuple(image.shape)}")
        return image
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"a numpy image must be H x W x 3 uint8 RGB, got {image.dtype} {image.shape}")
        rgb = image
    elif isinstance(image, (str, os.PathLike)) or (hasattr(image, "convert") and hasattr(image, "size")):
        rgb = read_image_exif(image)
    else:
        raise TypeError(f"expected an image path, PIL image, H x W x 3 uint8 array or CHW float tensor, got {type(image).__name__}")
    return image_to_tensor(rgb)


class SegmentationPredictor:
    """A trained segmenter behind one call: images in, :class:`SegmentationResult` out.

    >>> predictor = SegmentationPredictor("outputs/seg/model_final.pth")
    >>> result = predictor("photo.jpg")          # or a PIL image, an H x W x 3 uint8 array
    >>> result.class_map, result.pixel_counts()

    Args:
        model: a segmenter file (``save_segmenter``) or a built model.
        device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``.
        class_names: name per label; default the checkpoint's (``model.class_names``),
            else the label numbers.
        resize: run the model on the image resized so its short side is this many
            pixels (the class map still has the image's size); ``None``: as it is.
    """

    def __init__(
        self,
        model: str | os.PathLike | nn.Module,
        *,
        device: str = "auto",
        class_names: Sequence[str] | None = None,
        resize: int | None = None,
    ) -> None:
        if resize is not None and (isinstance(resize, bool) or not isinstance(resize, int) or resize < 1):
            raise ValueError(f"resize must be a positive integer or None, got {resize!r}")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.model = model.to(self.device).eval() if isinstance(model, nn.Module) else load_segmenter(model, device=self.device)
        names = class_names if class_names is not None else getattr(self.model, "class_names", None)
        num_classes = getattr(self.model, "build_args", {}).get("num_classes")
        if names is None:
            names = [str(i) for i in range(num_classes)] if num_classes else []
        elif num_classes is not None and len(names) != num_classes:
            raise ValueError(f"{len(names)} class names for a model with {num_classes} classes")
        self.class_names: list[str] = [str(n) for n in names]
        self.resize = resize
        self._mean = torch.tensor(IMAGENET_MEAN, device=self.device)[:, None, None]
        self._std = torch.tensor(IMAGENET_STD, device=self.device)[:, None, None]

    @torch.no_grad()
    def logits(self, image: torch.Tensor) -> torch.Tensor:
        """Logits (1, C, H, W) at the image's size for one CHW float image in [0, 1]."""
        height, width = image.shape[-2:]
        x = ((image.to(self.device) - self._mean) / self._std)[None]
        if self.resize is not None:
            scale = self.resize / min(height, width)
            size = [max(1, round(height * scale)), max(1, round(width * scale))]
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        out = self.model(x)["out"]
        if out.shape[-2:] != (height, width):
            out = F.interpolate(out, size=[height, width], mode="bilinear", align_corners=False)
        return out

    def __call__(self, images: ImageInput | Sequence[ImageInput]) -> SegmentationResult | list[SegmentationResult]:
        """Segment one image or a list of them.

        Args:
            images: a path, a PIL image, an H x W x 3 uint8 RGB array or a CHW float
                tensor in [0, 1], or a list of them.

        Returns:
            A :class:`SegmentationResult` for one image, a list of them for a list.
        """
        single = not isinstance(images, (list, tuple))
        results = []
        for image in [images] if single else images:
            tensor = _to_tensor(image)
            logits = self.logits(tensor)
            probs = logits.softmax(1)[0]
            confidence, labels = probs.max(0)
            results.append(SegmentationResult(
                class_map=labels.cpu().numpy().astype(np.int64), confidence=confidence.cpu().numpy().astype(np.float32),
                class_names=self.class_names, image_size=(int(tensor.shape[-2]), int(tensor.shape[-1])), logits=logits.cpu(),
            ))
        return results[0] if single else results
