"""Pictures people would rather see than read: detections on images, loss and AP curves.

Labels are legible in any script: each label is set in the first font that has all of its
characters, DejaVu Sans (Latin, Greek, Cyrillic, ...) first, then Noto Sans CJK (Chinese,
Japanese, Korean; the ``noto-cjk-sans-otc`` package, a dependency), then every other font
matplotlib finds on the system. When none has them all, a warning says so once.
"""

from __future__ import annotations

import functools
import logging
import unicodedata
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

__all__ = ["draw_detections"]

logger = logging.getLogger(__name__)

_PALETTE = [
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40),
]


_LATIN_FONT = "DejaVu Sans"
_CJK_FACE = 2  # Noto Sans CJK SC in the collection (0 JP, 1 KR, 2 SC, 3 TC, 4 HK); every face covers all three scripts
_warned_uncovered = False


@functools.lru_cache(maxsize=None)
def _font_faces() -> tuple[tuple[str, int], ...]:
    """``(font file, face index)`` that labels may be set in, in order of preference."""
    from matplotlib import font_manager

    faces: list[tuple[str, int]] = []
    try:
        faces.append((font_manager.findfont(_LATIN_FONT, fallback_to_default=False), 0))
    except ValueError:
        pass
    try:
        from noto_cjk_sans_otc import FONT_PATH

        faces.append((str(FONT_PATH), _CJK_FACE))
    except ImportError:
        pass

    def plainness(entry: Any) -> tuple:  # regular upright faces before italics and bolds
        weight = entry.weight if isinstance(entry.weight, int) else 1000
        return entry.style != "normal", abs(weight - 400), entry.name

    for entry in sorted(font_manager.fontManager.ttflist, key=plainness):
        face = (entry.fname, int(getattr(entry, "index", 0)))
        if face not in faces:
            faces.append(face)
    return tuple(faces)


@functools.lru_cache(maxsize=None)
def _coverage(fname: str, index: int) -> frozenset[int]:
    """Code points the font face has glyphs for (empty when it cannot be read)."""
    from fontTools.ttLib import TTFont

    try:
        with TTFont(fname, fontNumber=index, lazy=True) as font:
            return frozenset(font.getBestCmap() or ())
    except Exception:  # noqa: BLE001  (a broken system font is one we cannot use, nothing more)
        return frozenset()


@functools.lru_cache(maxsize=1024)
def _face_for(text: str) -> tuple[str, int] | None:
    """The first face with a glyph for every visible character of ``text`` (else the one with most)."""
    global _warned_uncovered
    needed = {ord(c) for c in text if not c.isspace() and unicodedata.category(c) not in ("Cc", "Cf")}
    best, best_covered = None, -1
    for face in _font_faces():
        covered = len(needed & _coverage(*face))
        if covered == len(needed):
            return face
        if covered > best_covered:
            best, best_covered = face, covered
    if not _warned_uncovered:
        _warned_uncovered = True
        missing = "".join(sorted({chr(c) for c in needed} - {chr(c) for c in _coverage(*best)})) if best else text
        logger.warning(
            "no font found has every character of the label %r (missing %r): they are drawn as empty boxes. "
            "Install a font that has them (pip install noto-cjk-sans-otc for Chinese, Japanese and Korean, or a "
            "system font package), then rebuild matplotlib's font cache (rm -r ~/.cache/matplotlib)",
            text, missing,
        )
    return best


@functools.lru_cache(maxsize=64)
def _truetype(fname: str, index: int, size: int) -> Any:
    from PIL import ImageFont

    return ImageFont.truetype(fname, size, index=index)


def _label_font(text: str, size: int) -> Any:
    from PIL import ImageFont

    face = _face_for(text)
    if face is not None:
        try:
            return _truetype(*face, size)
        except OSError:
            pass
    return ImageFont.load_default(size)  # no TrueType font at all: PIL's own, still with a background box


