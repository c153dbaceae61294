"""Detector inference rows: every candidate (torchvision eager, ours, the fast path, exported files) in a process of its own,
doing fixed work or the heavy post-processing load (``detection.postprocess``)."""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN, fasterrcnn_resnet50_fpn

from detection.models import build_detector
from detection.postprocess import fix_detector_work, set_fixed_thresholds, set_heavy_load, set_test_options
from engine.files import read_torch_file
from engine.timing import measure_peak_rss, peak_memory_mb, run_in_own_process, time_calls, time_interleaved

from ..fast import optimize_for_inference

from .backbones import randomise_bn, torchvision_backbone

__all__ = ["detector_pairs", "LOADS", "checkpoint_candidate", "detector_sizes", "bench_detectors", "time_candidate"]

logger = logging.getLogger(__name__)


LOADS = ("light", "heavy")


def detector_pairs(
    arch: str, depth: int, size: tuple[int, int], *, fixed_work: bool = True, load: str = "light", proposals: int | None = None,
) -> dict[str, nn.Module]:
    min_size, max_size = size
    torch.manual_seed(0)
    ours = build_detector(arch, backbone=f"resnet{depth}", num_classes=91, min_size=min_size, max_size=max_size).eval()
    randomise_bn(ours)
    if fixed_work and load == "heavy":
        set_heavy_load(ours)
    elif fixed_work:
        fix_detector_work(ours)
    cls = FasterRCNN if arch == "faster_rcnn" else MaskRCNN
    tv = cls(torchvision_backbone(depth), 91, min_size=min_size, max_size=max_size).eval()
    tv.load_state_dict(ours.state_dict())
    if fixed_work and load == "heavy":
        set_heavy_load(tv)
    elif fixed_work:
        set_fixed_thresholds(tv)
    if proposals is not None:
        for model in (ours, tv):
            set_test_options(model, {"rpn_post_nms_top_n_test": proposals})
    return {"torchvision": tv, "ours": ours}


def checkpoint_candidate(path: str | Path, size: tuple[int, int], *, proposals: int | None = None) -> nn.Module:
    """A detector file (e.g. pruned by ``tools/prune.py``) doing a row's fixed work at a row's size.

    Its own resize, proposal counts and thresholds (a shapes model's 128-pixel input, 150
    proposals) are replaced by the row's (``size``, torchvision's 1000 proposals or
    ``proposals``, ``fix_detector_work``), so only its widths and weights differ from the
    row's other candidates.

    Args:
        path: a Faster/Mask R-CNN detector file.
        size: the row's ``(min_size, max_size)``.
        proposals: the row's proposals per image, or ``None`` for 1000.
    """
    from detection.checkpoint import load_detector

    model = load_detector(path)
    model.transform.min_size, model.transform.max_size = (size[0],), size[1]
    model.roi_heads.detections_per_img = 100
    set_test_options(model, {"rpn_pre_nms_top_n_test": 1000, "rpn_post_nms_top_n_test": proposals or 1000})
    return fix_detector_work(model)


def _build_candidate(spec: dict[str, Any]) -> Callable[[list[torch.Tensor]], Any]:
    """Build one candidate of a detector row from its description (in the timing process)."""
    arch, depth, size = spec["arch"], spec["depth"], tuple(spec["size"])
    kind = spec["kind"]
    if kind == "checkpoint":
        return checkpoint_candidate(spec["path"], size, proposals=spec.get("proposals"))
    if kind == "exported":
        from deploy.runtime import load_exported

        return load_exported(spec["path"], runtime=spec["runtime"], precision=spec.get("precision"), num_threads=spec["threads"])
    proposals = spec.get("proposals")
    if kind == "r50":
        torch.manual_seed(0)
        r50 = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91, min_size=size[0], max_size=size[1]).eval()
        return set_test_options(fix_detector_work(r50), {"rpn_post_nms_top_n_test": proposals} if proposals else {})
    models = detector_pairs(arch, depth, size, load=spec.get("load", "light"), proposals=proposals)
    if kind == "uncapped":  # what every candidate would cost without the cap: torchvision's post-processing on our model
        return set_test_options(models["ours"], {"box_topk_candidates": 10**9})
    if kind in models:
        return models[kind]
    dtype = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[spec["dtype"]]
    return optimize_for_inference(models["ours"], dtype=dtype, autocast_pyramid=spec.get("autocast_pyramid", "outputs"))


