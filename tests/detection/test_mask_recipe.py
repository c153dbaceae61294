"""The shapes Mask R-CNN recipe: what it builds, that `--model mask_rcnn` picks it, and its outputs end to end."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
import yaml
from PIL import Image

from detection import build_detector, load_detector
from engine.files import atomic_save
from detection.checkpoint import read_checkpoint
from detection.config import load_config
from engine.images import image_to_tensor, read_image_rgb
from detection.models import rebuild_detector
from helpers import REPO, run_tool

RECIPE = REPO / "configs" / "shapes_mask_rcnn_r18_fpn.yaml"
TINY = [
    "shapes_train=16", "shapes_val=4", "shapes_size=64", "min_size=64", "max_size=64",
    "epochs=1", "workers=0", "log_period=1", "warmup_iters=2", "num_vis=1",
]


def _run(args: list[str], cache: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return run_tool(args, cache=cache, timeout=timeout)


def _conv_widths(head: torch.nn.Module) -> list[tuple[int, int]]:
    return [(m.in_channels, m.out_channels) for m in head.modules() if isinstance(m, torch.nn.Conv2d)]


def test_recipe_builds_the_model_and_mask_head_it_names():
    cfg = load_config(RECIPE)
    kwargs = dict(cfg["model_kwargs"])
    assert (cfg["model"], cfg["backbone"], cfg["weights_backbone"]) == ("mask_rcnn", "resnet18", None)
    model = build_detector(
        cfg["model"], backbone=cfg["backbone"], num_classes=7, returned_layers=cfg["returned_layers"],
        min_size=cfg["min_size"], max_size=cfg["max_size"], norm=cfg["norm"], **kwargs,
    )
    width, layers, pyramid = kwargs["mask_head_channels"], kwargs["mask_head_layers"], kwargs["out_channels"]
    assert width < 256 or layers < 4, "the recipe is meant to shrink torchvision's mask head"
    expected = [(pyramid, width)] + [(width, width)] * (layers - 1)
    assert _conv_widths(model.roi_heads.mask_head) == expected
    deconv = model.roi_heads.mask_predictor.conv5_mask
    assert (deconv.in_channels, deconv.out_channels) == (width, width)
    assert model.roi_heads.mask_predictor.mask_fcn_logits.out_channels == 7
    assert model.roi_heads.mask_roi_pool.output_size == (kwargs.get("mask_roi_size", 14),) * 2
    assert model.roi_heads.box_head.fc6.out_features == kwargs["representation_size"]
    assert model.build_args["mask_head_channels"] == width and model.build_args["mask_head_layers"] == layers


def test_default_mask_head_is_torchvisions():
    model = build_detector("mask_rcnn", num_classes=3)
    assert _conv_widths(model.roi_heads.mask_head) == [(256, 256)] * 4
    assert model.roi_heads.mask_predictor.conv5_mask.in_channels == 256
    assert model.roi_heads.mask_roi_pool.output_size == (14, 14)
    assert (model.build_args["mask_head_channels"], model.build_args["mask_head_layers"], model.build_args["mask_roi_size"]) == (256, 4, 14)
    assert "mask_head_channels" not in build_detector("faster_rcnn", num_classes=3).build_args


@pytest.mark.parametrize("options, widths, deconv_in", [
    (dict(mask_head_channels=64, mask_head_layers=3), [(128, 64), (64, 64), (64, 64)], 64),
    (dict(mask_head_layers=0), [], 128),  # pooled features go straight to the predictor
])
def test_custom_mask_head_rebuilds_from_build_args(options, widths, deconv_in):
    model = build_detector("mask_rcnn", num_classes=4, out_channels=128, mask_roi_size=7, min_size=64, max_size=64, **options)
    assert _conv_widths(model.roi_heads.mask_head) == widths
    assert model.roi_heads.mask_predictor.conv5_mask.in_channels == deconv_in
    again = rebuild_detector(model.build_args)
    assert again.build_args == model.build_args
    again.load_state_dict(model.state_dict(), strict=True)
    model.eval(), again.eval()
    with torch.no_grad():
        image = torch.rand(3, 64, 48, generator=torch.Generator().manual_seed(0))
        out_a, out_b = model([image])[0], again([image])[0]
    assert out_a["masks"].shape[-2:] == (64, 48)
    torch.testing.assert_close(out_a["masks"], out_b["masks"])


@pytest.mark.parametrize("options, message", [
    (dict(arch="mask_rcnn", mask_head_channels=0), "mask_head_channels must be an integer >= 1, got 0"),
    (dict(arch="mask_rcnn", mask_head_layers=-1), "mask_head_layers must be an integer >= 0, got -1"),
    (dict(arch="mask_rcnn", mask_roi_size=7.5), "mask_roi_size must be an integer >= 1, got 7.5"),
    (dict(arch="faster_rcnn", mask_head_channels=128), "only apply to mask_rcnn, got them for 'faster_rcnn'"),
])
def test_bad_mask_head_options_are_refused(options, message):
    arch = options.pop("arch")
    with pytest.raises(ValueError, match=message):
        build_detector(arch, num_classes=3, **options)


@pytest.fixture(scope="module")
def mask_run(tmp_path_factory):
    """`--model mask_rcnn` with no --config and no --data-path: two iterations on a tiny shapes set."""
    cache = tmp_path_factory.mktemp("cache")
    out = tmp_path_factory.mktemp("mask_run")
    proc = _run(["tools/train_det.py", "--model", "mask_rcnn", "--output-dir", str(out), "--max-iters", "2",
                 "--no-progress", "--set", *TINY], cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, cache


def test_model_mask_rcnn_without_config_picks_the_mask_recipe(mask_run):
    out, _ = mask_run
    used = yaml.safe_load((out / "config.yaml").read_text())
    recipe = yaml.safe_load(RECIPE.read_text())
    assert used["model"] == "mask_rcnn"
    assert used["model_kwargs"] == recipe["model_kwargs"]
    for key in ("returned_layers", "optimizer", "lr", "scheduler", "batch_size"):
        assert used[key] == recipe[key], key
    assert (used["shapes_train"], used["shapes_size"]) == (16, 64)


def test_short_run_writes_segm_detections_that_decode_to_the_image_size(mask_run):
    out, cache = mask_run
    segm = json.loads((out / "detections_segm.json").read_text())
    assert segm, "an untrained 6-class model still scores about 1/7 per class, above the 0.05 threshold"
    (gt_file,) = cache.glob("shapes-*/annotations/instances_val.json")
    sizes = {im["id"]: (im["height"], im["width"]) for im in json.loads(gt_file.read_text())["images"]}
    for det in segm:
        mask = mask_util.decode(det["segmentation"])
        assert mask.shape == sizes[det["image_id"]], det["image_id"]
        assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"bbox/AP", "segm/AP", "segm/AP50", "segm/APl"} <= set(metrics)
    assert read_checkpoint(out / "checkpoint.pth")["iteration"] == 2


def test_checkpoint_round_trips_through_load_detector_and_eval_coco(mask_run, tmp_path):
    out, cache = mask_run
    recipe = yaml.safe_load(RECIPE.read_text())["model_kwargs"]
    model = load_detector(out / "model_final.pth")
    assert model.build_args["arch"] == "mask_rcnn"
    assert model.build_args["mask_head_channels"] == recipe["mask_head_channels"]
    assert len(_conv_widths(model.roi_heads.mask_head)) == recipe["mask_head_layers"]
    proc = _run(["tools/eval_coco.py", "--checkpoint", str(out / "model_final.pth"), "--output-dir", str(tmp_path),
                 "--device", "cpu", "--workers", "0", "--no-progress"], cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "segm:" in proc.stdout and "segm/AP" in proc.stdout
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["segm/AP"] is not None and metrics["segm/AP"] >= 0
    # Same checkpoint, same images: the tool scores exactly what training's final evaluation wrote.
    assert json.loads((tmp_path / "detections_segm.json").read_text()) == json.loads((out / "detections_segm.json").read_text())


def _forced_checkpoint(src: Path, dst: Path, mask_logit: float) -> None:
    """``src`` with every box scored as class 1 and every mask logit set to ``mask_logit``."""
    ckpt = dict(read_checkpoint(src))
    state = dict(ckpt["model"])
    for name, value in (("roi_heads.mask_predictor.mask_fcn_logits", mask_logit), ("roi_heads.box_predictor.cls_score", None)):
        state[f"{name}.weight"] = torch.zeros_like(state[f"{name}.weight"])
        bias = torch.zeros_like(state[f"{name}.bias"])
        if value is None:
            bias[1] = 10.0
        else:
            bias[:] = value
        state[f"{name}.bias"] = bias
    ckpt["model"] = state
    # One detection, so that its label (drawn the same in both pictures) hides little of its mask.
    ckpt["build_args"] = {**ckpt["build_args"], "kwargs": {**ckpt["build_args"]["kwargs"], "box_detections_per_img": 1}}
    atomic_save(ckpt, dst)


def test_infer_draws_masks_from_a_mask_checkpoint(mask_run, tmp_path):
    out, cache = mask_run
    # Two iterations leave mask probabilities near 0.5. Two checkpoints that differ only in
    # their mask logits (+10: masks fill the boxes, -10: no mask pixel) give the same boxes and
    # labels, so whatever differs between their pictures is the drawn masks.
    (image_path,) = sorted(cache.glob("shapes-*/val/*.jpg"))[:1]
    pictures = {}
    for name, logit in (("masks", 10.0), ("no_masks", -10.0)):
        _forced_checkpoint(out / "model_final.pth", tmp_path / f"{name}.pth", logit)
        proc = _run(["tools/infer.py", "--checkpoint", str(tmp_path / f"{name}.pth"), "--input", str(image_path),
                     "--output", str(tmp_path / name), "--device", "cpu", "--score-thresh", "0.5"], cache)
        assert proc.returncode == 0, proc.stderr[-3000:]
        (picture,) = (tmp_path / name).glob("*.png")
        pictures[name] = np.asarray(Image.open(picture).convert("RGB")).astype(int)
        records = json.loads((tmp_path / name / "detections.json").read_text())[image_path.name]
        assert [r["name"] for r in records] == ["circle"]
    assert pictures["masks"].shape == pictures["no_masks"].shape

    model = load_detector(tmp_path / "masks.pth")
    image = image_to_tensor(read_image_rgb(image_path))
    with torch.no_grad():
        det = model([image])[0]
    assert len(det["boxes"]) == 1 and (det["masks"][0, 0] > 0.5).any(), "the forced mask should fill its box"
    changed = np.abs(pictures["masks"] - pictures["no_masks"]).sum(axis=-1) > 0
    assert changed.any(), "the picture with masks should differ from the one without"
    # Everything that differs lies inside the detection's box (pictures may be upscaled for legibility).
    scale = changed.shape[0] / image.shape[-2]
    x1, y1, x2, y2 = (det["boxes"][0] * scale).tolist()
    margin = 2 * scale  # torchvision pastes masks with a one-cell border, then the picture is interpolated
    rows, cols = np.nonzero(changed)
    assert rows.min() >= y1 - margin and rows.max() <= y2 + margin and cols.min() >= x1 - margin and cols.max() <= x2 + margin
