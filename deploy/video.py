"""Video in, video out: frames from a file, a camera, a stream URL or a folder of images; an annotated video and a JSON line per frame.

``open_source`` turns what a user types after ``--input`` into a frame source:

- a camera index (``"0"``, digits that name no file or folder),
- a stream URL (``rtsp://``, ``http(s)://``, any ``scheme://``),
- a video file (any container OpenCV's FFmpeg back-end reads: mp4, avi, mkv, mov, ...),
- a folder of images read as the frames of one video, in natural name order (``open_frame_folder``).

Each source is opened and its first frame read at once, so a missing file, a file that is
no video, a camera index with no camera and a URL that does not answer fail before any
work. Frames come out as :class:`Frame` (RGB, in the source's order, numbered as the
source numbers them). A frame that cannot be decoded is skipped and counted; a live source
(a camera, a stream without a frame count) that stops delivering is reopened up to
``reconnect`` times, then ends.

``annotate_video`` runs a ``deploy.Predictor`` over a source (``Predictor.stream``: decoding
in a background thread, OpenVINO requests in flight) and writes ``annotated.mp4`` (mp4v,
the source's size and frame rate, ``DEFAULT_FPS`` where the source has none) and
``detections.jsonl`` (one line per processed frame, flushed as written). The video is
written under a temporary name and renamed when it is finalised, also when the run stops
early (``stop`` set, e.g. by :func:`stop_on_signals`: Ctrl-C or SIGTERM), so ``annotated.mp4``,
when it exists, always plays.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "DEFAULT_FPS",
    "JSONL_NAME",
    "VIDEO_NAME",
    "VIDEO_SUFFIXES",
    "CaptureSource",
    "FolderSource",
    "Frame",
    "FrameSource",
    "VideoRun",
    "annotate_video",
    "frame_record",
    "input_kind",
    "open_frame_folder",
    "open_source",
    "StopRequest",
    "stop_on_signals",
]

log = logging.getLogger(__name__)

DEFAULT_FPS = 30.0
# Taken as videos by their name; other files are tried as images first (PIL), then as videos (OpenCV).
VIDEO_SUFFIXES = frozenset({".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".wmv", ".flv", ".ts", ".mts",
                            ".m2ts", ".3gp", ".ogv", ".mjpeg", ".mjpg", ".h264", ".h265", ".hevc"})
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_MAX_FPS = 1000.0  # above this a reported rate is a time base, not a frame rate (some streams report 90000)
_WARN_FIRST = 5  # skipped frames named one by one; the rest are only counted
_FILE_RETRIES = 10  # reads tried past a failed one before the reported end of a file
VIDEO_NAME = "annotated.mp4"
JSONL_NAME = "detections.jsonl"


def _cv2() -> Any:
    """OpenCV, with its own and FFmpeg's console messages silenced unless the user asked for them.

    A camera index with no camera, or a file that is no video, makes OpenCV print warnings
    and FFmpeg print errors on stderr; the tools say it in one line of their own instead.
    """
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # AV_LOG_QUIET; read when FFmpeg is first used
    import cv2

    if "OPENCV_LOG_LEVEL" not in os.environ:
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    return cv2


@dataclass(frozen=True)
class Frame:
    """One decoded frame.

    Attributes:
        index: its number in the source (0 first; skipped frames keep theirs, so numbers may jump).
        time: seconds: the file's own timestamp, seconds since a live source was opened, or
            ``index / fps`` for a frame folder.
        image: H x W x 3 uint8 RGB.
        name: a frame folder's file, relative to the folder (``None`` for videos).
    """

    index: int
    time: float
    image: np.ndarray
    name: str | None = None


class FrameSource:
    """What every source has: its frames in order (iterate once), what it is, and what it skipped.

    Attributes:
        kind: ``"file"``, ``"camera"``, ``"stream"`` or ``"frames"``.
        name: what messages call it (the path, ``camera 0``, the URL).
        size: ``(height, width)`` of its frames (of the first one; others are skipped).
        fps: the source's own frame rate, ``None`` when it has none.
        frame_count: frames it says it holds, ``None`` when unknown (cameras, live streams).
        skipped: frames that could not be decoded or had another size, so far.
        reconnects: times a live source was opened again after it stopped delivering.
    """

    kind: str
    name: str
    size: tuple[int, int]
    fps: float | None
    frame_count: int | None

    def __init__(self) -> None:
        self.skipped = 0
        self.reconnects = 0

    def __iter__(self) -> Iterator[Frame]:
        raise NotImplementedError

    def close(self) -> None:
        """Release what the source holds (a capture device); idempotent."""

    def __enter__(self) -> FrameSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _skip(self, index: int, why: str) -> None:
        self.skipped += 1
        if self.skipped <= _WARN_FIRST:
            more = "; further skipped frames are only counted" if self.skipped == _WARN_FIRST else ""
            log.warning("%s: skipped frame %d: %s%s", self.name, index, why, more)


class CaptureSource(FrameSource):
    """Frames of an OpenCV capture (a video file, a camera, a stream URL).

    Args:
        open_capture: returns a newly opened ``cv2.VideoCapture`` (or an object with its
            ``isOpened``, ``read``, ``get`` and ``release``); called again to reconnect.
        kind: ``"file"``, ``"camera"`` or ``"stream"``.
        name: what messages call it.
        what: how messages name the input (a tool passes its flag, e.g. ``"--input"``).
        reconnect: attempts to open a live source again when it stops delivering frames
            (0: end at once). Files and streams with a frame count end at their end.
        reconnect_delay: seconds before each attempt.

    Raises:
        ValueError: it cannot be opened, or no frame can be read from it.
    """

    def __init__(
        self, open_capture: Callable[[], Any], *, kind: str, name: str, what: str = "input", reconnect: int = 3,
        reconnect_delay: float = 1.0,
    ) -> None:
        super().__init__()
        if kind not in ("file", "camera", "stream"):
            raise ValueError(f"kind must be 'file', 'camera' or 'stream', got {kind!r}")
        if not isinstance(reconnect, int) or reconnect < 0:
            raise ValueError(f"reconnect must be a non-negative integer, got {reconnect!r}")
        if reconnect_delay < 0:
            raise ValueError(f"reconnect_delay must be >= 0 seconds, got {reconnect_delay}")
        self.kind, self.name = kind, name
        self.reconnect, self.reconnect_delay = reconnect, reconnect_delay
        self._open = open_capture
        cv2 = _cv2()
        self._capture = open_capture()
        if not self._capture.isOpened():
            self._capture.release()
            raise ValueError(_cannot_open(kind, what, name))
        self._opened_at = time.monotonic()
        ok, bgr = self._capture.read()
        if not ok or bgr is None or bgr.ndim != 3 or bgr.shape[2] != 3:
            self._capture.release()
            raise ValueError(f"{what} {name}: opened, but OpenCV could not read a colour frame from it")
        self.size = (int(bgr.shape[0]), int(bgr.shape[1]))
        fps = float(self._capture.get(cv2.CAP_PROP_FPS) or 0.0)
        self.fps = fps if 0.0 < fps <= _MAX_FPS else None
        count = float(self._capture.get(cv2.CAP_PROP_FRAME_COUNT) or 0.0)
        self.frame_count = int(count) if kind != "camera" and count > 0 else None
        # A camera, or a stream that says nothing of its length, is live: a pause is a drop, not the end.
        self.live = kind == "camera" or (kind == "stream" and self.frame_count is None)
        self._first: tuple[np.ndarray, float] | None = (bgr, self._seconds(0))
        self._closed = False

    def _seconds(self, index: int) -> float:
        """The timestamp of the frame just read: wall-clock seconds since opening for a live source, else the file's."""
        if self.live:
            return time.monotonic() - self._opened_at
        msec = float(self._capture.get(_cv2().CAP_PROP_POS_MSEC) or 0.0)
        if msec > 0.0 or index == 0:
            return msec / 1000.0
        return index / (self.fps or DEFAULT_FPS)  # a container without timestamps

    def __iter__(self) -> Iterator[Frame]:
        cv2 = _cv2()
        index = 0
        failed = 0  # reads that gave no frame since the last frame (live: each is followed by a reconnection attempt)
        first, self._first = self._first, None
        if first is None:
            raise RuntimeError(f"{self.name}: a capture source is read once")
        bgr: np.ndarray | None = first[0]
        seconds = first[1]
        while not self._closed:
            if bgr is not None:
                if bgr.ndim == 3 and bgr.shape[:2] == self.size and bgr.shape[2] == 3:
                    yield Frame(index, seconds, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
                else:
                    self._skip(index, f"{bgr.shape[1]}x{bgr.shape[0]} pixels, the video is {self.size[1]}x{self.size[0]}")
                index += 1
                failed = 0
            elif self.live:
                if failed > self.reconnect:
                    log.warning("%s: no frame after frame %d, %d reconnection attempts failed; stopping", self.name, index - 1,
                                self.reconnect)
                    return
                self._reopen(index, failed)
            elif self.frame_count is None or index >= self.frame_count or failed > _FILE_RETRIES:
                if self.frame_count is not None and index < self.frame_count:
                    log.warning("%s: decoding stopped at frame %d of the %d the file reports", self.name, index, self.frame_count)
                return
            ok, read = self._capture.read()
            if ok and read is not None:
                if not self.live and failed:  # frames of a file that failed to decode before this one
                    for lost in range(index, index + failed):
                        self._skip(lost, "could not be decoded")
                    index += failed
                bgr, seconds = read, self._seconds(index)
            else:
                bgr = None
                failed += 1

    def _reopen(self, index: int, attempt: int) -> None:
        """One reconnection attempt; a capture that does not open makes the next read fail, and the next attempt follow."""
        log.warning("%s: no frame after frame %d; reconnecting (attempt %d of %d)", self.name, index - 1, attempt, self.reconnect)
        self._capture.release()
        if self.reconnect_delay:
            time.sleep(self.reconnect_delay)
        try:
            self._capture = self._open()
        except Exception as e:  # noqa: BLE001  (a back-end error is one more failed attempt)
            log.warning("%s: reconnecting failed: %s: %s", self.name, type(e).__name__, e)
            self._capture = _Closed()
            return
        if self._capture.isOpened():
            self.reconnects += 1

    def close(self) -> None:
        self._closed = True
        self._capture.release()


class _Closed:
    """A capture that could not be opened again: every read fails."""

    def isOpened(self) -> bool:  # noqa: N802  (OpenCV's name)
        return False

    def read(self) -> tuple[bool, None]:
        return False, None

    def get(self, prop: int) -> float:
        return 0.0

    def release(self) -> None:
        pass


def _cannot_open(kind: str, what: str, name: str) -> str:
    if kind == "camera":
        return f"{what} {name.split()[-1]}: no camera at index {name.split()[-1]} (OpenCV could not open it)"
    if kind == "stream":
        return f"{what} {name}: the stream could not be opened (OpenCV's FFmpeg back-end got no answer, or not a video)"
    return f"{what} {name} is not an image PIL can read nor a video OpenCV can read"


class FolderSource(FrameSource):
    """A folder of images read as the frames of one video, in natural name order (``frame2`` before ``frame10``).

    Build it with :func:`open_frame_folder`.

    Args:
        files: ``(path, name)`` per image, in frame order.
        name: what messages call it.
        fps: the rate the frames are played at (their timestamps are ``index / fps``).
        what: how messages name the input.

    Raises:
        ValueError: none of the files can be read as an image.
    """

    def __init__(self, files: list[tuple[Path, str]], *, name: str, fps: float = DEFAULT_FPS, what: str = "input") -> None:
        from engine.images import read_image_rgb

        super().__init__()
        if fps <= 0:
            raise ValueError(f"fps must be > 0, got {fps}")
        self.kind, self.name, self.fps, self.frame_count = "frames", name, float(fps), len(files)
        self._files = files
        self._read = read_image_rgb
        for path, _ in files:  # the first readable frame sets the video's size
            try:
                self.size = tuple(self._read(path).shape[:2])  # type: ignore[assignment]
                return
            except Exception:  # noqa: BLE001  (PIL raises several types for corrupt files)
                continue
        raise ValueError(f"{what} {name}: none of its {len(files)} image files could be read as an image")

    def __iter__(self) -> Iterator[Frame]:
        for index, (path, rel) in enumerate(self._files):
            try:
                image = self._read(path)
            except Exception as e:  # noqa: BLE001  (PIL raises several types for corrupt files)
                self._skip(index, f"{rel} could not be read as an image ({type(e).__name__}: {e})")
                continue
            if image.shape[:2] != self.size:
                self._skip(index, f"{rel} is {image.shape[1]}x{image.shape[0]} pixels, the video is {self.size[1]}x{self.size[0]}")
                continue
            yield Frame(index, index / self.fps, image, rel)


def input_kind(spec: str, *, frames: bool = False) -> str:
    """What ``--input`` names: ``"camera"``, ``"stream"``, ``"video"``, ``"frames"`` or ``"images"``.

    Digits that name no file or folder are a camera index; ``scheme://...`` is a stream
    URL; a folder is ``"frames"`` with ``frames=True``, else ``"images"`` (one picture per
    image); a file with a video suffix (``VIDEO_SUFFIXES``) is ``"video"``; any other file
    is ``"images"`` if PIL opens it, else ``"video"``. A path that does not exist is
    ``"images"`` (whose reader says so).

    Args:
        spec: the text the user gave.
        frames: read a folder as the frames of one video.

    Raises:
        ValueError: ``frames`` with something that is not a folder.
    """
    path = Path(spec)
    if spec.isdigit() and not path.exists():
        kind = "camera"
    elif _URL.match(spec):
        kind = "stream"
    elif path.is_dir():
        kind = "frames" if frames else "images"
    elif path.is_file() and path.suffix.lower() in VIDEO_SUFFIXES:
        kind = "video"
    elif path.is_file():
        from PIL import Image

        try:
            with Image.open(path):
                kind = "images"
        except Exception:  # noqa: BLE001  (PIL raises several types for files that are not images)
            kind = "video"
    else:
        kind = "images"
    if frames and kind != "frames":
        raise ValueError(f"--frames reads a folder of images as the frames of a video; {spec} is not a folder")
    return kind


def open_source(spec: str, *, what: str = "input", reconnect: int = 3, reconnect_delay: float = 1.0, timeout: float = 10.0) -> CaptureSource:
    """Open a camera index, a stream URL or a video file and read its first frame.

    Args:
        spec: ``"0"`` (camera index), ``"rtsp://..."`` / ``"http(s)://..."`` (stream) or a
            video file's path.
        what: how messages name it (a tool passes its flag).
        reconnect: attempts to reopen a live source that stops delivering frames.
        reconnect_delay: seconds before each attempt.
        timeout: seconds a stream may take to open, or to deliver a frame.

    Raises:
        FileNotFoundError: a path that does not exist.
        ValueError: nothing OpenCV can open or read a frame from (names it).
    """
    cv2 = _cv2()
    kind = input_kind(spec)
    if kind == "camera":
        index = int(spec)
        return CaptureSource(lambda: cv2.VideoCapture(index), kind="camera", name=f"camera {index}", what=what,
                             reconnect=reconnect, reconnect_delay=reconnect_delay)
    if kind == "stream":
        params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, int(timeout * 1000), cv2.CAP_PROP_READ_TIMEOUT_MSEC, int(timeout * 1000)]
        return CaptureSource(lambda: cv2.VideoCapture(spec, cv2.CAP_FFMPEG, params), kind="stream", name=spec, what=what,
                             reconnect=reconnect, reconnect_delay=reconnect_delay)
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"{what} {spec} does not exist")
    if not path.is_file():
        raise ValueError(f"{what} {spec} is a folder: pass --frames to read its images as the frames of a video")
    return CaptureSource(lambda: cv2.VideoCapture(str(path)), kind="file", name=str(path), what=what, reconnect=0)


