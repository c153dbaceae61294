"""The GPU check behind ``tools/check_gpu.py``: every path that needs a CUDA device, in one command, with one summary.

Runs each step as a subprocess with its own timeout, inside an overall budget (7.5
minutes by default, so the whole check stays under 8); a step that fails or times out
is recorded and the next one runs:

  tests      pytest -m cuda tests/test_cuda.py tests/segmentation/test_segmentation_training.py
  train      tools/train_det.py --backbone resnet18 --device cuda --amp --max-iters 300
             (the shapes recipe; evaluation only at the end)
  eval       tools/eval_coco.py on that run's model_final.pth, on CUDA
  seg        tools/train_seg.py --config seg_shapes_semantic_fpn_r18 --device cuda --amp --max-iters 200
             (the shapes segmentation recipe, semantic FPN R18; mIoU evaluated at the end)
  latency    Faster R-CNN R18 / R34 at 800x1333, random weights, fixed work (1000
             proposals, 100 detections): median latency of synchronised forwards after
             warm-up and peak memory (max_memory_allocated), eager fp32 and fp16 fast path
  benchmark  tools/benchmark.py --device cuda --quick

Writes OUTPUT_DIR/summary.json and OUTPUT_DIR/summary.md (rewritten after every step, so
an interrupted check still leaves what it did): pass/fail and seconds per step, the GPU,
torch / CUDA / cuDNN versions, training images/s, AP, segmentation images/s and mIoU,
latency and memory, the benchmark rows. Each step's output is in OUTPUT_DIR/logs/STEP.log. Exit status: 0 when every step
passed, 1 otherwise, 2 without a CUDA device (nothing is run).
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, TextIO

import torch

from engine.timing import time_calls

from detection.postprocess import fix_detector_work
from deploy.fast import optimize_for_inference

REPO = Path(__file__).resolve().parent.parent
TRAIN_ITERS = 300
# The shapes recipe reads with one worker (sized for 2 CPU cores); GPU machines have more.
TRAIN_WORKERS = 4
# The CPU run of the same recipe had 3.9 bbox AP after 250 iterations (README); far below means a broken GPU path.
MIN_TRAIN_AP = 1.0
# The training's own final evaluation and eval_coco.py score the same file on the same data.
MAX_AP_GAP = 0.5
LATENCY_SIZE = (800, 1333)
# The segmentation step: a short run of the shapes segmentation recipe, checked to learn (its loss falls), not to converge.
SEG_RECIPE = "seg_shapes_semantic_fpn_r18"
SEG_TRAIN_ITERS = 200
# A step is not started with less time than this left of the budget.
MIN_STEP_S = 15.0
STEP_NAMES = ("tests", "train", "eval", "seg", "latency", "benchmark")


class CheckFailed(Exception):
    """A step exited 0 but its results show a failure."""


@dataclass
class Step:
    """One subprocess of the check.

    Attributes:
        name: short name, for the log file and the summary.
        what: one line saying what it checks.
        cmd: the command, run in the repository root.
        timeout_s: its own limit; the overall budget may cut it shorter.
        collect: reads the step's figures from its outputs; ``CheckFailed`` (or any
            error after a zero exit status) fails the step.
        requires: files an earlier step must have written before this one starts.
        outputs: paths this step writes, removed before the check so results never mix
            with an earlier run's (``metrics.jsonl`` is appended to, for one).
    """

    name: str
    what: str
    cmd: list[str]
    timeout_s: float
    collect: Callable[[], dict[str, Any]] | None = None
    requires: list[Path] = field(default_factory=list)
    outputs: list[Path] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Reading each step's results


def pytest_results(junit: Path) -> dict[str, Any]:
    """Counts from pytest's JUnit XML; fails when no test passed (all skipped means no GPU was used)."""
    root = ET.parse(junit).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["failed_tests"] = [
        f"{case.get('classname')}::{case.get('name')}"
        for case in root.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None
    ]
    if counts["passed"] == 0:
        raise CheckFailed(f"no CUDA test passed ({counts['tests']} collected, {counts['skipped']} skipped)")
    return counts


def _median_of(records: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in records if isinstance(r.get(key), (int, float))]
    return statistics.median(values) if values else None


