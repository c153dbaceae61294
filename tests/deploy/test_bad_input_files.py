"""Bad files and bad runs as users meet them (issue 18 items 3, 4, 5, 7, 11).

- Junk files given to the tools: one ``error:`` line naming the file, exit 2, nothing written.
- Training that diverges (``--lr 1e6``): one ``error:`` line, exit 1, no traceback.
- Mask R-CNN scored on a validation file without ``segmentation``: bbox scored, segm skipped
  with one logged reason, ``metrics.json`` written.
- ``train_cls.py`` on a folder with fewer than two classes: an error naming the layout.
- The int8 export logs the file it wrote, not its temporary folder.
"""

from __future__ import annotations

import json
import logging
import random
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

TINY_DET = ["shapes_train=4", "shapes_val=2", "shapes_size=64", "min_size=64", "max_size=64", "workers=0", "warmup_iters=0", "num_vis=0"]


def _run(args: list[str], tmp_path: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    from helpers import run_tool, tool_env  # the tool forked from this process: no 4-5 s of imports per run

    return run_tool(args, env=tool_env(tmp_path / "cache", TORCH_HOME=str(tmp_path / "torch")), timeout=timeout)


def _one_error_line(proc: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    assert proc.returncode == code, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and proc.stderr.strip().splitlines()[-1] == errors[0], proc.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def test_junk_files_given_to_the_tools_are_one_error_line(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"junk")  # printf junk > junk.pth
    noise = tmp_path / "noise.onnx"
    noise.write_bytes(random.Random(0).randbytes(3000))
    out = tmp_path / "run"
    for args, bad in [
        (["tools/train_det.py", "--weights-backbone", str(junk), "--output-dir", str(out)], junk),
        (["tools/train_det.py", "--resume", str(junk), "--output-dir", str(out)], junk),
        (["tools/eval_coco.py", "--checkpoint", str(junk)], junk),
        (["tools/eval_coco.py", "--checkpoint", str(noise), "--runtime", "openvino"], noise),
    ]:
        _one_error_line(_run(args, tmp_path, timeout=120), 2, str(bad))
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir() if p.name != "cache") == ["junk.pth", "noise.onnx"]


def test_diverged_training_is_one_error_line_and_exit_1(tmp_path):
    """``--lr 1e6``: five non-finite losses in a row end the run with one line that says where to go on (or that nowhere)."""
    out = tmp_path / "run"
    # SGD diverges at once at this rate (AdamW's steps are bounded by the rate, so it takes a few more iterations).
    proc = _run(["tools/train_det.py", "--lr", "1e6", "--output-dir", str(out), "--epochs", "10", "--eval-period", "0", "--batch-size", "2",
                 "--device", "cpu", "--no-progress", "--set", *TINY_DET, "optimizer=sgd", "max_nonfinite=3", "checkpoint_period=1"], tmp_path)
    line = _one_error_line(proc, 1, "non-finite losses in a row")
    assert "checkpoint" in line  # the last good one, or that there is none


# ---------------------------------------------------------------------------------------------
# Mask R-CNN without ground-truth masks


def test_mask_rcnn_scored_on_boxes_only_ground_truth(tmp_path, caplog):
    from detection import build_detector
    from detection.data import CocoDetection
    from detection.evaluation import evaluate
    from engine import shapes

    root = shapes.generate(tmp_path / "shapes", num_train=1, num_val=2, image_size=64, seed=4)
    ann = root / "annotations" / "instances_val.json"
    data = json.loads(ann.read_text())
    assert all(a.get("segmentation") for a in data["annotations"])
    for a in data["annotations"]:
        a.pop("segmentation")  # as boxes-only annotation tools write it
    ann.write_text(json.dumps(data))
    torch.manual_seed(0)
    model = build_detector("mask_rcnn", backbone="resnet18", num_classes=4, min_size=64, max_size=64, out_channels=16,
                           representation_size=32, rpn_post_nms_top_n_test=20, box_score_thresh=0.0, box_detections_per_img=10)
    val = CocoDetection(root, "val")
    out = tmp_path / "eval"
    with caplog.at_level(logging.WARNING, logger="detection.evaluation"):
        result = evaluate(model, val, output_dir=out, progress=False)  # KeyError: 'segmentation' (pycocotools) before
    assert "bbox/AP" in result["metrics"] and not any(k.startswith("segm/") for k in result["metrics"])
    reason = result["skipped"]["segm"]
    assert f"{len(data['annotations'])} of {len(data['annotations'])} annotations" in reason and str(ann) in reason
    assert [r.getMessage() for r in caplog.records] == [f"segm AP skipped: {reason}"]
    assert json.loads((out / "metrics.json").read_text()) == result["metrics"]
    assert (out / "detections_bbox.json").is_file() and not (out / "detections_segm.json").exists()


# ---------------------------------------------------------------------------------------------
# Classification folders with fewer than two classes


def _image(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(path)


def test_one_class_folder_is_an_error_naming_the_layout(tmp_path):
    from classification.data import ImageFolder, ImageFolderError

    root = tmp_path / "one"
    for i in range(4):
        _image(root / "train" / "images" / f"{i}.jpg", i)
        _image(root / "val" / "images" / f"{i}.jpg", i)
    with pytest.raises(ImageFolderError, match=r"train holds one class folder \('images'\); a classifier needs at least two\. "
                                              r"Expected layout: .*/train/<class>/<image>"):
        ImageFolder(root, "train")
    ImageFolder(root, "val", classes=["cat", "images"])  # a validation split may hold fewer classes than training
    # A COCO root (annotations/ beside the image folders) is named as one.
    (root / "annotations").mkdir()
    proc = _run(["tools/train_cls.py", "--data-path", str(root), "--device", "cpu", "--output-dir", str(tmp_path / "run")], tmp_path, timeout=120)
    _one_error_line(proc, 2, "a classifier needs at least two", "looks like a COCO detection root", "tools/train_det.py")
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------
# int8 export's log


def test_int8_export_logs_the_file_it_wrote(tmp_path, caplog):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from detection import build_detector, save_detector
    from deploy.export import export_detector
    from engine import shapes

    root = shapes.generate(tmp_path / "shapes", num_train=2, num_val=1, image_size=64, seed=5)
    torch.manual_seed(0)
    model = build_detector("faster_rcnn", backbone="resnet18", num_classes=4, min_size=64, max_size=64, out_channels=16,
                           representation_size=32, rpn_post_nms_top_n_test=20).eval()
    ckpt = tmp_path / "model_final.pth"
    save_detector(model, ckpt, config={"data_path": str(root), "train_split": "train"})
    out = tmp_path / "int8.onnx"
    with caplog.at_level(logging.INFO, logger="deploy.export"):
        export_detector(ckpt, out, int8=True, calib_images=2)
    wrote = [r.getMessage() for r in caplog.records if r.getMessage().startswith("wrote ")]
    # Before: "wrote <out folder>/.int8.onnx.<random>.tmp/fp32.onnx (opset 17, ...)", a file deleted a moment later.
    assert wrote == [f"wrote {out} (int8, onnxruntime, 2 calibration images)"], wrote
    assert sorted(p.name for p in tmp_path.iterdir()) == ["int8.onnx", "model_final.pth", "shapes"]
