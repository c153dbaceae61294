"""Speed and memory of our models beside torchvision's own, measured in one run.

    python tools/benchmark.py                    # full CPU run (several minutes)
    python tools/benchmark.py --quick            # about a minute
    python tools/benchmark.py --device cuda

Method: every candidate is warmed up, then timed ``--reps`` times with the candidates
of a row interleaved (so drift of the machine hits all of them alike); the median is
reported, with the ratio to the reference of its row. CUDA timings are synchronised.
Peak memory: ``torch.cuda.max_memory_allocated`` on CUDA; on the CPU the growth of a
forked child's peak RSS over one forward (activations and workspace on top of the
weights, measured with one thread). Writes ``benchmark.json`` and ``benchmark.png`` to ``--output-dir``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN, fasterrcnn_resnet50_fpn
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

from backbones import resnet_fpn
from detection.evaluation import coco_evaluate
from detection.fast import optimize_for_inference
from detection.models import build_detector


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(fns: dict[str, Callable[[], Any]], reps: int, warmup: int, device: torch.device) -> dict[str, float]:
    """Median seconds per call for each candidate, calls interleaved rep by rep."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            _sync(device)
            t = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def _child_peak(fn: Callable[[], Any], queue: Any) -> None:
    # OpenMP's thread pool does not survive fork(); one thread is what DataLoader workers use too.
    torch.set_num_threads(1)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn()
    queue.put((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)


def peak_memory_mb(fn: Callable[[], Any], device: torch.device) -> float | None:
    """Peak memory of one call, in MiB (see the module docstring for what is measured)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child_peak, args=(fn, queue))
    proc.start()
    proc.join(timeout=300)
    if proc.is_alive():
        proc.kill()
        return None
    return queue.get() if not queue.empty() else None


def _tv_backbone(depth: int) -> nn.Module:
    return resnet_fpn_backbone(backbone_name=f"resnet{depth}", weights=None, trainable_layers=5, norm_layer=nn.BatchNorm2d)


def _randomise_bn(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) * 0.2 - 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


def bench_backbones(args: argparse.Namespace, device: torch.device, rows: list[dict]) -> None:
    shapes = [(16, 224, 224), (1, 800, 1216)] if not args.quick else [(4, 224, 224), (1, args.size, args.size * 3 // 2)]
    for depth in args.depths:
        ours = resnet_fpn(depth).eval().to(device)
        _randomise_bn(ours)
        tv = _tv_backbone(depth).eval().to(device)
        tv.load_state_dict(ours.state_dict())
        detector_like = nn.Module()  # optimize_for_inference works on a detector's .backbone
        detector_like.backbone = ours
        fast_fp32 = optimize_for_inference(detector_like).backbone
        low = torch.bfloat16 if device.type == "cpu" else torch.float16
        fast_low = optimize_for_inference(detector_like, dtype=low).backbone
        fast_low_all = optimize_for_inference(detector_like, dtype=low, autocast_pyramid=True).backbone
        for n, h, w in shapes:
            x = torch.rand(n, 3, h, w, device=device)
            fns = {
                "torchvision": lambda m=tv: m(x),
                "ours": lambda m=ours: m(x),
                "ours fast fp32": lambda m=fast_fp32: m(x),
                f"ours fast {str(low).split('.')[-1]}": lambda m=fast_low: m(x),
                f"ours fast {str(low).split('.')[-1]} + pyramid": lambda m=fast_low_all: m(x),
            }
            with torch.no_grad():
                t = time_interleaved(fns, args.reps, args.warmup, device)
            for name, sec in t.items():
                rows.append({"group": "trunk+FPN forward", "case": f"R{depth} {n}x{h}x{w}", "candidate": name,
                             "images_per_s": n / sec, "seconds": sec, "ratio": t["torchvision"] / sec})


def _detector_pairs(arch: str, depth: int, size: tuple[int, int]) -> dict[str, nn.Module]:
    min_size, max_size = size
    torch.manual_seed(0)
    ours = build_detector(arch, backbone=f"resnet{depth}", num_classes=91, min_size=min_size, max_size=max_size).eval()
    _randomise_bn(ours)
    cls = FasterRCNN if arch == "faster_rcnn" else MaskRCNN
    tv = cls(_tv_backbone(depth), 91, min_size=min_size, max_size=max_size).eval()
    tv.load_state_dict(ours.state_dict())
    # Random heads score every box near 1/91: lower the threshold so NMS and the mask head do real work.
    for m in (ours, tv):
        m.roi_heads.score_thresh = 0.0
    return {"torchvision": tv, "ours": ours}


def bench_detectors(args: argparse.Namespace, device: torch.device, rows: list[dict]) -> None:
    size = (800, 1333) if not args.quick else (args.size, args.size * 3 // 2)
    image = [torch.rand(3, size[0], int(size[0] * 1.5), device=device)]
    low = torch.bfloat16 if device.type == "cpu" else torch.float16
    for arch in ("faster_rcnn", "mask_rcnn"):
        for depth in args.depths:
            models = _detector_pairs(arch, depth, size)
            models["ours fast fp32"] = optimize_for_inference(models["ours"])
            models[f"ours fast {str(low).split('.')[-1]}"] = optimize_for_inference(models["ours"], dtype=low)
            models[f"ours fast {str(low).split('.')[-1]} + pyramid"] = optimize_for_inference(models["ours"], dtype=low, autocast_pyramid=True)
            if arch == "faster_rcnn" and depth == args.depths[0]:
                r50 = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91, min_size=size[0], max_size=size[1]).eval()
                r50.roi_heads.score_thresh = 0.0
                models["torchvision R50 (fasterrcnn_resnet50_fpn)"] = r50
            models = {k: m.to(device) for k, m in models.items()}
            fns = {k: (lambda m=m: m(image)) for k, m in models.items()}
            with torch.no_grad():
                t = time_interleaved(fns, args.reps, args.warmup, device)
                mem = {k: (peak_memory_mb(fn, device) if not args.no_memory else None) for k, fn in fns.items()}
            for name, sec in t.items():
                rows.append({"group": "detector inference", "case": f"{arch} R{depth} {size[0]}x{int(size[0] * 1.5)}", "candidate": name,
                             "images_per_s": 1 / sec, "seconds": sec, "ratio": t["torchvision"] / sec, "peak_mb": mem[name]})


def bench_training(args: argparse.Namespace, device: torch.device, rows: list[dict]) -> None:
    n, side = (4, 256) if not args.quick else (2, args.size)
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, side, side, generator=g).to(device) for _ in range(n)]
    targets = []
    for _ in range(n):
        xy = torch.rand(4, 2, generator=g) * side * 0.6
        wh = torch.rand(4, 2, generator=g) * side * 0.3 + 8
        targets.append({"boxes": torch.cat([xy, xy + wh], 1).to(device), "labels": torch.randint(1, 91, (4,), generator=g).to(device)})
    for depth in args.depths:
        models = _detector_pairs("faster_rcnn", depth, (side, side))
        models["ours --amp"] = models["ours"]
        opts = {k: torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=1e-4, momentum=0.9) for k, m in models.items()}

        def step(name: str) -> None:
            model = models[name].to(device).train()
            with torch.autocast(device.type, dtype=torch.bfloat16 if device.type == "cpu" else torch.float16, enabled=name.endswith("--amp")):
                loss = sum(model(images, targets).values())
            opts[name].zero_grad()
            loss.backward()
            opts[name].step()

        t = time_interleaved({k: (lambda k=k: step(k)) for k in models}, max(args.reps // 2, 2), 1, device)
        for name, sec in t.items():
            rows.append({"group": "training iteration", "case": f"faster_rcnn R{depth} {n}x{side}x{side}", "candidate": name,
                         "images_per_s": n / sec, "seconds": sec, "ratio": t["torchvision"] / sec})


def bench_coco_eval(args: argparse.Namespace, rows: list[dict]) -> None:
    from pycocotools.coco import COCO

    g = torch.Generator().manual_seed(0)
    n_img, n_cat = (500, 20) if not args.quick else (100, 10)
    images, anns, dets = [], [], []
    for i in range(1, n_img + 1):
        images.append({"id": i, "width": 640, "height": 480, "file_name": f"{i}.jpg"})
        for _ in range(8):
            x, y = (torch.rand(2, generator=g) * 500).tolist()
            w, h = (torch.rand(2, generator=g) * 120 + 4).tolist()
            c = int(torch.randint(1, n_cat + 1, (1,), generator=g))
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": c, "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
            for _ in range(3):
                jx, jy = (torch.randn(2, generator=g) * 6).tolist()
                dets.append({"image_id": i, "category_id": c, "bbox": [x + jx, y + jy, w, h], "score": float(torch.rand(1, generator=g))})
    gt = COCO()
    gt.dataset = {"images": images, "annotations": anns, "categories": [{"id": c, "name": str(c)} for c in range(1, n_cat + 1)]}
    gt.createIndex()
    evaluators = ["pycocotools"]
    try:
        import faster_coco_eval  # noqa: F401

        evaluators.append("faster")
    except ImportError:
        pass
    t = time_interleaved({e: (lambda e=e: coco_evaluate(gt, dets, "bbox", evaluator=e)) for e in evaluators}, max(args.reps // 2, 2), 0, torch.device("cpu"))
    for name, sec in t.items():
        rows.append({"group": "COCO evaluation", "case": f"{len(dets)} bbox detections on {n_img} images", "candidate": name,
                     "images_per_s": n_img / sec, "seconds": sec, "ratio": t["pycocotools"] / sec})


def format_table(rows: list[dict]) -> str:
    lines = [f"{'group':<20} {'case':<34} {'candidate':<42} {'img/s':>9} {'ms':>9} {'ratio':>6} {'peak MiB':>9}"]
    lines.append("-" * len(lines[0]))
    for r in rows:
        mem = r.get("peak_mb")
        lines.append(
            f"{r['group']:<20} {r['case']:<34} {r['candidate']:<42} {r['images_per_s']:9.2f} {r['seconds'] * 1000:9.1f} "
            f"{r['ratio']:6.2f} {(f'{mem:9.0f}' if mem is not None else '        -')}"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['case']} | {r['candidate']}" for r in rows]
    fig, ax = plt.subplots(figsize=(10, 0.28 * len(rows) + 1.5))
    colors = ["tab:gray" if r["candidate"].startswith("torchvision") or r["candidate"] == "pycocotools" else "tab:blue" for r in rows]
    ax.barh(range(len(rows)), [r["ratio"] for r in rows], color=colors)
    ax.axvline(1.0, color="k", linewidth=0.8)
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("speed relative to the reference of the row (higher is faster)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--quick", action="store_true", help="small sizes and few repetitions (about a minute)")
    p.add_argument("--reps", type=int, help="timed repetitions per candidate (default 7, quick 3)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--size", type=int, default=320, help="--quick: shorter image side")
    p.add_argument("--depths", type=int, nargs="+", default=[18, 34], choices=[18, 34])
    p.add_argument("--only", nargs="+", choices=["backbone", "detector", "train", "eval"], default=["backbone", "detector", "train", "eval"])
    p.add_argument("--no-memory", action="store_true", help="skip peak-memory measurement")
    p.add_argument("--output-dir", default="outputs/benchmark")
    args = p.parse_args(argv)
    if args.reps is None:
        args.reps = 3 if args.quick else 7
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
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
             "train": lambda: bench_training(args, device, rows), "eval": lambda: bench_coco_eval(args, rows)}
    for name in args.only:
        steps[name]()
        print(format_table(rows))
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmark.json").write_text(json.dumps({"machine": machine, "args": vars(args), "rows": rows}, indent=1))
    plot(rows, out / "benchmark.png")
    print(f"\nwrote {out / 'benchmark.json'} and {out / 'benchmark.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