def training_figures(run_dir: Path, iterations: int = TRAIN_ITERS) -> dict[str, Any]:
    """Speed and AP of a training run from its ``metrics.jsonl``."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    windows = [r for r in records if "images_per_s" in r]
    if not windows:
        raise CheckFailed(f"{run_dir / 'metrics.jsonl'} has no images_per_s records")
    # The first window holds CUDA start-up and cuDNN's first algorithm choices.
    steady = windows[1:] or windows
    evals = [r for r in records if isinstance(r.get("bbox/AP"), (int, float))]
    figures = {
        "iterations": windows[-1]["iter"],
        "images_per_s": statistics.median(r["images_per_s"] for r in steady),
        "images_per_s_first_window": windows[0]["images_per_s"],
        "images_per_s_windows": [round(r["images_per_s"], 2) for r in windows],
        "seconds_per_iter": _median_of(steady, "seconds_per_iter"),
        "data_seconds_per_iter": _median_of(steady, "data_seconds_per_iter"),
        "last_loss": windows[-1].get("loss"),
        "bbox_AP": evals[-1]["bbox/AP"] if evals else None,
    }
    if figures["iterations"] != iterations:
        raise CheckFailed(f"trained {figures['iterations']} iterations, expected {iterations}")
    if not (run_dir / "model_final.pth").is_file():
        raise CheckFailed(f"no {run_dir / 'model_final.pth'}")
    if figures["bbox_AP"] is None:
        raise CheckFailed("the run's final evaluation wrote no bbox/AP")
    if figures["bbox_AP"] < MIN_TRAIN_AP:
        raise CheckFailed(f"bbox AP {figures['bbox_AP']:.2f} after {iterations} iterations, expected >= {MIN_TRAIN_AP} "
                          "(the CPU run of this recipe had 3.9 after 250)")
    return figures


def seg_training_figures(run_dir: Path, iterations: int = SEG_TRAIN_ITERS) -> dict[str, Any]:
    """Speed, loss and mIoU of the segmentation run from its ``metrics.jsonl``; fails when it did not learn."""
    import math

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    windows = [r for r in records if "images_per_s" in r]
    if not windows:
        raise CheckFailed(f"{run_dir / 'metrics.jsonl'} has no images_per_s records")
    steady = windows[1:] or windows  # the first window holds CUDA start-up
    evals = [r for r in records if isinstance(r.get("val/mIoU"), (int, float))]
    figures = {
        "iterations": windows[-1]["iter"],
        "images_per_s": statistics.median(r["images_per_s"] for r in steady),
        "images_per_s_first_window": windows[0]["images_per_s"],
        "seconds_per_iter": _median_of(steady, "seconds_per_iter"),
        "data_seconds_per_iter": _median_of(steady, "data_seconds_per_iter"),
        "first_loss": windows[0].get("loss"),
        "last_loss": windows[-1].get("loss"),
        "mIoU": evals[-1]["val/mIoU"] if evals else None,
        "pixel_acc": evals[-1].get("val/pixel_acc") if evals else None,
    }
    if figures["iterations"] != iterations:
        raise CheckFailed(f"trained {figures['iterations']} iterations, expected {iterations}")
    if not (run_dir / "model_final.pth").is_file():
        raise CheckFailed(f"no {run_dir / 'model_final.pth'}")
    if figures["mIoU"] is None:
        raise CheckFailed("the run's final evaluation wrote no val/mIoU")
    first, last = figures["first_loss"], figures["last_loss"]
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in (first, last)) or last >= first:
        raise CheckFailed(f"the segmentation loss did not fall: {first} in the first logging window, {last} in the last")
    return figures


def eval_figures(eval_dir: Path, run_dir: Path) -> dict[str, Any]:
    """``eval_coco.py``'s metrics, checked against the training's own final evaluation of the same file."""
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    ap = metrics.get("bbox/AP")
    if not isinstance(ap, (int, float)):
        raise CheckFailed(f"{eval_dir / 'metrics.json'} has no bbox/AP")
    figures: dict[str, Any] = {"metrics": metrics, "bbox_AP": ap}
    try:
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
        train_ap = [r["bbox/AP"] for r in records if isinstance(r.get("bbox/AP"), (int, float))][-1]
    except (OSError, IndexError, json.JSONDecodeError):
        return figures
    figures["training_bbox_AP"] = train_ap
    if abs(ap - train_ap) > MAX_AP_GAP:
        raise CheckFailed(f"eval_coco.py gives bbox AP {ap:.2f} for model_final.pth, the training's own evaluation gave {train_ap:.2f}")
    return figures


def benchmark_figures(bench_dir: Path) -> dict[str, Any]:
    """The rows of ``benchmark.json``."""
    report = json.loads((bench_dir / "benchmark.json").read_text())
    rows = report.get("rows") or []
    if not rows:
        raise CheckFailed(f"{bench_dir / 'benchmark.json'} has no rows")
    return {"machine": report.get("machine"), "rows": rows}


def latency_figures(path: Path) -> dict[str, Any]:
    """The latency step's JSON; fails when a model did not do the fixed work (1000 proposals, 100 detections)."""
    result = json.loads(path.read_text())
    rows = result.get("rows") or []
    if not rows:
        raise CheckFailed(f"{path} has no rows")
    off = [f"{r['model']} {r['candidate']}: {r['proposals']} proposals, {r['detections']} detections" for r in rows
           if (r["proposals"], r["detections"]) != (1000, 100)]
    if off:
        raise CheckFailed(f"not the fixed work of 1000 proposals and 100 detections: {'; '.join(off)}")
    return result


