"""Frames per second on a video, end to end and stage by stage (``tools/benchmark.py --only video``).

Method. A clip of moving shapes scenes (``engine.shapes.scene_frames``: one scene panned a
few pixels a frame, so every object moves) is written as an mp4v file at each size asked
(480x640 and 720x1280 by default). Each detector file given (``--checkpoints``) runs at the
clip's own size: its resize is set to the frame (short side = the frame's, no scaling),
because a model trained on 128-pixel shapes would otherwise shrink every frame to 128 pixels
and time a toy; the file's score threshold (0.5 for drawing), its NMS and its detections are
its own, so the post-processing does the work the frames give it. Each candidate runs in a
process of its own with the same threads (``engine.timing.run_in_own_process``), is warmed
up on a few frames, then timed twice:

- **stages**, after the end-to-end run, frame after frame with nothing overlapped: decode
  (``cv2.VideoCapture.read`` + BGR to RGB), to tensor, the model (pre-processing, inference
  and post-processing inside the detector or file), to :class:`deploy.Prediction`, drawing
  (``draw_detections`` at the frame's size) and encoding (``cv2.VideoWriter``); medians in ms.
  "Model only" frames/s is 1000 / the model's median.
- **end to end**: ``deploy.video.annotate_video`` on the clip, exactly what ``tools/infer.py
  --input clip.mp4`` runs (decoding in a background thread, two frames ahead; OpenVINO requests
  in flight where the candidate says so): frames written over the wall-clock seconds from the
  first frame asked for to the video finalised.

Candidates, per file: ours eager, the fast path (BN folded, channels-last, bfloat16 trunk), the
exported fp32 and int8 files (int8 calibrated on frames of the clip) under ONNX Runtime and
OpenVINO (fp32, bf16, int8; int8 also with two requests in flight, and with two requests on two
CPU streams); the fast path and the int8 files also with ``prefetch=0`` (no decoding thread: on two
cores that thread competes with the runtime's own), and torchvision eager: the same detector and weights in torchvision's own classes
(``BackboneWithFPN`` on ``torchvision.models.resnet*``, ``RoIHeads`` without our candidate cap),
for files whose widths torchvision's classes can hold (not a pruned file). Ratios are to the
torchvision eager row of the same clip size (the first such row), else to the first row.
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from engine.timing import run_in_own_process

__all__ = ["DEFAULT_VIDEO_SIZES", "bench_video", "time_video", "torchvision_twin", "video_model", "write_clip"]

logger = logging.getLogger(__name__)

DEFAULT_VIDEO_SIZES = ((480, 640), (720, 1280))
WARMUP_FRAMES = 3
STAGES = ("decode", "to_tensor", "model", "to_prediction", "draw", "encode")


def write_clip(path: str | Path, height: int, width: int, frames: int, *, fps: float = 30.0, seed: int = 0) -> Path:
    """Write ``frames`` frames of a moving shapes scene as an mp4v video of ``height`` x ``width``.

    Args:
        path: the ``.mp4`` file to write.
        height: frame height in pixels.
        width: frame width in pixels.
        frames: number of frames.
        fps: the video's frame rate.
        seed: the scene's random seed.
    """
    import cv2

    from engine.shapes import scene_frames

    path = Path(path)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    if not writer.isOpened():
        raise RuntimeError(f"OpenCV could not open an mp4v video writer for {path}")
    try:
        for rgb in scene_frames(height, width, frames, seed=seed):
            writer.write(np.ascontiguousarray(rgb[:, :, ::-1]))
    finally:
        writer.release()
    return path


def video_model(path: str | Path, size: tuple[int, int], *, proposals: int | None = None) -> nn.Module:
    """A detector file made to run at a frame's own size: short side ``size``'s, no scaling.

    Args:
        path: a Faster/Mask R-CNN file (``model_final.pth``, a pruned file, ...).
        size: the frame's ``(height, width)``.
        proposals: proposals per image at test time (``None``: the file's own); ignored for
            RetinaNet and FCOS, which have none.
    """
    from detection.checkpoint import load_detector
    from detection.postprocess import set_test_options

    model = load_detector(path).eval()
    model.transform.min_size, model.transform.max_size = (min(size),), max(size)
    if proposals is not None and hasattr(model, "rpn"):  # RetinaNet and FCOS have no proposals
        set_test_options(model, {"rpn_post_nms_top_n_test": proposals})
    return model


def torchvision_twin(model: nn.Module) -> nn.Module:
    """The same detector in torchvision's own classes, with the same weights.

    The pyramid becomes ``torchvision.models.detection.backbone_utils.BackboneWithFPN`` on
    ``torchvision.models.resnet18/34`` with the model's normalisation (BatchNorm or frozen
    BatchNorm), levels and pyramid width, and the box post-processing torchvision's ``RoIHeads`` (no
    candidate cap); the RPN, heads, transform and test settings are the model's.

    Args:
        model: a detector from ``build_detector`` / ``load_detector``.

    Raises:
        ValueError: torchvision's classes cannot hold this model's weights (a pruned model, a
            pyramid with other levels).
    """
    import torchvision
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.models.detection.roi_heads import RoIHeads
    from torchvision.ops import FrozenBatchNorm2d
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

    built = model.build_args
    if built["arch"] not in ("faster_rcnn", "mask_rcnn"):
        raise ValueError(f"the torchvision twin is built for Faster and Mask R-CNN, not {built['arch']}")
    backbone_name = built["backbone"]
    norms = {"bn": nn.BatchNorm2d, "frozen_bn": FrozenBatchNorm2d}
    if built.get("norm", "frozen_bn") not in norms:
        raise ValueError(f"torchvision's ResNet has no {built['norm']!r} normalisation for {backbone_name}")
    trunk = getattr(torchvision.models, backbone_name)(weights=None, norm_layer=norms[built.get("norm", "frozen_bn")])
    layers = built.get("returned_layers") or [1, 2, 3, 4]
    tv_backbone = BackboneWithFPN(trunk, {f"layer{k}": str(i) for i, k in enumerate(layers)}, [64 * 2 ** (k - 1) for k in layers],
                                  model.backbone.out_channels, extra_blocks=LastLevelMaxPool())
    try:
        tv_backbone.load_state_dict(model.backbone.state_dict())
    except RuntimeError as e:
        raise ValueError(f"torchvision's {backbone_name} + FPN cannot hold this model's pyramid weights: {str(e).splitlines()[0]}") from e
    twin = copy.deepcopy(model)
    twin.backbone = tv_backbone.eval()
    twin.roi_heads.__class__ = RoIHeads  # CappedRoIHeads only adds a method and an int to torchvision's class
    return twin


def _predictor(spec: dict[str, Any]) -> Any:
    from deploy.predictor import Predictor

    kind = spec["kind"]
    if kind == "exported":
        return Predictor(spec["file"], runtime=spec["runtime"], device="cpu", precision=spec.get("precision"))
    model = video_model(spec["path"], tuple(spec["size"]), proposals=spec.get("proposals"))
    if kind == "torchvision":
        return Predictor(torchvision_twin(model), device="cpu")
    if kind == "fast":
        return Predictor(model, device="cpu", fast=True, dtype=torch.bfloat16)
    return Predictor(model, device="cpu")


def _stage_times(predictor: Any, clip: str, frames: int, out_dir: Path) -> tuple[dict[str, float], float]:
    """Median ms per stage over ``frames`` frames (after one of warm-up), nothing overlapped; and detections per frame."""
    import cv2

    from deploy.predictor import as_image_tensor
    from detection.visualize import draw_detections

    capture = cv2.VideoCapture(clip)
    height, width = int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)), int(capture.get(cv2.CAP_PROP_FRAME_WIDTH))
    writer = cv2.VideoWriter(str(out_dir / "stages.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), 30.0, (width, height))
    times: dict[str, list[float]] = {stage: [] for stage in STAGES}
    found = []
    try:
        for index in range(frames + 1):
            t0 = time.perf_counter()
            ok, bgr = capture.read()
            if not ok:
                break
            rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
            t1 = time.perf_counter()
            tensor = as_image_tensor(rgb)
            t2 = time.perf_counter()
            out = predictor.predict_tensors([tensor])[0]
            t3 = time.perf_counter()
            prediction = predictor._convert(out, (height, width))
            t4 = time.perf_counter()
            picture = draw_detections(torch.from_numpy(rgb).permute(2, 0, 1), prediction.raw, predictor.class_names,
                                      score_thresh=predictor.score_thresh, min_side=0)
            t5 = time.perf_counter()
            writer.write(np.ascontiguousarray(picture.permute(1, 2, 0).numpy()[:, :, ::-1]))
            t6 = time.perf_counter()
            if index == 0:
                continue  # warm-up: first calls allocate and compile
            for stage, (a, b) in zip(STAGES, ((t0, t1), (t1, t2), (t2, t3), (t3, t4), (t4, t5), (t5, t6))):
                times[stage].append((b - a) * 1000)
            found.append(len(prediction))
    finally:
        capture.release()
        writer.release()
    if not found:
        raise RuntimeError(f"{clip}: fewer than 2 frames could be read")
    return {stage: statistics.median(values) for stage, values in times.items()}, float(np.mean(found))


def time_video(spec: dict[str, Any], queue: Any) -> None:
    """Timing process of one candidate: warm-up, the end-to-end run (``annotate_video``), then the stage medians."""
    try:
        import cv2

        from deploy.sources import open_source
        from deploy.video import annotate_video

        torch.set_num_threads(spec["threads"])
        predictor = _predictor(spec)
        requests, streams = spec.get("requests", 1), spec.get("streams")
        capture = cv2.VideoCapture(spec["clip"])
        warm = [cv2.cvtColor(capture.read()[1], cv2.COLOR_BGR2RGB) for _ in range(WARMUP_FRAMES + requests)]
        capture.release()
        # Before any clock: first calls allocate, OpenVINO compiles the streaming model and creates its requests.
        for _ in predictor.stream(warm, requests=requests, streams=streams):
            pass
        with tempfile.TemporaryDirectory() as tmp:
            run = annotate_video(predictor, open_source(spec["clip"]), Path(tmp) / "run", requests=requests, streams=streams,
                                 prefetch=spec.get("prefetch", 2), max_frames=spec["frames"], progress=False)
            stages, detections = _stage_times(predictor, spec["clip"], spec["stage_frames"], Path(tmp))
        queue.put({"fps": run.fps, "frames": run.frames, "stages_ms": stages, "detections": detections})
    except Exception as e:  # noqa: BLE001 - reported as the row's error by the parent
        queue.put({"error": f"{type(e).__name__}: {e}"})


def _export(path: str, size: tuple[int, int], clip: str, out_dir: Path, proposals: int | None, calibration: int) -> dict[str, str]:
    """The file exported at the clip's size, fp32 and int8 (calibrated on ``calibration`` frames of the clip)."""
    import cv2

    from deploy.export import export_onnx, quantize_onnx

    model = video_model(path, size, proposals=proposals)
    stem = f"{Path(path).stem}_{size[0]}x{size[1]}" + (f"_p{proposals}" if proposals else "")
    fp32 = export_onnx(model, out_dir / f"{stem}.onnx", category_mapping=getattr(model, "category_mapping", None))
    capture = cv2.VideoCapture(clip)
    images = []
    for _ in range(calibration):
        ok, bgr = capture.read()
        if not ok:
            break
        images.append(torch.from_numpy(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)).permute(2, 0, 1).float() / 255)
    capture.release()
    int8 = quantize_onnx(fp32, out_dir / f"{stem}_int8.onnx", images)
    return {"fp32": str(fp32), "int8": str(int8)}


