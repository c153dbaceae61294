"""Draw accuracy against latency: bbox AP of detector files (eval_coco.py's metrics.json) against their benchmark rows.

    python tools/plot_tradeoff.py --benchmark outputs/prune/bench_800/benchmark.json \
        --point "ratio 0" model_final outputs/prune/eval_model_final/metrics.json outputs/prune/eval_model_final_int8/metrics.json \
        --point "ratio 0.5" r0.5 outputs/prune/r0.5_ft5/metrics.json outputs/prune/eval_r0.5_ft5_int8/metrics.json \
        --reference-ap 49.3 --target-speedup 12 --output docs/pruning_ap_latency.png

Each ``--point LABEL STEM METRICS [INT8_METRICS]`` is one model: ``STEM`` names its rows in the
benchmark (``tools/benchmark.py --checkpoints``: the row ``STEM`` is eager PyTorch, ``STEM
openvino int8`` its int8 file in OpenVINO, ...); ``METRICS`` gives the AP of the fp32 rows,
``INT8_METRICS`` (optional) the AP measured on its int8 file. One line per runtime joins the
models; the benchmark's ``torchvision`` row (torchvision eager at full width) is drawn as a
vertical line, and ``--target-speedup`` / ``--reference-ap`` draw a target box if given.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from engine.cli import fail, run_tool

RUNTIMES = {"eager": "", "ONNX Runtime int8": " onnxruntime int8", "OpenVINO int8": " openvino int8", "OpenVINO fp32": " openvino fp32"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--benchmark", required=True, help="a benchmark.json of tools/benchmark.py --checkpoints")
    p.add_argument("--point", nargs="+", action="append", required=True, metavar="ARG",
                   help="LABEL STEM METRICS [INT8_METRICS]: a model, its benchmark rows' name and its eval_coco.py metrics.json files")
    p.add_argument("--runtimes", nargs="+", default=["eager", "ONNX Runtime int8", "OpenVINO int8"], choices=list(RUNTIMES))
    p.add_argument("--reference-ap", type=float, help="the AP to stay within --ap-loss of (e.g. the unpruned model's)")
    p.add_argument("--ap-loss", type=float, default=1.5)
    p.add_argument("--target-speedup", type=float, help="a speed-up over the torchvision row to mark (e.g. 12)")
    p.add_argument("--title", default="")
    p.add_argument("--output", required=True, help="the picture to write (.png)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_tool(lambda _: _plot(args))


def _ap(path: str) -> float:
    metrics = json.loads(Path(path).read_text())
    if "bbox/AP" not in metrics:
        raise ValueError(f"{path} has no bbox/AP (is it eval_coco.py's metrics.json?)")
    return float(metrics["bbox/AP"])


def _plot(args: argparse.Namespace) -> int:
    for point in args.point:
        if len(point) not in (3, 4):
            return fail(f"--point takes LABEL STEM METRICS [INT8_METRICS], got {len(point)} values: {' '.join(point)}")
        for path in point[2:]:
            if not Path(path).is_file():
                return fail(f"--point {point[0]}: {path} does not exist")
    if not Path(args.benchmark).is_file():
        return fail(f"--benchmark {args.benchmark} does not exist")
    rows = json.loads(Path(args.benchmark).read_text())["rows"]
    seconds = {r["candidate"]: r["seconds"] for r in rows if r["group"] == "detector inference"}
    case = next((r["case"] for r in rows if r["group"] == "detector inference"), "")
    missing = [f"{p[1]}{RUNTIMES[rt]}" for p in args.point for rt in args.runtimes if f"{p[1]}{RUNTIMES[rt]}" not in seconds]
    if missing:
        return fail(f"--benchmark {args.benchmark} has no detector row named {missing[0]!r} (rows: {', '.join(sorted(seconds))})")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for runtime, marker in zip(args.runtimes, "osD^"):
        xs, ys = [], []
        for label, stem, fp32, *int8 in args.point:
            ap = _ap(int8[0]) if "int8" in runtime and int8 else _ap(fp32)
            xs.append(seconds[f"{stem}{RUNTIMES[runtime]}"] * 1000)
            ys.append(ap)
            ax.annotate(label, (xs[-1], ys[-1]), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.plot(xs, ys, marker=marker, label=runtime)
    if "torchvision" in seconds:
        reference = seconds["torchvision"] * 1000
        ax.axvline(reference, color="gray", linestyle="--", linewidth=1)
        ax.annotate(f"torchvision eager R18\n(full width) {reference:.0f} ms", (reference, ax.get_ylim()[0]), fontsize=7,
                    ha="right", va="bottom", xytext=(-3, 3), textcoords="offset points", color="gray")
        if args.target_speedup:
            ax.axvline(reference / args.target_speedup, color="tab:red", linestyle=":", linewidth=1)
            ax.annotate(f"{args.target_speedup:g}x faster", (reference / args.target_speedup, ax.get_ylim()[1]), fontsize=7,
                        ha="left", va="top", xytext=(3, -3), textcoords="offset points", color="tab:red")
    if args.reference_ap is not None:
        ax.axhline(args.reference_ap - args.ap_loss, color="tab:red", linestyle=":", linewidth=1)
        ax.annotate(f"{args.reference_ap:g} - {args.ap_loss:g} AP", (ax.get_xlim()[0], args.reference_ap - args.ap_loss), fontsize=7,
                    va="bottom", xytext=(3, 2), textcoords="offset points", color="tab:red")
    ax.set_xscale("log")
    ax.set_xlabel(f"ms per image ({case}, fixed work), log scale")
    ax.set_ylabel("bbox AP")
    ax.set_title(args.title or "bbox AP against latency")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
