"""Drawn detections stay legible: small pictures are upscaled, labels sit on a filled, contrasting box."""

from __future__ import annotations

import json

import numpy as np
import torch

from detection.visualize import _PALETTE, draw_detections
from engine.text import text_color as _text_color
from engine.plots import plot_curves


def _detections() -> dict[str, torch.Tensor]:
    return {
        "boxes": torch.tensor([[10.0, 20.0, 60.0, 60.0]]),
        "scores": torch.tensor([0.9]),
        "labels": torch.tensor([1]),
    }


def test_small_images_are_upscaled_and_labels_sit_on_the_class_colour():
    image = torch.full((3, 80, 100), 0.5)
    out = draw_detections(image, _detections(), ["__background__", "circle"])
    assert out.dtype == torch.uint8 and tuple(out.shape) == (3, 512, 640)
    colour = torch.tensor(_PALETTE[1], dtype=torch.uint8)
    # The label box above the detection (y0 = 20 * 6.4 = 128) is filled with the class colour.
    band = out[:, 110:126, 66:120].permute(1, 2, 0).reshape(-1, 3)
    filled = (band == colour).all(dim=1).float().mean()
    grey = (band == 128).all(dim=1).float().mean()
    assert filled > 0.3 and grey < 0.05
    # ...and carries text in the contrasting colour.
    text = torch.tensor(_text_color(_PALETTE[1]), dtype=torch.uint8)
    assert (out[:, 95:128, 64:200].permute(1, 2, 0).reshape(-1, 3) == text).all(dim=1).any()


def test_label_font_grows_with_the_picture():
    def label_height(size: int) -> int:
        image = torch.full((3, size, size), 0.5)
        det = {"boxes": torch.tensor([[0.3 * size, 0.5 * size, 0.8 * size, 0.9 * size]]), "scores": torch.tensor([0.9]),
               "labels": torch.tensor([2])}
        out = draw_detections(image, det, ["bg", "a", "square"], min_side=0)
        colour = torch.tensor(_PALETTE[2], dtype=torch.uint8)
        rows = (out.permute(1, 2, 0) == colour).all(dim=2).float().mean(dim=1)
        top = int(0.5 * size)
        return int((rows[:top] > 0.05).sum())  # rows above the box mostly filled: the label band

    small, large = label_height(512), label_height(1536)
    assert small >= 12 and large > 2 * small


def test_text_colour_contrasts_with_its_background():
    assert _text_color((255, 225, 25)) == (0, 0, 0)
    assert _text_color((0, 0, 128)) == (255, 255, 255)


def test_curves_are_drawn_from_metrics_jsonl(tmp_path):
    lines = [{"iter": i, "epoch": 0, "loss": 2.0 / i, "loss_classifier": 1.0 / i} for i in range(1, 6)]
    lines.append({"iter": 5, "epoch": 0, "bbox/AP": 12.5, "bbox/AP50": 30.0})
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in lines))
    out = plot_curves(tmp_path / "metrics.jsonl", tmp_path / "curves.png")
    from PIL import Image

    picture = np.asarray(Image.open(out))
    assert picture.shape[0] > 300 and picture.std() > 10
