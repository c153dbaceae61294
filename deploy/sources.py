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
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["cv2_module", "DEFAULT_FPS", "VIDEO_SUFFIXES", "Frame", "FrameSource", "CaptureSource", "FolderSource", "input_kind", "open_source", "open_frame_folder"]

log = logging.getLogger(__name__)

DEFAULT_FPS = 30.0


# Taken as videos by their name; other files are tried as images first (PIL), then as videos (OpenCV).
VIDEO_SUFFIXES = frozenset({".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".wmv", ".flv", ".ts", ".mts",
                            ".m2ts", ".3gp", ".ogv", ".mjpeg", ".mjpg", ".h264", ".h265", ".hevc"})


_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


_MAX_FPS = 1000.0  # above this a reported rate is a time base, not a frame rate (some streams report 90000)


_WARN_FIRST = 5  # skipped frames named one by one; the rest are only counted


_FILE_RETRIES = 10  # reads tried past a failed one before the reported end of a file


def cv2_module() -> Any:
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
        cv2 = cv2_module()
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
        msec = float(self._capture.get(cv2_module().CAP_PROP_POS_MSEC) or 0.0)
        if msec > 0.0 or index == 0:
            return msec / 1000.0
        return index / (self.fps or DEFAULT_FPS)  # a container without timestamps

    def __iter__(self) -> Iterator[Frame]:
        cv2 = cv2_module()
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
    cv2 = cv2_module()
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