# ---------------------------------------------------------------------------------------------
# The latency step (run in its own process: python tools/check_gpu.py --measure-latency PATH)


def _time_model(model: torch.nn.Module, images: list[torch.Tensor], reps: int, warmup: int) -> dict[str, Any]:
    device = images[0].device
    proposals: list[int] = []
    hook = model.rpn.register_forward_hook(lambda mod, inp, out: proposals.append(len(out[0][0])))
    with torch.no_grad():
        times = time_calls({"model": lambda: model(images)}, reps, warmup, device)["model"]
        torch.cuda.reset_peak_memory_stats(device)
        resident = torch.cuda.memory_allocated(device)
        out = model(images)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
    hook.remove()
    median = statistics.median(times)
    return {
        "median_ms": median * 1000, "min_ms": min(times) * 1000, "max_ms": max(times) * 1000, "images_per_s": 1 / median,
        "peak_mib": peak / 2**20, "activations_mib": (peak - resident) / 2**20, "resident_mib": resident / 2**20,
        "proposals": proposals[-1], "detections": len(out[0]["boxes"]),
    }


def measure_latency(path: Path, *, reps: int = 10, warmup: int = 3, size: tuple[int, int] = LATENCY_SIZE) -> dict[str, Any]:
    """Inference latency and peak memory of Faster R-CNN R18/R34 at 800x1333 on CUDA; written to ``path``.

    Random weights with the work fixed as the benchmark fixes it
    (``detection.postprocess.fix_detector_work``): exactly ``rpn_post_nms_top_n_test`` (1000)
    proposals and 100 detections per image, whatever the weights and the depth, so R18
    and R34 do the same work.

    Args:
        path: the JSON file to write.
        reps: timed forwards per candidate (the median is reported).
        warmup: untimed forwards first.
        size: image height and width.
    """
    from detection import build_detector

    device = torch.device("cuda")
    h, w = size
    images = [torch.rand(3, h, w, generator=torch.Generator().manual_seed(0)).to(device)]
    rows = []
    for depth in (18, 34):
        torch.manual_seed(0)
        eager = fix_detector_work(build_detector("faster_rcnn", backbone=f"resnet{depth}", num_classes=91, min_size=h, max_size=w).eval())
        candidates = {"eager fp32": eager, "fast fp16": optimize_for_inference(eager, dtype=torch.float16)}
        for name, model in candidates.items():
            model.to(device)
            rows.append({"model": f"Faster R-CNN R{depth}-FPN", "candidate": name, **_time_model(model, images, reps, warmup)})
            model.cpu()
            torch.cuda.empty_cache()
    result = {"image": [h, w], "reps": reps, "warmup": warmup, "rows": rows}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    return result


# ---------------------------------------------------------------------------------------------
# Running the steps


