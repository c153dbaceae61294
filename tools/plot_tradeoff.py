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
import json
import sys
from pathlib import Path

from engine.cli import fail, run_tool
from engine.files import atomic_write

# runtime -> the suffix of its benchmark rows after the file's stem, and which of the point's metrics is its AP
# (0: METRICS, 1: INT8_METRICS, 2: INT8_ORT_METRICS, falling back to INT8_METRICS)
RUNTIMES = {
    "eager": ("", 0),
    "OpenVINO fp32": (" openvino fp32", 0),
    "ONNX Runtime int8": (" onnxruntime int8", 2),
    "OpenVINO int8": (" openvino int8", 1),
    "ONNX Runtime int8+fc": (" onnxruntime int8+fc", 2),  # benchmark.py --int8-linear
    "OpenVINO int8+fc": (" openvino int8+fc", 1),
}


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


def read_ap(path: str | Path) -> float:
    """The ``bbox/AP`` of an ``eval_coco.py`` (or training) ``metrics.json``.

    Args:
        path: the file.
    """
    try:
        metrics = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not a readable metrics.json: {e}") from e
    if not isinstance(metrics, dict) or "bbox/AP" not in metrics:
        raise ValueError(f"{path} has no bbox/AP (expected eval_coco.py's metrics.json)")
    return float(metrics["bbox/AP"])


def read_speedups(paths: list[str | Path]) -> dict[str, float]:
    """Detector rows' speed-up over torchvision eager, by candidate name, from benchmark.json files.

    A name in more than one file keeps the later file's value.

    Args:
        paths: ``benchmark.json`` files of ``tools/benchmark.py``.
    """
    speedups: dict[str, float] = {}
    for path in paths:
        try:
            rows = json.loads(Path(path).read_text())["rows"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path} is not a benchmark.json of tools/benchmark.py: {e}") from e
        speedups.update({r["candidate"]: float(r["ratio"]) for r in rows if r.get("group") == "detector inference" and r.get("ratio")})
    return speedups


def tradeoff_points(
    speedups: dict[str, float], points: list[list[str]], runtimes: list[str]
) -> dict[str, list[tuple[str, float, float]]]:
    """``{runtime: [(label, speed-up, AP), ...]}`` for the points the data has, each line by speed-up.

    Args:
        speedups: ``read_speedups``'s result.
        points: ``[LABEL, STEM, METRICS, (INT8_METRICS, (INT8_ORT_METRICS))]`` lists, as ``--point`` takes them.
        runtimes: keys of ``RUNTIMES``.

    Raises:
        ValueError: a point's benchmark row is missing, or a metrics file is unreadable.
    """
    lines: dict[str, list[tuple[str, float, float]]] = {}
    for runtime in runtimes:
        suffix, which = RUNTIMES[runtime]
        line = []
        for label, stem, *metrics in points:
            if len(metrics) <= min(which, 1):
                continue  # no int8 AP for this model
            name = f"{stem}{suffix}"
            if name not in speedups:
                raise ValueError(f"no benchmark has a detector row named {name!r} (rows: {', '.join(sorted(speedups))})")
            line.append((label, speedups[name], read_ap(metrics[min(which, len(metrics) - 1)])))
        if line:
            lines[runtime] = sorted(line, key=lambda point: point[1])
    return lines


def draw(lines: dict[str, list[tuple[str, float, float]]], path: Path, *, title: str, reference_ap: float | None = None,
         ap_loss: float = 1.5, target_speedup: float | None = None) -> None:
    """Write the picture of ``tradeoff_points``'s lines to ``path`` (atomically).

    Args:
        lines: ``tradeoff_points``'s result.
        path: a ``.png`` file.
        title: the picture's title.
        reference_ap: draws the line ``reference_ap - ap_loss`` when given.
        ap_loss: see ``reference_ap``.
        target_speedup: draws a vertical line at this speed-up when given.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(8, 5))
    for (runtime, line), marker in zip(lines.items(), "osD^"):
        xs = [x for _, x, _ in line]
        ys = [y for _, _, y in line]
        ax.plot(xs, ys, marker=marker, label=runtime)
        for label, x, y in line:
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if target_speedup:
        ax.axvline(target_speedup, color="tab:red", linestyle=":", linewidth=1, label=f"target: {target_speedup:g}x")
    if reference_ap is not None:
        ax.axhline(reference_ap - ap_loss, color="tab:red", linestyle="--", linewidth=1,
                   label=f"target: {reference_ap:.1f} - {ap_loss:g} AP")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}x"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}x" if f"{x:g}"[0] in "235" else ""))
    ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.set_xlabel("speed-up over torchvision eager (same benchmark run, fixed work), log scale")
    ax.set_ylabel("bbox AP")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        atomic_write(path, lambda f: fig.savefig(f, dpi=110, format="png"))
    finally:
        plt.close(fig)


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
