"""Synthetic shapes: annotations agree with the pixels, the data set reads back, output is deterministic."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.shapes import SHAPES_CLASSES

from detection.data import CocoDetection

from engine import shapes
from helpers import REPO



def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shapes.generate(tmp_path_factory.mktemp("shapes"), num_train=24, num_val=6, image_size=192, seed=7)


def test_layout_and_categories(shapes_root: Path) -> None:
    for split, count in (("train", 24), ("val", 6)):
        data = json.loads((shapes_root / "annotations" / f"instances_{split}.json").read_text())
        assert len(data["images"]) == count
        assert len(list((shapes_root / split).glob("*.jpg"))) == count
        assert [c["name"] for c in data["categories"]] == list(SHAPES_CLASSES)
        assert {"info", "licenses"} <= data.keys()
        per_image = np.bincount([a["image_id"] for a in data["annotations"]], minlength=count + 1)[1:]
        assert per_image.min() >= 1 and per_image.max() <= 8
        for ann in data["annotations"]:
            assert ann["iscrowd"] == 0
            assert all(len(poly) >= 6 and len(poly) % 2 == 0 for poly in ann["segmentation"])
    assert len(SHAPES_CLASSES) >= 5


def test_read_back_agrees_with_json(shapes_root: Path) -> None:
    ds = CocoDetection(shapes_root, "train", masks=True)
    assert len(ds) == 24
    for index in range(len(ds)):
        image, target = ds[index]
        image_id = int(target["image_id"])
        anns = sorted(ds.coco.imgToAnns[image_id], key=lambda a: a["id"])
        info = ds.coco.imgs[image_id]
        assert image.shape == (3, info["height"], info["width"])
        assert image.dtype == torch.float32 and 0.0 <= float(image.min()) and float(image.max()) <= 1.0
        expected_boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)])
        torch.testing.assert_close(target["boxes"], expected_boxes.float())
        assert [ds.label_to_cat_id[int(label)] for label in target["labels"]] == [a["category_id"] for a in anns]
        torch.testing.assert_close(target["area"], torch.tensor([a["area"] for a in anns], dtype=torch.float32))
        masks = target["masks"]
        assert masks.dtype == torch.uint8 and masks.shape[1:] == image.shape[1:]
        for mask, box, ann in zip(masks, target["boxes"], anns):
            ys, xs = torch.nonzero(mask, as_tuple=True)
            mask_box = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
            assert torch.all((mask_box - box).abs() <= 1.0), (mask_box, box)
            assert abs(int(mask.sum()) - ann["area"]) <= 1


def test_visible_pixels_are_annotated(shapes_root: Path) -> None:
    """Later shapes occlude earlier ones: the visible masks of one image never overlap."""
    ds = CocoDetection(shapes_root, "val", masks=True)
    for index in range(len(ds)):
        masks = ds[index][1]["masks"]
        assert int(masks.sum(dim=0).max()) <= 1


def test_object_sizes_span_coco_areas() -> None:
    areas = []
    for index in range(60):
        rng = np.random.default_rng([0, 0, index])
        _, objects = shapes.render_image(rng, 320, 320)
        areas += [obj["area"] for obj in objects]
    areas_arr = np.array(areas)
    assert (areas_arr < 32**2).any() and ((areas_arr >= 32**2) & (areas_arr < 96**2)).any() and (areas_arr >= 96**2).any()
    assert areas_arr.min() >= shapes.MIN_AREA


def test_small_images_keep_learnable_objects() -> None:
    for index in range(20):
        _, objects = shapes.render_image(np.random.default_rng([1, 0, index]), 128, 96)
        for obj in objects:
            assert max(obj["bbox"][2], obj["bbox"][3]) >= 4


def test_same_seed_is_byte_identical(tmp_path: Path) -> None:
    a = shapes.generate(tmp_path / "a", num_train=4, num_val=2, image_size=96, seed=3)
    b = shapes.generate(tmp_path / "b", num_train=4, num_val=2, image_size=96, seed=3)
    c = shapes.generate(tmp_path / "c", num_train=4, num_val=2, image_size=96, seed=4)
    assert _digests(a) == _digests(b)
    assert len(_digests(a)) == 4 + 2 + 2
    assert _digests(a) != _digests(c)


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="image_size"):
        shapes.generate(tmp_path, num_train=1, num_val=1, image_size=16)


def test_cli_writes_data_set(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    result = subprocess.run(
        [sys.executable, "tools/make_shapes.py", "--out", str(out), "--train", "3", "--val", "2", "--size", "96", "--seed", "1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    assert str(out) in result.stdout
    assert len(json.loads((out / "annotations" / "instances_val.json").read_text())["images"]) == 2
    assert _digests(out) == _digests(shapes.generate(tmp_path / "lib", num_train=3, num_val=2, image_size=96, seed=1))