def build_steps(out: Path, python: str = sys.executable) -> list[Step]:
    """The check's steps, writing under ``out``."""
    tests_dir, train_dir, eval_dir, bench_dir = out / "tests", out / "train", out / "eval", out / "bench"
    seg_dir = out / "seg"
    latency = out / "latency.json"
    junit = tests_dir / "junit.xml"
    return [
        Step("tests", "pytest -m cuda tests/test_cuda.py tests/segmentation/test_segmentation_training.py",
             [python, "-m", "pytest", "-m", "cuda", "tests/test_cuda.py", "tests/segmentation/test_segmentation_training.py", "-q", f"--junitxml={junit}"], 240,
             collect=lambda: pytest_results(junit), outputs=[tests_dir]),
        Step("train", f"shapes recipe, ResNet-18, --amp (fp16 + GradScaler), {TRAIN_ITERS} iterations",
             [python, "tools/train_det.py", "--backbone", "resnet18", "--device", "cuda", "--amp", "--max-iters", str(TRAIN_ITERS),
              "--output-dir", str(train_dir), "--no-progress", "--workers", str(TRAIN_WORKERS), "--set", "eval_period=0"], 240,
             collect=lambda: training_figures(train_dir), outputs=[train_dir]),
        Step("eval", "tools/eval_coco.py on the run's model_final.pth, on CUDA",
             [python, "tools/eval_coco.py", "--checkpoint", str(train_dir / "model_final.pth"), "--device", "cuda", "--no-progress",
              "--output-dir", str(eval_dir)], 120,
             collect=lambda: eval_figures(eval_dir, train_dir), requires=[train_dir / "model_final.pth"], outputs=[eval_dir]),
        Step("seg", f"shapes segmentation recipe ({SEG_RECIPE}), --amp (fp16 + GradScaler), {SEG_TRAIN_ITERS} iterations",
             [python, "tools/train_seg.py", "--config", SEG_RECIPE, "--device", "cuda", "--amp", "--max-iters", str(SEG_TRAIN_ITERS),
              "--output-dir", str(seg_dir), "--no-progress", "--workers", str(TRAIN_WORKERS), "--set", "eval_period=0"], 150,
             collect=lambda: seg_training_figures(seg_dir), outputs=[seg_dir]),
        Step("latency", f"Faster R-CNN R18/R34 at {LATENCY_SIZE[0]}x{LATENCY_SIZE[1]}: latency and peak memory",
             [python, str(Path(__file__).resolve()), "--measure-latency", str(latency)], 150,
             collect=lambda: latency_figures(latency), outputs=[latency]),
        Step("benchmark", "tools/benchmark.py --device cuda --quick",
             [python, "tools/benchmark.py", "--device", "cuda", "--quick", "--output-dir", str(bench_dir)], 240,
             collect=lambda: benchmark_figures(bench_dir), outputs=[bench_dir]),
    ]


