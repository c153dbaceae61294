"""Micro-benchmark: torchvision's CPU RoIAlign against ``detection.ops`` at detector shapes.

Each case times forward, and forward + backward w.r.t. the features, for both
implementations interleaved in the same loop (so load from other processes hits both
alike), and prints the median of ``--reps`` runs and the speed-up. The shapes are those
of Faster R-CNN R18-FPN training (4 images of 256 px, 512 RoIs each) and inference at
800x1216 (1000 RoIs).

    python tools/bench_roi_align.py --reps 5 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import OrderedDict
from typing import Callable

import torch
import torchvision

from detection.ops import MultiScaleRoIAlign, roi_align


def random_boxes(num: int, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
    """Boxes with log-uniform sides from 8 px to the image size, clipped to the image."""
    size = torch.tensor([width, height], dtype=torch.float32)
    log_min = torch.log(torch.tensor(8.0))
    side = torch.exp(log_min + torch.rand(num, 2, generator=generator) * (torch.log(size) - log_min))
    centre = torch.rand(num, 2, generator=generator) * size
    low = torch.minimum(torch.maximum(centre - side / 2, torch.zeros(2)), size - 1)
    high = torch.minimum(torch.maximum(centre + side / 2, low + 1), size)
    return torch.cat([low, high], dim=1)


def time_once(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5, help="timed runs per measurement (median is shown)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--only", default="", help="run only cases whose name contains this")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    channels = args.channels

    cases: list[tuple[str, Callable[..., torch.Tensor], Callable[..., torch.Tensor], tuple, list[torch.Tensor]]] = []

    def single(name: str, images: int, height: int, width: int, rois_per_image: int, stride: int) -> None:
        feats = torch.randn(images, channels, height // stride, width // stride, generator=gen)
        boxes = [random_boxes(rois_per_image, height, width, gen) for _ in range(images)]
        call = (boxes, 7, 1.0 / stride, 2, False)
        cases.append((name, torchvision.ops.roi_align, roi_align, call, [feats]))

    def pyramid(name: str, images: int, height: int, width: int, rois_per_image: int) -> None:
        feats = OrderedDict(
            (str(i), torch.randn(images, channels, height // s, width // s, generator=gen))
            for i, s in enumerate((4, 8, 16, 32))
        )
        boxes = [random_boxes(rois_per_image, height, width, gen) for _ in range(images)]
        ref = torchvision.ops.MultiScaleRoIAlign(list(feats), 7, 2)
        ours = MultiScaleRoIAlign(list(feats), 7, 2)
        shapes = [(height, width)] * images

        def run_ref(*levels: torch.Tensor) -> torch.Tensor:
            return ref(OrderedDict(zip(feats, levels)), boxes, shapes)

        def run_ours(*levels: torch.Tensor) -> torch.Tensor:
            return ours(OrderedDict(zip(feats, levels)), boxes, shapes)

        cases.append((name, run_ref, run_ours, (), list(feats.values())))

    single("train  4x256x64x64, 2048 RoIs (stride 4)", 4, 256, 256, 512, 4)
    single("infer  1x256x200x304, 1000 RoIs (stride 4)", 1, 800, 1216, 1000, 4)
    single("infer  1x256x100x152, 1000 RoIs (stride 8)", 1, 800, 1216, 1000, 8)
    single("infer  1x256x50x76, 1000 RoIs (stride 16)", 1, 800, 1216, 1000, 16)
    single("infer  1x256x25x38, 1000 RoIs (stride 32)", 1, 800, 1216, 1000, 32)
    pyramid("train  pooler, 4 levels, 4 img 256 px, 2048 RoIs", 4, 256, 256, 512)
    pyramid("infer  pooler, 4 levels, 1 img 800x1216, 1000 RoIs", 1, 800, 1216, 1000)

    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, threads {torch.get_num_threads()}, "
          f"median of {args.reps}")
    header = f"{'case':52s} {'tv fwd':>8s} {'ours':>8s} {'x':>6s} {'tv f+b':>8s} {'ours':>8s} {'x':>6s}  max|diff| f / b"
    print(header)
    print("-" * len(header))
    for name, ref_fn, our_fn, call, inputs in cases:
        if args.only not in name:
            continue
        leaves = [t.clone().requires_grad_() for t in inputs]
        upstream = torch.randn_like(ref_fn(*inputs, *call), memory_format=torch.contiguous_format)

        def forward(fn: Callable[..., torch.Tensor]) -> Callable[[], None]:
            def run() -> None:
                with torch.no_grad():
                    fn(*inputs, *call)

            return run

        def forward_backward(fn: Callable[..., torch.Tensor]) -> Callable[[], None]:
            def run() -> None:
                torch.autograd.grad(fn(*leaves, *call), leaves, upstream)

            return run

        runs = {
            "ref_f": forward(ref_fn),
            "our_f": forward(our_fn),
            "ref_fb": forward_backward(ref_fn),
            "our_fb": forward_backward(our_fn),
        }
        for fn in runs.values():
            fn()  # warm-up
        times: dict[str, list[float]] = {key: [] for key in runs}
        for _ in range(args.reps):
            for key, fn in runs.items():
                times[key].append(time_once(fn))
        med = {key: statistics.median(v) for key, v in times.items()}

        out_ref = ref_fn(*leaves, *call)
        out_our = our_fn(*leaves, *call)
        grad_ref = torch.autograd.grad(out_ref, leaves, upstream)
        grad_our = torch.autograd.grad(out_our, leaves, upstream)
        diff_f = (out_ref - out_our).abs().max().item()
        diff_b = max((a - b).abs().max().item() for a, b in zip(grad_ref, grad_our))
        print(
            f"{name:52s} {med['ref_f']:8.1f} {med['our_f']:8.1f} {med['ref_f'] / med['our_f']:6.1f} "
            f"{med['ref_fb']:8.1f} {med['our_fb']:8.1f} {med['ref_fb'] / med['our_fb']:6.1f}  {diff_f:.1e} / {diff_b:.1e}"
        )
    print("times in ms; x = torchvision time / ours")


if __name__ == "__main__":
    main()