def _text_color(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    # Black on light label backgrounds, white on dark ones (ITU-R BT.601 luma).
    return (0, 0, 0) if 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2] > 150 else (255, 255, 255)


def _draw_labels(img: torch.Tensor, boxes: torch.Tensor, texts: Sequence[str], colors: Sequence[tuple[int, int, int]]) -> torch.Tensor:
    from PIL import Image, ImageDraw

    height, width = img.shape[-2:]
    size = max(12, round(min(height, width) / 28))
    pil = Image.fromarray(img.permute(1, 2, 0).numpy())
    draw = ImageDraw.Draw(pil)
    pad = max(1, size // 6)
    for (x0, y0, _, _), text, color in zip(boxes.tolist(), texts, colors):
        font = _label_font(text, size)  # per label: a Chinese name needs another font than a Latin one
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        w, h = right - left + 2 * pad, bottom - top + 2 * pad
        # Above the box when there is room, else just inside its top edge; never off the image.
        x = min(max(x0, 0), max(width - w, 0))
        y = y0 - h if y0 - h >= 0 else max(y0, 0)
        y = min(y, max(height - h, 0))
        draw.rectangle((x, y, x + w, y + h), fill=color)
        draw.text((x + pad - left, y + pad - top), text, fill=_text_color(color), font=font)
    return torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1)


def draw_detections(
    image: torch.Tensor,
    detections: Mapping[str, torch.Tensor],
    class_names: Sequence[str],
    *,
    score_thresh: float = 0.5,
    mask_threshold: float = 0.5,
    min_side: int = 512,
) -> torch.Tensor:
    """Draw boxes, class names, scores and masks on one image, legibly at any image size.

    Small images are upscaled first; labels are set in a font sized with the picture,
    on a filled box of the detection's colour with black or white text, whichever
    contrasts.

    Args:
        image: CHW float in [0, 1] or uint8.
        detections: a torchvision detection dict (``boxes``, ``scores``, ``labels``,
            optionally ``masks``).
        class_names: name per contiguous label (index 0 the background).
        score_thresh: detections below this score are not drawn.
        mask_threshold: mask probability that counts as inside.
        min_side: upscale small images so their shorter side is at least this many
            pixels before drawing (0: never).

    Returns:
        A uint8 CHW image.
    """
    img = image.detach().cpu()
    if img.dtype != torch.uint8:
        img = (img.clamp(0, 1) * 255).round().to(torch.uint8)
    keep = detections["scores"].detach().cpu() >= score_thresh
    boxes = detections["boxes"].detach().cpu()[keep].float()
    masks = detections["masks"].detach().cpu()[keep][:, 0] if "masks" in detections else None
    scale = max(1.0, min_side / min(img.shape[-2:])) if min_side else 1.0
    if scale > 1.0:
        size = [round(img.shape[-2] * scale), round(img.shape[-1] * scale)]
        img = torch.nn.functional.interpolate(img[None].float(), size=size, mode="bilinear", align_corners=False)[0].round().clamp(0, 255).to(torch.uint8)
        boxes = boxes * scale
        if masks is not None and len(masks):
            masks = torch.nn.functional.interpolate(masks[None].float(), size=size, mode="bilinear", align_corners=False)[0]
    labels = detections["labels"].detach().cpu()[keep].tolist()
    scores = detections["scores"].detach().cpu()[keep].tolist()
    colors = [_PALETTE[label % len(_PALETTE)] for label in labels]
    if masks is not None and len(masks):
        img = draw_segmentation_masks(img, masks > mask_threshold, alpha=0.45, colors=colors)
    if len(boxes):
        names = [class_names[label] if 0 <= label < len(class_names) else str(label) for label in labels]
        width = max(2, round(min(img.shape[-2:]) / 200))
        img = draw_bounding_boxes(img, boxes, colors=colors, width=width)
        img = _draw_labels(img, boxes, [f"{n} {s:.2f}" for n, s in zip(names, scores)], colors)
    return img
