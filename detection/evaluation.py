"""COCO evaluation with pycocotools' ``COCOeval`` (bbox and segm), on one or many processes.

Detections are written with the data set's original category ids; the ground truth is
the ``COCO`` object the data set already parsed, never rebuilt from transformed targets.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pycocotools.mask as mask_util
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from engine import distributed as dist_utils

__all__ = [
    "METRIC_NAMES",
    "EVALUATORS",
    "to_coco_results",
    "run_inference",
    "coco_evaluate",
    "evaluate",
]

logger = logging.getLogger(__name__)

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")
EVALUATORS = ("pycocotools", "faster")


def to_coco_results(
    output: Mapping[str, torch.Tensor], image_id: int, label_to_cat_id: Mapping[int, int], *, mask_threshold: float = 0.5
) -> tuple[list[dict], list[dict]]:
    """Convert one image's detections to COCO result dicts.

    Args:
        output: a torchvision detection dict (``boxes`` xyxy, ``scores``, ``labels``,
            optionally ``masks`` N x 1 x H x W probabilities).
        image_id: the COCO image id.
        label_to_cat_id: contiguous label -> original category id.
        mask_threshold: probability above which a pixel belongs to the mask.

    Returns:
        ``(bbox_results, segm_results)``; the second is empty without masks.
    """
    boxes = output["boxes"].detach().float().cpu()
    scores = output["scores"].detach().float().cpu().tolist()
    labels = output["labels"].detach().cpu().tolist()
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist() if len(boxes) else []
    unknown = sorted({label for label in labels if label not in label_to_cat_id})
    if unknown:
        raise ValueError(f"model predicted labels {unknown} that the category mapping lacks (known: {sorted(label_to_cat_id)})")
    bbox = [
        {"image_id": int(image_id), "category_id": int(label_to_cat_id[label]), "bbox": [round(v, 3) for v in box], "score": round(score, 5)}
        for box, score, label in zip(xywh, scores, labels)
    ]
    segm: list[dict] = []
    if "masks" in output:
        masks = (output["masks"].detach().cpu()[:, 0] > mask_threshold).numpy().astype(np.uint8)
        for mask, score, label in zip(masks, scores, labels):
            encoded = mask_util.encode(np.asfortranarray(mask))
            rle = {"size": [int(v) for v in encoded["size"]], "counts": encoded["counts"].decode("ascii")}
            segm.append({"image_id": int(image_id), "category_id": int(label_to_cat_id[label]), "segmentation": rle, "score": round(score, 5)})
    return bbox, segm


def _collate(batch: Sequence[Any]) -> tuple:
    return tuple(zip(*batch))


@torch.no_grad()
def run_inference(
    model: nn.Module,
    dataset: Any,
    label_to_cat_id: Mapping[int, int],
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 1,
    workers: int = 0,
    progress: bool = True,
    autocast_dtype: torch.dtype | None = None,
) -> dict[int, tuple[list[dict], list[dict]]]:
    """Predict on this process's share of ``dataset`` and return COCO results per image id.

    Under ``torchrun`` each rank takes every ``world_size``-th image; gather with
    ``evaluate`` (or ``distributed.all_gather_object``).

    Args:
        model: a detector in eval mode.
        dataset: a ``CocoDetection`` with ``transforms=None`` (original image size).
        label_to_cat_id: contiguous label -> original category id.
        device: where to run.
        batch_size: images per forward.
        workers: data-loader processes.
        progress: show a tqdm bar (rank 0 only).
        autocast_dtype: run under autocast with this dtype (e.g. ``torch.bfloat16``).
    """
    device = torch.device(device)
    rank, world = dist_utils.rank(), dist_utils.world_size()
    shard = Subset(dataset, list(range(rank, len(dataset), world)))
    loader = DataLoader(
        shard, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=_collate,
        pin_memory=device.type == "cuda",
    )
    model.eval()
    per_image: dict[int, tuple[list[dict], list[dict]]] = {}
    bar = tqdm(loader, desc="eval", disable=not progress or rank != 0, dynamic_ncols=True)
    for images, targets in bar:
        images = [img.to(device, non_blocking=True) for img in images]
        ctx = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else contextlib.nullcontext()
        with ctx:
            outputs = model(images)
        for out, target in zip(outputs, targets):
            image_id = int(target["image_id"])
            # An unreadable image is replaced by another one by the data set; score each image once.
            if image_id not in per_image:
                per_image[image_id] = to_coco_results(out, image_id, label_to_cat_id)
    return per_image


def _per_category_ap(coco_eval: Any, names: Mapping[int, str]) -> dict[str, float]:
    # precision: [iou thresholds, recall points, categories, area ranges, max dets]
    precision = coco_eval.eval["precision"]
    table = {}
    for k, cat_id in enumerate(coco_eval.params.catIds):
        p = precision[:, :, k, 0, -1]
        p = p[p > -1]
        table[names.get(cat_id, str(cat_id))] = float(p.mean() * 100) if p.size else float("nan")
    return table


def coco_evaluate(
    coco_gt: Any, results: list[dict], iou_type: str, *, evaluator: str = "pycocotools"
) -> dict[str, Any]:
    """Score COCO results against ground truth with ``COCOeval``.

    Args:
        coco_gt: the ground truth ``pycocotools.coco.COCO``.
        results: COCO result dicts (original category ids).
        iou_type: ``"bbox"`` or ``"segm"``.
        evaluator: ``"pycocotools"`` or ``"faster"`` (the ``faster-coco-eval`` package,
            same numbers, faster).

    Returns:
        ``{"metrics": {f"{iou_type}/AP": ...} in percent (``None`` where the ground truth
        has no object of that size), "summary": the 12-line text,
        "per_category": {name: AP}, "stats": the 12 raw stats}``.
    """
    if evaluator not in EVALUATORS:
        raise ValueError(f"evaluator must be one of {list(EVALUATORS)}, got {evaluator!r}")
    names = {c["id"]: c["name"] for c in coco_gt.loadCats(coco_gt.getCatIds())}
    if evaluator == "faster":
        try:
            from faster_coco_eval import COCO as FasterCOCO  # type: ignore[import-not-found]
            from faster_coco_eval import COCOeval_faster  # type: ignore[import-not-found]
        except ImportError:
            raise ImportError("evaluator='faster' needs the faster-coco-eval package: pip install faster-coco-eval") from None
        # It keeps its own COCO class; build it from the already parsed ground truth.
        coco_gt = FasterCOCO(coco_gt.dataset, use_deepcopy=True)

        def make_eval(gt: Any, dt: Any, kind: str) -> Any:
            return COCOeval_faster(gt, dt, kind, print_function=print)
    else:
        from pycocotools.cocoeval import COCOeval as make_eval
    if not results:
        stats = [0.0] * 12
        return {
            "metrics": {f"{iou_type}/{n}": 0.0 for n in METRIC_NAMES},
            "summary": f"no {iou_type} detections: every AP is 0",
            "per_category": {name: 0.0 for name in names.values()},
            "stats": stats,
        }
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        # loadRes adds id/area/bbox to the dicts it gets: hand it copies, keep ours as written.
        coco_dt = coco_gt.loadRes([dict(r) for r in results])
        coco_eval = make_eval(coco_gt, coco_dt, iou_type)
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    summary = "\n".join(line for line in buf.getvalue().splitlines() if line.lstrip().startswith("Average"))
    stats = [float(s) for s in coco_eval.stats[:12]]
    # pycocotools reports -1 where the ground truth has no object (e.g. no large ones): None, not 0.
    metrics = {f"{iou_type}/{n}": (stats[i] * 100 if stats[i] >= 0 else None) for i, n in enumerate(METRIC_NAMES)}
    return {"metrics": metrics, "summary": summary, "per_category": _per_category_ap(coco_eval, names), "stats": stats}


def format_metrics(metrics: Mapping[str, float | None]) -> str:
    """``bbox/AP 30.31  bbox/AP50 45.09 ...`` (``n/a`` where the split has no such objects)."""
    return "  ".join(f"{k} {v:.2f}" if v is not None else f"{k} n/a" for k, v in metrics.items())


def format_per_category(table: Mapping[str, float], iou_type: str) -> str:
    """A two-column text table of per-category AP, aligned as a terminal shows it.

    Names are padded by display width: wide characters (Chinese, Japanese, Korean)
    take two columns, combining marks none.
    """
    import unicodedata

    def cols(text: str) -> int:
        return sum(0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)

    width = max([cols(n) for n in table] + [8])
    lines = [f"{'category':<{width}}  {iou_type} AP", f"{'-' * width}  {'-' * 7}"]
    lines += [f"{name}{' ' * (width - cols(name))}  {ap:7.2f}" for name, ap in table.items()]
    return "\n".join(lines)


def evaluate(
    model: nn.Module,
    dataset: Any,
    *,
    label_to_cat_id: Mapping[int, int] | None = None,
    device: torch.device | str = "cpu",
    output_dir: str | os.PathLike | None = None,
    batch_size: int = 1,
    workers: int = 0,
    evaluator: str = "pycocotools",
    autocast_dtype: torch.dtype | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the model over ``dataset`` and score bbox (and segm when it predicts masks).

    Segm is skipped, with one warning saying why, when the ground truth has objects
    without a ``segmentation`` (a boxes-only validation file): bbox is still scored
    and ``metrics.json`` written.

    Works under ``torchrun``: every rank predicts its share, rank 0 gathers, scores and
    writes, and every rank returns the same result.

    Args:
        model: a detector (eval mode is set here).
        dataset: a ``CocoDetection`` without transforms; its ``coco`` is the ground truth.
        label_to_cat_id: the model's label -> category id mapping (from its
            checkpoint); default the data set's own.
        device: where to run.
        output_dir: where to write ``detections_bbox.json``, ``detections_segm.json``
            and ``metrics.json`` (rank 0); ``None`` writes nothing.
        batch_size: images per forward.
        workers: data-loader processes.
        evaluator: ``"pycocotools"`` or ``"faster"``.
        autocast_dtype: optional autocast dtype for inference.
        progress: show progress bars.

    Returns:
        ``{"metrics": {...}, "summaries": {iou_type: text}, "per_category": {iou_type: {...}},
        "skipped": {iou_type: reason}, "seconds": {"inference": s, "coco_eval": s}}``.
    """
    mapping = dict(label_to_cat_id) if label_to_cat_id is not None else dict(dataset.label_to_cat_id)
    t0 = time.perf_counter()
    mine = run_inference(
        model, dataset, mapping, device=device, batch_size=batch_size, workers=workers,
        progress=progress, autocast_dtype=autocast_dtype,
    )
    merged: dict[int, tuple[list[dict], list[dict]]] = {}
    for part in dist_utils.all_gather_object(mine):
        for image_id, results in part.items():
            merged.setdefault(image_id, results)
    bbox = [r for b, _ in merged.values() for r in b]
    segm = [r for _, s in merged.values() for r in s]
    t1 = time.perf_counter()
    result: dict[str, Any] = {}
    if dist_utils.is_main_process():
        result = {"metrics": {}, "summaries": {}, "per_category": {}}
        iou_types: Iterable[tuple[str, list]] = [("bbox", bbox)] + ([("segm", segm)] if segm or _has_masks(model) else [])
        result["skipped"] = {}
        no_masks = _missing_masks(dataset) if len(iou_types) > 1 else None
        if no_masks:
            iou_types = iou_types[:1]
            result["skipped"]["segm"] = no_masks
            logger.warning("segm AP skipped: %s", no_masks)
        for iou_type, results in iou_types:
            results.sort(key=lambda r: (r["image_id"], -r["score"]))
            scored = coco_evaluate(dataset.coco, results, iou_type, evaluator=evaluator)
            result["metrics"].update(scored["metrics"])
            result["summaries"][iou_type] = scored["summary"]
            result["per_category"][iou_type] = scored["per_category"]
            if output_dir is not None:
                Path(output_dir).mkdir(parents=True, exist_ok=True)
                (Path(output_dir) / f"detections_{iou_type}.json").write_text(json.dumps(results))
        result["seconds"] = {"inference": t1 - t0, "coco_eval": time.perf_counter() - t1}
        if output_dir is not None:
            (Path(output_dir) / "metrics.json").write_text(json.dumps(result["metrics"], indent=2))
    return dist_utils.broadcast_object(result)


def _missing_masks(dataset: Any) -> str | None:
    """Why segm AP cannot be scored on ``dataset``'s ground truth (objects without a mask), or ``None``."""
    annotations = dataset.coco.dataset.get("annotations", [])
    # pycocotools needs polygons or an RLE for every object (an empty polygon list fails in frPyObjects too).
    lacking = sum(1 for a in annotations if not a.get("segmentation"))
    if not lacking:
        return None
    where = getattr(dataset, "ann_file", "the annotation file")
    return (f"{lacking} of {len(annotations)} annotations in {where} have no 'segmentation' (polygons or RLE); "
            "segm AP needs a mask for every object, so only bbox AP is scored")


def _has_masks(model: nn.Module) -> bool:
    model = getattr(model, "module", model)
    if isinstance(getattr(model, "has_masks", None), bool):  # exported detectors (deploy.runtime) say so
        return model.has_masks
    roi_heads = getattr(model, "roi_heads", None)
    return roi_heads is not None and getattr(roi_heads, "mask_predictor", None) is not None