def _candidates(path: str, files: dict[str, str] | None) -> dict[str, dict[str, Any]]:
    """What one detector file is timed as: eager, fast path, and (when exported) each runtime and precision."""
    candidates: dict[str, dict[str, Any]] = {
        "torchvision eager": {"kind": "torchvision"},
        "ours eager": {"kind": "ours"},
        "ours fast bfloat16": {"kind": "fast"},
        "ours fast bfloat16, no prefetch": {"kind": "fast", "prefetch": 0},
    }
    if files:
        candidates.update({
            "onnxruntime fp32": {"kind": "exported", "file": files["fp32"], "runtime": "onnxruntime"},
            "onnxruntime int8": {"kind": "exported", "file": files["int8"], "runtime": "onnxruntime"},
            "onnxruntime int8, no prefetch": {"kind": "exported", "file": files["int8"], "runtime": "onnxruntime", "prefetch": 0},
            "openvino fp32": {"kind": "exported", "file": files["fp32"], "runtime": "openvino", "precision": "fp32"},
            "openvino bf16": {"kind": "exported", "file": files["fp32"], "runtime": "openvino", "precision": "bf16"},
            "openvino int8": {"kind": "exported", "file": files["int8"], "runtime": "openvino", "precision": "fp32"},
            "openvino int8, no prefetch": {"kind": "exported", "file": files["int8"], "runtime": "openvino", "precision": "fp32", "prefetch": 0},
            "openvino int8, 2 requests": {"kind": "exported", "file": files["int8"], "runtime": "openvino", "precision": "fp32",
                                          "requests": 2},
            "openvino int8, 2 requests, 2 streams": {"kind": "exported", "file": files["int8"], "runtime": "openvino",
                                                     "precision": "fp32", "requests": 2, "streams": 2},
            "openvino int8, 2 requests, 2 streams, no prefetch": {"kind": "exported", "file": files["int8"], "runtime": "openvino",
                                                                  "precision": "fp32", "requests": 2, "streams": 2, "prefetch": 0},
        })
    return candidates


