"""Score a trained segmenter: global pixel accuracy, per-class IoU and mIoU, as torchvision's reference prints them.

    python tools/eval_seg.py --checkpoint outputs/seg_shapes_semantic_fpn_r18/model_final.pth   # its validation data
    python tools/eval_seg.py --checkpoint model_final.pth --data-path /data/VOCdevkit/VOC2012 --split val
    torchrun --nproc_per_node=8 tools/eval_seg.py --checkpoint model_final.pth --data-path /data/coco
    python tools/eval_seg.py --checkpoint seg.onnx --runtime openvino                 # the deployed file itself
    python tools/eval_seg.py --checkpoint seg_int8.onnx                                # int8: ONNX Runtime
    python tools/eval_seg.py --checkpoint seg.onnx --runtime openvino --precision bf16 # what is not int8 in bf16

One confusion matrix over the split (each process scores every N-th image; the matrices are
summed over processes); pixels labelled 255 are not counted. Images are resized as in training
(the checkpoint's val_resize) unless --resize says otherwise. --output-dir writes metrics.json.
An exported file (tools/export.py; fp32 or int8) runs on the CPU with ONNX Runtime, OpenVINO or
TorchScript and is scored on the data its metadata records, exactly as its checkpoint would be.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from deploy.files import add_runtime_args
from engine.cli import add_eval_flags, init_device, removed_on_failure, run_tool


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="model_final.pth or checkpoint.pth from tools/train_seg.py, or an exported .onnx / .pt (tools/export.py)")
    add_runtime_args(p)
    add_eval_flags(p, data="VOC or COCO-layout root; omitted: the data the checkpoint was trained on",
                   split="split to score (default: the checkpoint's val_split, else val / the one *val* file)",
                   batch_help="images loaded together; those of one size run as one batch (none is padded)",
                   workers=min(4, os.cpu_count() or 1))
    p.add_argument("--data-format", choices=["auto", "coco", "voc"], default="auto", help="layout of --data-path (auto: by its folders)")
    p.add_argument("--resize", type=int, help="short side in pixels, 0 for none (default: the checkpoint's val_resize)")
    return p.parse_args(argv)


def _load(args: argparse.Namespace) -> tuple:
    """The model to score and its device: whatever file ``deploy.open_model`` opens as a segmenter."""
    from deploy.opening import open_model
    from engine.config import ConfigError

    try:
        opened = open_model(args.checkpoint, task="segmentation", runtime=args.runtime, precision=args.precision, device=args.device)
        if opened.exported and args.amp:
            raise ConfigError("--amp is for PyTorch checkpoints; an exported file runs in the precision it was written in (fp32 or int8)")
    except (ValueError, ImportError) as e:  # a runtime that does not run the file, or one not installed
        raise ConfigError(str(e)) from None
    device = init_device("cpu" if opened.exported else args.device)  # under torchrun: this rank's device
    return opened.moved_to(device).model, device


def work(args: argparse.Namespace) -> int:
    import torch

    from engine import distributed as dist_utils
    from engine.config import ConfigError
    from engine.files import atomic_write_text
    from segmentation.evaluation import evaluate_segmenter
    from segmentation.training import evaluation_dataset

    for flag, value, low in (("--batch-size", args.batch_size, 1), ("--workers", args.workers, 0), ("--resize", args.resize, 0)):
        if value is not None and value < low:
            raise ConfigError(f"{flag} must be an integer >= {low}, got {value}")
    if args.output_dir is not None and Path(args.output_dir).exists() and not Path(args.output_dir).is_dir():
        raise ConfigError(f"--output-dir {args.output_dir} is a file; pass a folder for metrics.json")
    model, device = _load(args)
    runtime = getattr(model, "runtime", "torch")
    trained = model.train_config
    resize = (args.resize or None) if args.resize is not None else (trained or {}).get("val_resize")
    dataset, described = evaluation_dataset(trained, model.class_names, data_path=args.data_path, data_format=args.data_format,
                                            split=args.split, resize=resize)
    amp_dtype = (torch.float16 if device.type == "cuda" else torch.bfloat16) if args.amp else None
    cm = evaluate_segmenter(model, dataset, num_classes=len(model.class_names), device=device, batch_size=args.batch_size,
                            workers=args.workers, amp_dtype=amp_dtype, progress=not args.no_progress)
    if not dist_utils.is_main_process():
        return 0
    print(f"{model.build_args['arch']}/{model.build_args['backbone']} from {args.checkpoint} ({runtime}) on {described}: {cm.images} images"
          f"{f', short side {resize}' if resize else ''}")
    print(cm)
    print(cm.table(model.class_names))
    if args.output_dir is not None:
        summary = cm.summary(model.class_names)
        record = {"checkpoint": str(args.checkpoint), "runtime": runtime, "data": described, "images": cm.images, "resize": resize, **summary}
        with removed_on_failure(args.output_dir) as out:
            atomic_write_text(out / "metrics.json", json.dumps(record, indent=2, ensure_ascii=False))
        print(f"wrote {Path(args.output_dir) / 'metrics.json'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_tool(lambda _: work(args))


if __name__ == "__main__":
    sys.exit(main())
