"""Top-1 / top-5 accuracy of a ResNet-18/34 classifier on an ImageFolder split.

    python tools/eval_cls.py --weights imagenet --backbone resnet18 --data-path /data/imagenet
    python tools/eval_cls.py --weights outputs/shapes_cls_r18/model_final.pth            # shapes crops
    torchrun --nproc_per_node=8 tools/eval_cls.py --weights imagenet --backbone resnet34 --data-path /data/imagenet

torchvision's evaluation transform: resize the shorter side to 256, centre-crop 224,
ImageNet mean/std. Weights without class names (torchvision's files, plain state dicts)
are read in the sorted order of the class folders, as torchvision's ImageFolder numbers them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from engine.cli import USER_ERRORS, add_eval_flags, fail, run_tool
from backbones.resnet import BACKBONES


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", required=True, help="imagenet (torchvision's file for --backbone) or a checkpoint path")
    p.add_argument("--backbone", choices=list(BACKBONES), help="needed for --weights imagenet; for a file, checked against it")
    add_eval_flags(p, data="ImageFolder root; omitted: the split the checkpoint was trained with (shapes crops)",
                   split="folder under --data-path to score (default: the checkpoint's val_split, else val)", batch_size=64,
                   workers=min(4, os.cpu_count() or 1))
    p.add_argument("--resize-size", type=int, help="shorter side before the centre crop (default 256, or the checkpoint's)")
    p.add_argument("--crop-size", type=int, help="centre crop (default 224, or the checkpoint's)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_tool(lambda _: _evaluate(args), logging=False)


def _evaluate(args: argparse.Namespace) -> int:
    import torch

    from backbones.weights import IMAGENET_WEIGHTS
    from engine import distributed as dist_utils
    from engine.logs import setup_logging
    from classification import evaluate_classifier, load_classifier_weights
    from engine.config import ConfigError, resolve_device
    from classification.data import ImageFolder, ImageFolderError, build_cls_transform, prepare_cls_data_root

    try:
        for name in ("batch_size", "resize_size", "crop_size"):
            value = getattr(args, name)
            if value is not None and value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
        if args.workers < 0:
            raise ConfigError(f"--workers must be 0 (load in this process) or more, got {args.workers}")
        device = resolve_device(args.device)
        model, classes, described = load_classifier_weights(args.weights, backbone=args.backbone)
        trained = getattr(model, "train_config", None) or {}  # the training config, for train_cls.py files
        if args.data_path is not None:
            root = Path(args.data_path)
            if not root.is_dir():
                raise ImageFolderError(f"data path {root} does not exist (expected ROOT/<split>/<class>/<image>)")
        elif trained:
            root = prepare_cls_data_root(trained)
        else:
            raise ConfigError("--data-path is needed: these weights do not say what data they were trained on")
        split = args.split or trained.get("val_split") or "val"
        resize = args.resize_size or trained.get("val_resize_size") or 256
        crop = args.crop_size or trained.get("val_crop_size") or 224
        if crop > resize:
            raise ConfigError(f"--crop-size ({crop}) must not exceed --resize-size ({resize})")
        transform = build_cls_transform(False, crop_size=crop, resize_size=resize)
        dataset = ImageFolder(root, split, transform=transform, classes=classes)
        outputs = model.fc.out_features
        if classes is None and len(dataset.classes) != outputs:
            raise ImageFolderError(
                f"{described} has {outputs} outputs and no class names, so labels follow the sorted class folders, "
                f"which needs exactly {outputs} of them; {dataset.split_dir} has {len(dataset.classes)}"
            )
    except USER_ERRORS as e:
        return fail(e)

    setup_logging()  # after the checks: a mistake above is one line, not the load report and then the error
    dist_utils.init_distributed(device)
    amp_dtype = (torch.float16 if device == "cuda" else torch.bfloat16) if args.amp else None
    run_device = torch.device("cuda", dist_utils.local_rank()) if device == "cuda" else torch.device("cpu")
    result = evaluate_classifier(model.to(run_device), dataset, device=run_device, batch_size=args.batch_size,
                                 workers=args.workers, amp_dtype=amp_dtype, progress=not args.no_progress)
    if dist_utils.is_main_process():
        print(f"{described} on {result['images']} images of {dataset.split_dir} (resize {resize}, centre crop {crop}):")
        print(f"top-1 {result['top1']:.3f}  top-5 {result['top5']:.3f}  loss {result['loss']:.4f}")
        if args.weights == "imagenet":
            spec = IMAGENET_WEIGHTS[BACKBONES[args.backbone]]
            print(f"(torchvision publishes {spec.acc_top1} / {spec.acc_top5} for {spec.file_name} on ImageNet val)")
        if args.output_dir:
            out = Path(args.output_dir)
            out.mkdir(parents=True, exist_ok=True)
            (out / "metrics.json").write_text(json.dumps({"top1": result["top1"], "top5": result["top5"], "loss": result["loss"],
                                                          "images": result["images"], "weights": args.weights}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