def _natural_key(name: str) -> list[Any]:
    return [(0, int(part), part) if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name)]


def open_frame_folder(folder: Path, *, what: str = "input", fps: float = DEFAULT_FPS, exclude: Path | None = None) -> FolderSource:
    """A folder of images (subfolders included) as the frames of one video, in natural name order.

    Args:
        folder: the folder.
        what: how messages name it.
        fps: the frame rate the frames are played at.
        exclude: a folder not to read (the tool's output folder, when inside ``folder``).

    Raises:
        FileNotFoundError: no such folder, or no image in it.
        ValueError: none of its images can be read.
    """
    from .inputs import image_files

    files, left_out = image_files(folder, exclude if exclude is not None else folder / ".none", what=what)
    if left_out:
        log.info("%s: %d frames; left out %d entries that are not images by their extension, hidden, or the output folder",
                 folder, len(files), len(left_out))
    files.sort(key=lambda entry: _natural_key(entry[1]))
    return FolderSource(files, name=str(folder), fps=fps, what=what)


class _VideoFile:
    """An mp4v video written under a temporary name and renamed to ``path`` once finalised."""

    def __init__(self, path: Path, *, fps: float, size: tuple[int, int]) -> None:
        cv2 = _cv2()
        self.path = path
        self._partial = path.with_name(f".{path.stem}.partial{path.suffix}")  # the suffix chooses OpenCV's container
        self._writer = cv2.VideoWriter(str(self._partial), cv2.VideoWriter_fourcc(*"mp4v"), float(fps), (size[1], size[0]))
        if not self._writer.isOpened():
            raise RuntimeError(f"OpenCV could not open an mp4v video writer for {self._partial}")
        self.frames = 0

    def write(self, rgb: np.ndarray) -> None:
        self._writer.write(np.ascontiguousarray(rgb[:, :, ::-1]))  # OpenCV writes BGR
        self.frames += 1

    def close(self) -> Path | None:
        """Finalise the file; returns its path, or ``None`` (and no file) when no frame was written."""
        self._writer.release()
        if not self.frames:
            self._partial.unlink(missing_ok=True)
            return None
        os.replace(self._partial, self.path)
        return self.path