def _kill_group(proc: subprocess.Popen) -> None:
    # The step runs in its own session: this ends it and its DataLoader workers, nothing else.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def run_step(step: Step, log_path: Path, deadline: float) -> dict[str, Any]:
    """Run one step (unless a required file is missing or the budget is spent) and read its figures."""
    record: dict[str, Any] = {
        "name": step.name, "what": step.what, "command": shlex.join(step.cmd), "log": str(log_path),
        "status": "not run", "seconds": 0.0, "returncode": None, "timeout_s": None, "notes": [], "figures": {},
    }
    missing = [str(p) for p in step.requires if not p.exists()]
    if missing:
        record["notes"].append(f"needs {', '.join(missing)} from an earlier step")
        return record
    remaining = deadline - time.monotonic()
    if remaining < MIN_STEP_S:
        record["notes"].append(f"the overall budget was spent ({remaining:.0f} s left)")
        return record
    timeout = min(step.timeout_s, remaining)
    record["timeout_s"] = round(timeout, 1)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        log.write(f"$ {record['command']}\n")
        log.flush()
        proc = subprocess.Popen(step.cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            returncode = proc.wait(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            returncode = proc.wait()
            timed_out = True
        except BaseException:
            _kill_group(proc)
            raise
    record["seconds"] = round(time.monotonic() - t0, 1)
    record["returncode"] = returncode
    if timed_out:
        record["status"] = "timeout"
        record["notes"].append(f"stopped after {timeout:.0f} s")
    else:
        record["status"] = "pass" if returncode == 0 else "fail"
    if step.collect is not None:
        try:
            record["figures"] = step.collect()
        except CheckFailed as e:
            record["notes"].append(str(e))
            record["status"] = "fail" if record["status"] == "pass" else record["status"]
        except Exception as e:  # noqa: BLE001  (missing or malformed results: the step did not do its job)
            record["notes"].append(f"could not read its results: {type(e).__name__}: {e}")
            record["status"] = "fail" if record["status"] == "pass" else record["status"]
    if record["status"] != "pass":
        record["log_tail"] = _tail(log_path)
    return record


def environment() -> dict[str, Any]:
    """The GPU and the software versions the figures belong to."""
    import torchvision

    props = torch.cuda.get_device_properties(0)
    driver = None
    if shutil.which("nvidia-smi"):
        try:
            query = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                   capture_output=True, text=True, timeout=20)
            driver = query.stdout.strip().splitlines()[0] if query.returncode == 0 and query.stdout.strip() else None
        except (OSError, subprocess.TimeoutExpired):
            driver = None
    return {
        "gpu": props.name, "gpu_count": torch.cuda.device_count(), "compute_capability": f"{props.major}.{props.minor}",
        "gpu_memory_gib": round(props.total_memory / 2**30, 1), "driver": driver,
        "torch": torch.__version__, "torchvision": torchvision.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
        # fp32 convolutions run in TF32 by default on Ampere and later; the "fp32" figures mean that.
        "tf32_cudnn": torch.backends.cudnn.allow_tf32, "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
    }


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as Markdown."""
    env = summary["environment"]
    steps = summary["steps"]
    passed = sum(s["status"] == "pass" for s in steps)
    verdict = "PASS" if summary["passed"] else ("FAIL" if summary["complete"] else "INCOMPLETE")
    lines = [
        "# GPU check",
        "",
        f"- result: **{verdict}** ({passed} of {len(steps)} steps passed{'' if summary['complete'] else ', still running or interrupted'})",
        f"- GPU: {env.get('gpu')} (compute capability {env.get('compute_capability')}, {env.get('gpu_memory_gib')} GiB; "
        f"{env.get('gpu_count')} visible; driver {env.get('driver') or 'unknown'})",
        f"- torch {env.get('torch')} (CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}), torchvision {env.get('torchvision')}, "
        f"Python {env.get('python')}, {env.get('cpu_count')} CPUs; TF32: cuDNN {env.get('tf32_cudnn')}, matmul {env.get('tf32_matmul')}",
        f"- started {summary['started']}, {summary['seconds']:.0f} s in all (budget {summary['budget_s']:.0f} s); "
        f"logs in {summary['output_dir']}/logs/",
        "",
        "| step | status | seconds | what | notes |",
        "|---|---|---:|---|---|",
    ]
    for s in steps:
        notes = "; ".join(s["notes"]).replace("|", "/")
        lines.append(f"| {s['name']} | {s['status']} | {s['seconds']:.1f} | {s['what']} | {notes} |")
    by_name = {s["name"]: s for s in steps}

    tests = by_name.get("tests", {}).get("figures") or {}
    if tests:
        lines += ["", f"CUDA tests: {tests['passed']} passed, {tests['failures'] + tests['errors']} failed, {tests['skipped']} skipped."]
        lines += [f"- failed: `{name}`" for name in tests.get("failed_tests", [])]

    train = by_name.get("train", {}).get("figures") or {}
    evaluation = by_name.get("eval", {}).get("figures") or {}
    if train or evaluation:
        lines += ["", f"## Training: shapes recipe, ResNet-18, --amp, {TRAIN_ITERS} iterations", ""]
        if train:
            lines += [
                f"- training speed: **{_fmt(train.get('images_per_s'))} images/s** (median over the logging windows after the first; "
                f"first window, with start-up: {_fmt(train.get('images_per_s_first_window'))})",
                f"- {_fmt(train.get('seconds_per_iter'), 4)} s/iteration, of which waiting for data {_fmt(train.get('data_seconds_per_iter'), 4)} s; "
                f"last loss {_fmt(train.get('last_loss'), 3)}",
                f"- bbox AP after {train.get('iterations')} iterations (the run's own evaluation): {_fmt(train.get('bbox_AP'))}",
            ]
        if evaluation:
            lines.append(f"- bbox AP from tools/eval_coco.py on model_final.pth: {_fmt(evaluation.get('bbox_AP'))}")

    seg = by_name.get("seg", {}).get("figures") or {}
    if seg:
        lines += [
            "", f"## Segmentation training: {SEG_RECIPE}, --amp, {SEG_TRAIN_ITERS} iterations", "",
            f"- training speed: **{_fmt(seg.get('images_per_s'))} images/s** (median over the logging windows after the first; "
            f"first window, with start-up: {_fmt(seg.get('images_per_s_first_window'))})",
            f"- {_fmt(seg.get('seconds_per_iter'), 4)} s/iteration, of which waiting for data {_fmt(seg.get('data_seconds_per_iter'), 4)} s; "
            f"loss {_fmt(seg.get('first_loss'), 3)} in the first logging window, {_fmt(seg.get('last_loss'), 3)} in the last",
            f"- mIoU after {seg.get('iterations')} iterations (the run's own evaluation): {_fmt(seg.get('mIoU'))}, "
            f"pixel accuracy {_fmt(seg.get('pixel_acc'))}",
        ]

    latency = by_name.get("latency", {}).get("figures") or {}
    if latency.get("rows"):
        h, w = latency["image"]
        lines += [
            "", f"## Inference, one {h}x{w} image (random weights, fixed work)", "",
            f"Median of {latency['reps']} synchronised forwards after {latency['warmup']} warm-up; peak = torch.cuda.max_memory_allocated "
            "over one forward (activations = peak minus what was allocated before it).", "",
            "| model | candidate | median ms | images/s | peak MiB | activations MiB | proposals | detections |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in latency["rows"]:
            lines.append(f"| {r['model']} | {r['candidate']} | {r['median_ms']:.1f} | {r['images_per_s']:.1f} | {r['peak_mib']:.0f} | "
                         f"{r['activations_mib']:.0f} | {r['proposals']} | {r['detections']} |")

    bench = by_name.get("benchmark", {}).get("figures") or {}
    if bench.get("rows"):
        lines += ["", "## tools/benchmark.py --device cuda --quick", "",
                  "| group | case | candidate | images/s | ms | ratio | peak MiB |", "|---|---|---|---:|---:|---:|---:|"]
        for r in bench["rows"]:
            lines.append(f"| {r['group']} | {r['case']} | {r['candidate']} | {r['images_per_s']:.2f} | {r['seconds'] * 1000:.1f} | "
                         f"{r['ratio']:.2f} | {_fmt(r.get('peak_mb'), 0)} |")

    failed = [s for s in steps if s["status"] not in ("pass", "not run")]
    for s in failed:
        lines += ["", f"## {s['name']}: {s['status']} (exit status {s['returncode']})", "", f"`{s['command']}`", "", "```",
                  s.get("log_tail", ""), "```"]
    return "\n".join(lines) + "\n"


def write_summary(summary: dict[str, Any], out: Path) -> tuple[Path, Path]:
    """Write ``summary.json`` and ``summary.md`` in ``out``."""
    json_path, md_path = out / "summary.json", out / "summary.md"
    json_path.write_text(json.dumps(summary, indent=1))
    md_path.write_text(format_summary(summary))
    return json_path, md_path


def run_checks(steps: list[Step], out: Path, *, budget_s: float, environment: dict[str, Any], stream: TextIO = sys.stdout) -> dict[str, Any]:
    """Run ``steps`` in order within ``budget_s`` seconds, writing the summary after each.

    Args:
        steps: from ``build_steps``.
        out: the output folder (summary, logs, each step's outputs).
        budget_s: the whole check's limit; no step starts with under ``MIN_STEP_S`` left.
        environment: from ``environment()``, recorded with the figures.
        stream: where progress lines go.

    Returns:
        The summary (also in ``out/summary.json``).
    """
    out.mkdir(parents=True, exist_ok=True)
    logs = out / "logs"
    for step in steps:
        for path in step.outputs:
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        (logs / f"{step.name}.log").unlink(missing_ok=True)
    logs.mkdir(exist_ok=True)
    start = time.monotonic()
    deadline = start + budget_s
    summary: dict[str, Any] = {
        "passed": False, "complete": False, "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds": 0.0, "budget_s": budget_s, "output_dir": str(out), "environment": environment, "steps": [],
    }
    for i, step in enumerate(steps, 1):
        print(f"[{i}/{len(steps)}] {step.name}: {shlex.join(step.cmd)}", file=stream, flush=True)
        record = run_step(step, logs / f"{step.name}.log", deadline)
        summary["steps"].append(record)
        summary["seconds"] = round(time.monotonic() - start, 1)
        notes = f" ({'; '.join(record['notes'])})" if record["notes"] else ""
        print(f"[{i}/{len(steps)}] {step.name}: {record['status']} in {record['seconds']:.1f} s{notes}", file=stream, flush=True)
        write_summary(summary, out)
    summary["complete"] = True
    summary["passed"] = bool(steps) and all(s["status"] == "pass" for s in summary["steps"])
    json_path, md_path = write_summary(summary, out)
    print(f"GPU check {'passed' if summary['passed'] else 'FAILED'} in {summary['seconds']:.0f} s; summary: {md_path} and {json_path}",
          file=stream, flush=True)
    return summary