def _exported_candidates(
    arch: str, depth: int, size: tuple[int, int], out_dir: Path, quick: bool, *, load: str = "light", proposals: int | None = None,
    checkpoint: str | None = None, linear: bool = False,
) -> dict[str, dict[str, Any]]:
    """Export the row's "ours" model (or ``checkpoint``'s, ``checkpoint_candidate``) (fp32 and int8) and describe each runtime/precision to time.

    ``linear``: the int8 file has its fully connected layers quantised too (``quantize_onnx(linear=True)``),
    and its rows are named ``int8+fc``.
    """
    try:
        import onnxruntime  # noqa: F401

        from deploy.export import export_onnx, quantize_onnx
    except ImportError:
        logger.warning("onnx/onnxruntime not installed: no exported rows (pip install -e '.[deploy]')")
        return {}
    if checkpoint is not None:
        model = checkpoint_candidate(checkpoint, size, proposals=proposals)
        stem = f"{Path(checkpoint).stem}_{size[0]}" + (f"_p{proposals}" if proposals else "")
    else:
        model = detector_pairs(arch, depth, size, load=load, proposals=proposals)["ours"]
        stem = f"{arch}_r{depth}_{size[0]}" + (f"_{load}" if load != "light" else "") + (f"_p{proposals}" if proposals else "")
    fp32 = out_dir / f"{stem}.onnx"
    int8_name = "int8+fc" if linear else "int8"
    int8 = out_dir / f"{stem}_{int8_name.replace('+', '')}.onnx"
    export_onnx(model, fp32)
    # Speed rows only: int8 kernels cost the same whatever the scales, so two random images calibrate.
    g = torch.Generator().manual_seed(0)
    side = min(size[0], 320)
    start = time.perf_counter()
    quantize_onnx(fp32, int8, [torch.rand(3, side, side * 3 // 2, generator=g) for _ in range(2)], linear=linear)
    calibration = time.perf_counter() - start  # the quantizer runs the fp32 file on each image: post-processing included
    logger.info("%s: int8 quantisation (2 calibration images) took %.1f s", int8.name, calibration)
    specs = {"onnxruntime fp32": {"path": str(fp32), "runtime": "onnxruntime"},
             f"onnxruntime {int8_name}": {"path": str(int8), "runtime": "onnxruntime", "quantize_s": calibration}}
    try:
        import openvino  # noqa: F401

        specs.update({
            "openvino fp32": {"path": str(fp32), "runtime": "openvino", "precision": "fp32"},
            "openvino bf16": {"path": str(fp32), "runtime": "openvino", "precision": "bf16"},
            f"openvino {int8_name}": {"path": str(int8), "runtime": "openvino", "precision": "fp32", "quantize_s": calibration},
        })
    except ImportError:
        logger.warning("openvino not installed: no OpenVINO rows")
    return {name: {"kind": "exported", **spec} for name, spec in specs.items()}


def detector_sizes(args: argparse.Namespace) -> tuple[tuple[int, int], tuple[int, int]]:
    """The detector rows' ``(min_size, max_size)`` and image ``(height, width)``.

    800x1216 by default (both sides divisible by 32, as the issue's timings), ``--quick``:
    ``size x 1.52 size``; ``--image H W`` (``args.image``) any image, which the models'
    resize then leaves as it is (short side = ``min_size``, long side within ``max_size``).
    """
    image = getattr(args, "image", None)
    if image:
        height, width = image
        return (min(height, width), max(1333, height, width)), (height, width)
    size = (800, 1333) if not args.quick else (args.size, args.size * 3 // 2)
    return size, (size[0], int(size[0] * 1.52))


def _file_row(path: str | Path) -> tuple[str, int]:
    """The detector row a file belongs to: its architecture and trunk depth."""
    built = read_torch_file(path)["build_args"]
    return built["arch"], int(str(built["backbone"]).removeprefix("resnet"))


def bench_detectors(args: argparse.Namespace, device: torch.device, rows: list[dict], *, load: str = "light") -> None:
    """Detector inference rows: every candidate doing the fixed work (``load="light"``) or at the heavy load (``set_heavy_load``)."""
    if load not in LOADS:
        raise ValueError(f"load must be one of {list(LOADS)}, got {load!r}")
    proposals = getattr(args, "proposals", None)
    if device.type == "cuda":
        if load == "heavy":
            logger.warning("the heavy-load detector rows are CPU rows (one process per candidate): skipped on CUDA")
            return None
        return _bench_detectors_cuda(args, device, rows)
    size, image = detector_sizes(args)
    low = "bfloat16"
    export_dir = Path(args.output_dir) / "exported"
    export_dir.mkdir(parents=True, exist_ok=True)
    # The heavy rows show post-processing, which the trunk's depth does not change: the first depth only.
    cases = [(arch, d) for arch in args.archs for d in (args.depths if load == "light" else args.depths[:1])]
    only_files = getattr(args, "checkpoints_only", False)
    file_rows = {path: _file_row(path) for path in getattr(args, "checkpoints", [])}  # each file read once
    for arch, depth in cases:
        candidates: dict[str, dict[str, Any]] = {"torchvision": {"kind": "torchvision"}}
        if only_files and (arch, depth) not in file_rows.values():
            continue
        if load == "heavy" and not only_files:
            candidates["ours, no candidate cap"] = {"kind": "uncapped"}
        if not only_files:
            candidates.update({
                "ours": {"kind": "ours"},
                "ours fast fp32": {"kind": "fast", "dtype": "float32"},
                f"ours fast {low}": {"kind": "fast", "dtype": low},
            })
        if load == "light" and not only_files:
            candidates.update({
                f"ours fast {low} + pyramid": {"kind": "fast", "dtype": low, "autocast_pyramid": True},
                f"ours fast {low}, fp32 pyramid": {"kind": "fast", "dtype": low, "autocast_pyramid": False},
            })
        if load == "light" and arch == "faster_rcnn" and depth == args.depths[0] and not only_files:
            candidates["torchvision R50 (fasterrcnn_resnet50_fpn)"] = {"kind": "r50"}
        if not args.no_export and not only_files and (arch, depth) in (("faster_rcnn", 18), ("faster_rcnn", 34), ("mask_rcnn", 18)):
            candidates.update(_exported_candidates(arch, depth, size, export_dir, args.quick, load=load, proposals=proposals))
        for path in getattr(args, "checkpoints", []) if load == "light" else []:
            # Detector files (pruned ones, tools/prune.py) of this row's architecture and depth, doing its fixed work.
            if file_rows[path] != (arch, depth):
                continue
            stem = Path(path).stem
            candidates[f"{stem}"] = {"kind": "checkpoint", "path": str(path)}
            if not args.no_export:
                exported = _exported_candidates(arch, depth, size, export_dir, args.quick, proposals=proposals, checkpoint=str(path),
                                                linear=getattr(args, "int8_linear", False))
                candidates.update({f"{stem} {name}": spec for name, spec in exported.items()})
        results = {}
        for name, spec in candidates.items():
            full = {**spec, "arch": arch, "depth": depth, "size": list(size), "image": list(image), "threads": torch.get_num_threads(),
                    "reps": args.reps, "warmup": args.warmup, "load": load, "proposals": proposals}
            results[name] = run_in_own_process(time_candidate, full, in_process=args.in_process)
            logger.info("%s R%d %s: %s", arch, depth, name, results[name])
        ref = results["torchvision"]["seconds"]
        group = "detector inference" if load == "light" else "detector, heavy load"
        case = f"{arch} R{depth} {image[0]}x{image[1]}" + (f", {proposals} proposals" if proposals else "")
        for name, r in results.items():
            if "error" in r:
                logger.error("%s R%d %s failed: %s", arch, depth, name, r["error"])
                continue
            row = {"group": group, "case": case, "candidate": name,
                   "images_per_s": 1 / r["seconds"], "seconds": r["seconds"], "ratio": ref / r["seconds"],
                   "peak_mb": r["peak_mb"] if not args.no_memory else None, "detections": r["detections"]}
            if "quantize_s" in candidates[name]:
                row["quantize_s"] = candidates[name]["quantize_s"]
            rows.append(row)


def _bench_detectors_cuda(args: argparse.Namespace, device: torch.device, rows: list[dict]) -> None:
    size, (height, width) = detector_sizes(args)
    image = [torch.rand(3, height, width, device=device)]
    for arch in args.archs:
        for depth in args.depths:
            models = detector_pairs(arch, depth, size, proposals=getattr(args, "proposals", None))
            models["ours fast fp32"] = optimize_for_inference(models["ours"])
            models["ours fast float16"] = optimize_for_inference(models["ours"], dtype=torch.float16)
            models = {k: m.to(device) for k, m in models.items()}
            fns = {k: (lambda m=m: m(image)) for k, m in models.items()}
            with torch.no_grad():
                t = time_interleaved(fns, args.reps, args.warmup, device)
                mem = {k: (peak_memory_mb(fn, device) if not args.no_memory else None) for k, fn in fns.items()}
            for name, sec in t.items():
                rows.append({"group": "detector inference", "case": f"{arch} R{depth} {size[0]}x{int(size[0] * 1.52)}", "candidate": name,
                             "images_per_s": 1 / sec, "seconds": sec, "ratio": t["torchvision"] / sec, "peak_mb": mem[name]})


def time_candidate(spec: dict[str, Any], queue: Any) -> None:
    """Timing process: build, warm up, time ``reps`` forwards, report median seconds and peak RSS growth."""
    try:
        torch.set_num_threads(spec["threads"])
        model = _build_candidate(spec)
        image = [torch.rand(3, spec["image"][0], spec["image"][1], generator=torch.Generator().manual_seed(0))]
        with torch.no_grad():
            out, peak = measure_peak_rss(lambda: model(image))
            times = time_calls({"model": lambda: model(image)}, spec["reps"], spec["warmup"], torch.device("cpu"))["model"]
        queue.put({"seconds": statistics.median(times), "peak_mb": peak, "detections": int(len(out[0]["boxes"]))})
    except Exception as e:  # noqa: BLE001 - reported as the row's error by the parent
        queue.put({"error": f"{type(e).__name__}: {e}"})
