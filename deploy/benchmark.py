"""The benchmark behind ``tools/benchmark.py``: our models beside torchvision's own, measured in one run.

Method. Trunk + pyramid, training and COCO-evaluation rows: every candidate is warmed
up, then timed ``--reps`` times with the candidates of a row interleaved (so drift of
the machine hits all of them alike); the median is reported, with the ratio to the
reference of its row. Detector inference rows on the CPU: each candidate runs in a
process of its own (so one candidate's memory and thread pools do not slow another),
with the same number of threads, and reports the median of ``--reps`` forwards after
``--warmup``; every detector does the same work (``fix_detector_work``: 1000
proposals, 100 detections and masks, whatever the weights), so rows of different
depths compare. The exported rows run the file ``deploy.export`` writes for the
row's own model (fp32, and int8 by ONNX Runtime's static quantizer) through
``deploy.runtime.load_exported``, each labelled with the precision that ran.
The heavy-load rows (``--only heavy``, ``set_heavy_load``) time the same candidates where
post-processing is the work: random weights, score threshold 0 and NMS at 1.0 in the RPN and
the box head, so every one of 1000 proposals x 90 classes (90,000 candidates) passes the
threshold and nothing is suppressed; ours caps the candidates entering NMS
(``box_topk_candidates``, ``detection.postprocess``) and the row shows ours without the cap
too. ``--proposals N`` times every detector row at N proposals per image instead of 1000.
Segmenter inference rows (``bench_segmenters``) on the CPU likewise: each candidate in a
process of its own with the same threads, one 520x520 image, 21 classes (VOC), random
weights: our DeepLabV3 R18/R34 at output stride 8 and 16 and Semantic FPN R18 against
torchvision's ``deeplabv3_resnet50(weights=None, weights_backbone=None)`` (what a user
takes today, the ratios' reference), plus the exported files (fp32, int8) of DeepLabV3
R18 OS8 and Semantic FPN R18 in ONNX Runtime and OpenVINO. A segmenter's work does not
depend on its weights (no thresholds, no NMS), so nothing needs fixing.
Peak memory: ``torch.cuda.max_memory_allocated`` on CUDA; on the CPU, detector and
segmenter rows report the timing process's peak RSS during its first forward over its
RSS before it (activations and workspace on top of the weights; Linux ``clear_refs``;
``engine.timing.measure_peak_rss``), measured inside that process, never in a forked
child. CUDA timings are synchronised. Writes ``benchmark.json`` and ``benchmark.png``
to ``--output-dir``.
"""

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
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

from backbones import resnet_fpn
from detection.evaluation import coco_evaluate
from detection.models import build_detector
from detection.postprocess import fix_detector_work, set_fixed_thresholds, set_heavy_load, set_test_options
from segmentation.models import build_segmenter
from engine.files import read_torch_file
from engine.timing import measure_peak_rss, peak_memory_mb, run_in_own_process, time_calls, time_interleaved

from .fast import optimize_for_inference
from .files import kind_of

__all__ = [
    "bench_backbones",
    "bench_coco_eval",
    "bench_detectors",
    "bench_roi_align",
    "bench_segmenters",
    "bench_training",
    "checkpoint_candidate",
    "format_table",
    "plot",
    "roi_align_cases",
    "time_candidate",
    "time_segmenter",
]

logger = logging.getLogger(__name__)


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
        fast_low_trunk = optimize_for_inference(detector_like, dtype=low, autocast_pyramid=False).backbone
        for n, h, w in shapes:
            x = torch.rand(n, 3, h, w, device=device)
            fns = {
                "torchvision": lambda m=tv: m(x),
                "ours": lambda m=ours: m(x),
                "ours fast fp32": lambda m=fast_fp32: m(x),
                f"ours fast {str(low).split('.')[-1]}": lambda m=fast_low: m(x),
                f"ours fast {str(low).split('.')[-1]} + pyramid": lambda m=fast_low_all: m(x),
                f"ours fast {str(low).split('.')[-1]}, fp32 pyramid": lambda m=fast_low_trunk: m(x),
            }
            with torch.no_grad():
                t = time_interleaved(fns, args.reps, args.warmup, device)
            for name, sec in t.items():
                rows.append({"group": "trunk+FPN forward", "case": f"R{depth} {n}x{h}x{w}", "candidate": name,
                             "images_per_s": n / sec, "seconds": sec, "ratio": t["torchvision"] / sec})


LOADS = ("light", "heavy")


def _detector_pairs(
    arch: str, depth: int, size: tuple[int, int], *, fixed_work: bool = True, load: str = "light", proposals: int | None = None,
) -> dict[str, nn.Module]:
    min_size, max_size = size
    torch.manual_seed(0)
    ours = build_detector(arch, backbone=f"resnet{depth}", num_classes=91, min_size=min_size, max_size=max_size).eval()
    _randomise_bn(ours)
    if fixed_work and load == "heavy":
        set_heavy_load(ours)
    elif fixed_work:
        fix_detector_work(ours)
    cls = FasterRCNN if arch == "faster_rcnn" else MaskRCNN
    tv = cls(_tv_backbone(depth), 91, min_size=min_size, max_size=max_size).eval()
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
    models = _detector_pairs(arch, depth, size, load=spec.get("load", "light"), proposals=proposals)
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
        model = _detector_pairs(arch, depth, size, load=load, proposals=proposals)["ours"]
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
            models = _detector_pairs(arch, depth, size, proposals=getattr(args, "proposals", None))
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


# ---------------------------------------------------------------------------------------------
# Segmenters: ours against torchvision's deeplabv3_resnet50 at 520x520 (torchvision's evaluation size)

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
    _randomise_bn(model)
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
        models = _detector_pairs("faster_rcnn", depth, (side, side), fixed_work=False)
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


