"""Pictures people would rather see than read: detections on images.

Labels are legible in any script: the font is chosen per label by ``engine.text``, the one
text path every picture of the project uses.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

from engine.text import label_font, text_color

__all__ = ["draw_detections"]

_PALETTE = [
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40),
]


def _draw_labels(img: torch.Tensor, boxes: torch.Tensor, texts: Sequence[str], colors: Sequence[tuple[int, int, int]]) -> torch.Tensor:
    from PIL import Image, ImageDraw

    height, width = img.shape[-2:]
    size = max(12, round(min(height, width) / 28))
    pil = Image.fromarray(img.permute(1, 2, 0).numpy())
    draw = ImageDraw.Draw(pil)
    pad = max(1, size // 6)
    for (x0, y0, _, _), text, color in zip(boxes.tolist(), texts, colors):
        font = label_font(text, size)  # per label: a Chinese name needs another font than a Latin one
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        w, h = right - left + 2 * pad, bottom - top + 2 * pad
        # Above the box when there is room, else just inside its top edge; never off the image.
        x = min(max(x0, 0), max(width - w, 0))
        y = y0 - h if y0 - h >= 0 else max(y0, 0)
        y = min(y, max(height - h, 0))
        draw.rectangle((x, y, x + w, y + h), fill=color)
        draw.text((x + pad - left, y + pad - top), text, fill=text_color(color), font=font)
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
