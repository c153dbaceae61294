"""Class maps people can look at: VOC colours, overlays on the image with a legend, palette PNGs.

Class names in the legend are set by ``engine.text`` (a font with every glyph of the name, CJK
included), as detection labels are.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from engine.text import label_font

__all__ = ["colorize", "draw_segmentation", "save_class_map", "voc_palette"]


def voc_palette(num: int = 256) -> np.ndarray:
    """Pascal VOC's colour map: ``num`` x 3 uint8, label 0 black, 255 the border colour (224, 224, 192).

    Args:
        num: number of colours (256 covers every uint8 label).
    """
    palette = np.zeros((num, 3), dtype=np.uint8)
    for label in range(num):
        c, r, g, b = label, 0, 0, 0
        for shift in range(7, -1, -1):
            r |= ((c >> 0) & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        palette[label] = (r, g, b)
    return palette


def _as_numpy_map(class_map: np.ndarray | torch.Tensor) -> np.ndarray:
    values = class_map.detach().cpu().numpy() if isinstance(class_map, torch.Tensor) else np.asarray(class_map)
    if values.ndim != 2:
        raise ValueError(f"a class map is H x W, got shape {values.shape}")
    if values.size and (values.min() < 0 or values.max() > 255):
        raise ValueError(f"class map values must lie in 0..255, got {values.min()}..{values.max()}")
    return values.astype(np.uint8)


def colorize(class_map: np.ndarray | torch.Tensor, palette: np.ndarray | None = None) -> np.ndarray:
    """Colour every pixel by its label.

    Args:
        class_map: H x W labels 0..255.
        palette: 256 x 3 uint8 colours (default ``voc_palette()``).

    Returns:
        H x W x 3 uint8 RGB.
    """
    palette = voc_palette() if palette is None else np.asarray(palette, dtype=np.uint8)
    return palette[_as_numpy_map(class_map)]


def _image_hwc(image: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(image, torch.Tensor):
        img = image.detach().cpu()
        if img.dtype != torch.uint8:
            img = (img.clamp(0, 1) * 255).round().to(torch.uint8)
        if img.ndim != 3 or img.shape[0] != 3:
            raise ValueError(f"a tensor image must be CHW with 3 channels, got {tuple(img.shape)}")
        return img.permute(1, 2, 0).numpy()
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"a numpy image must be H x W x 3 uint8 RGB, got {array.dtype} {array.shape}")
    return array


def draw_segmentation(
    image: np.ndarray | torch.Tensor,
    class_map: np.ndarray | torch.Tensor,
    *,
    class_names: Sequence[str] | None = None,
    alpha: float = 0.5,
    palette: np.ndarray | None = None,
    draw_background: bool = False,
    ignore_index: int = 255,
    legend: bool = True,
) -> torch.Tensor:
    """Blend the class colours over the image and list the classes present.

    Args:
        image: H x W x 3 uint8 RGB array, or CHW tensor (uint8, or float in [0, 1]).
        class_map: H x W labels of the same size.
        class_names: name per label, for the legend (default the label numbers).
        alpha: opacity of the colours.
        palette: 256 x 3 uint8 colours (default VOC's).
        draw_background: also tint label 0.
        ignore_index: label left untinted (and out of the legend).
        legend: draw a key of the classes present in the top-left corner.

    Returns:
        A uint8 CHW tensor (``engine.plots.save_image`` writes it).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    rgb = _image_hwc(image)
    labels = _as_numpy_map(class_map)
    if labels.shape != rgb.shape[:2]:
        raise ValueError(f"class map {labels.shape} and image {rgb.shape[:2]} differ in size")
    palette = voc_palette() if palette is None else np.asarray(palette, dtype=np.uint8)
    tint = labels != ignore_index
    if not draw_background:
        tint &= labels != 0
    out = rgb.astype(np.float32)
    out[tint] = (1.0 - alpha) * out[tint] + alpha * palette[labels[tint]].astype(np.float32)
    out = np.clip(np.round(out), 0, 255).astype(np.uint8)
    if legend:
        present = [int(v) for v in np.unique(labels[tint])]
        if present:
            out = _draw_legend(out, present, class_names, palette)
    return torch.from_numpy(np.ascontiguousarray(out)).permute(2, 0, 1)


def _draw_legend(rgb: np.ndarray, labels: list[int], class_names: Sequence[str] | None, palette: np.ndarray) -> np.ndarray:
    height, width = rgb.shape[:2]
    size = max(10, round(min(height, width) / 30))
    pil = Image.fromarray(rgb)
    draw = ImageDraw.Draw(pil)
    pad = max(1, size // 4)
    y = pad
    for label in labels:
        name = class_names[label] if class_names is not None and 0 <= label < len(class_names) else str(label)
        font = label_font(name, size)  # per name: a Chinese name needs another font than a Latin one
        left, top, right, bottom = draw.textbbox((0, 0), name, font=font)
        box_h = bottom - top + 2 * pad
        colour = tuple(int(c) for c in palette[label])
        draw.rectangle((pad, y, pad + box_h, y + box_h), fill=colour, outline=(255, 255, 255))
        x = 2 * pad + box_h
        draw.rectangle((x, y, x + right - left + 2 * pad, y + box_h), fill=(0, 0, 0))
        draw.text((x + pad - left, y + pad - top), name, fill=(255, 255, 255), font=font)
        y += box_h + pad
        if y > height - box_h:
            break
    return np.asarray(pil).copy()


def save_class_map(path: str | os.PathLike, class_map: np.ndarray | torch.Tensor, palette: np.ndarray | None = None) -> Path:
    """Write a class map as a palette PNG, VOC's own mask format (pixel values are the labels).

    Args:
        path: destination ``.png``.
        class_map: H x W labels 0..255.
        palette: 256 x 3 uint8 colours (default VOC's).

    Returns:
        The path.
    """
    palette = voc_palette() if palette is None else np.asarray(palette, dtype=np.uint8)
    labels = np.ascontiguousarray(_as_numpy_map(class_map))
    png = Image.frombytes("P", (labels.shape[1], labels.shape[0]), labels.tobytes())
    png.putpalette(palette.reshape(-1).tolist())
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    png.save(path)
    return path
