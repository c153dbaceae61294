"""Segmenter inference rows: our DeepLabV3 / semantic FPN (eager and exported) beside torchvision's ``deeplabv3_resnet50``."""

from __future__ import annotations

import argparse
import logging
import statistics
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from segmentation.models import build_segmenter
from engine.files import read_torch_file
from engine.timing import measure_peak_rss, peak_memory_mb, run_in_own_process, time_calls, time_interleaved

from ..files import kind_of

from .backbones import randomise_bn

__all__ = ["SEG_SIZE", "SEG_CLASSES", "SEG_REFERENCE", "time_segmenter", "bench_segmenters"]

logger = logging.getLogger(__name__)


SEG_SIZE = 520


SEG_CLASSES = 21


SEG_REFERENCE = "torchvision deeplabv3_resnet50"


# The exported rows: one DeepLabV3 and the semantic FPN (architecture, depth, output stride).
_SEG_EXPORTED = (("deeplabv3", 18, 8), ("semantic_fpn", 18, 32))


def _seg_name(arch: str, depth: int, output_stride: int) -> str:
    return f"deeplabv3 R{depth} OS{output_stride}" if arch == "deeplabv3" else f"{arch} R{depth}"


def _seg_specs(depths: list[int]) -> dict[str, dict[str, Any]]:
    """The eager candidates: torchvision's reference, then ours (DeepLabV3 at OS 8 and 16 per depth, Semantic FPN R18)."""
    specs: dict[str, dict[str, Any]] = {SEG_REFERENCE: {"kind": "torchvision"}}
    for depth in depths:
        for stride in (8, 16):
            specs[_seg_name("deeplabv3", depth, stride)] = {"kind": "ours", "arch": "deeplabv3", "depth": depth, "output_stride": stride}
    if 18 in depths:
        specs[_seg_name("semantic_fpn", 18, 32)] = {"kind": "ours", "arch": "semantic_fpn", "depth": 18, "output_stride": 32}
    return specs


def _seg_file_name(path: str | Path) -> str:
    """A segmenter file's row name: its stem, or its run folder's name for a ``model_final.pth``."""
    path = Path(path)
    return path.parent.name if path.stem in ("model_final", "checkpoint") else path.stem


def _build_seg_model(spec: dict[str, Any]) -> nn.Module:
    torch.manual_seed(0)
    if spec["kind"] == "checkpoint":  # a trained segmenter file, with its own head widths and weights
        from segmentation.checkpoint import load_segmenter

        return load_segmenter(spec["path"]).eval()
    if spec["kind"] == "torchvision":
        from torchvision.models.segmentation import deeplabv3_resnet50

        return deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=SEG_CLASSES).eval()
    model = build_segmenter(spec["arch"], backbone=f"resnet{spec['depth']}", num_classes=SEG_CLASSES, output_stride=spec["output_stride"]).eval()
    randomise_bn(model)
    return model


def _exported_seg_candidates(depths: list[int], side: int, out_dir: Path) -> dict[str, dict[str, Any]]:
    """Export the listed segmenters (fp32 and int8) and describe each runtime/precision to time."""
    try:
        import onnxruntime  # noqa: F401

        from deploy.export import export_onnx, quantize_onnx
    except ImportError:
        logger.warning("onnx/onnxruntime not installed: no exported segmenter rows (pip install -e '.[deploy]')")
        return {}
    try:
        import openvino  # noqa: F401

        runtimes = [("onnxruntime fp32", "onnxruntime", None, False), ("onnxruntime int8", "onnxruntime", None, True),
                    ("openvino fp32", "openvino", "fp32", False), ("openvino bf16", "openvino", "bf16", False),
                    ("openvino int8", "openvino", "fp32", True)]
    except ImportError:
        logger.warning("openvino not installed: no OpenVINO segmenter rows")
        runtimes = [("onnxruntime fp32", "onnxruntime", None, False), ("onnxruntime int8", "onnxruntime", None, True)]
    specs: dict[str, dict[str, Any]] = {}
    for arch, depth, stride in _SEG_EXPORTED:
        if depth not in depths:
            continue
        model = _build_seg_model({"kind": "ours", "arch": arch, "depth": depth, "output_stride": stride})
        fp32 = out_dir / f"seg_{arch}_r{depth}_os{stride}_{side}.onnx"
        int8 = out_dir / f"seg_{arch}_r{depth}_os{stride}_{side}_int8.onnx"
        export_onnx(model, fp32, export_size=(side, side))
        # Speed rows only: int8 kernels cost the same whatever the scales, so two random images calibrate.
        g = torch.Generator().manual_seed(0)
        quantize_onnx(fp32, int8, [torch.rand(3, side, side, generator=g) for _ in range(2)])
        for label, runtime, precision, quantized in runtimes:
            specs[f"{_seg_name(arch, depth, stride)} {label}"] = {
                "kind": "exported", "path": str(int8 if quantized else fp32), "runtime": runtime, "precision": precision}
    return specs


