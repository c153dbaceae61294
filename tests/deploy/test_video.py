"""Videos, frame folders, cameras and streams through tools/infer.py and Predictor.stream (issue 23 items 1, 2, 5).

The inputs are made here: a short mp4 panned across a shapes scene (the objects move
through the frame), a folder of frames with one that is not an image, fake captures for
a stream that drops. No camera or network is touched: the camera index and the stream URL
that are not there fail before anything is opened for real. The model is a tiny random
Mask R-CNN (masks are drawn and written), its ONNX export runs the OpenVINO cases.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from deploy import Predictor
from deploy.sources import CaptureSource, FolderSource, input_kind, open_source
from deploy.video import annotate_video
from detection import build_detector, save_detector
from engine.shapes import scene_frames
from helpers import REPO, run_tool, tool_env

MAPPING = {"cat_ids": [7, 3], "names": ["猫", "dog"]}
FPS = 12.0
HEIGHT, WIDTH = 64, 96


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    # box_score_thresh=0: random weights then give candidates (and masks) on every frame. A one-layer mask head:
    # torchvision's four 256-channel layers would cost ten times the rest of the model per detection.
    detector = build_detector("mask_rcnn", num_classes=3, min_size=64, max_size=64, out_channels=16, representation_size=32,
                              rpn_pre_nms_top_n_test=30, rpn_post_nms_top_n_test=10, box_score_thresh=0.0,
                              box_detections_per_img=4, mask_head_channels=16, mask_head_layers=1, mask_roi_size=7).eval()
    detector.category_mapping = MAPPING
    return detector


@pytest.fixture(scope="module")
def checkpoint(model: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model") / "model_final.pth"
    save_detector(model, path, category_mapping=MAPPING)
    return path


@pytest.fixture(scope="module")
def onnx_file(model: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("onnx")
    pytest.importorskip("openvino")
    from deploy import export_onnx

    return export_onnx(model, tmp_path_factory.mktemp("onnx") / "model.onnx")


def _scene_frames(count: int, seed: int = 0) -> list[np.ndarray]:
    return scene_frames(HEIGHT, WIDTH, count, seed=seed)


def _write_video(path: Path, frames: list[np.ndarray], fps: float = FPS) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (frames[0].shape[1], frames[0].shape[0]))
    for frame in frames:
        writer.write(frame[:, :, ::-1].copy())
    writer.release()
    return path


def _read_video(path: Path) -> tuple[list[np.ndarray], float, int]:
    """RGB frames, the frame rate and the frame count the file reports."""
    capture = cv2.VideoCapture(str(path))
    fps, count = capture.get(cv2.CAP_PROP_FPS), int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
    frames = []
    while True:
        ok, bgr = capture.read()
        if not ok:
            break
        frames.append(bgr[:, :, ::-1])
    capture.release()
    return frames, fps, count


def _lines(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def _infer(*args: str) -> subprocess.CompletedProcess:
    return run_tool(["tools/infer.py", "--device", "cpu", *args], timeout=240)


def test_a_video_file_gives_an_annotated_video_and_a_line_per_frame(checkpoint: Path, tmp_path: Path) -> None:
    frames = _scene_frames(10)
    clip = _write_video(tmp_path / "clip.mp4", frames)
    out = tmp_path / "vis"
    proc = _infer("--checkpoint", str(checkpoint), "--input", str(clip), "--output", str(out), "--score-thresh", "0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["annotated.mp4", "detections.jsonl"]  # no partial file left

    drawn, fps, count = _read_video(out / "annotated.mp4")
    assert len(drawn) == count == 10 and fps == pytest.approx(FPS) and drawn[0].shape == (HEIGHT, WIDTH, 3)
    source, _, _ = _read_video(clip)
    assert all(np.abs(d.astype(int) - s).mean() > 2 for d, s in zip(drawn, source))  # boxes, labels and masks drawn on each

    lines = _lines(out / "detections.jsonl")
    assert [line["frame"] for line in lines] == list(range(10))
    assert all(set(line) == {"frame", "time", "detections"} for line in lines)
    assert [line["time"] for line in lines] == pytest.approx([i / FPS for i in range(10)], abs=1e-3)
    detections = [d for line in lines for d in line["detections"]]
    assert detections and {d["name"] for d in detections} <= {"猫", "dog"}
    assert all(MAPPING["cat_ids"][MAPPING["names"].index(d["name"])] == d["category_id"] for d in detections)
    import pycocotools.mask as mask_utils

    for d in detections:
        assert set(d) == {"box_xyxy", "score", "label", "name", "category_id", "mask_area", "mask"}
        mask = mask_utils.decode({"size": d["mask"]["size"], "counts": d["mask"]["counts"].encode()})
        assert mask.shape == (HEIGHT, WIDTH) and int(mask.sum()) == d["mask_area"]
    assert "frames/s" in proc.stderr and "10 frames, 0 skipped" in proc.stderr
    assert "wrote 10 frames" in proc.stdout


def test_a_frame_folder_on_openvino_with_requests_in_flight_skips_the_corrupt_frame(onnx_file: Path, tmp_path: Path) -> None:
    src = tmp_path / "frames"
    src.mkdir()
    for i, frame in enumerate(_scene_frames(6, seed=1)):
        Image.fromarray(frame).save(src / f"frame{i}.png")
    (src / "frame3.png").write_bytes(np.random.default_rng(0).bytes(500))  # a frame that is not an image
    Image.fromarray(_scene_frames(1)[0]).save(src / "frame10.png")  # natural order: after frame5, not after frame1
    out = tmp_path / "vis"
    proc = _infer("--checkpoint", str(onnx_file), "--runtime", "openvino", "--requests", "2", "--input", str(src), "--frames",
                  "--fps", "10", "--output", str(out), "--score-thresh", "0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = _lines(out / "detections.jsonl")
    assert [(line["frame"], line["file"]) for line in lines] == [
        (0, "frame0.png"), (1, "frame1.png"), (2, "frame2.png"), (4, "frame4.png"), (5, "frame5.png"), (6, "frame10.png")]
    assert [line["time"] for line in lines] == pytest.approx([0.0, 0.1, 0.2, 0.4, 0.5, 0.6])
    drawn, fps, count = _read_video(out / "annotated.mp4")
    assert len(drawn) == count == 6 and fps == pytest.approx(10.0) and drawn[0].shape == (HEIGHT, WIDTH, 3)
    assert "skipped frame 3: frame3.png could not be read" in proc.stderr and "6 frames, 1 skipped" in proc.stderr
    assert "(1 skipped)" in proc.stdout


def test_a_file_that_is_no_video_is_one_error_line_and_no_output(tmp_path: Path) -> None:
    junk = tmp_path / "broken.mp4"
    junk.write_bytes(np.random.default_rng(0).bytes(4000))
    out = tmp_path / "vis"
    # No model is read: the input fails first. FFmpeg would print "moov atom not found" on stderr of its own.
    proc = _infer("--checkpoint", "never_read.pth", "--input", str(junk), "--output", str(out))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [f"error: --input {junk} is not an image PIL can read nor a video OpenCV can read"]
    assert not out.exists()


def test_what_the_input_names_and_the_messages_of_what_is_not_there(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    (tmp_path / "pics").mkdir()
    Image.fromarray(_scene_frames(1)[0]).save(tmp_path / "pics" / "a.png")
    (tmp_path / "notes.txt").write_text("not a picture")
    (tmp_path / "clip.mp4").write_bytes(b"")
    assert input_kind("0") == "camera" and input_kind("rtsp://cam.local/live") == "stream" and input_kind("https://x/y.mp4") == "stream"
    assert input_kind(str(tmp_path / "pics")) == "images" and input_kind(str(tmp_path / "pics"), frames=True) == "frames"
    assert input_kind(str(tmp_path / "pics" / "a.png")) == "images"
    assert input_kind(str(tmp_path / "clip.mp4")) == "video" and input_kind(str(tmp_path / "notes.txt")) == "video"
    with pytest.raises(ValueError, match="--frames reads a folder"):
        input_kind(str(tmp_path / "pics" / "a.png"), frames=True)
    with pytest.raises(FileNotFoundError, match="missing.mp4 does not exist"):
        open_source(str(tmp_path / "missing.mp4"), what="--input")
    with pytest.raises(ValueError, match="the stream could not be opened"):  # nothing listens on port 9 of this machine
        open_source("rtsp://127.0.0.1:9/live", what="--input", timeout=2.0)
    capfd.readouterr()
    with pytest.raises(ValueError, match=r"^--input 97: no camera at index 97 \(OpenCV could not open it\)$"):
        open_source("97", what="--input")
    assert capfd.readouterr().err == ""  # OpenCV's own warnings ("can't open camera by index") silenced: infer.py says one line


class _FakeCapture:
    """A capture that delivers ``frames`` (``None``: a read that fails) and then fails; or one that does not open."""

    def __init__(self, frames: list[np.ndarray | None] | None, count: int = 0) -> None:
        self.frames, self.count = list(frames or []), count
        self.opened = frames is not None

    def isOpened(self) -> bool:  # noqa: N802
        return self.opened

    def read(self):
        frame = self.frames.pop(0) if self.opened and self.frames else None
        return frame is not None, frame

    def get(self, prop: int) -> float:
        return {cv2.CAP_PROP_FPS: 25.0, cv2.CAP_PROP_FRAME_COUNT: float(self.count)}.get(prop, 0.0)

    def release(self) -> None:
        self.opened = False


def test_a_live_stream_that_drops_is_reopened_then_ends_cleanly(caplog: pytest.LogCaptureFixture) -> None:
    black = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    wrong = np.zeros((HEIGHT // 2, WIDTH, 3), np.uint8)
    # Three frames, the drop; a reconnection that fails, one that works (two frames, one of another size); then nothing.
    captures = iter([_FakeCapture([black] * 3), _FakeCapture(None), _FakeCapture([black, wrong, black])])
    source = CaptureSource(lambda: next(captures, _FakeCapture(None)), kind="stream", name="rtsp://cam/live", reconnect=2,
                           reconnect_delay=0)
    with caplog.at_level("WARNING", logger="deploy"):
        frames = list(source)
    assert source.live and [f.index for f in frames] == [0, 1, 2, 3, 5] and source.skipped == 1 and source.reconnects == 1
    assert all(f.image.shape == (HEIGHT, WIDTH, 3) for f in frames)
    said = caplog.text
    assert "reconnecting (attempt 1 of 2)" in said and "reconnecting (attempt 2 of 2)" in said
    assert "2 reconnection attempts failed; stopping" in said and "skipped frame 4" in said

    # A file whose third frame does not decode: skipped and counted, the rest read; its end is its end (no reconnection).
    opened = iter([_FakeCapture([black, black, None, black], count=4)])
    source = CaptureSource(lambda: next(opened), kind="file", name="clip.mp4", reconnect=0)
    assert [f.index for f in source] == [0, 1, 3] and source.skipped == 1 and source.reconnects == 0
    assert [f.time for f in CaptureSource(lambda: _FakeCapture([black] * 3, count=3), kind="file", name="c.mp4")] == [0.0, 0.04, 0.08]


def _counting(frames: list[np.ndarray], pulled: list[int], fail_after: int | None = None):
    for i, frame in enumerate(frames):
        if fail_after is not None and i == fail_after:
            raise RuntimeError("camera unplugged")
        pulled.append(i)
        yield frame


def test_stream_yields_in_order_lazily_and_what_came_before_an_error(model: torch.nn.Module, one_thread: None) -> None:
    predictor = Predictor(model, device="cpu", score_thresh=0.0)
    frames = _scene_frames(4, seed=2)
    expected = [predictor(frame) for frame in frames[:3]]
    for prefetch in (0, 2):
        pulled: list[int] = []
        stream = predictor.stream(_counting(frames * 10, pulled), prefetch=prefetch)
        first = next(stream)
        time.sleep(0.2)  # time for a background reader to run ahead as far as it may
        assert len(pulled) <= 1 + prefetch + 1, pulled  # not the whole iterable: at most what waits in the queue
        np.testing.assert_array_equal(first.scores, expected[0].scores)
        stream.close()
        pulled = []
        got = []
        with pytest.raises(RuntimeError, match="camera unplugged"):
            for prediction in predictor.stream(_counting(frames, pulled, fail_after=3), prefetch=prefetch):
                got.append(prediction)
        assert len(got) == 3
        for a, b in zip(got, expected):
            np.testing.assert_array_equal(a.boxes, b.boxes)
            np.testing.assert_array_equal(a.scores, b.scores)
            assert a.names == b.names and a.masks is not None and np.array_equal(a.masks, b.masks)
    with pytest.raises(ValueError, match="for exported files run by OpenVINO"):
        predictor.stream(frames, requests=2)  # refused when called, not at the first frame


def test_openvino_requests_in_flight_give_the_synchronous_results_in_order(onnx_file: Path, checkpoint: Path, monkeypatch) -> None:
    predictor = Predictor(onnx_file, runtime="openvino", score_thresh=0.0)
    frames = _scene_frames(6, seed=3)
    synchronous = list(predictor.stream(frames, prefetch=0))
    assert len({p.scores.tobytes() for p in synchronous}) == 6  # distinct frames, so a result out of order shows
    for kwargs in ({"requests": 3}, {"requests": 2, "streams": 2}):
        answered = list(predictor.stream(iter(frames), **kwargs))
        assert len(answered) == 6
        for a, b in zip(answered, synchronous):
            np.testing.assert_allclose(a.boxes, b.boxes, atol=1e-3)
            np.testing.assert_allclose(a.scores, b.scores, atol=1e-4)
            assert a.names == b.names and a.masks.shape == b.masks.shape == (len(b), HEIGHT, WIDTH)
    got = []
    with pytest.raises(RuntimeError, match="camera unplugged"):
        for prediction in predictor.stream(_counting(frames, [], fail_after=4), requests=3):
            got.append(prediction)
    assert [p.scores.tobytes() for p in got] == [p.scores.tobytes() for p in synchronous[:4]]
    # bf16 reaches OpenVINO from Predictor (and infer.py --precision); a PyTorch checkpoint refuses it.
    import deploy.runtime

    asked = {}
    monkeypatch.setattr(deploy.runtime, "load_exported", lambda path, **kwargs: asked.update(kwargs) or predictor.model)
    Predictor(onnx_file, runtime="openvino", precision="bf16")
    assert asked["precision"] == "bf16" and asked["runtime"] == "openvino"
    with pytest.raises(ValueError, match="precision='bf16' is for exported files run with runtime='openvino'"):
        Predictor(checkpoint, device="cpu", precision="bf16")


def test_annotated_frames_keep_their_colours_and_stop_ends_after_the_frame(model: torch.nn.Module, tmp_path: Path, one_thread: None) -> None:
    colours = [(220, 30, 30), (30, 220, 30), (30, 30, 220)]
    files = []
    for i, colour in enumerate(colours):
        Image.fromarray(np.full((HEIGHT, WIDTH, 3), colour, np.uint8)).save(tmp_path / f"{i}.png")
        files.append((tmp_path / f"{i}.png", f"{i}.png"))
    predictor = Predictor(model, device="cpu", score_thresh=1.0)  # nothing passes: the frames are written as they came
    run = annotate_video(predictor, FolderSource(files, name="solid", fps=5.0), tmp_path / "out", progress=False)
    assert run.frames == 3 and not run.interrupted and run.video == tmp_path / "out" / "annotated.mp4" and run.fps > 0
    drawn, fps, _ = _read_video(run.video)
    assert fps == pytest.approx(5.0)
    for frame, colour in zip(drawn, colours):  # RGB in, RGB out (OpenCV writes and reads BGR)
        np.testing.assert_allclose(frame.reshape(-1, 3).mean(0), colour, atol=12)

    stop = threading.Event()
    stop.set()  # as the first Ctrl-C does: the frame being processed is finished, then the run ends
    run = annotate_video(predictor, FolderSource(files, name="solid", fps=5.0), tmp_path / "stopped", stop=stop, progress=False)
    assert run.interrupted and run.frames == 1 and len(_read_video(run.video)[0]) == 1
    assert len(_lines(run.detections)) == 1
    run = annotate_video(predictor, FolderSource(files, name="solid", fps=5.0), tmp_path / "two", max_frames=2, progress=False)
    assert not run.interrupted and run.frames == 2 and len(_lines(run.detections)) == 2


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["ctrl_c", "sigterm"])
def test_ctrl_c_or_sigterm_leaves_a_playable_video_and_whole_lines(checkpoint: Path, tmp_path: Path, signum: int, code: int) -> None:
    # Long enough that the run cannot end before the signal: 1504 frames of 64 x 48.
    frames = [cv2.resize(f, (64, 48)) for f in _scene_frames(8, seed=4)]
    clip = _write_video(tmp_path / "long.mp4", frames * 188)
    out = tmp_path / "vis"
    proc = subprocess.Popen([sys.executable, "tools/infer.py", "--device", "cpu", "--checkpoint", str(checkpoint), "--input", str(clip),
                             "--output", str(out), "--score-thresh", "0"], cwd=REPO, env=tool_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        lines_file = out / "detections.jsonl"
        deadline = time.monotonic() + 180
        while not (lines_file.exists() and lines_file.read_bytes().count(b"\n") >= 1):
            assert proc.poll() is None and time.monotonic() < deadline, "the tool ended or stalled before its first frame"
            time.sleep(0.05)
        proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, stderr[-3000:]
    said = [line for line in stderr.splitlines() if line.startswith("interrupted")]
    assert len(said) == 1 and "complete up to there" in said[0], stderr[-3000:]
    lines = _lines(out / "detections.jsonl")  # every line whole JSON, the file ends with a newline
    drawn, _, count = _read_video(out / "annotated.mp4")  # finalised: OpenCV reads it
    assert 1 <= len(lines) < 1504 and len(drawn) == count == len(lines)
    assert [line["frame"] for line in lines] == list(range(len(lines)))
    assert sorted(p.name for p in out.iterdir()) == ["annotated.mp4", "detections.jsonl"]
    assert os.path.getsize(out / "annotated.mp4") > 0


@pytest.mark.parametrize("first, second, raised, code", [
    (signal.SIGTERM, signal.SIGTERM, SystemExit, 143),
    (signal.SIGINT, signal.SIGINT, KeyboardInterrupt, None),
    (signal.SIGTERM, signal.SIGINT, KeyboardInterrupt, None),
])
def test_a_second_signal_stops_at_once_and_the_handlers_come_back(first: int, second: int, raised: type, code: int | None) -> None:
    from deploy.video import StopRequest, stop_on_signals

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    stop = StopRequest()
    with pytest.raises(raised) as caught, stop_on_signals(stop):
        os.kill(os.getpid(), first)
        assert stop.is_set() and stop.signum == first  # the first one only asks the loop to stop
        os.kill(os.getpid(), second)
        pytest.fail("a second signal must end the block")
    assert stop.signum == first
    if code is not None:
        assert caught.value.code == code
    assert {s: signal.getsignal(s) for s in before} == before


def test_video_flags_out_of_range_or_for_images_are_one_error_line(checkpoint: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from helpers import load_tool, one_error_line

    clip = _write_video(tmp_path / "clip.mp4", _scene_frames(2))
    photo = tmp_path / "photo.png"
    Image.fromarray(_scene_frames(1)[0]).save(photo)
    tool = load_tool("infer")
    for flags, said in ((["--input", str(clip), "--prefetch", "-1"], "--prefetch must be >= 0, got -1"),
                        (["--input", str(clip), "--requests", "0"], "--requests must be >= 1, got 0"),
                        (["--input", str(clip), "--requests", "2"], "--requests and --streams are for --runtime openvino"),
                        (["--input", str(photo), "--prefetch", "0"], "--prefetch is for videos, cameras, streams and --frames folders")):
        assert tool.main(["--checkpoint", str(checkpoint), "--output", str(tmp_path / "out"), *flags]) == 2, flags
        assert said in one_error_line(capsys.readouterr().err), flags
        assert not (tmp_path / "out").exists()


SOLID = [(220, 30, 30), (30, 220, 30), (30, 30, 220), (230, 200, 40)]  # RGB: red, green, blue, yellow


def test_a_video_file_delivers_every_frame_in_rgb_and_its_end_is_no_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    clip = _write_video(tmp_path / "solid.mp4", [np.full((HEIGHT, WIDTH, 3), c, np.uint8) for c in SOLID])  # written as BGR
    with caplog.at_level("WARNING", logger="deploy"):
        with open_source(str(clip)) as source:
            frames = list(source)
    assert source.frame_count == len(SOLID) and [f.index for f in frames] == list(range(len(SOLID)))
    for frame, colour in zip(frames, SOLID):
        mean = frame.image.reshape(-1, 3).mean(0)
        assert np.abs(mean - colour).max() < 12, f"frame {frame.index}: mean colour {mean.round()} for RGB {colour} (BGR not converted?)"
    assert source.skipped == 0 and not caplog.records, f"a complete file logged: {caplog.text}"


def test_a_camera_delivers_rgb_frames(monkeypatch: pytest.MonkeyPatch) -> None:
    bgr = [np.full((HEIGHT, WIDTH, 3), c[::-1], np.uint8) for c in SOLID]  # what OpenCV's capture gives
    opened: list[int] = []

    def capture(index: int) -> _FakeCapture:
        opened.append(index)
        return _FakeCapture(list(bgr))

    monkeypatch.setattr(cv2, "VideoCapture", capture)
    source = open_source("0", reconnect=0, reconnect_delay=0)
    frames = list(source)
    assert opened == [0] and source.live and source.frame_count is None
    assert [tuple(int(v) for v in f.image[0, 0]) for f in frames] == SOLID, "camera frames must come out RGB"


def test_a_stream_that_reports_its_length_ends_at_its_end_without_reconnecting(caplog: pytest.LogCaptureFixture) -> None:
    # An HTTP(S) file read as a stream says how many frames it has: it is not live, so its end is the end.
    black = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    opened: list[int] = []

    def capture() -> _FakeCapture:
        opened.append(1)
        return _FakeCapture([black] * 3, count=3) if len(opened) == 1 else _FakeCapture(None)  # then it is gone

    with caplog.at_level("WARNING", logger="deploy"):
        source = CaptureSource(capture, kind="stream", name="https://host/clip.mp4", reconnect=2, reconnect_delay=0)
        frames = list(source)
    assert not source.live and source.frame_count == 3
    assert [f.index for f in frames] == [0, 1, 2] and [f.time for f in frames] == [0.0, 0.04, 0.08]  # the file's clock
    assert len(opened) == 1 and source.reconnects == 0 and not caplog.records, f"opened {len(opened)} times: {caplog.text}"
