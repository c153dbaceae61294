"""Semantic masks from COCO instances and VOC PNGs, the shapes view, augmentation and bad input."""

import json
import logging

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from PIL import Image

from engine.coco import AnnotationError
from engine.skips import SKIP_REASONS
from engine.images import IMAGENET_MEAN, IMAGENET_STD
from segmentation.data import (
    SHAPES_SEG_CLASSES,
    CocoSegmentation,
    VOCSegmentation,
    build_seg_transforms,
    coco_semantic_mask,
    collate_fn,
    denormalize,
    make_shapes,
)
from segmentation.visualize import voc_palette


def _box(x0, y0, x1, y1):
    """A rectangle polygon covering pixels x0..x1-1, y0..y1-1 as pycocotools rasterises it."""
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def _rasterised(polygons, h, w):
    return mask_util.decode(mask_util.merge(mask_util.frPyObjects(polygons, h, w))).astype(bool)


# ---------------------------------------------------------------------------------------------
# coco_semantic_mask


def test_union_per_category_overlaps_and_crowds_by_hand():
    h, w = 12, 16
    a1, a2 = _box(0, 0, 6, 6), _box(4, 4, 9, 9)  # category 7, overlapping each other: still 7
    b = _box(8, 0, 12, 5)                         # category 3, overlaps a2 -> 255
    crowd = mask_util.encode(np.asfortranarray(np.pad(np.ones((2, 3), np.uint8), ((10, 0), (13, 0)))))
    anns = [
        {"category_id": 7, "segmentation": a1},
        {"category_id": 7, "segmentation": a2},
        {"category_id": 3, "segmentation": b},
        {"category_id": 3, "segmentation": crowd, "iscrowd": 1},
    ]
    mapping = {3: 1, 7: 2}
    mask = coco_semantic_mask(anns, h, w, mapping)
    ra1, ra2, rb = (_rasterised(p, h, w) for p in (a1, a2, b))
    expected = np.zeros((h, w), np.uint8)
    expected[ra1 | ra2] = 2
    expected[rb] = 1
    expected[(ra1 | ra2) & rb] = 255
    expected[10:, 13:] = 255
    assert ((ra1 & ra2).any() and ((ra1 | ra2) & rb).any())  # the fixture has both kinds of overlap
    np.testing.assert_array_equal(mask, expected)
    assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 1, 2, 255}


def test_no_annotations_is_all_background():
    assert not coco_semantic_mask([], 5, 7, {1: 1}).any()


# ---------------------------------------------------------------------------------------------
# COCO layout


def _write_coco(root, *, images, annotations, categories, split="train"):
    (root / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(exist_ok=True)
    entries = []
    for image_id, (name, h, w) in enumerate(images, start=1):
        pixels = np.random.default_rng(image_id).integers(0, 255, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / split / name)
        entries.append({"id": image_id, "file_name": name, "height": h, "width": w})
    anns = []
    for i, ann in enumerate(annotations, start=1):
        x, y = ann["segmentation"][0][0], ann["segmentation"][0][1]
        anns.append({"id": i, "bbox": [x, y, 4, 4], "iscrowd": 0, "area": 16.0, **ann})
    data = {"images": entries, "annotations": anns, "categories": categories}
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
    return root


CATEGORIES = [{"id": 9, "name": "dog"}, {"id": 2, "name": "cat"}]


def test_coco_labels_are_contiguous_in_category_id_order(tmp_path, one_thread):
    root = _write_coco(
        tmp_path, images=[("a.png", 20, 24), ("b.png", 16, 16)],
        annotations=[{"image_id": 1, "category_id": 9, "segmentation": _box(2, 2, 10, 10)},
                     {"image_id": 1, "category_id": 2, "segmentation": _box(12, 4, 20, 12)}],
        categories=CATEGORIES,
    )
    ds = CocoSegmentation(root, "train")
    assert ds.class_names == ["__background__", "cat", "dog"] and ds.num_classes == 3
    assert ds.category_mapping() == {"cat_ids": [2, 9], "names": ["cat", "dog"]}
    image, mask = ds.read_sample(0)
    assert image.shape == (20, 24, 3) and mask.shape == (20, 24)
    assert mask[5, 5] == 2 and mask[8, 15] == 1 and mask[0, 0] == 0
    x, y = ds[0]
    assert x.dtype == torch.float32 and x.shape == (3, 20, 24) and y.dtype == torch.int64
    torch.testing.assert_close(denormalize(x), torch.from_numpy(image.copy()).permute(2, 0, 1), rtol=0, atol=1)
    torch.testing.assert_close(x[:, 0, 0], (torch.tensor(image[0, 0]).float() / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD))
    assert len(CocoSegmentation(root, "train", drop_empty=True)) == 1


def test_coco_annotation_without_segmentation_is_an_error(tmp_path):
    root = _write_coco(tmp_path, images=[("a.png", 8, 8)], annotations=[{"image_id": 1, "category_id": 2, "segmentation": _box(0, 0, 4, 4)}],
                       categories=CATEGORIES)
    data = json.loads((root / "annotations" / "instances_train.json").read_text())
    data["annotations"][0]["segmentation"] = []
    (root / "annotations" / "instances_train.json").write_text(json.dumps(data))
    with pytest.raises(AnnotationError, match="annotation id 1 has no segmentation"):
        CocoSegmentation(root, "train")


def test_coco_missing_files_are_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="annotation file not found"):
        CocoSegmentation(tmp_path, "train")
    root = _write_coco(tmp_path, images=[("a.png", 8, 8)], annotations=[], categories=CATEGORIES)
    (root / "train" / "a.png").unlink()
    (root / "train").rmdir()
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        CocoSegmentation(root, "train")


