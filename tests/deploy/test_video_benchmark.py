"""tools/benchmark.py --only video: the clip, the torchvision twin, the rows and their stages (tiny sizes: this checks the tool, not speed)."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import pytest
import torch

from deploy.benchmark.video import STAGES, torchvision_twin, video_model, write_clip
from detection import build_detector, save_detector
from helpers import load_tool, one_error_line

MAPPING = {"cat_ids": [1, 2], "names": ["circle", "square"]}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    # box_score_thresh=0: random weights then give detections to draw and post-process on every frame.
    model = build_detector("faster_rcnn", num_classes=3, min_size=64, max_size=64, out_channels=16, representation_size=32,
                           rpn_pre_nms_top_n_test=30, rpn_post_nms_top_n_test=10, box_score_thresh=0.0, box_detections_per_img=4).eval()
    path = tmp_path_factory.mktemp("model") / "model_final.pth"
    save_detector(model, path, category_mapping=MAPPING)
    return path


def test_the_clip_moves_and_the_model_runs_at_the_frame_size(tmp_path: Path, checkpoint: Path) -> None:
    clip = write_clip(tmp_path / "clip.mp4", 48, 80, 5, fps=10.0)
    capture = cv2.VideoCapture(str(clip))
    frames = []
    while True:
        ok, bgr = capture.read()
        if not ok:
            break
        frames.append(bgr)
    assert capture.get(cv2.CAP_PROP_FPS) == pytest.approx(10.0)
    capture.release()
    assert len(frames) == 5 and frames[0].shape == (48, 80, 3)
    assert any(abs(frames[0].astype(int) - f.astype(int)).mean() > 1 for f in frames[1:])  # objects move

    model = video_model(checkpoint, (480, 640), proposals=7)
    assert model.transform.min_size == (480,) and model.transform.max_size == 640  # a 480x640 frame is not rescaled
    assert model.rpn._post_nms_top_n["testing"] == 7


def test_the_torchvision_twin_gives_our_detections_and_refuses_widths_it_cannot_hold(checkpoint: Path) -> None:
    import torchvision

    model = video_model(checkpoint, (64, 96))
    twin = torchvision_twin(model)
    assert type(twin.backbone.body.layer1[0]) is torchvision.models.resnet.BasicBlock
    assert type(twin.roi_heads) is torchvision.models.detection.roi_heads.RoIHeads
    images = [torch.rand(3, 64, 96, generator=torch.Generator().manual_seed(1))]
    with torch.no_grad():
        ours, theirs = model(images)[0], twin(images)[0]
    assert len(ours["boxes"]) > 0
    for key in ("boxes", "scores", "labels"):
        torch.testing.assert_close(ours[key], theirs[key])

    from detection.pruning import prune_detector

    narrower = prune_detector(model, ratio=0.5, scope="pyramid").model  # one narrower pyramid width: torchvision's FPN takes it
    with torch.no_grad():
        torch.testing.assert_close(torchvision_twin(narrower)(images)[0]["boxes"], narrower(images)[0]["boxes"])
    pruned = prune_detector(model, ratio=0.5, scope="trunk").model  # blocks narrower inside: torchvision's ResNet cannot
    with pytest.raises(ValueError, match="cannot hold"):
        torchvision_twin(pruned)


def test_video_rows_have_end_to_end_and_stage_times_for_every_runtime(tmp_path: Path, checkpoint: Path) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("openvino")
    from deploy.benchmark.video import _candidates

    files = {"fp32": "m.onnx", "int8": "m_int8.onnx"}
    assert list(_candidates("m.pth", files)) == [
        "torchvision eager", "ours eager", "ours fast bfloat16", "ours fast bfloat16, no prefetch", "onnxruntime fp32", "onnxruntime int8",
        "onnxruntime int8, no prefetch", "openvino fp32", "openvino bf16", "openvino int8", "openvino int8, no prefetch",
        "openvino int8, 2 requests", "openvino int8, 2 requests, 2 streams", "openvino int8, 2 requests, 2 streams, no prefetch"]
    assert list(_candidates("m.pth", None)) == ["torchvision eager", "ours eager", "ours fast bfloat16", "ours fast bfloat16, no prefetch"]

    out = tmp_path / "bench"
    # --in-process: the candidates run in this process (a process each is the tool's default; run_in_own_process
    # has its own test in test_benchmark.py). --candidates: one of each kind of path (a PyTorch model, an exported
    # file run synchronously without the decoding thread, OpenVINO requests on streams).
    code = load_tool("benchmark").main(["--only", "video", "--checkpoints", str(checkpoint), "--image", "48", "64",
                                        "--video-frames", "3", "--in-process", "--no-memory", "--output-dir", str(out),
                                        "--candidates", "torchvision", "onnxruntime int8, no", "2 streams"])
    assert code == 0
    rows = json.loads((out / "benchmark.json").read_text())["rows"]
    assert {r["group"] for r in rows} == {"video"}
    assert [r["candidate"] for r in rows] == ["torchvision eager", "onnxruntime int8, no prefetch", "openvino int8, 2 requests, 2 streams",
                                              "openvino int8, 2 requests, 2 streams, no prefetch"]
    for r in rows:
        assert r["frames"] == 3 and r["images_per_s"] > 0 and r["model_fps"] > 0, r
        assert set(r["stages_ms"]) == set(STAGES) and all(v > 0 for v in r["stages_ms"].values()), r
        assert r["detections"] >= 0  # detections per frame at the predictor's score threshold (0.5)
    assert rows[0]["ratio"] == 1.0  # torchvision eager is the reference
    assert (out / "video" / "clip_48x64.mp4").exists() and (out / "video" / "model_final_48x64_int8.onnx").exists()


def test_the_video_step_refuses_what_it_cannot_run(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    tool = load_tool("benchmark")
    assert tool.main(["--only", "video", "--output-dir", str(tmp_path)]) == 2
    assert "--only video needs --checkpoints" in one_error_line(capsys.readouterr().err)
    assert tool.main(["--only", "video", "--video-frames", "0", "--output-dir", str(tmp_path)]) == 2
    assert "--video-frames must be a positive integer, got 0" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "benchmark.json").exists()
