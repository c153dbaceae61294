"""Real photos and real class names: EXIF orientation in every reader, labels in any script, wide-character tables."""

from __future__ import annotations

import json
import logging
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from deploy import Predictor

from detection import build_detector
from detection import visualize
from engine import text
from detection.data import CocoDetection, collate_fn
from engine.images import read_image_rgb
from detection.evaluation import format_per_category

DARK, BRIGHT = 20, 235


def _scene(height: int, width: int, box: tuple[int, int, int, int]) -> np.ndarray:
    """A dark picture with one bright block at ``box`` (x, y, w, h): where the object is, as a person sees it."""
    rgb = np.full((height, width, 3), DARK, dtype=np.uint8)
    x, y, w, h = box
    rgb[y:y + h, x:x + w] = BRIGHT
    return rgb


def _save_photo(path: Path, upright: np.ndarray, orientation: int = 6) -> None:
    """Save ``upright`` as a phone does: the pixels stored turned, with the EXIF tag that turns them back."""
    turns = {1: 0, 3: 2, 6: 1, 8: -1}[orientation]  # orientation 6: the stored image is the upright one turned 90° left
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(np.ascontiguousarray(np.rot90(upright, k=turns))).save(path, exif=exif, quality=95)


def _coco(root: Path, images: list[tuple[str, int, int, tuple[int, int, int, int]]], split: str = "val") -> Path:
    """A COCO set of ``(file, height, width, box)``: one object per image, sizes and boxes as the JSON records them."""
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    data = {
        "images": [{"id": i, "file_name": f, "height": h, "width": w} for i, (f, h, w, _) in enumerate(images, start=1)],
        "annotations": [
            {"id": i, "image_id": i, "category_id": 1, "bbox": list(box), "iscrowd": 0, "area": box[2] * box[3]}
            for i, (_, _, _, box) in enumerate(images, start=1)
        ],
        "categories": [{"id": 1, "name": "thing"}],
    }
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
    (root / split).mkdir(exist_ok=True)
    return root / split


def _box_mean(image: torch.Tensor, box_xyxy: torch.Tensor) -> float:
    x0, y0, x1, y1 = (int(round(v)) for v in box_xyxy.tolist())
    return float(image[:, y0:y1, x0:x1].mean() * 255)


# ---------------------------------------------------------------------------------------------
# EXIF orientation: the data set


def test_a_non_square_phone_photo_is_turned_upright_not_skipped(tmp_path):
    box = (18, 2, 12, 8)
    img_dir = _coco(tmp_path, [("phone.jpg", 24, 32, box)])  # JSON: the upright frame, as annotation tools record it
    _save_photo(img_dir / "phone.jpg", _scene(24, 32, box))
    ds = CocoDetection(tmp_path, "val")
    image, target = ds[0]
    assert ds.num_skipped == 0 and ds.skipped_files == []
    assert tuple(image.shape) == (3, 24, 32)
    assert _box_mean(image, target["boxes"][0]) > 200  # the object is inside its box
    assert ds.num_rotated == 1
    assert "1 images turned upright by their EXIF orientation tag" in ds.orientation_summary()


def test_a_square_phone_photo_gets_pixels_in_the_frame_of_its_boxes(tmp_path):
    box = (20, 2, 10, 8)  # top right as seen; top left in the stored pixels
    img_dir = _coco(tmp_path, [("square.jpg", 32, 32, box)])
    _save_photo(img_dir / "square.jpg", _scene(32, 32, box))
    image, target = CocoDetection(tmp_path, "val")[0]
    assert _box_mean(image, target["boxes"][0]) > 200


