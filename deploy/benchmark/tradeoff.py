"""Accuracy against speed: bbox AP of detector files against their benchmark rows (``tools/plot_tradeoff.py``).

The x axis is each row's speed-up over torchvision eager *in its own benchmark run* (the
benchmark's ``ratio``), so rows of runs taken on different days compare; one line per
runtime joins the models. An int8 runtime is drawn only for the models whose int8 AP was
measured: the fp32 AP is never borrowed for it.
"""

from __future__ import annotations

import json
from pathlib import Path

from engine.files import atomic_write

__all__ = ["RUNTIMES", "draw", "read_ap", "read_speedups", "tradeoff_points"]

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
