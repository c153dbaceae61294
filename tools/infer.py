"""Run a trained detector on images, videos, cameras or streams and draw what it sees.

    python tools/infer.py --checkpoint outputs/run/model_final.pth --input photo.jpg --output vis/
    python tools/infer.py --checkpoint model_final.pth --input images/ --output vis/ --score-thresh 0.3
    python tools/infer.py --checkpoint model.onnx --input images/ --output vis/          # ONNX Runtime
    python tools/infer.py --checkpoint model_final.pth --input clip.mp4 --output vis/    # a video file
    python tools/infer.py --checkpoint model.onnx --runtime openvino --input 0 --output vis/ --requests 2   # camera 0
    python tools/infer.py --checkpoint model_final.pth --input rtsp://cam.local/stream --output vis/ --max-frames 900
    python tools/infer.py --checkpoint model_final.pth --input frames/ --frames --output vis/ --fps 25

Videos, cameras, stream URLs and (with --frames) folders of frames give ``annotated.mp4`` (the
source's size and frame rate, --fps where it has none) and ``detections.jsonl`` (a line per
frame: ``frame``, ``time`` in seconds, ``detections``); a frame that cannot be decoded is
skipped and counted; a live source that drops is reopened --reconnect times. Ctrl-C or SIGTERM
stops after the current frame with both files whole (exit 130 / 143). See docs/video.md.

Writes one PNG per input, named after the whole file name (``a.jpg`` -> ``a.jpg.png``, so
``a.jpg`` and ``a.png`` never overwrite each other), and detections.json. A folder is walked
with its subfolders; outputs keep the relative path (``images/batch1/x.jpg`` ->
``vis/batch1/x.jpg.png``, key ``batch1/x.jpg`` in detections.json). Photos are drawn upright
(their EXIF orientation tag is applied) and boxes are in that frame.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from engine.cli import DEVICES, DTYPES, USER_ERRORS, fail, parse_dtype, run_tool
from deploy.files import add_runtime_args, check_exported_flags
from deploy.inputs import check_output_folder, image_files, left_out_note, predict_files
from deploy.sources import DEFAULT_FPS, input_kind
from deploy.video import VIDEO_OPTIONS, check_video_options, open_video_input
from detection.postprocess import add_test_option_args

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="model_final.pth from train_det.py, or an exported .onnx (TorchScript .pt with --runtime torchscript)")
    add_runtime_args(p)
    p.add_argument("--input", required=True, help="an image file or a folder of images, subfolders included (any format PIL reads); "
                   "a video file; a camera index (0); a stream URL (rtsp://, http(s)://); a folder of frames with --frames")
    p.add_argument("--output", required=True, help="folder for the PNGs and detections.json, or for annotated.mp4 and "
                   "detections.jsonl (made when there is something to write)")
    p.add_argument("--score-thresh", type=float, default=0.5)
    p.add_argument("--device", choices=list(DEVICES), default="auto")
    p.add_argument("--fast", action="store_true", help="PyTorch: BN folding + channels-last (+ --dtype) inference path")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32")
    add_test_option_args(p)  # PyTorch checkpoints; an exported file has them baked in
    video = p.add_argument_group("videos, cameras, streams and frame folders")
    video.add_argument("--frames", action="store_true", help="read the --input folder's images as the frames of one video (natural name order)")
    video.add_argument("--fps", type=float, help=f"frame rate of annotated.mp4 where the source has none (frame folders, some cameras); default {DEFAULT_FPS:g}")
    video.add_argument("--max-frames", type=int, help="stop after this many frames (a camera or a stream never ends)")
    video.add_argument("--reconnect", type=int, help="a camera or live stream that stops delivering frames is reopened this many times, 1 s apart, "
                       "before the run ends (default 3)")
    video.add_argument("--requests", type=int, help="--runtime openvino: inference requests in flight (default 1: one at a time)")
    video.add_argument("--streams", type=int, help="--runtime openvino: compile with this many CPU streams so requests run side by side")
    video.add_argument("--prefetch", type=int,
                       help="frames decoded ahead by a background thread (default 2; 0: decode in turn with inference, no thread)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_tool(lambda _: _infer(args))


def _infer(args: argparse.Namespace) -> int:
    out_dir = Path(args.output)
    source = None
    try:
        if not 0.0 <= args.score_thresh <= 1.0:
            raise ValueError(f"--score-thresh must be in [0, 1], got {args.score_thresh}")
        check_output_folder(out_dir, what="--output")
        kind = input_kind(args.input, frames=args.frames)
        check_video_options({k: getattr(args, k) for k in VIDEO_OPTIONS}, video=kind != "images", runtime=args.runtime, input=args.input)
        if kind == "images":
            paths, left_out = image_files(Path(args.input), out_dir, what="--input")
        else:
            source = open_video_input(args.input, kind, out_dir, fps=args.fps, reconnect=args.reconnect)
        predictor = _predictor(args)
    except (*USER_ERRORS, ValueError, ImportError) as e:
        if source is not None:
            source.close()
        return fail(e)
    if source is not None:
        return _video(args, predictor, source, out_dir)
    return _images(args, predictor, paths, left_out, out_dir)


def _predictor(args: argparse.Namespace):
    from deploy.opening import open_model
    from deploy.predictor import Predictor
    from detection.postprocess import parse_test_options, set_test_options

    test_options = parse_test_options(args)
    opened = open_model(args.checkpoint, task="detection", runtime=args.runtime, device=args.device, precision=args.precision)
    if opened.exported:
        check_exported_flags(args.checkpoint, device=args.device, test_options=test_options, use="run")
    predictor = Predictor(opened, score_thresh=args.score_thresh, fast=args.fast, dtype=parse_dtype(args.dtype))
    set_test_options(predictor.model, test_options)
    return predictor


def _video(args: argparse.Namespace, predictor, source, out_dir: Path) -> int:
    from deploy.video import StopRequest, annotate_video, stop_on_signals

    stop = StopRequest()
    with stop_on_signals(stop):
        run = annotate_video(predictor, source, out_dir, fps=args.fps or DEFAULT_FPS, requests=args.requests or 1,
                             streams=args.streams, prefetch=2 if args.prefetch is None else args.prefetch, max_frames=args.max_frames,
                             stop=stop)
    wrote = f"{run.video.name} and {run.detections.name}" if run.video else f"{run.detections.name} (no frame, so no video)"
    if run.interrupted:
        print(f"interrupted after {run.frames} frames: {wrote} in {out_dir} are complete up to there", file=sys.stderr)
        return 128 + stop.signum if stop.signum else 130  # the shell's convention: 130 for SIGINT, 143 for SIGTERM
    print(f"wrote {run.frames} frames to {out_dir}: {wrote}" + (f" ({run.skipped} skipped)" if run.skipped else ""))
    return 0


def _images(args: argparse.Namespace, predictor, paths: list[tuple[Path, str]], left_out: list[str], out_dir: Path) -> int:
    from detection.visualize import draw_detections
    from engine.files import atomic_write_text
    from engine.images import image_to_tensor, read_image_rgb

    def predict(image, name: str):
        prediction = predictor(image)
        if len(prediction):
            line = f"{name}: {len(prediction)} detections"
        else:
            best = float(prediction.raw["scores"].max()) if len(prediction.raw["scores"]) else None
            line = f"{name}: 0 detections at --score-thresh {args.score_thresh} ({f'highest score {best:.3f}' if best is not None else 'the model returned no candidates'})"
        return draw_detections(image, prediction.raw, predictor.class_names, score_thresh=args.score_thresh), prediction.to_list(), line

    if left_out:
        print(left_out_note(args.input, len(paths), left_out))
    results = predict_files(paths, out_dir, read=lambda p: image_to_tensor(read_image_rgb(p)), predict=predict, say=print,
                            warn=lambda m: print(m, file=sys.stderr))
    if not results:
        return fail(f"none of the {len(paths)} inputs could be read as an image")
    atomic_write_text(out_dir / "detections.json", json.dumps(results, indent=1, ensure_ascii=False))
    print(f"wrote {len(results)} {'image' if len(results) == 1 else 'images'} to {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
