"""Micro-benchmark: torchvision's CPU RoIAlign against ``detection.ops`` at detector shapes (``deploy.benchmark.roi_align``).

Each case times forward, and forward + backward w.r.t. the features, for both
implementations interleaved in the same loop (so load from other processes hits both
alike), and prints the median of ``--reps`` runs and the speed-up. The shapes are those
of Faster R-CNN R18-FPN training (4 images of 256 px, 512 RoIs each) and inference at
800x1216 (1000 RoIs).

    python tools/bench_roi_align.py --reps 5 --threads 2
"""

from __future__ import annotations

import argparse
import sys

import torch
import torchvision

from deploy.benchmark import bench_roi_align
from engine.cli import run_tool


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5, help="timed runs per measurement (median is shown)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--only", default="", help="run only cases whose name contains this")
    return parser.parse_args(argv)


def _bench(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, threads {torch.get_num_threads()}, median of {args.reps}")
    header = f"{'case':52s} {'tv fwd':>8s} {'ours':>8s} {'x':>6s} {'tv f+b':>8s} {'ours':>8s} {'x':>6s}  max|diff| f / b"
    print(header)
    print("-" * len(header))
    for r in bench_roi_align(channels=args.channels, reps=args.reps, only=args.only):
        print(f"{r['case']:52s} {r['ref_fwd_ms']:8.1f} {r['ours_fwd_ms']:8.1f} {r['ref_fwd_ms'] / r['ours_fwd_ms']:6.1f} "
              f"{r['ref_fwd_bwd_ms']:8.1f} {r['ours_fwd_bwd_ms']:8.1f} {r['ref_fwd_bwd_ms'] / r['ours_fwd_bwd_ms']:6.1f}  "
              f"{r['max_diff_fwd']:.1e} / {r['max_diff_bwd']:.1e}")
    print("times in ms; x = torchvision time / ours")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_tool(lambda _: _bench(args))


if __name__ == "__main__":
    sys.exit(main())