def test_coco_unreadable_or_resized_images_are_skipped_and_counted(tmp_path, caplog, one_thread):
    root = _write_coco(tmp_path, images=[("a.png", 8, 8), ("b.png", 8, 8), ("c.png", 8, 8)], annotations=[], categories=CATEGORIES)
    (root / "train" / "a.png").write_bytes(b"not an image")
    Image.fromarray(np.zeros((9, 8, 3), np.uint8)).save(root / "train" / "b.png")
    ds = CocoSegmentation(root, "train")
    with caplog.at_level(logging.WARNING, logger="segmentation.data"):
        image, mask = ds[0]
    assert image.shape == (3, 8, 8)
    assert ds.num_skipped == 1 and len(ds.skipped_files) == 2  # index 0 skipped once, b found bad on the way
    text = caplog.text
    assert "a.png: unreadable image" in text and "b.png: decoded size (9, 8) differs from (height, width) (8, 8)" in text
    with pytest.raises(ValueError, match="b.png: decoded size"):
        ds.read_sample(1)


# ---------------------------------------------------------------------------------------------
# VOC layout


def _write_voc(root, masks, *, split="train", listed=None):
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for name, mask in masks.items():
        h, w = mask.shape[:2]
        Image.fromarray(np.full((h, w, 3), 128, np.uint8)).save(root / "JPEGImages" / f"{name}.jpg")
        if mask.ndim == 3:
            Image.fromarray(mask).save(root / "SegmentationClass" / f"{name}.png")
        else:
            png = Image.frombytes("P", (w, h), np.ascontiguousarray(mask).tobytes())
            png.putpalette(voc_palette().reshape(-1).tolist())
            png.save(root / "SegmentationClass" / f"{name}.png")
    ids = list(masks) if listed is None else listed
    (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return root


def _voc_mask(h=10, w=12, label=15):
    mask = np.zeros((h, w), np.uint8)
    mask[2:8, 3:9] = label
    mask[2, 3:9] = 255  # VOC's object border
    return mask


def test_voc_palette_masks_keep_labels_and_the_border(tmp_path, one_thread):
    root = _write_voc(tmp_path, {"2007_000001": _voc_mask(), "2007_000002": _voc_mask(label=1)})
    ds = VOCSegmentation(root, "train")
    assert len(ds) == 2 and ds.num_classes == 21 and ds.class_names[15] == "person"
    _, mask = ds.read_sample(0)
    np.testing.assert_array_equal(mask, _voc_mask())
    image, target = ds[0]
    assert image.shape == (3, 10, 12) and target.dtype == torch.int64
    assert set(target.unique().tolist()) == {0, 15, 255}


def test_voc_missing_files_are_left_out_with_one_warning(tmp_path, caplog):
    root = _write_voc(tmp_path, {"a": _voc_mask(), "b": _voc_mask(), "c": _voc_mask()}, listed=["a", "b", "c", "d"])
    (root / "SegmentationClass" / "b.png").unlink()
    with caplog.at_level(logging.WARNING, logger="segmentation.data"):
        ds = VOCSegmentation(root, "train")
    assert ds.ids == ["a", "c"] and ds.num_missing == 2
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "left out 2 of 4 ids whose image or mask file is missing (b: no mask b.png, d: no image)" in warnings[0].getMessage()
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("b\nd\n")
    with pytest.raises(FileNotFoundError, match="none of the 2 ids"):
        VOCSegmentation(root, "train")


def test_voc_layout_errors_name_what_is_missing(tmp_path):
    (tmp_path / "VOCdevkit" / "VOC2012").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"JPEGImages.*VOCdevkit/VOC2012 looks like the folder to pass"):
        VOCSegmentation(tmp_path, "train")
    root = _write_voc(tmp_path / "voc", {"a": _voc_mask()})
    with pytest.raises(FileNotFoundError, match=r"split list not found: .*val.txt \(lists found: train\)"):
        VOCSegmentation(root, "val")
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("\n")
    with pytest.raises(ValueError, match="lists no image ids"):
        VOCSegmentation(root, "train")


