"""Draw accuracy against speed: bbox AP of detector files against their benchmark rows.

    python tools/plot_tradeoff.py \
        --benchmark outputs/prune/bench_800/benchmark.json outputs/p22/bench_800/benchmark.json \
        --point "unpruned" model_final outputs/prune/eval_model_final/metrics.json outputs/prune/eval_model_final_int8/metrics.json \
        --point "0.5" r0.5 outputs/prune/r0.5_ft5_lr1_steps/step1/metrics.json outputs/prune/eval_r0.5_ft5_lr1_int8/metrics.json \
        --reference-ap 49.3 --target-speedup 12 --output docs/img/pruning_ap_speed.png

Each ``--point LABEL STEM METRICS [INT8_METRICS [INT8_ORT_METRICS]]`` is one model. ``STEM`` names its rows in a
benchmark (``tools/benchmark.py --checkpoints``): the row ``STEM`` is eager PyTorch, ``STEM
openvino int8`` its int8 file in OpenVINO, and so on. ``METRICS`` is the ``metrics.json`` of
``eval_coco.py`` (or of a training run) for the checkpoint; ``INT8_METRICS`` that of its int8
file (``eval_coco.py --checkpoint model_int8.onnx --runtime openvino``), and
``INT8_ORT_METRICS`` that of the same file in ONNX Runtime, whose int8 kernels round
differently (without it the ONNX Runtime lines take ``INT8_METRICS``). An int8 runtime is
drawn only for the models whose int8 AP was measured: the fp32 AP is never borrowed for it.

The x axis is each row's speed-up over torchvision eager *in its own benchmark run*
(the benchmark's ``ratio``), so rows of runs taken on different days compare; one line per
runtime joins the models. ``--target-speedup`` and ``--reference-ap``/``--ap-loss`` mark the
target region.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from deploy.benchmark.tradeoff import RUNTIMES, draw, read_speedups, tradeoff_points
from engine.cli import fail, run_tool

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--benchmark", nargs="+", required=True, help="benchmark.json files of tools/benchmark.py --checkpoints")
    p.add_argument("--point", nargs="+", action="append", required=True, metavar="ARG",
                   help="LABEL STEM METRICS [INT8_METRICS [INT8_ORT_METRICS]]: a model, its benchmark rows' name and its metrics.json "
                        "files (the int8 file's in OpenVINO, and in ONNX Runtime)")
    p.add_argument("--runtimes", nargs="+", default=["eager", "ONNX Runtime int8", "OpenVINO int8"], choices=list(RUNTIMES))
    p.add_argument("--reference-ap", type=float, help="the AP to stay within --ap-loss of (e.g. the unpruned model's)")
    p.add_argument("--ap-loss", type=float, default=1.5, help="allowed AP below --reference-ap (default 1.5)")
    p.add_argument("--target-speedup", type=float, help="a speed-up over torchvision eager to mark (e.g. 12)")
    p.add_argument("--title", default="bbox AP against speed")
    p.add_argument("--output", required=True, help="the picture to write (.png)")
    return p.parse_args(argv)


def _check(args: argparse.Namespace) -> dict[str, list[tuple[str, float, float]]]:
    for point in args.point:
        if len(point) not in (3, 4, 5):
            raise ValueError(f"--point takes LABEL STEM METRICS [INT8_METRICS [INT8_ORT_METRICS]], got {len(point)} values: {' '.join(point)}")
    for path in [*args.benchmark, *(p for point in args.point for p in point[2:])]:
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path} does not exist")
    if Path(args.output).is_dir():
        raise ValueError(f"--output {args.output} is a folder; give a .png file")
    lines = tradeoff_points(read_speedups(args.benchmark), args.point, args.runtimes)
    if not lines:
        raise ValueError("nothing to draw: no point has a row for the chosen --runtimes")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        lines = _check(args)
    except (ValueError, FileNotFoundError) as e:
        return fail(e)

    def work(_: object) -> int:
        draw(lines, Path(args.output), title=args.title, reference_ap=args.reference_ap, ap_loss=args.ap_loss,
             target_speedup=args.target_speedup)
        for runtime, line in lines.items():
            print(f"{runtime}: " + ", ".join(f"{label} {x:.2f}x {ap:.1f} AP" for label, x, ap in line))
        print(f"wrote {args.output}")
        return 0

    return run_tool(work)


if __name__ == "__main__":
    sys.exit(main())