def test_a_set_annotated_on_stored_pixels_keeps_them_with_exif_transpose_false(tmp_path):
    stored_box = (2, 2, 8, 10)  # the annotation was drawn on the pixels as stored
    img_dir = _coco(tmp_path, [("square.jpg", 32, 32, stored_box)])
    upright = np.rot90(_scene(32, 32, stored_box), k=-1)  # what a viewer shows once the tag is applied
    _save_photo(img_dir / "square.jpg", upright)
    ds = CocoDetection(tmp_path, "val", exif_transpose=False)
    image, target = ds[0]
    assert _box_mean(image, target["boxes"][0]) > 200
    assert ds.num_rotated == 0
    assert "0 images turned upright" in ds.orientation_summary() and "1 with a tag kept as stored" in ds.orientation_summary()
    # The default turns the same square image upright, away from these boxes.
    image, target = CocoDetection(tmp_path, "val")[0]
    assert _box_mean(image, target["boxes"][0]) < 100


def test_a_size_that_tells_the_frame_wins_over_the_option_with_one_warning(tmp_path, caplog):
    box = (18, 2, 12, 8)
    img_dir = _coco(tmp_path, [("a.jpg", 24, 32, box), ("b.jpg", 24, 32, box)])
    for name in ("a.jpg", "b.jpg"):
        _save_photo(img_dir / name, _scene(24, 32, box))
    ds = CocoDetection(tmp_path, "val", exif_transpose=False)
    with caplog.at_level(logging.WARNING, logger="detection.data.coco"):
        samples = [ds[i] for i in range(len(ds))]
    assert ds.num_skipped == 0 and ds.num_rotated == 2
    assert all(_box_mean(image, target["boxes"][0]) > 200 for image, target in samples)
    warnings = [r.getMessage() for r in caplog.records if "exif_transpose" in r.getMessage()]
    assert len(warnings) == 1 and "set it to true" in warnings[0], warnings


def test_a_stored_frame_size_is_kept_as_stored_by_default(tmp_path):
    stored_box = (2, 2, 10, 8)
    img_dir = _coco(tmp_path, [("stored.jpg", 24, 32, stored_box)])  # JSON: the stored frame
    _save_photo(img_dir / "stored.jpg", np.rot90(_scene(24, 32, stored_box), k=-1))
    ds = CocoDetection(tmp_path, "val")
    image, target = ds[0]
    assert ds.num_skipped == 0 and tuple(image.shape) == (3, 24, 32)
    assert _box_mean(image, target["boxes"][0]) > 200
    assert ds.num_rotated == 0


def test_a_size_matching_neither_frame_is_skipped_naming_both(tmp_path, caplog):
    box = (2, 2, 8, 8)
    img_dir = _coco(tmp_path, [("odd.jpg", 20, 20, box), ("plain.png", 24, 32, box)])
    _save_photo(img_dir / "odd.jpg", _scene(24, 32, box))
    Image.fromarray(_scene(24, 32, box)).save(img_dir / "plain.png")
    ds = CocoDetection(tmp_path, "val")
    with caplog.at_level(logging.WARNING, logger="detection.data.coco"):
        _, target = ds[0]
    assert int(target["image_id"]) == 2 and ds.num_skipped == 1
    assert "EXIF orientation 6: (32, 24) as stored, (24, 32) upright" in caplog.text


def test_rotations_are_counted_across_dataloader_workers(tmp_path):
    box = (18, 2, 12, 8)
    names = ["p0.jpg", "p1.jpg", "p2.jpg"]
    img_dir = _coco(tmp_path, [(n, 24, 32, box) for n in names] + [("plain.png", 24, 32, box)])
    for name in names:
        _save_photo(img_dir / name, _scene(24, 32, box))
    Image.fromarray(_scene(24, 32, box)).save(img_dir / "plain.png")
    ds = CocoDetection(tmp_path, "val")
    for _ in DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate_fn):
        pass
    assert ds.num_rotated == 3 and ds.num_skipped == 0


def test_read_image_rgb_applies_the_tag_unless_told_not_to(tmp_path):
    upright = _scene(24, 32, (18, 2, 12, 8))
    _save_photo(tmp_path / "p.jpg", upright)
    read = read_image_rgb(tmp_path / "p.jpg")
    assert read.shape == (24, 32, 3)
    assert np.abs(read.astype(int) - upright).mean() < 4  # JPEG noise only
    assert read_image_rgb(tmp_path / "p.jpg", exif_transpose=False).shape == (32, 24, 3)


