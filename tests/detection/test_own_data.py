"""A user's own data and typos: hand-made COCO files, split discovery, option names, recipes, logs, file modes."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from PIL import Image
from torch import nn

from engine.files import atomic_save

from detection import build_detector, save_detector
from detection.config import CONFIG_DIR, ConfigError, apply_overrides, find_recipe, list_recipes, load_config
from detection.data import CocoDetection
from engine.datasets import DataPathError
from engine.roots import find_splits
from detection.evaluation import coco_evaluate, evaluate
from helpers import run_tool

TINY = [
    "shapes_train=8", "shapes_val=4", "shapes_size=64", "min_size=64", "max_size=64",
    "log_period=1", "workers=0", "warmup_iters=2",
]
SIZE = 128
TRIANGLE = [[4.0, 4.0, 44.0, 4.0, 4.0, 44.0]]  # box 40 x 40 = 1600 (medium); its mask about 800 (small)


def _run(args: list[str], cache: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    return run_tool(args, cache=cache, timeout=timeout)


def _write_split(root: Path, split: str, data: dict[str, Any]) -> None:
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
    (root / split).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for img in data["images"]:
        pixels = rng.integers(0, 256, (img["height"], img["width"], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / split / img["file_name"])


def _hand_made() -> dict[str, Any]:
    """Categories listed 7 then 3; most annotations lack iscrowd and area, as hand-made files do."""
    images = [{"id": i, "file_name": f"{i}.png", "height": SIZE, "width": SIZE} for i in (1, 2, 3)]
    anns = [
        {"id": 1, "image_id": 1, "category_id": 7, "bbox": [4, 4, 40, 40], "segmentation": TRIANGLE},  # both missing
        {"id": 2, "image_id": 1, "category_id": 3, "bbox": [60, 60, 40, 30]},  # both missing, no mask
        {"id": 3, "image_id": 2, "category_id": 7, "bbox": [8, 8, 110, 110], "iscrowd": 0, "area": 12100.0},  # complete
        {"id": 4, "image_id": 2, "category_id": 3, "bbox": [20, 30, 40, 50], "area": 2000.0},  # iscrowd missing
        {"id": 5, "image_id": 3, "category_id": 3, "bbox": [70, 10, 50, 40], "iscrowd": 0},  # area missing, no mask
    ]
    return {"images": images, "annotations": anns, "categories": [{"id": 7, "name": "cat"}, {"id": 3, "name": "dog"}]}


@pytest.fixture
def hand_made(tmp_path: Path) -> Path:
    _write_split(tmp_path / "data", "val", _hand_made())
    return tmp_path / "data"


def _polygon_area(poly: list[list[float]]) -> float:
    return float(mask_util.area(mask_util.merge(mask_util.frPyObjects(poly, SIZE, SIZE))))


# ---------------------------------------------------------------------------------------------
# 1. COCO files without iscrowd / area


def test_missing_iscrowd_and_area_are_filled_with_one_warning(hand_made: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="engine.coco"):
        ds = CocoDetection(hand_made, "val")
    anns = ds.coco.anns
    assert all(a["iscrowd"] == 0 for a in anns.values())
    mask_area = _polygon_area(TRIANGLE)
    assert abs(mask_area - 800) < 80  # the triangle, not its 1600-pixel box
    assert anns[1]["area"] == pytest.approx(mask_area)
    assert anns[2]["area"] == 1200.0  # no mask: the box, 40 x 30
    assert anns[3]["area"] == 12100.0 and anns[4]["area"] == 2000.0  # given areas are kept
    assert anns[5]["area"] == 2000.0
    filled = [r for r in caplog.records if "filled" in r.getMessage()]
    assert len(filled) == 1, caplog.text
    message = filled[0].getMessage()
    assert "instances_val.json" in message
    assert re.search(r"iscrowd=0 for 3 annotations, area \(from mask, else box\) for 3$", message), message


def test_complete_file_gives_no_fill_warning(tmp_path: Path, caplog) -> None:
    data = _hand_made()
    for ann in data["annotations"]:
        ann.update(iscrowd=0, area=float(ann["bbox"][2] * ann["bbox"][3]))
    _write_split(tmp_path, "val", data)
    with caplog.at_level(logging.WARNING, logger="engine.coco"):
        CocoDetection(tmp_path, "val")
    assert "filled" not in caplog.text


@pytest.mark.parametrize("compressed", [False, True], ids=["uncompressed", "compressed"])
def test_missing_area_of_an_rle_mask_is_its_pixel_count(tmp_path: Path, compressed: bool) -> None:
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[10:30, 20:70] = 1  # 1000 pixels in a 50 x 20 box
    mask[10:20, 20:30] = 0  # minus 100: not the box area
    if compressed:
        rle = mask_util.encode(np.asfortranarray(mask))
        segm = {"size": [SIZE, SIZE], "counts": rle["counts"].decode("ascii")}
    else:
        # COCO's crowd regions: run lengths, column-major, starting with background.
        flat = mask.flatten(order="F")
        changes = np.flatnonzero(np.diff(flat)) + 1
        counts = np.diff(np.concatenate([[0], changes, [flat.size]])).tolist()
        segm = {"size": [SIZE, SIZE], "counts": counts if flat[0] == 0 else [0, *counts]}
    data = _hand_made()
    data["annotations"] = [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [20, 10, 50, 20], "iscrowd": 1, "segmentation": segm}]
    _write_split(tmp_path, "val", data)
    ann = CocoDetection(tmp_path, "val").coco.anns[1]
    assert ann["area"] == 900.0 and ann["iscrowd"] == 1


def _detections() -> list[dict[str, Any]]:
    # Near misses and false positives over every size range, so each AP is neither 0 nor 1.
    return [
        {"image_id": 1, "category_id": 7, "bbox": [5, 4, 40, 41], "score": 0.9},
        {"image_id": 1, "category_id": 3, "bbox": [62, 61, 40, 30], "score": 0.6},
        {"image_id": 1, "category_id": 3, "bbox": [4, 4, 40, 40], "score": 0.7},
        {"image_id": 2, "category_id": 7, "bbox": [10, 8, 100, 110], "score": 0.8},
        {"image_id": 2, "category_id": 3, "bbox": [25, 30, 40, 45], "score": 0.5},
        {"image_id": 2, "category_id": 3, "bbox": [90, 90, 20, 20], "score": 0.95},
        {"image_id": 3, "category_id": 3, "bbox": [72, 12, 50, 40], "score": 0.3},
        {"image_id": 3, "category_id": 7, "bbox": [70, 10, 50, 40], "score": 0.4},
    ]


def test_pycocotools_and_faster_coco_eval_agree_on_a_hand_made_file(hand_made: Path) -> None:
    pytest.importorskip("faster_coco_eval")
    ds = CocoDetection(hand_made, "val")
    ref = coco_evaluate(ds.coco, _detections(), "bbox", evaluator="pycocotools")
    fast = coco_evaluate(ds.coco, _detections(), "bbox", evaluator="faster")
    np.testing.assert_allclose(fast["stats"], ref["stats"], atol=1e-6)
    # The filled mask area makes the triangle a small object: APs exists only because of it.
    assert ref["stats"][3] >= 0 and ref["stats"][4] >= 0 and ref["stats"][5] >= 0
    assert 0 < ref["stats"][0] < 1


def test_eval_cli_on_a_hand_made_file(hand_made: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_detector("faster_rcnn", num_classes=3, min_size=64, max_size=64, out_channels=32, representation_size=64,
                           rpn_pre_nms_top_n_test=50, rpn_post_nms_top_n_test=20, box_score_thresh=0.0)
    ckpt = save_detector(model, tmp_path / "model.pth", category_mapping={"cat_ids": [3, 7], "names": ["dog", "cat"]})
    out = tmp_path / "eval"
    proc = _run(["tools/eval_coco.py", "--checkpoint", str(ckpt), "--data-path", str(hand_made), "--split", "val",
                 "--output-dir", str(out), "--device", "cpu", "--workers", "0", "--no-progress"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Average Precision" in proc.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {f"bbox/{k}" for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")}
    dets = json.loads((out / "detections_bbox.json").read_text())
    assert dets and {d["category_id"] for d in dets} == {3, 7}


# ---------------------------------------------------------------------------------------------
# 2. evaluate() writes the ids of the mapping it is given


class _FixedDetector(nn.Module):
    """Returns the same detections for every image: label 1 on the cat's box, label 2 on the dog's."""

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        boxes = torch.tensor([[4.0, 4.0, 44.0, 44.0], [60.0, 60.0, 100.0, 90.0]])
        return [{"boxes": boxes, "scores": torch.tensor([0.9, 0.8]), "labels": torch.tensor([1, 2])} for _ in images]


def test_evaluate_writes_the_given_mapping_not_the_data_sets_order(tmp_path: Path) -> None:
    data = _hand_made()
    data["images"] = data["images"][:1]
    data["annotations"] = data["annotations"][:2]  # image 1: cat (id 7) at [4,4,40,40], dog (id 3) at [60,60,40,30]
    _write_split(tmp_path, "val", data)
    ds = CocoDetection(tmp_path, "val")
    assert ds.label_to_cat_id == {1: 3, 2: 7}  # the data set's own order differs from the model's
    out = tmp_path / "eval"
    result = evaluate(_FixedDetector(), ds, label_to_cat_id={1: 7, 2: 3}, output_dir=out, progress=False)
    dets = json.loads((out / "detections_bbox.json").read_text())
    assert sorted((d["bbox"][0], d["category_id"]) for d in dets) == [(4.0, 7), (60.0, 3)]
    assert result["metrics"]["bbox/AP"] == pytest.approx(100.0)
    # The data set's own order would put both on the wrong class.
    wrong = evaluate(_FixedDetector(), ds, output_dir=tmp_path / "own", progress=False)
    assert wrong["metrics"]["bbox/AP"] == pytest.approx(0.0)


# ---------------------------------------------------------------------------------------------
# 3. Unknown detector option names


def test_misspelled_build_option_names_the_right_one() -> None:
    with pytest.raises(ValueError, match="box_score_thres'.*box_score_thresh"):
        build_detector("faster_rcnn", num_classes=3, box_score_thres=0.5)


def test_misspelled_model_kwargs_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="box_score_thresh"):
        apply_overrides(load_config(), ["model_kwargs={box_score_thres: 0.9}"])
    with pytest.raises(ConfigError, match="box_score_thresh"):
        apply_overrides(load_config(), ["model_kwargs.box_score_thres=0.9"])
    cfg = apply_overrides(load_config(), ["model_kwargs.box_score_thresh=0.9"])
    assert cfg["model_kwargs"] == {"box_score_thresh": 0.9}
    # Options of one architecture are checked against that architecture.
    cfg = apply_overrides(load_config(), ["model=retinanet", "model_kwargs.score_thresh=0.2"])
    assert cfg["model_kwargs"] == {"score_thresh": 0.2}
    with pytest.raises(ConfigError, match="rpn_batch_size_per_image"):
        apply_overrides(load_config(), ["model=retinanet", "model_kwargs.rpn_batch_size_per_image=64"])


def test_set_option_reaches_the_model() -> None:
    model = build_detector("faster_rcnn", num_classes=3, min_size=64, max_size=64, box_score_thresh=0.5)
    assert model.roi_heads.score_thresh == 0.5


# ---------------------------------------------------------------------------------------------
# 5. Output files follow the umask


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)], ids=["umask022", "umask077"])
def test_saved_files_follow_the_umask(tmp_path: Path, umask: int, mode: int) -> None:
    old = os.umask(umask)
    try:
        atomic_save({"w": torch.ones(2)}, tmp_path / "a.pth")
        model = build_detector("faster_rcnn", num_classes=3, min_size=64, max_size=64, out_channels=32, representation_size=64)
        save_detector(model, tmp_path / "model_final.pth")
    finally:
        os.umask(old)
    assert (tmp_path / "a.pth").stat().st_mode & 0o777 == mode
    assert (tmp_path / "model_final.pth").stat().st_mode & 0o777 == mode


# ---------------------------------------------------------------------------------------------
# 6. Finding the splits of a data folder


def _empty(split: str) -> dict[str, Any]:
    return {"images": [], "annotations": [], "categories": [{"id": 1, "name": "x"}]}


def test_one_train_val_pair_is_found(tmp_path: Path) -> None:
    for split in ("mytrain", "myval"):
        _write_split(tmp_path, split, _empty(split))
    assert find_splits(tmp_path, None, None) == ("mytrain", "myval")
    assert find_splits(tmp_path, "myval", "mytrain") == ("myval", "mytrain")  # given splits are taken as given


def test_two_train_files_are_ambiguous(tmp_path: Path) -> None:
    for split in ("train2017", "train_extra", "val2017"):
        _write_split(tmp_path, split, _empty(split))
    with pytest.raises(DataPathError, match="--train-split") as info:
        find_splits(tmp_path, None, None)
    assert "train2017" in str(info.value) and "train_extra" in str(info.value) and "val2017" in str(info.value)
    assert find_splits(tmp_path, "train2017", None) == ("train2017", "val2017")


def test_trainval_is_not_guessed_as_the_validation_split_too(tmp_path: Path) -> None:
    # VOC-style folders: "trainval" holds both words; evaluating on the training data must not be silent.
    for split in ("trainval", "test"):
        _write_split(tmp_path, split, _empty(split))
    with pytest.raises(DataPathError, match="--val-split") as info:
        find_splits(tmp_path, None, None)
    assert "test, trainval" in str(info.value)
    assert find_splits(tmp_path, None, "test") == ("trainval", "test")


def test_a_split_that_does_not_exist_lists_those_that_do(tmp_path: Path) -> None:
    for split in ("train", "val"):
        _write_split(tmp_path, split, _empty(split))
    with pytest.raises(DataPathError, match="--val-split valid2017") as info:
        find_splits(tmp_path, None, "valid2017")
    assert "splits found: train, val" in str(info.value)
    (tmp_path / "annotations" / "instances_test.json").write_text("{}")  # an annotation file without its image folder
    with pytest.raises(DataPathError, match="image folder"):
        find_splits(tmp_path, "test", "val")


def test_no_annotations_at_all(tmp_path: Path) -> None:
    with pytest.raises(DataPathError, match="--train-split"):
        find_splits(tmp_path, None, None)
    with pytest.raises(DataPathError, match="does not exist"):
        find_splits(tmp_path / "missing", None, None)


def test_train_cli_with_an_ambiguous_folder_is_one_error_line(tmp_path: Path) -> None:
    for split in ("train_a", "train_b", "val"):
        _write_split(tmp_path / "data", split, _empty(split))
    proc = _run(["tools/train_det.py", "--data-path", str(tmp_path / "data"), "--output-dir", str(tmp_path / "out")], tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--train-split" in lines[0], proc.stderr
    assert "train_a" in lines[0] and "train_b" in lines[0]
    assert not (tmp_path / "out").exists()  # nothing started


# ---------------------------------------------------------------------------------------------
# 8. Recipes by name


def test_recipe_by_name(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)  # the name works from any folder
    path = CONFIG_DIR / "faster_rcnn_r18_fpn_1x_coco.yaml"
    assert find_recipe("faster_rcnn_r18_fpn_1x_coco") == path
    assert find_recipe("faster_rcnn_r18_fpn_1x_coco.yaml") == path
    assert find_recipe("configs/faster_rcnn_r18_fpn_1x_coco.yaml") == path
    assert load_config("faster_rcnn_r18_fpn_1x_coco") == load_config(path)
    assert load_config("faster_rcnn_r18_fpn_1x_coco")["train_split"] == "train2017"


def test_unknown_recipe_lists_the_recipes() -> None:
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    assert [r["name"] for r in list_recipes(None)] == names
    assert [r["name"] for r in list_recipes()] == [n for n in names if not n.startswith(("cls_", "seg_"))]
    with pytest.raises(ConfigError, match="config file not found: faster_rcnn_r99") as info:
        load_config("faster_rcnn_r99")
    assert all(name in str(info.value) for name in names)


def test_train_cli_lists_and_finds_recipes(tmp_path: Path) -> None:
    proc = _run(["tools/train_det.py", "--list-configs"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    listed = [line.split()[0] for line in proc.stdout.strip().splitlines()]
    assert listed == sorted(p.stem for p in CONFIG_DIR.glob("*.yaml") if not p.stem.startswith(("cls_", "seg_")))
    # Found by name, the recipe gets as far as checking the data folder.
    proc = _run(["tools/train_det.py", "--config", "faster_rcnn_r18_fpn_1x_coco", "--data-path", str(tmp_path / "nope"),
                 "--device", "cpu"], tmp_path)
    assert proc.returncode == 2 and "config file not found" not in proc.stderr
    assert f"data path {tmp_path / 'nope'} does not exist" in proc.stderr


# ---------------------------------------------------------------------------------------------
# 9. The epoch in every log record, parameter counts in the log


def test_metrics_epoch_under_max_iters_and_parameter_counts(tmp_path: Path, monkeypatch) -> None:
    from detection.training import train

    monkeypatch.setenv("RESFPN_CACHE", str(tmp_path / "cache"))
    cfg = load_config(CONFIG_DIR / "shapes_faster_rcnn_r18_fpn.yaml")
    cfg = apply_overrides(cfg, [*TINY, "shapes_train=16", "epochs=2", "max_iters=3", "num_vis=0"],
                          output_dir=str(tmp_path / "run"), device="cpu", batch_size=2)
    result = train(cfg, progress=False)
    assert result["iteration"] == 3
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records if "loss" in r] == [1, 2, 3]
    assert "bbox/AP" in records[-1] and records[-1]["iter"] == 3
    assert [r["epoch"] for r in records] == [0] * len(records)
    log = (tmp_path / "run" / "log.txt").read_text()
    line = next((ln for ln in log.splitlines() if "parameters" in ln and "trainable" in ln), None)
    assert line is not None, log[-2000:]
    from detection import count_parameters, load_detector

    total, trainable = count_parameters(load_detector(tmp_path / "run" / "model_final.pth"))
    assert f"{total:,} parameters" in line and f"{trainable:,} trainable" in line


def test_a_failed_final_evaluation_keeps_the_model_and_says_what_to_run(tmp_path: Path, monkeypatch) -> None:
    from detection import load_detector, training

    def broken(*args: Any, **kwargs: Any) -> None:
        raise KeyError("iscrowd")

    monkeypatch.setenv("RESFPN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(training, "evaluate", broken)
    cfg = apply_overrides(load_config(CONFIG_DIR / "shapes_faster_rcnn_r18_fpn.yaml"), [*TINY, "max_iters=1", "num_vis=0"],
                          output_dir=str(tmp_path / "run"), device="cpu", batch_size=2)
    with pytest.raises(training.EvaluationError) as info:
        training.train(cfg, progress=False)
    final = tmp_path / "run" / "model_final.pth"
    assert str(final) in str(info.value) and "KeyError" in str(info.value) and "tools/eval_coco.py" in str(info.value)
    assert load_detector(final).build_args["arch"] == "faster_rcnn"