def frame_record(frame: Frame, prediction: Any) -> dict[str, Any]:
    """One ``detections.jsonl`` line: ``frame``, ``time``, (``file``,) and ``detections``.

    Each detection is ``Prediction.to_list()``'s (``box_xyxy``, ``score``, ``label``,
    ``name``, ``category_id``) and, for Mask R-CNN, ``mask_area`` (pixels) and ``mask``, the
    mask as COCO compressed RLE (``{"size": [h, w], "counts": "..."}``,
    ``pycocotools.mask.decode`` reads it back).

    Args:
        frame: the frame.
        prediction: its ``deploy.Prediction``.
    """
    record: dict[str, Any] = {"frame": frame.index, "time": round(frame.time, 4)}
    if frame.name is not None:
        record["file"] = frame.name
    detections = prediction.to_list()
    if prediction.masks is not None and len(detections):
        import pycocotools.mask as mask_utils

        rles = mask_utils.encode(np.asfortranarray(prediction.masks.transpose(1, 2, 0).astype(np.uint8)))
        for item, rle in zip(detections, rles):
            item["mask_area"] = int(mask_utils.area(rle))
            item["mask"] = {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}
    record["detections"] = detections
    return record


@dataclass
class VideoRun:
    """What ``annotate_video`` did.

    Attributes:
        frames: frames processed (each has its line and its video frame).
        skipped: frames the source could not decode (or of another size).
        reconnects: times a live source was reopened.
        seconds: wall-clock seconds from the first frame asked for to the last one written.
        video: the annotated video, ``None`` when no frame was processed.
        detections: ``detections.jsonl``.
        interrupted: ``stop`` ended the run before the source did.
    """

    frames: int
    skipped: int
    reconnects: int
    seconds: float
    video: Path | None
    detections: Path
    interrupted: bool

    @property
    def fps(self) -> float:
        """Frames per second end to end (decoding, inference, drawing, encoding)."""
        return self.frames / self.seconds if self.seconds > 0 else 0.0


