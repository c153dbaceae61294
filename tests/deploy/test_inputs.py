"""deploy.inputs: the picture loop every inference tool runs, and what a folder walk left out."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from PIL import Image

from deploy.inputs import image_files, left_out_note, predict_files
from deploy.video import check_video_options
from engine.images import read_image_rgb


def test_predict_files_skips_what_does_not_read_and_writes_a_picture_per_image(tmp_path):
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    Image.fromarray(np.full((8, 10, 3), 200, np.uint8)).save(src / "a.png")
    Image.fromarray(np.full((6, 4, 3), 10, np.uint8)).save(src / "sub" / "b.jpg")
    (src / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    (src / "notes.txt").write_text("not an image")
    paths, left_out = image_files(src, tmp_path / "out")
    assert left_out_note(src, len(paths), left_out) == f"{src}: 3 images; left out 1 entries that are not images by their extension, hidden, or the output folder: notes.txt"
    assert left_out_note(src, 3, []) is None
    said, warned = [], []

    def predict(image, name):
        picture = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
        return picture, {"mean": float(image.mean())}, f"{name}: ok"

    results = predict_files(paths, tmp_path / "out", read=read_image_rgb, predict=predict, say=said.append, warn=warned.append)
    assert set(results) == {"a.png", "sub/b.jpg"} and results["a.png"] == {"mean": 200.0}
    assert sorted(said) == ["a.png: ok", "sub/b.jpg: ok"]
    assert len(warned) == 1 and warned[0].startswith(f"skipping unreadable {src / 'broken.jpg'}")
    assert np.asarray(Image.open(tmp_path / "out" / "sub" / "b.jpg.png")).shape == (6, 4, 3)
    assert not (tmp_path / "out" / "broken.jpg.png").exists()


def test_video_options_are_checked_by_name_and_range():
    check_video_options({"fps": 25.0, "requests": 2}, video=True, runtime="openvino", input="clip.mp4")
    with pytest.raises(ValueError, match=r"--fps, --max-frames are for videos.*--input photos/ is read as images"):
        check_video_options({"fps": 25.0, "max_frames": 3}, video=False, runtime=None, input="photos/")
    with pytest.raises(ValueError, match=r"--fps must be > 0, got 0"):
        check_video_options({"fps": 0.0}, video=True, runtime=None, input="clip.mp4")
    with pytest.raises(ValueError, match=r"--reconnect must be >= 0, got -1"):
        check_video_options({"reconnect": -1}, video=True, runtime=None, input="clip.mp4")
    with pytest.raises(ValueError, match=r"--requests and --streams are for --runtime openvino"):
        check_video_options({"requests": 2}, video=True, runtime="onnxruntime", input="clip.mp4")
