"""tools/infer.py on what users hand it: folders of folders, phone photos, a file where a folder goes, a text file."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from detection import build_detector, save_detector

MAPPING = {"cat_ids": [7, 3], "names": ["猫", "dog"]}


def _infer(*args: str) -> subprocess.CompletedProcess:
    from helpers import run_tool  # the tool forked from this process: no 4-5 s of imports per run

    return run_tool(["tools/infer.py", "--device", "cpu", *args], timeout=180)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = build_detector(
        "faster_rcnn", num_classes=3, min_size=64, max_size=64, out_channels=32, representation_size=64,
        rpn_pre_nms_top_n_test=50, rpn_post_nms_top_n_test=20, box_score_thresh=0.0,
    )
    path = tmp_path_factory.mktemp("model") / "model_final.pth"
    save_detector(model, path, category_mapping=MAPPING)
    return path


def _noise(height: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_a_folder_is_walked_with_its_subfolders_and_photos_drawn_upright(checkpoint: Path, tmp_path: Path) -> None:
    src = tmp_path / "pics"
    (src / "batch1" / "deeper").mkdir(parents=True)
    (src / ".thumbs").mkdir()
    Image.fromarray(_noise(64, 64, 0)).save(src / "a.jpg")
    Image.fromarray(_noise(64, 64, 1)).save(src / "batch1" / "a.jpg")  # same name, another folder: both kept
    exif = Image.Exif()
    exif[0x0112] = 6  # a phone photo: stored 48 wide x 64 tall, shown turned, 64 wide x 48 tall
    Image.fromarray(_noise(64, 48, 2)).save(src / "batch1" / "deeper" / "phone.jpg", exif=exif)
    Image.fromarray(_noise(64, 64, 3)).save(src / ".thumbs" / "t.jpg")
    (src / "notes.txt").write_text("not a picture")
    out = src / "vis"  # inside the input folder: never read back as input
    out.mkdir()
    Image.fromarray(_noise(64, 64, 4)).save(out / "old.jpg.png")

    proc = _infer("--checkpoint", str(checkpoint), "--input", str(src), "--output", str(out), "--score-thresh", "0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    drawn = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert drawn == ["a.jpg.png", "batch1/a.jpg.png", "batch1/deeper/phone.jpg.png", "old.jpg.png"]
    dets = json.loads((out / "detections.json").read_text(encoding="utf-8"))
    assert sorted(dets) == ["a.jpg", "batch1/a.jpg", "batch1/deeper/phone.jpg"]
    assert {d["name"] for v in dets.values() for d in v} <= {"猫", "dog"}
    # What was left out is said, not silently dropped.
    assert "left out 3" in proc.stdout and "notes.txt" in proc.stdout and ".thumbs/" in proc.stdout and "vis/" in proc.stdout
    # The photo is drawn as a viewer shows it: landscape, its boxes within that frame.
    with Image.open(out / "batch1" / "deeper" / "phone.jpg.png") as im:
        assert im.size[0] > im.size[1]
    boxes = np.array([d["box_xyxy"] for d in dets["batch1/deeper/phone.jpg"]])
    assert len(boxes) and boxes[:, 2].max() <= 64 + 1e-3 and boxes[:, 3].max() <= 48 + 1e-3
    assert boxes[:, 2].max() > 48  # some box reaches past what the stored frame's width would allow


def test_output_naming_an_existing_file_is_one_error_line(tmp_path: Path) -> None:
    Image.fromarray(_noise(32, 32, 0)).save(tmp_path / "x.png")
    taken = tmp_path / "results.txt"
    taken.write_text("keep me")
    for output in (taken, taken / "vis"):
        proc = _infer("--checkpoint", "never_read.pth", "--input", str(tmp_path / "x.png"), "--output", str(output))
        assert proc.returncode == 2
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: --output ") and str(taken) in lines[0], proc.stderr
    assert taken.read_text() == "keep me"


def test_a_text_file_is_one_error_line_and_leaves_no_output_folder(tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("not a picture")
    out = tmp_path / "out"
    proc = _infer("--checkpoint", "never_read.pth", "--input", str(notes), "--output", str(out))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: --input {notes} is not an image"), proc.stderr
    assert not out.exists()