@pytest.mark.parametrize(
    "bad, message",
    [
        (_voc_mask(label=21), r"label values 21 are outside 0..20 \(and are not the ignore index 255\)"),
        (_voc_mask(h=11), r"is \(11, 12\) but the image is \(10, 12\)"),
        (np.zeros((10, 12, 3), np.uint8), "is a RGB image; a label mask is a palette"),
    ],
)
def test_voc_bad_masks_are_skipped_with_the_reason(bad, message, tmp_path, caplog, one_thread):
    root = _write_voc(tmp_path, {"bad": _voc_mask(), "good": _voc_mask(label=3)})
    if bad.shape[:2] != (10, 12):  # a mask of another size than its image
        Image.frombytes("P", (12, 11), np.ascontiguousarray(bad).tobytes()).save(root / "SegmentationClass" / "bad.png")
    else:
        _write_voc(root, {"bad": bad}, split="other")
    with caplog.at_level(logging.WARNING, logger="segmentation.data"):
        ds = VOCSegmentation(root, "train")
        _, target = ds[0]
    assert 3 in target.unique().tolist()  # the next readable sample: "good"
    assert ds.num_skipped == 1 and ds.skipped_files == [str(root / "JPEGImages" / "bad.jpg")]
    assert any(r.levelno == logging.WARNING for r in caplog.records)
    with pytest.raises(ValueError, match=message):
        ds.read_sample(0)


