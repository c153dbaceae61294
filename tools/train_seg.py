"""Train a semantic segmenter (DeepLabV3, FCN, semantic FPN) on a ResNet-18/34 trunk.

    python tools/train_seg.py                                           # shapes CPU demo (make train-seg)
    python tools/train_seg.py --config seg_deeplabv3_r18_voc --data-path /data/VOCdevkit/VOC2012
    torchrun --nproc_per_node=8 tools/train_seg.py --config seg_semantic_fpn_r18_coco --data-path /data/coco
    python tools/train_seg.py --resume                                  # iteration-exact, from OUTPUT_DIR/checkpoint.pth
    python tools/train_seg.py --list-configs

Data: the VOC layout (JPEGImages/, SegmentationClass/, ImageSets/Segmentation/) or COCO-format
instances (annotations/instances_<split>.json, <split>/), told apart by the folders; without
--data-path, the built-in shapes set. Writes config.yaml, log.txt, metrics.jsonl, checkpoint.pth,
model_final.pth, metrics.json, curves.png and vis/ (ground truth | prediction) to --output-dir.
"""

from __future__ import annotations

import argparse
import sys

from engine.cli import add_train_flags, recipe_table, run_tool, train_overrides, training_summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["deeplabv3", "fcn", "semantic_fpn"])
    p.add_argument("--backbone", choices=["resnet18", "resnet34"])
    p.add_argument("--output-stride", type=int, choices=[8, 16, 32])
    p.add_argument("--aux-loss", action="store_true", default=None, help="torchvision's auxiliary FCN head on layer3 (weight aux_weight)")
    add_train_flags(
        p, default_recipe="the shapes CPU recipe without --data-path, torchvision's reference settings with it",
        data="VOC or COCO-layout root; omitted: the built-in shapes data set",
        train_split="VOC: ImageSets/Segmentation/<split>.txt (train); COCO: instances_<split>.json",
        val_split="VOC: val; COCO: the one instances_*val*.json",
        set_help="override any config key (model_kwargs.NAME=V for one head option)",
    )
    return p.parse_args(argv)


def work(args: argparse.Namespace) -> int:
    from engine import distributed as dist_utils
    from engine.config import apply_overrides, load_config
    from engine.recipes import recipe_notice
    from segmentation.config import CPU_SEG_RECIPE, SEGMENTATION, default_seg_recipe
    from segmentation.evaluation import format_seg_metrics
    from segmentation.training import preflight_seg, train_segmenter

    if args.list_configs:
        print(recipe_table("segmentation"))
        return 0
    recipe = args.config or default_seg_recipe(args.data_path)
    cfg = load_config(recipe, schema=SEGMENTATION)
    if args.model is not None and args.model != cfg["model"] and cfg["model_kwargs"]:
        # The recipe's head options were chosen for its own architecture; --set model_kwargs.X=V still applies.
        print(f"--model {args.model}: the recipe's {cfg['model']} head options {cfg['model_kwargs']} are not used")
        cfg = {**cfg, "model_kwargs": {}}
    own = ("model", "backbone", "output_stride", "aux_loss", "weights_backbone")
    cfg = apply_overrides(cfg, args.set, schema=SEGMENTATION, **train_overrides(args, *own))
    cfg = preflight_seg(cfg, resume=args.resume)  # every user error before the output folder is made
    if dist_utils.is_main_process():
        line, warning = recipe_notice(recipe, cfg, cpu_recipe=CPU_SEG_RECIPE, defaults="torchvision's reference settings")
        print(line + (f"\nwarning: {warning}" if warning else ""))
    result = train_segmenter(cfg, resume=args.resume, progress=not args.no_progress)
    summary = training_summary(result, cfg, format_seg_metrics(result["metrics"]))
    if summary:
        print(summary)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_tool(lambda _: work(args))


if __name__ == "__main__":
    sys.exit(main())
