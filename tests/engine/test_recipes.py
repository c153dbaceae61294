"""Training tools say which recipe runs, and warn when a GPU recipe runs on a CPU (issue 32 item 4)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from detection.config import load_config as load_det_config
from engine.config import load_config
from engine.recipes import recipe_notice
from segmentation.config import CPU_SEG_RECIPE, SEGMENTATION
from helpers import load_tool


def test_the_cpu_recipes_are_sized_for_two_cores():
    seg = load_config(CPU_SEG_RECIPE, schema=SEGMENTATION)
    assert seg["model"] == "semantic_fpn" and seg["backbone"] == "resnet18" and seg["device"] == "cpu"
    assert 128 <= seg["crop_size"] <= 192 and seg["batch_size"] == 8 and seg["workers"] <= 2
    det = load_det_config("faster_rcnn_r18_fpn_cpu")
    assert det["device"] == "cpu" and det["workers"] <= 2 and det["max_size"] <= 512


@pytest.mark.parametrize("recipe, warned", [(None, True), ("seg_deeplabv3_r18_voc", True), (CPU_SEG_RECIPE, False),
                                            ("seg_shapes_semantic_fpn_r18", False)])
def test_a_gpu_recipe_on_a_cpu_names_the_cpu_recipe(recipe, warned):
    cfg = {**load_config(recipe, schema=SEGMENTATION), "device": "cpu"}
    line, warning = recipe_notice(recipe, cfg, cpu_recipe=CPU_SEG_RECIPE, defaults="torchvision's reference settings")
    assert line.startswith(f"recipe: {recipe or 'the defaults'}") and f"crop {cfg['crop_size']}" in line and line.endswith("on cpu")
    assert (warning is not None) == warned
    if warned:
        assert "GPU recipe" in warning and f"--config {CPU_SEG_RECIPE}" in warning


def test_train_seg_says_its_recipe_before_training(tmp_path, monkeypatch, capsys):
    import segmentation.training

    root = tmp_path / "voc"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True)
    for name in ("a", "b"):
        Image.fromarray(np.zeros((20, 24, 3), np.uint8)).save(root / "JPEGImages" / f"{name}.jpg")
        Image.fromarray(np.zeros((20, 24), np.uint8), mode="L").save(root / "SegmentationClass" / f"{name}.png")
    for split in ("train", "val"):
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("a\nb\n")
    monkeypatch.setattr(segmentation.training, "train_segmenter", lambda cfg, **_: (_ for _ in ()).throw(KeyboardInterrupt))
    train_seg = load_tool("train_seg")
    assert train_seg.main(["--data-path", str(root), "--device", "cpu", "--output-dir", str(tmp_path / "out")]) == 130
    out = capsys.readouterr().out
    assert "recipe: the defaults (torchvision's reference settings" in out and f"warning: " in out and f"--config {CPU_SEG_RECIPE}" in out
    assert train_seg.main(["--config", CPU_SEG_RECIPE, "--data-path", str(root), "--output-dir", str(tmp_path / "out")]) == 130
    out = capsys.readouterr().out
    assert f"recipe: {CPU_SEG_RECIPE} (crop 160, batch 8, 2 workers" in out and "warning" not in out