def bench_video(args: argparse.Namespace, rows: list[dict]) -> None:
    """Video rows: every ``args.checkpoints`` detector file on a shapes clip at each ``args.image`` size (default 480x640, 720x1280).

    Reads ``args.checkpoints``, ``args.image``, ``args.video_frames``, ``args.proposals``,
    ``args.candidates`` (names containing one of them; all when empty), ``args.no_export``,
    ``args.in_process``, ``args.output_dir``.
    """
    from deploy.files import identify

    paths = [p for p in args.checkpoints if identify(p).kind in ("detector", "training_state")]
    if not paths:
        raise ValueError("the video rows need --checkpoints: one or more Faster/Mask R-CNN files to run on the clip")
    sizes = [tuple(args.image)] if getattr(args, "image", None) else list(DEFAULT_VIDEO_SIZES)
    frames = args.video_frames
    out_dir = Path(args.output_dir) / "video"
    out_dir.mkdir(parents=True, exist_ok=True)
    proposals = getattr(args, "proposals", None)
    for size in sizes:
        clip = str(write_clip(out_dir / f"clip_{size[0]}x{size[1]}.mp4", size[0], size[1], frames + 2))
        results: list[tuple[str, str, dict[str, Any]]] = []
        for path in paths:
            files = None if args.no_export else _export(path, size, clip, out_dir, proposals, calibration=8)
            case = f"{Path(path).parent.name}/{Path(path).stem} {size[0]}x{size[1]}" + (f", {proposals} proposals" if proposals else "")
            wanted = getattr(args, "candidates", None)
            chosen = {n: c for n, c in _candidates(path, files).items() if not wanted or any(w in n for w in wanted)}
            for name, spec in chosen.items():
                full = {**spec, "path": str(path), "size": list(size), "clip": clip, "frames": frames,
                        "stage_frames": min(frames, 10), "threads": torch.get_num_threads(), "proposals": proposals}
                result = run_in_own_process(time_video, full, in_process=args.in_process)
                if "error" in result:
                    level = logging.INFO if name == "torchvision eager" and result["error"].startswith("ValueError") else logging.ERROR
                    logger.log(level, "%s %s: not timed: %s", case, name, result["error"])
                    continue
                logger.info("%s %s: %.2f frames/s end to end, stages %s", case, name, result["fps"],
                            {k: round(v, 1) for k, v in result["stages_ms"].items()})
                results.append((case, name, result))
        if not results:
            continue
        reference = next((r for _, n, r in results if n == "torchvision eager"), results[0][2])["fps"]
        for case, name, r in results:
            rows.append({"group": "video", "case": case, "candidate": name, "images_per_s": r["fps"], "seconds": 1 / r["fps"],
                         "ratio": r["fps"] / reference, "peak_mb": None, "model_fps": 1000 / r["stages_ms"]["model"],
                         "stages_ms": r["stages_ms"], "detections": r["detections"], "frames": r["frames"]})


def format_video_table(rows: list[dict]) -> str:
    """The video rows as a table: frames/s end to end and model only, and each stage's ms."""
    video = [r for r in rows if r["group"] == "video"]
    if not video:
        return ""
    head = f"{'case':<44} {'candidate':<38} {'e2e fps':>8} {'model fps':>9} " + " ".join(f"{s:>13}" for s in STAGES)
    lines = [head, "-" * len(head)]
    for r in video:
        stages = " ".join(f"{r['stages_ms'][s]:13.1f}" for s in STAGES)
        lines.append(f"{r['case']:<44} {r['candidate']:<38} {r['images_per_s']:8.2f} {r['model_fps']:9.2f} {stages}")
    return "\n".join(lines)