def time_segmenter(spec: dict[str, Any], queue: Any) -> None:
    """Timing process of a segmenter candidate: build, warm up, time ``reps`` forwards, report median seconds and peak RSS growth."""
    try:
        torch.set_num_threads(spec["threads"])
        if spec["kind"] == "exported":
            from deploy.runtime import load_exported

            model: Any = load_exported(spec["path"], runtime=spec["runtime"], precision=spec.get("precision"), num_threads=spec["threads"],
                                       task="segmentation")
        else:
            model = _build_seg_model(spec)
        # Any normalised batch does: the cost of a segmenter does not depend on the pixels.
        x = torch.randn(1, 3, *spec["size"], generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            out, peak = measure_peak_rss(lambda: model(x)["out"])
            times = time_calls({"model": lambda: model(x)}, spec["reps"], spec["warmup"], torch.device("cpu"))["model"]
        queue.put({"seconds": statistics.median(times), "peak_mb": peak, "output": list(out.shape)})
    except Exception as e:  # noqa: BLE001 - reported as the row's error by the parent
        queue.put({"error": f"{type(e).__name__}: {e}"})


def bench_segmenters(args: argparse.Namespace, device: torch.device, rows: list[dict]) -> None:
    """Segmenter inference rows: ours beside torchvision's ``deeplabv3_resnet50``, one image at 520x520 (``--quick``: ``--size``)."""
    side = SEG_SIZE if not args.quick else args.size
    case = f"1x{side}x{side}, {SEG_CLASSES} classes"
    if device.type == "cuda":
        return _bench_segmenters_cuda(args, device, rows, side, case)
    candidates = _seg_specs(args.depths)
    for path in getattr(args, "checkpoints", []):
        if kind_of(read_torch_file(path)) == "segmenter":  # detector files go to the detector rows
            candidates[_seg_file_name(path)] = {"kind": "checkpoint", "path": str(path)}
    if not args.no_export:
        export_dir = Path(args.output_dir) / "exported"
        export_dir.mkdir(parents=True, exist_ok=True)
        candidates.update(_exported_seg_candidates(args.depths, side, export_dir))
    results = {}
    for name, spec in candidates.items():
        full = {**spec, "name": name, "size": [side, side], "threads": torch.get_num_threads(), "reps": args.reps, "warmup": args.warmup}
        results[name] = run_in_own_process(time_segmenter, full, in_process=args.in_process)
        logger.info("segmenter %s: %s", name, results[name])
    if "error" in results[SEG_REFERENCE]:
        raise RuntimeError(f"the reference {SEG_REFERENCE} failed: {results[SEG_REFERENCE]['error']}")
    ref = results[SEG_REFERENCE]["seconds"]
    for name, r in results.items():
        if "error" in r:
            logger.error("segmenter %s failed: %s", name, r["error"])
            continue
        rows.append({"group": "segmenter inference", "case": case, "candidate": name, "images_per_s": 1 / r["seconds"],
                     "seconds": r["seconds"], "ratio": ref / r["seconds"], "peak_mb": r["peak_mb"] if not args.no_memory else None,
                     "output": r["output"]})


def _bench_segmenters_cuda(args: argparse.Namespace, device: torch.device, rows: list[dict], side: int, case: str) -> None:
    x = torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(0)).to(device)
    models = {name: _build_seg_model(spec).to(device) for name, spec in _seg_specs(args.depths).items()}

    def call(model: nn.Module, half: bool) -> Callable[[], Any]:
        def run() -> Any:
            with torch.autocast("cuda", dtype=torch.float16, enabled=half):
                return model(x)["out"]
        return run

    fns = {}
    for name, model in models.items():
        fns[name] = call(model, False)
        fns[f"{name} fp16"] = call(model, True)
    with torch.no_grad():
        t = time_interleaved(fns, args.reps, args.warmup, device)
        mem = {k: (peak_memory_mb(fn, device) if not args.no_memory else None) for k, fn in fns.items()}
    for name, sec in t.items():
        rows.append({"group": "segmenter inference", "case": case, "candidate": name, "images_per_s": 1 / sec, "seconds": sec,
                     "ratio": t[SEG_REFERENCE] / sec, "peak_mb": mem[name]})
