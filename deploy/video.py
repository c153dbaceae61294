"""Video out: ``annotate_video`` runs a predictor over a frame source (``deploy.sources``) and writes an annotated video and a JSON line per frame.

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
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .sources import DEFAULT_FPS, Frame, FrameSource, cv2_module, open_frame_folder, open_source

__all__ = ["VIDEO_OPTIONS", "check_video_options", "open_video_input", "VIDEO_NAME", "JSONL_NAME", "frame_record", "VideoRun", "annotate_video", "StopRequest", "STOP_SIGNALS", "stop_on_signals"]

log = logging.getLogger(__name__)

VIDEO_NAME = "annotated.mp4"
JSONL_NAME = "detections.jsonl"
STOP_SIGNALS = ("SIGINT", "SIGTERM")
# The options of a video run, with their smallest value (fps: above 0), as the tools' --fps, --max-frames, ... flags.
VIDEO_OPTIONS = {"fps": 0.0, "max_frames": 1, "reconnect": 0, "requests": 1, "streams": 1, "prefetch": 0}


def check_video_options(options: dict[str, Any], *, video: bool, runtime: str | None, input: str) -> None:
    """Check a video run's options before any work: only for a video input, in range, requests for OpenVINO only.

    Args:
        options: ``VIDEO_OPTIONS`` keys to values (``None``: not given).
        video: whether the input is a video, camera, stream or frame folder.
        runtime: the runtime chosen (``--requests`` / ``--streams`` are OpenVINO's).
        input: what the user gave, for messages.

    Raises:
        ValueError: naming the flag, its value and what it must be.
    """
    given = [f"--{name.replace('_', '-')}" for name in VIDEO_OPTIONS if options.get(name) is not None]
    if given and not video:
        raise ValueError(f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} for videos, cameras, streams and --frames folders; "
                         f"--input {input} is read as images")
    for name, low in VIDEO_OPTIONS.items():
        value = options.get(name)
        if value is not None and (value < low or (name == "fps" and value == 0)):
            bound = "> 0" if name == "fps" else f">= {low}"
            raise ValueError(f"--{name.replace('_', '-')} must be {bound}, got {value:g}")
    if ((options.get("requests") or 1) > 1 or options.get("streams")) and runtime != "openvino":
        raise ValueError("--requests and --streams are for --runtime openvino (an exported .onnx file); other runtimes run one frame at a time")


class _VideoFile:
    """An mp4v video written under a temporary name and renamed to ``path`` once finalised."""

    def __init__(self, path: Path, *, fps: float, size: tuple[int, int]) -> None:
        cv2 = cv2_module()
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


def open_video_input(spec: str, kind: str, out_dir: Path, *, fps: float | None = None, reconnect: int | None = None) -> FrameSource:
    """The frame source of a video run's input, refusing an output folder that would overwrite it.

    Args:
        spec: what the user gave (``--input``).
        kind: ``input_kind``'s answer: ``"frames"``, ``"video"``, ``"camera"`` or ``"stream"``.
        out_dir: the output folder (a frame folder's own files in it are left out).
        fps: a frame folder's frame rate (default ``DEFAULT_FPS``).
        reconnect: reopenings of a live source that drops (default 3).

    Raises:
        ValueError: the annotated video would overwrite the input file.
    """
    if kind == "frames":
        return open_frame_folder(Path(spec), what="--input", fps=fps or DEFAULT_FPS, exclude=out_dir)
    if kind == "video" and Path(spec).resolve() == (out_dir / VIDEO_NAME).resolve():
        raise ValueError(f"--output {out_dir} would overwrite the input {spec} with the annotated video: pick another folder")
    return open_source(spec, what="--input", reconnect=3 if reconnect is None else reconnect)
