"""Speed and memory of our models beside torchvision's own, measured in one run (the method: ``deploy.benchmark``).

    python tools/benchmark.py                    # full CPU run (about 30 minutes)
    python tools/benchmark.py --quick            # small sizes, a few minutes
    python tools/benchmark.py --only detector    # detectors only: eager, fast path, ONNX Runtime, OpenVINO, int8
    python tools/benchmark.py --only heavy       # the same at the heavy load: 90,000 candidate boxes (score 0, NMS 1.0)
    python tools/benchmark.py --only detector --proposals 300   # every detector at 300 proposals instead of 1000
    python tools/benchmark.py --only seg         # segmenters at 520x520 beside torchvision's deeplabv3_resnet50
    python tools/benchmark.py --only video --checkpoints model_final.pth   # frames/s on a shapes clip, end to end and per stage
    python tools/benchmark.py --device cuda

Writes ``benchmark.json`` and ``benchmark.png`` to ``--output-dir``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

from deploy.benchmark import bench_backbones, bench_coco_eval, bench_detectors, bench_segmenters, bench_training, format_table, plot
from deploy.benchmark.video import bench_video, format_video_table
from engine.cli import fail, run_tool


STEPS = ("backbone", "detector", "heavy", "seg", "train", "eval", "video")
DEFAULT_STEPS = [step for step in STEPS if step != "video"]  # the video rows need detector files (--checkpoints)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--quick", action="store_true", help="small sizes and few repetitions (about a minute)")
    p.add_argument("--reps", type=int, help="timed repetitions per candidate (default 7, quick 3)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--size", type=int, default=320, help="--quick: shorter image side (segmenters: the side of a square image)")
    p.add_argument("--image", type=int, nargs=2, metavar=("H", "W"),
                   help="detector rows: images of H x W (e.g. 480 640), left at that size by the models' resize; default 800x1216; "
                        "video rows: the clip's frame size (default 480x640 and 720x1280)")
    p.add_argument("--video-frames", type=int, default=60, metavar="N", help="video rows: frames run end to end per candidate (default 60)")
    p.add_argument("--depths", type=int, nargs="+", default=[18, 34], choices=[18, 34])
    p.add_argument("--archs", nargs="+", default=["faster_rcnn", "mask_rcnn"], choices=["faster_rcnn", "mask_rcnn"],
                   help="detectors timed by the detector step")
    p.add_argument("--only", nargs="+", choices=list(STEPS), default=DEFAULT_STEPS,
                   help="backbone: trunk + FPN; detector / seg: inference, each candidate in its own process; heavy: detector inference "
                        "where post-processing is the work (score threshold 0, NMS 1.0: 90,000 candidates); train: detector steps; eval: "
                        "COCOeval; video (not in the default): frames/s end to end and per stage of the --checkpoints detector files on a "
                        "shapes clip (deploy.benchmark.video). Default: all but video")
    p.add_argument("--proposals", type=int, metavar="N",
                   help="detector rows: proposals per image (rpn_post_nms_top_n_test) for every candidate, instead of 1000")
    p.add_argument("--checkpoints", nargs="+", default=[], metavar="PATH",
                   help="detector rows: also time these Faster/Mask R-CNN files (e.g. pruned by tools/prune.py) in the row of their "
                        "architecture and depth, doing the same fixed work: eager, and their exported fp32/int8 files unless --no-export; "
                        "seg rows: also time these segmenter files (tools/train_seg.py), eager, at the rows' size; video rows: the "
                        "detector files to run on the clip (required there)")
    p.add_argument("--checkpoints-only", action="store_true",
                   help="detector rows: time only the --checkpoints files (and their exports) beside the torchvision reference, in the "
                        "rows they belong to")
    p.add_argument("--candidates", nargs="+", metavar="TEXT",
                   help="video rows: time only the candidates whose name contains one of these (e.g. 'openvino int8' 'torchvision')")
    p.add_argument("--in-process", action="store_true",
                   help="time the detector/seg candidates in this process, not one process each: quicker, for checking the tool "
                        "(candidates share the allocator and thread pools, so do not compare them this way)")
    p.add_argument("--no-memory", action="store_true", help="skip peak-memory measurement")
    p.add_argument("--int8-linear", action="store_true",
                   help="detector rows: quantise the fully connected layers too in the --checkpoints files' int8 exports (rows "
                        "'onnxruntime int8+fc', 'openvino int8+fc' instead of 'onnxruntime int8', 'openvino int8'; tools/export.py --int8-linear)")
    p.add_argument("--no-export", action="store_true", help="skip the ONNX Runtime / OpenVINO rows of detectors and segmenters (no export)")
    p.add_argument("--output-dir", default="outputs/benchmark")
    args = p.parse_args(argv)
    if args.reps is None:
        args.reps = 3 if args.quick else 7
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_tool(lambda _: _benchmark(args))


def _benchmark(args: argparse.Namespace) -> int:
    if args.device == "cuda" and not torch.cuda.is_available():
        return fail("--device cuda but CUDA is not available")
    if args.image is not None and min(args.image) < 32:
        return fail(f"--image must be at least 32 x 32 pixels, got {args.image[0]} x {args.image[1]}")
    if "video" in args.only and args.video_frames < 1:
        return fail(f"--video-frames must be a positive integer, got {args.video_frames}")
    if args.proposals is not None and args.proposals < 1:
        return fail(f"--proposals must be a positive integer, got {args.proposals}")
    from backbones.weights import WeightsError
    from deploy.files import identify

    for path in args.checkpoints:
        try:
            info = identify(path)
        except (OSError, WeightsError) as e:
            return fail(e)
        if info.kind not in ("detector", "training_state", "segmenter"):
            return fail(f"--checkpoints {path} is not a detector or segmenter file (it is a {info.kind!r} file)")
    if args.checkpoints_only and not args.checkpoints:
        return fail("--checkpoints-only needs --checkpoints")
    if args.int8_linear and (not args.checkpoints or args.no_export):
        return fail("--int8-linear quantises the --checkpoints files' int8 exports: pass --checkpoints, without --no-export")
    if "video" in args.only and not any(identify(p).kind in ("detector", "training_state") for p in args.checkpoints):
        return fail("--only video needs --checkpoints naming at least one Faster/Mask R-CNN file to run on the clip")
    device = torch.device(args.device)
    machine = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    print(f"benchmark on {machine}")
    rows: list[dict] = []
    steps = {"backbone": lambda: bench_backbones(args, device, rows), "detector": lambda: bench_detectors(args, device, rows),
             "heavy": lambda: bench_detectors(args, device, rows, load="heavy"),
             "seg": lambda: bench_segmenters(args, device, rows), "train": lambda: bench_training(args, device, rows),
             "eval": lambda: bench_coco_eval(args, rows), "video": lambda: bench_video(args, rows)}
    for name in args.only:
        steps[name]()
        print(format_table(rows))
    if "video" in args.only:
        print(format_video_table(rows))
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmark.json").write_text(json.dumps({"machine": machine, "args": vars(args), "rows": rows}, indent=1))
    plot(rows, out / "benchmark.png")
    print(f"\nwrote {out / 'benchmark.json'} and {out / 'benchmark.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