def annotate_video(
    predictor: Any,
    source: FrameSource,
    out_dir: str | os.PathLike,
    *,
    fps: float = DEFAULT_FPS,
    requests: int = 1,
    streams: int | None = None,
    prefetch: int = 2,
    max_frames: int | None = None,
    stop: threading.Event | None = None,
    progress: bool = True,
) -> VideoRun:
    """Detect objects in every frame of ``source``; write ``annotated.mp4`` and ``detections.jsonl`` into ``out_dir``.

    The video has the source's size and frame rate (``fps`` where it has none), one frame
    per processed frame, drawn as ``detection.visualize.draw_detections`` draws (boxes,
    names, scores, masks) at the frame's own size. ``detections.jsonl`` gets one line per
    processed frame (:func:`frame_record`), flushed as it is written, so it can be read
    while the run goes on. When the run ends (the source's end, ``max_frames``, ``stop``,
    Ctrl-C or an error) the video is finalised and renamed, and a line logs the frames, the
    skipped frames and the frames per second.

    Args:
        predictor: a ``deploy.Predictor`` (its ``score_thresh`` and ``mask_threshold`` apply).
        source: from :func:`open_source` or :func:`open_frame_folder`; closed when done.
        out_dir: the output folder (made here).
        fps: the frame rate of the video where the source has none.
        requests: ``Predictor.stream``'s OpenVINO requests in flight.
        streams: ``Predictor.stream``'s OpenVINO CPU streams.
        prefetch: frames decoded ahead by a background thread (0: none).
        max_frames: stop after this many processed frames (``None``: the whole source).
        stop: checked after every frame: once set, the run ends there (``interrupted``).
        progress: show a progress bar with the frames per second.

    Returns:
        A :class:`VideoRun`.
    """
    import torch
    from tqdm import tqdm

    from detection.visualize import draw_detections

    if fps <= 0:
        source.close()
        raise ValueError(f"fps must be > 0, got {fps}")
    if max_frames is not None and max_frames < 1:
        source.close()
        raise ValueError(f"max_frames must be a positive integer or None, got {max_frames}")
    out = Path(out_dir)
    stop = stop if stop is not None else threading.Event()
    pending: collections.deque[Frame] = collections.deque()

    def images() -> Iterator[np.ndarray]:
        # Predictor.stream pulls each image once and answers in order: its predictions pair with these, first in first out.
        for frame in source:
            pending.append(frame)
            yield frame.image

    try:
        predictions = predictor.stream(images(), requests=requests, streams=streams, prefetch=prefetch)  # reads nothing yet
        out.mkdir(parents=True, exist_ok=True)
        video = _VideoFile(out / VIDEO_NAME, fps=source.fps or fps, size=source.size)
    except BaseException:
        source.close()
        raise
    frames, interrupted, written, seconds = 0, False, None, 0.0
    runs_on = getattr(predictor.model, "runtime", None) or f"torch on {getattr(predictor, 'device', 'cpu')}"
    log.info("%s: %s, %dx%d at %s frames/s%s; model: %s%s", source.name, source.kind, source.size[1], source.size[0],
             f"{source.fps:g}" if source.fps else f"{fps:g} (none given)", f", {source.frame_count} frames" if source.frame_count else "",
             runs_on, f", {requests} requests in flight" if requests > 1 else "")
    started = time.perf_counter()

    def finish() -> None:
        nonlocal written, seconds
        seconds = time.perf_counter() - started
        written = video.close()
        log.info("%s: %d frames, %d skipped, %d reconnects, %.2f frames/s end to end%s", source.name, frames, source.skipped,
                 source.reconnects, frames / seconds if seconds > 0 else 0.0, " (stopped early)" if interrupted else "")

    # Undone in reverse order, however the loop ends: the decoding thread stops before the capture is released,
    # and the video is finalised last.
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(finish)
        lines = cleanup.enter_context(open(out / JSONL_NAME, "w", encoding="utf-8"))
        # Counts the source's frames (skipped ones too); the postfix is the mean rate since the start, end to end.
        bar = cleanup.enter_context(tqdm(total=source.frame_count, desc=Path(source.name).name or source.name, unit="frame",
                                         disable=not progress, dynamic_ncols=True))
        cleanup.callback(lambda: bar.update(max(0, frames + source.skipped - bar.n)))  # skipped frames after the last one
        cleanup.callback(source.close)
        cleanup.callback(predictions.close)
        for prediction in predictions:
            frame = pending.popleft()
            image = frame.image if frame.image.flags.writeable else frame.image.copy()  # PIL's arrays are read-only
            picture = draw_detections(torch.from_numpy(image).permute(2, 0, 1), prediction.raw, predictor.class_names,
                                      score_thresh=predictor.score_thresh, mask_threshold=predictor.mask_threshold, min_side=0)
            video.write(picture.permute(1, 2, 0).numpy())
            lines.write(json.dumps(frame_record(frame, prediction), ensure_ascii=False) + "\n")
            lines.flush()
            frames += 1
            bar.update(frame.index + 1 - bar.n)
            bar.set_postfix_str(f"mean {frames / (time.perf_counter() - started):.1f} frames/s", refresh=False)
            if max_frames is not None and frames >= max_frames:
                break
            if stop.is_set():
                interrupted = True
                break
    return VideoRun(frames=frames, skipped=source.skipped, reconnects=source.reconnects, seconds=seconds, video=written,
                    detections=out / JSONL_NAME, interrupted=interrupted)