def test_voc_reads_every_image_format_pil_reads_in_any_case_and_names_the_others(tmp_path, caplog, one_thread):
    root = _write_voc(tmp_path, {n: _voc_mask(label=i + 1) for i, n in enumerate(["jpg", "rgba", "upper", "bmp", "gif"])})
    images = root / "JPEGImages"
    rgba = np.zeros((10, 12, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 255
    (images / "rgba.jpg").unlink()
    Image.fromarray(rgba, "RGBA").save(images / "rgba.png")
    (images / "upper.jpg").rename(images / "upper.JPEG")
    (images / "bmp.jpg").unlink()
    Image.fromarray(np.full((10, 12, 3), 7, np.uint8)).save(images / "bmp.BMP")
    (images / "gif.jpg").unlink()
    Image.fromarray(np.full((10, 12, 3), 7, np.uint8)).save(images / "gif.gif")
    with caplog.at_level(logging.WARNING, logger="segmentation.data"):
        ds = VOCSegmentation(root, "train")
    assert ds.ids == ["jpg", "rgba", "upper", "bmp"]
    assert ds.skipped_files == [] and ds._sample_path(1) == images / "rgba.png"
    image, mask = ds.read_sample(1)
    assert image.shape == (10, 12, 3) and image[0, 0].tolist() == [200, 0, 0]  # RGBA read as RGB
    assert 2 in mask
    assert all(ds.read_sample(i)[0].shape == (10, 12, 3) for i in range(len(ds)))
    # The id whose only file is of another format is named with the file found, and why it is not used.
    message = " ".join(r.getMessage() for r in caplog.records)
    assert "left out 1 of 5 ids" in message and "gif: found gif.gif, not an image file read here (.jpg, .jpeg, .png, .bmp, any case)" in message


def test_bad_files_are_summarised_once_with_their_real_reasons(tmp_path, caplog, one_thread):
    root = _write_voc(tmp_path, {"rgb": np.zeros((10, 12, 3), np.uint8), "size": _voc_mask(), "good": _voc_mask(label=3)})
    Image.frombytes("L", (12, 11), bytes(12 * 11)).save(root / "SegmentationClass" / "size.png")
    ds = VOCSegmentation(root, "train")
    assert ds.skip_summary() is None  # nothing read yet
    summaries = []
    with caplog.at_level(logging.WARNING, logger="segmentation.data"):
        for _epoch in range(3):
            for i in range(len(ds)):
                ds[i]
            summaries.append(ds.skip_summary())
            ds.reset_skipped()
    first = summaries[0]
    assert first is not None and "unreadable" not in first
    assert first.startswith("2 samples fell back to another image, from 2 bad files: ")
    assert "1 mask that is not a label image (RGB, ...)" in first and "1 mask whose size differs from its image's" in first
    assert summaries[1:] == [None, None]  # the same files in later epochs: not said again
    per_file = [r.getMessage() for r in caplog.records]
    assert len(per_file) == 2 and any("rgb.jpg" in m and "is a RGB image" in m for m in per_file), per_file
    # A worker process's findings reach the main process: the reason travels with the data set's shared memory.
    import pickle

    clone = pickle.loads(pickle.dumps(ds))
    assert clone._why[ds.ids.index("size")] == SKIP_REASONS.index("mask whose size differs from its image's")
    with pytest.raises(ValueError, match="reason must be one of"):
        ds._record_bad(0, "unreadable")


def test_voc_custom_class_count_and_nothing_readable(tmp_path):
    root = _write_voc(tmp_path, {"a": _voc_mask(label=2)})
    assert VOCSegmentation(root, "train", class_names=["bg", "x", "y"]).num_classes == 3
    ds = VOCSegmentation(root, "train", class_names=["bg", "x"])
    with pytest.raises(RuntimeError, match="no readable sample"):
        ds[0]


# ---------------------------------------------------------------------------------------------
# shapes


def test_shapes_semantic_view_matches_its_annotations(tmp_path, one_thread):
    root = make_shapes(tmp_path / "shapes", num_train=2, num_val=2, image_size=64, seed=3)
    assert make_shapes(root, num_train=2, num_val=2, image_size=64, seed=3) == root  # present: not rewritten
    ds = CocoSegmentation(root, "val")
    assert tuple(ds.class_names) == SHAPES_SEG_CLASSES and ds.num_classes == 7
    data = json.loads((root / "annotations" / "instances_val.json").read_text())
    for index in range(len(ds)):
        _, mask = ds.read_sample(index)
        assert IGNORE not in mask  # shapes never overlap
        for ann in (a for a in data["annotations"] if a["image_id"] == ds.ids[index]):
            h, w = mask.shape
            assert (mask[_rasterised(ann["segmentation"], h, w)] == ann["category_id"]).all()


IGNORE = 255


# ---------------------------------------------------------------------------------------------
# Transforms and batching


def test_training_transform_crops_pads_with_ignore_and_never_blends_labels(one_thread):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)
    mask = rng.choice(np.array([0, 3, 5, 255], np.uint8), size=(40, 50))
    transform = build_seg_transforms(train=True, crop_size=64, seed=0)
    padded = 0
    for _ in range(8):
        x, y = transform(image, mask)
        assert x.shape == (3, 64, 64) and y.shape == (64, 64) and y.dtype == torch.int64
        assert set(y.unique().tolist()) <= {0, 3, 5, 255}
        padded += int((y[-1] == 255).all())
    assert padded  # a rescale below 64/50 leaves padding at the bottom
    # A crop larger than any rescale: the padded image is 0 before normalisation.
    x, y = build_seg_transforms(train=True, crop_size=128, scale_range=(1.0, 1.0), hflip_prob=0.0)(image, mask)
    assert (y[40:] == 255).all() and (y[:, 50:] == 255).all()
    torch.testing.assert_close(denormalize(x)[:, 40:], torch.zeros(3, 88, 128, dtype=torch.uint8))
    np.testing.assert_array_equal(y[:40, :50].numpy(), mask)


def test_flip_moves_image_and_mask_together(one_thread):
    image = np.zeros((8, 8, 3), np.uint8)
    image[:, :2] = 255
    mask = np.zeros((8, 8), np.uint8)
    mask[:, :2] = 4
    x, y = build_seg_transforms(train=True, crop_size=8, scale_range=(1.0, 1.0), hflip_prob=1.0)(image, mask)
    assert (y[:, 6:] == 4).all() and (y[:, :6] == 0).all()
    assert (denormalize(x)[:, :, 6:] == 255).all()


def test_evaluation_transform_keeps_or_resizes(one_thread):
    image = np.zeros((30, 60, 3), np.uint8)
    mask = np.zeros((30, 60), np.uint8)
    mask[10:20, 20:40] = 2
    x, y = build_seg_transforms(train=False)(image, mask)
    assert x.shape == (3, 30, 60) and torch.equal(y, torch.from_numpy(mask).long())
    x, y = build_seg_transforms(train=False, resize=15)(image, mask)
    assert x.shape == (3, 15, 30) and set(y.unique().tolist()) == {0, 2}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(crop_size=0), "crop_size must be a positive integer"),
        (dict(scale_range=(2.0, 0.5)), r"scale_range must satisfy 0 < low <= high"),
        (dict(hflip_prob=1.5), r"hflip_prob must be in \[0, 1\]"),
        (dict(resize=100), "resize is an evaluation option"),
        (dict(train=False, resize=-1), "resize must be a positive integer"),
    ],
)
def test_bad_transform_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_seg_transforms(**kwargs)


