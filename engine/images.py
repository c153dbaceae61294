"""Reading images the way every task sees them: RGB uint8, whatever the file's mode, and upright.

Real photos carry an EXIF orientation tag (phones store the sensor's pixels and a tag
saying how to turn them); viewers, annotation tools and detectron2 apply it, and so does
``read_image_rgb`` by default, so pixels, boxes and masks share one frame in training,
evaluation and inference. PIL is used rather than OpenCV: OpenCV returns a grey-filled
image for a truncated JPEG (it only prints to stderr), where PIL raises.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "as_rgb_array", "exif_orientation", "image_to_tensor", "read_image_rgb", "upright_size"]

# The normalisation torchvision's ImageNet weights were trained with (and every trunk here): RGB in [0, 1].
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# EXIF orientations (2..8) whose upright image has height and width swapped.
_SWAPS_AXES = frozenset({5, 6, 7, 8})


def exif_orientation(image: Image.Image) -> int:
    """The image's EXIF orientation tag, 1 (as stored) when it has none or an invalid one.

    Args:
        image: an opened PIL image.
    """
    value = image.getexif().get(ExifTags.Base.Orientation, 1)
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def upright_size(stored: tuple[int, int], orientation: int) -> tuple[int, int]:
    """``(height, width)`` of an image once its EXIF ``orientation`` is applied.

    Args:
        stored: ``(height, width)`` of the pixels as stored.
        orientation: the EXIF orientation tag (1..8).
    """
    return (stored[1], stored[0]) if orientation in _SWAPS_AXES else stored


def as_rgb_array(image: Image.Image) -> np.ndarray:
    """An opened PIL image as RGB uint8 (H x W x 3): grey and palette expanded, alpha dropped, 16-bit to its high byte."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        values = np.asarray(image).astype(np.int64)
        if image.mode == "I" and values.max(initial=0) <= 255:
            gray = values.astype(np.uint8)
        else:
            gray = (np.clip(values, 0, 65535) >> 8).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image)


def read_image_rgb(path: str | os.PathLike[str], *, exif_transpose: bool = True) -> np.ndarray:
    """Read an image file as RGB uint8 (H x W x 3), whatever its mode, upright.

    PIL is used rather than OpenCV: OpenCV returns a grey-filled image for a
    truncated JPEG (it only prints to stderr), where PIL raises. The EXIF
    orientation tag is applied (``PIL.ImageOps.exif_transpose``), as detectron2
    does and as viewers and annotation tools show photos: a phone photo comes
    out the way it was taken.

    Args:
        path: image file.
        exif_transpose: apply the EXIF orientation tag; ``False`` returns the
            pixels as stored.

    Returns:
        The image array. Grayscale and palette images are expanded, alpha is
        dropped, 16-bit images keep their 8 most significant bits.

    Raises:
        OSError: the file is missing, truncated or not an image (PIL may raise
            other exception types for some corrupt files).
    """
    with Image.open(path) as image:
        image.load()
        if exif_transpose and exif_orientation(image) != 1:
            return as_rgb_array(ImageOps.exif_transpose(image))
        return as_rgb_array(image)


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """HWC uint8 array -> CHW float32 tensor in [0, 1] (what torchvision detectors take).

    Args:
        image: H x W x 3 uint8 array.
    """
    # In numpy, one single-threaded pass: torch's intra-op threads would compete with
    # DataLoader workers and the training step for the same cores.
    chw = np.empty((image.shape[2], image.shape[0], image.shape[1]), dtype=np.float32)
    np.divide(image.transpose(2, 0, 1), np.float32(255.0), out=chw)
    return torch.from_numpy(chw)