# ---------------------------------------------------------------------------------------------
# RoIAlign: torchvision's CPU kernel against detection.ops at detector shapes (tools/bench_roi_align.py)


def random_boxes(num: int, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
    """Boxes with log-uniform sides from 8 px to the image size, clipped to the image."""
    size = torch.tensor([width, height], dtype=torch.float32)
    log_min = torch.log(torch.tensor(8.0))
    side = torch.exp(log_min + torch.rand(num, 2, generator=generator) * (torch.log(size) - log_min))
    centre = torch.rand(num, 2, generator=generator) * size
    low = torch.minimum(torch.maximum(centre - side / 2, torch.zeros(2)), size - 1)
    high = torch.minimum(torch.maximum(centre + side / 2, low + 1), size)
    return torch.cat([low, high], dim=1)


def roi_align_cases(channels: int = 256, seed: int = 0) -> list[tuple[str, Callable[..., torch.Tensor], Callable[..., torch.Tensor], tuple, list[torch.Tensor]]]:
    """``(name, torchvision's call, ours, extra args, feature maps)`` at Faster R-CNN R18-FPN shapes.

    Training: 4 images of 256 px, 512 RoIs each; inference at 800x1216: 1000 RoIs; one
    level at each stride, and the 4-level pooler.

    Args:
        channels: feature channels.
        seed: for the features and boxes.
    """
    import torchvision
    from collections import OrderedDict

    from detection.ops import MultiScaleRoIAlign, roi_align

    gen = torch.Generator().manual_seed(seed)
    cases: list[tuple[str, Callable[..., torch.Tensor], Callable[..., torch.Tensor], tuple, list[torch.Tensor]]] = []

    def single(name: str, images: int, height: int, width: int, rois_per_image: int, stride: int) -> None:
        feats = torch.randn(images, channels, height // stride, width // stride, generator=gen)
        boxes = [random_boxes(rois_per_image, height, width, gen) for _ in range(images)]
        cases.append((name, torchvision.ops.roi_align, roi_align, (boxes, 7, 1.0 / stride, 2, False), [feats]))

    def pyramid(name: str, images: int, height: int, width: int, rois_per_image: int) -> None:
        feats = OrderedDict((str(i), torch.randn(images, channels, height // s, width // s, generator=gen)) for i, s in enumerate((4, 8, 16, 32)))
        boxes = [random_boxes(rois_per_image, height, width, gen) for _ in range(images)]
        ref, ours = torchvision.ops.MultiScaleRoIAlign(list(feats), 7, 2), MultiScaleRoIAlign(list(feats), 7, 2)
        shapes = [(height, width)] * images
        cases.append((name, lambda *levels: ref(OrderedDict(zip(feats, levels)), boxes, shapes),
                      lambda *levels: ours(OrderedDict(zip(feats, levels)), boxes, shapes), (), list(feats.values())))

    single("train  4x256x64x64, 2048 RoIs (stride 4)", 4, 256, 256, 512, 4)
    single("infer  1x256x200x304, 1000 RoIs (stride 4)", 1, 800, 1216, 1000, 4)
    single("infer  1x256x100x152, 1000 RoIs (stride 8)", 1, 800, 1216, 1000, 8)
    single("infer  1x256x50x76, 1000 RoIs (stride 16)", 1, 800, 1216, 1000, 16)
    single("infer  1x256x25x38, 1000 RoIs (stride 32)", 1, 800, 1216, 1000, 32)
    pyramid("train  pooler, 4 levels, 4 img 256 px, 2048 RoIs", 4, 256, 256, 512)
    pyramid("infer  pooler, 4 levels, 1 img 800x1216, 1000 RoIs", 1, 800, 1216, 1000)
    return cases


def bench_roi_align(*, channels: int = 256, reps: int = 5, only: str = "") -> list[dict[str, Any]]:
    """Forward and forward + backward of torchvision's RoIAlign and ours, interleaved; medians in ms and the largest differences.

    Args:
        channels: feature channels.
        reps: timed runs per measurement.
        only: run only cases whose name contains this.
    """
    rows = []
    cpu = torch.device("cpu")
    for name, ref_fn, our_fn, call, inputs in roi_align_cases(channels):
        if only not in name:
            continue
        leaves = [t.clone().requires_grad_() for t in inputs]
        upstream = torch.randn_like(ref_fn(*inputs, *call), memory_format=torch.contiguous_format)

        def forward_backward(fn: Callable[..., torch.Tensor]) -> Callable[[], Any]:
            return lambda: torch.autograd.grad(fn(*leaves, *call), leaves, upstream)

        with torch.no_grad():
            fwd = time_interleaved({"ref": lambda: ref_fn(*inputs, *call), "ours": lambda: our_fn(*inputs, *call)}, reps, 1, cpu)
        fb = time_interleaved({"ref": forward_backward(ref_fn), "ours": forward_backward(our_fn)}, reps, 1, cpu)
        out_ref, out_our = ref_fn(*leaves, *call), our_fn(*leaves, *call)
        grad_ref = torch.autograd.grad(out_ref, leaves, upstream)
        grad_our = torch.autograd.grad(out_our, leaves, upstream)
        rows.append({
            "case": name, "ref_fwd_ms": fwd["ref"] * 1e3, "ours_fwd_ms": fwd["ours"] * 1e3,
            "ref_fwd_bwd_ms": fb["ref"] * 1e3, "ours_fwd_bwd_ms": fb["ours"] * 1e3,
            "max_diff_fwd": (out_ref - out_our).abs().max().item(),
            "max_diff_bwd": max((a - b).abs().max().item() for a, b in zip(grad_ref, grad_our)),
        })
    return rows