# ---------------------------------------------------------------------------------------------
# EXIF orientation: inference


def test_predictor_sees_a_photo_upright_from_a_path_or_a_pil_image(tmp_path, one_thread):
    torch.manual_seed(0)
    model = build_detector(
        "faster_rcnn", num_classes=3, min_size=64, max_size=64, out_channels=32, representation_size=64,
        rpn_pre_nms_top_n_test=50, rpn_post_nms_top_n_test=20, box_score_thresh=0.0,
    )
    predictor = Predictor(model, device="cpu", score_thresh=0.0)
    upright = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    _save_photo(tmp_path / "p.jpg", upright)
    reference = predictor(read_image_rgb(tmp_path / "p.jpg"))  # arrays are taken as given: this one is upright
    assert reference.image_size == (48, 64)
    with Image.open(tmp_path / "p.jpg") as pil:
        for prediction in (predictor(tmp_path / "p.jpg"), predictor(pil)):
            assert prediction.image_size == (48, 64)
            assert len(prediction) > 0
            np.testing.assert_allclose(prediction.boxes, reference.boxes, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Labels in any script


@pytest.fixture
def fresh_fonts():
    """Font choices made again: nothing cached from another test, nothing left for the next."""
    text.reset_font_choice()
    yield
    text.reset_font_choice()


def _label_band(name: str) -> torch.Tensor:
    det = {"boxes": torch.tensor([[10.0, 40.0, 90.0, 90.0]]), "scores": torch.tensor([0.9]), "labels": torch.tensor([1])}
    out = visualize.draw_detections(torch.full((3, 100, 100), 0.5), det, ["__background__", name])
    return out[:, 150:256, :]  # scaled to 512 px: the label sits above y0 = 40 * 5.12


def test_chinese_labels_are_drawn_with_their_glyphs_not_empty_boxes(fresh_fonts, caplog):
    with caplog.at_level(logging.WARNING, logger="engine.text"):
        cat, dog = _label_band("猫"), _label_band("狗")
    # Without a font that has them, both names come out as the same empty box (.notdef).
    assert not torch.equal(cat, dog)
    assert not caplog.records
    # The choice is per text: a Latin name stays in DejaVu Sans.
    assert Path(text.face_for("person 0.90")[0]).name == "DejaVuSans.ttf"
    assert Path(text.face_for("猫 0.90")[0]).name != "DejaVuSans.ttf"


def test_a_warning_says_once_that_no_font_has_the_characters(fresh_fonts, monkeypatch, caplog):
    only_latin = text.font_faces()[:1]
    assert Path(only_latin[0][0]).name == "DejaVuSans.ttf"
    monkeypatch.setattr(text, "font_faces", lambda: only_latin)
    with caplog.at_level(logging.WARNING, logger="engine.text"):
        cat, dog = _label_band("猫"), _label_band("狗")
        _label_band("猫")
    assert torch.equal(cat, dog)  # what the test above tells apart: tofu boxes
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "猫" in warnings[0] and "pip install noto-cjk-sans-otc" in warnings[0], warnings


# ---------------------------------------------------------------------------------------------
# The per-category AP table


def _columns(text: str) -> int:
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def test_per_category_table_aligns_names_in_wide_characters():
    table = format_per_category({"person": 50.0, "长颈鹿": 12.5, "猫": 3.25, "traffic light": 1.0}, "bbox")
    lines = table.splitlines()
    # Every line ends at the same terminal column, and each AP sits right-aligned there.
    assert len({_columns(line) for line in lines}) == 1, table
    assert [line.split()[-1] for line in lines[2:]] == ["50.00", "12.50", "3.25", "1.00"]
    assert lines[3].startswith("长颈鹿 ")