def test_transform_refuses_a_mask_of_another_size():
    with pytest.raises(ValueError, match=r"image size \(4, 4\) and mask size \(4, 5\) differ"):
        build_seg_transforms(train=False)(np.zeros((4, 4, 3), np.uint8), np.zeros((4, 5), np.uint8))


def test_collate_pads_images_with_zero_and_masks_with_ignore():
    a = (torch.ones(3, 4, 6), torch.full((4, 6), 2))
    b = (torch.ones(3, 5, 3), torch.full((5, 3), 1))
    images, masks = collate_fn([a, b])
    assert images.shape == (2, 3, 5, 6) and masks.shape == (2, 5, 6)
    assert (images[0, :, 4:] == 0).all() and (masks[0, 4:] == 255).all() and (masks[1, :, 3:] == 255).all()
    assert (masks[0, :4] == 2).all() and (masks[1, :, :3] == 1).all()


@pytest.mark.parametrize("annotated_upright", [True, False])
def test_coco_images_are_used_in_the_frame_their_annotation_describes(annotated_upright, tmp_path, one_thread):
    # A phone photo stored sideways with EXIF orientation 6: the JSON size says which frame was annotated.
    upright = np.zeros((20, 32, 3), np.uint8)
    upright[:, :16] = 255
    stored = np.ascontiguousarray(np.rot90(upright, k=1))
    h, w = (20, 32) if annotated_upright else (32, 20)
    root = _write_coco(tmp_path, images=[("p.jpg", h, w)], annotations=[{"image_id": 1, "category_id": 2, "segmentation": _box(0, 0, 4, 4)}],
                       categories=CATEGORIES)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(root / "train" / "p.jpg", exif=exif, quality=95)
    image, mask = CocoSegmentation(root, "train").read_sample(0)
    assert image.shape[:2] == mask.shape == (h, w)
    expected = upright if annotated_upright else stored
    assert np.abs(image.astype(int) - expected).max() < 40  # JPEG noise only: the same frame
