"""CocoDetection on a fabricated data set holding every kind of bad input the data layer promises to handle."""

from __future__ import annotations

import copy
import json
import logging
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from detection.data import (
    CocoDetection,
    build_transforms,
    cat_id_to_label_from_mapping,
    collate_fn,
    label_to_cat_id_from_mapping,
)

H, W = 30, 40
CATEGORIES = [{"id": 90, "name": "zebra"}, {"id": 1, "name": "person"}, {"id": 3, "name": "car"}]
BAD_FILES = ["corrupt.jpg", "missing.jpg", "truncated.jpg", "wrong_size.png"]


def _rgb(seed: int, height: int = H, width: int = W) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _poly(x0: float, y0: float, x1: float, y1: float) -> list[list[float]]:
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def _write_images(img_dir: Path) -> None:
    img_dir.mkdir(parents=True)
    Image.fromarray(_rgb(0)).save(img_dir / "good.jpg", quality=95)
    Image.fromarray(_rgb(1)).save(img_dir / "boxes.png")
    Image.fromarray(_rgb(2)).save(img_dir / "empty.png")
    Image.fromarray(_rgb(3)).save(img_dir / "crowd_only.png")
    Image.fromarray(np.full((H, W), 100, dtype=np.uint8), mode="L").save(img_dir / "gray.png")
    rgba = np.dstack([np.full((H, W, 3), (10, 20, 30), dtype=np.uint8), np.zeros((H, W), dtype=np.uint8)])
    Image.fromarray(rgba, mode="RGBA").save(img_dir / "rgba.png")
    palette = Image.new("P", (W, H), 1)
    palette.putpalette([0, 0, 0, 200, 50, 25] + [0] * 762)
    palette.save(img_dir / "palette.png")
    Image.fromarray(np.full((H, W), 0x8040, dtype=np.uint16)).save(img_dir / "gray16.png")
    (img_dir / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG" * 20)
    encoded = (img_dir / "good.jpg").read_bytes()
    (img_dir / "truncated.jpg").write_bytes(encoded[: len(encoded) // 2])
    Image.fromarray(_rgb(4, 20, 20)).save(img_dir / "wrong_size.png")


def _dataset_json() -> dict[str, Any]:
    names = [
        "good.jpg", "boxes.png", "empty.png", "crowd_only.png", "gray.png", "rgba.png",
        "palette.png", "gray16.png", "corrupt.jpg", "missing.jpg", "truncated.jpg", "wrong_size.png",
    ]  # fmt: skip
    # Image ids are not 1..N, to check that the original ids come back.
    images = [{"id": 100 + 7 * i, "file_name": n, "height": H, "width": W} for i, n in enumerate(names)]
    ids = {img["file_name"]: img["id"] for img in images}
    rle = mask_utils.encode(np.asfortranarray(np.pad(np.ones((6, 8), np.uint8), ((2, H - 8), (3, W - 11)))))
    rle["counts"] = rle["counts"].decode("ascii")
    anns = [
        {"image_id": ids["good.jpg"], "category_id": 90, "bbox": [5, 5, 10, 8], "segmentation": _poly(5, 5, 15, 13)},
        {"image_id": ids["good.jpg"], "category_id": 3, "bbox": [3, 2, 8, 6], "segmentation": rle},
        # boxes.png: in the image / partly outside (clipped) / zero width / crowd / fully outside (zero after clipping)
        {"image_id": ids["boxes.png"], "category_id": 1, "bbox": [2, 3, 10, 10], "segmentation": _poly(2, 3, 12, 13)},
        {"image_id": ids["boxes.png"], "category_id": 3, "bbox": [30, 20, 20, 20], "segmentation": _poly(30, 20, 50, 40)},
        {"image_id": ids["boxes.png"], "category_id": 90, "bbox": [5, 5, 0, 10], "segmentation": _poly(5, 5, 5, 15)},
        {"image_id": ids["boxes.png"], "category_id": 1, "bbox": [0, 0, 40, 30], "iscrowd": 1, "segmentation": _poly(0, 0, 40, 30)},
        {"image_id": ids["boxes.png"], "category_id": 90, "bbox": [45, 5, 10, 10], "segmentation": _poly(45, 5, 55, 15)},
        {"image_id": ids["crowd_only.png"], "category_id": 1, "bbox": [1, 1, 5, 5], "iscrowd": 1, "segmentation": _poly(1, 1, 6, 6)},
    ]
    for name in names[4:]:
        anns.append({"image_id": ids[name], "category_id": 1, "bbox": [1, 1, 20, 20], "segmentation": _poly(1, 1, 21, 21)})
    for i, ann in enumerate(anns, start=1):
        ann.update(id=i, area=float(ann["bbox"][2] * ann["bbox"][3]))
        ann.setdefault("iscrowd", 0)
    return {"images": images, "annotations": anns, "categories": [dict(c) for c in CATEGORIES]}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fabricated")
    _write_images(root / "val")
    (root / "annotations").mkdir()
    (root / "annotations" / "instances_val.json").write_text(json.dumps(_dataset_json()))
    return root


def _index(ds: CocoDetection, file_name: str) -> int:
    return [ds.coco.imgs[i]["file_name"] for i in ds.ids].index(file_name)


def _get(ds: CocoDetection, file_name: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    return ds[_index(ds, file_name)]


def test_category_mapping_with_gaps(root: Path) -> None:
    ds = CocoDetection(root, "val")
    assert ds.cat_ids == [1, 3, 90]
    assert ds.class_names == ["__background__", "person", "car", "zebra"]
    assert ds.num_classes == 4
    assert ds.cat_id_to_label == {1: 1, 3: 2, 90: 3}
    assert ds.label_to_cat_id == {1: 1, 2: 3, 3: 90}
    mapping = json.loads(json.dumps(ds.category_mapping()))
    assert mapping == {"cat_ids": [1, 3, 90], "names": ["person", "car", "zebra"]}
    assert label_to_cat_id_from_mapping(mapping) == ds.label_to_cat_id
    assert cat_id_to_label_from_mapping(mapping) == ds.cat_id_to_label
    assert all(ds.label_to_cat_id[ds.cat_id_to_label[c]] == c for c in ds.cat_ids)


def test_attributes_come_from_json(root: Path) -> None:
    ds = CocoDetection(root, "val")
    assert ds.ann_file == root / "annotations" / "instances_val.json"
    assert ds.img_dir == root / "val"
    assert ds.ids == sorted(ds.coco.imgs) and len(ds) == 12
    assert ds.image_sizes == [(H, W)] * 12
    assert ds.aspect_ratios() == pytest.approx([W / H] * 12)


def test_targets_of_a_good_image(root: Path) -> None:
    ds = CocoDetection(root, "val", masks=True)
    image, target = _get(ds, "good.jpg")
    assert image.shape == (3, H, W) and image.dtype == torch.float32
    assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0
    assert target["image_id"].dtype == torch.int64 and target["image_id"].ndim == 0 and int(target["image_id"]) == 100
    torch.testing.assert_close(target["boxes"], torch.tensor([[5.0, 5, 15, 13], [3, 2, 11, 8]]))
    assert target["labels"].tolist() == [3, 2]
    assert target["iscrowd"].tolist() == [0, 0]
    torch.testing.assert_close(target["area"], torch.tensor([80.0, 48.0]))
    masks = target["masks"]
    assert masks.dtype == torch.uint8 and masks.shape == (2, H, W)
    assert int(masks[1].sum()) == 48 and masks[1, 2:8, 3:11].all()  # from RLE
    assert masks[0, 5:13, 5:15].all()  # from a polygon


def test_boxes_clipped_degenerate_and_crowd_dropped(root: Path) -> None:
    ds = CocoDetection(root, "val", masks=True)
    _, target = _get(ds, "boxes.png")
    torch.testing.assert_close(target["boxes"], torch.tensor([[2.0, 3, 12, 13], [30, 20, 40, 30]]))
    assert target["labels"].tolist() == [1, 2]
    assert target["masks"].shape == (2, H, W)
    assert int(target["masks"][1].sum()) == 100  # the clipped object's mask, not another's
    assert len(target["area"]) == len(target["iscrowd"]) == 2
    # Crowd regions stay in the ground truth that evaluation uses.
    assert any(a["iscrowd"] for a in ds.coco.imgToAnns[int(target["image_id"])])


def test_empty_images_kept_or_dropped(root: Path) -> None:
    kept = CocoDetection(root, "val", masks=True)
    for name in ("empty.png", "crowd_only.png"):
        _, target = _get(kept, name)
        assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
        assert target["masks"].shape == (0, H, W)
    dropped = CocoDetection(root, "val", drop_empty=True)
    names = {dropped.coco.imgs[i]["file_name"] for i in dropped.ids}
    assert len(dropped) == 10 and not names & {"empty.png", "crowd_only.png"}
    assert len(dropped.image_sizes) == 10


@pytest.mark.parametrize(
    ("name", "rgb"),
    [("gray.png", (100, 100, 100)), ("rgba.png", (10, 20, 30)), ("palette.png", (200, 50, 25)), ("gray16.png", (0x80,) * 3)],
)
def test_image_modes_become_rgb(root: Path, name: str, rgb: tuple[int, int, int]) -> None:
    image, target = _get(CocoDetection(root, "val"), name)
    assert image.shape == (3, H, W)
    torch.testing.assert_close(image[:, 0, 0], torch.tensor(rgb, dtype=torch.float32) / 255)
    assert target["labels"].tolist() == [1]


def test_bad_images_are_skipped_warned_once_and_counted(root: Path, caplog) -> None:
    ds = CocoDetection(root, "val")
    with caplog.at_level(logging.WARNING, logger="detection.data.coco"):
        for _ in range(2):
            for name in BAD_FILES:
                index = _index(ds, name)
                _, target = ds[index]
                # The next readable index is served in place of the bad one.
                assert ds.coco.imgs[int(target["image_id"])]["file_name"] not in BAD_FILES
    skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping image ")]
    assert sorted(Path(m.split(": ")[0].removeprefix("skipping image ")).name for m in skipped) == sorted(BAD_FILES)
    assert any("differs from" in m for m in skipped)
    assert ds.num_skipped == 8
    assert sorted(Path(f).name for f in ds.skipped_files) == sorted(BAD_FILES)
    ds.reset_skipped()
    assert ds.num_skipped == 0
    ds[_index(ds, "corrupt.jpg")]
    assert ds.num_skipped == 1


def test_skip_count_is_shared_by_workers(root: Path) -> None:
    ds = CocoDetection(root, "val", transforms=build_transforms("hflip", seed=0))
    loader = DataLoader(ds, batch_size=3, num_workers=2, collate_fn=collate_fn)
    for epoch in range(2):
        seen = [int(t["image_id"]) for _, targets in loader for t in targets]
        assert len(seen) == len(ds)
        assert ds.num_skipped == len(BAD_FILES), f"epoch {epoch}"
        ds.reset_skipped()
    assert sorted(Path(f).name for f in ds.skipped_files) == sorted(BAD_FILES)


def test_every_image_unreadable_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "annotations").mkdir()
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "a.jpg").write_bytes(b"junk")
    images = [{"id": i, "file_name": name, "height": 4, "width": 4} for i, name in ((1, "a.jpg"), (2, "b.jpg"))]
    data = {"images": images, "annotations": [], "categories": [{"id": 1, "name": "x"}]}
    (tmp_path / "annotations" / "instances_train.json").write_text(json.dumps(data))
    ds = CocoDetection(tmp_path, "train")
    with pytest.raises(RuntimeError, match="no readable image"):
        ds[0]
    assert ds.num_skipped == 1 and len(ds.skipped_files) == 2


def test_pickle_and_deepcopy_keep_state(root: Path, caplog) -> None:
    ds = CocoDetection(root, "val")
    with caplog.at_level(logging.WARNING, logger="detection.data.coco"):
        ds[_index(ds, "corrupt.jpg")]
    assert "corrupt.jpg" in caplog.text
    assert "corrupt.jpg" in {Path(f).name for f in ds.skipped_files}
    for clone in (pickle.loads(pickle.dumps(ds)), copy.deepcopy(ds)):
        assert clone.num_skipped == 1
        assert clone.skipped_files == ds.skipped_files
        assert len(clone) == len(ds) and clone.category_mapping() == ds.category_mapping()


def _write_json(tmp_path: Path, data: Any) -> Path:
    (tmp_path / "annotations").mkdir(exist_ok=True)
    ann_file = tmp_path / "annotations" / "instances_val.json"
    ann_file.write_text(data if isinstance(data, str) else json.dumps(data))
    return ann_file


def test_missing_annotation_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="instances_val.json"):
        CocoDetection(tmp_path, "val")


def test_missing_image_folder(tmp_path: Path) -> None:
    _write_json(tmp_path, _dataset_json())
    with pytest.raises(FileNotFoundError, match=f"image folder not found: {tmp_path / 'val'}"):
        CocoDetection(tmp_path, "val")


def test_broken_json(tmp_path: Path) -> None:
    ann_file = _write_json(tmp_path, '{"images": [')
    with pytest.raises(ValueError, match=f"{ann_file}.*not valid JSON"):
        CocoDetection(tmp_path, "val")


def test_unknown_category_names_file_and_id(tmp_path: Path) -> None:
    data = _dataset_json()
    data["annotations"][3]["category_id"] = 7
    ann_file = _write_json(tmp_path, data)
    with pytest.raises(ValueError, match=rf"{ann_file}: annotation id 4 has category_id 7.*known ids: \[1, 3, 90\]"):
        CocoDetection(tmp_path, "val")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.pop("categories"), "missing or non-list 'categories'"),
        (lambda d: d["annotations"][0].update(image_id=5), "annotation id 1 has unknown image_id 5"),
        (lambda d: d["annotations"][0].update(bbox=[1, 2, 3]), "annotation id 1 has an invalid bbox"),
        (lambda d: d["images"][0].pop("height"), "image id 100 has no 'height'"),
        (lambda d: d["categories"].append({"id": 1, "name": "again"}), "category id 1 appears twice"),
        (lambda d: d["images"][1].update(width=0), "image id 107 has invalid size 30 x 0"),
    ],
)
def test_invalid_annotation_file(tmp_path: Path, edit: Any, message: str) -> None:
    data = _dataset_json()
    edit(data)
    _write_json(tmp_path, data)
    with pytest.raises(ValueError, match=message):
        CocoDetection(tmp_path, "val")


def test_transforms_receive_clean_objects(root: Path) -> None:
    calls = []

    def spy(image: np.ndarray, boxes: np.ndarray, labels: np.ndarray, masks: np.ndarray | None) -> dict[str, torch.Tensor]:
        calls.append((image.shape, boxes.copy(), labels.copy(), masks.shape))
        return build_transforms("none")(image, boxes, labels, masks)

    ds = CocoDetection(root, "val", transforms=spy, masks=True)
    _, target = _get(ds, "boxes.png")
    shape, boxes, labels, mask_shape = calls[-1]
    assert shape == (H, W, 3) and mask_shape == (2, H, W)
    np.testing.assert_array_equal(boxes, [[2, 3, 12, 13], [30, 20, 40, 30]])
    assert labels.tolist() == [1, 2] == target["labels"].tolist()
    torch.testing.assert_close(target["area"], torch.tensor([100.0, 400.0]))  # the annotations' areas