class StopRequest(threading.Event):
    """A stop flag that remembers the signal which set it (``signum``; ``None`` when set by code)."""

    signum: int | None = None


STOP_SIGNALS = ("SIGINT", "SIGTERM")


@contextlib.contextmanager
def stop_on_signals(stop: threading.Event) -> Iterator[threading.Event]:
    """While the block runs, the first Ctrl-C (SIGINT) or SIGTERM sets ``stop`` instead of ending the process.

    A loop that checks ``stop`` after each frame then ends with every file whole and the
    video and the JSON lines agreeing frame for frame: ``docker stop`` and ``systemctl
    stop`` (SIGTERM) leave what Ctrl-C leaves. A second signal stops at once, through the
    normal unwinding (so ``finally`` blocks still finalise files): a second signal, either one: SIGINT raises
    ``KeyboardInterrupt``, SIGTERM ``SystemExit(143)``. When ``stop`` is a
    :class:`StopRequest`, its ``signum`` records the first signal. Outside the main thread
    (where signal handlers cannot be set) the block runs unchanged.

    Args:
        stop: the event to set.
    """
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    signums = [getattr(signal, name) for name in STOP_SIGNALS if hasattr(signal, name)]
    previous = {signum: signal.getsignal(signum) for signum in signums}

    def again(signum: int, frame: Any) -> None:
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)

    def first(signum: int, frame: Any) -> None:
        if isinstance(stop, StopRequest) and stop.signum is None:
            stop.signum = signum
        stop.set()
        for each in signums:
            signal.signal(each, again)

    for signum in signums:
        signal.signal(signum, first)
    try:
        yield stop
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
