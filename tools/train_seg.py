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

from engine.cli import DEVICES, run_tool


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="recipe: a YAML path or a name from configs/ (default: the shapes CPU recipe "
                                    "without --data-path, torchvision's reference settings with it)")
    p.add_argument("--list-configs", action="store_true", help="list the shipped segmentation recipes and exit")
    p.add_argument("--model", choices=["deeplabv3", "fcn", "semantic_fpn"])
    p.add_argument("--backbone", choices=["resnet18", "resnet34"])
    p.add_argument("--output-stride", type=int, choices=[8, 16, 32])
    p.add_argument("--aux-loss", action="store_true", default=None, help="torchvision's auxiliary FCN head on layer3 (weight aux_weight)")
    p.add_argument("--data-path", help="VOC or COCO-layout root; omitted: the built-in shapes data set")
    p.add_argument("--train-split", help="VOC: ImageSets/Segmentation/<split>.txt (train); COCO: instances_<split>.json")
    p.add_argument("--val-split", help="VOC: val; COCO: the one instances_*val*.json")
    p.add_argument("--output-dir")
    p.add_argument("--epochs", type=int)
    p.add_argument("--max-iters", type=int, help="stop after this many iterations (smoke runs)")
    p.add_argument("--batch-size", type=int, help="images per process")
    p.add_argument("--lr", type=float, help="learning rate for lr_reference_batch images (scaled by the total batch)")
    p.add_argument("--device", choices=list(DEVICES), help="default: the recipe's (auto: cuda when available)")
    p.add_argument("--amp", action="store_true", default=None, help="autocast: fp16 + GradScaler on CUDA, bf16 on CPU")
    p.add_argument("--resume", nargs="?", const=True, default=None, metavar="PATH", help="resume from PATH or OUTPUT_DIR/checkpoint.pth")
    p.add_argument("--weights-backbone", help="imagenet, none, or a checkpoint path (e.g. from tools/train_cls.py)")
    p.add_argument("--workers", type=int)
    p.add_argument("--eval-period", type=int, help="epochs between evaluations (0: only at the end)")
    p.add_argument("--seed", type=int)
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="override any config key (model_kwargs.NAME=V for one head option)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def work(args: argparse.Namespace) -> int:
    from engine import distributed as dist_utils
    from engine.config import apply_overrides, list_recipes, load_config
    from engine.recipes import recipe_notice
    from segmentation.config import CPU_SEG_RECIPE, SEGMENTATION, default_seg_recipe
    from segmentation.evaluation import format_seg_metrics
    from segmentation.training import preflight_seg, train_segmenter

    if args.list_configs:
        for recipe in list_recipes("segmentation"):
            print(f"{recipe['name']:<34} {recipe['description']}")
        return 0
    recipe = args.config or default_seg_recipe(args.data_path)
    cfg = load_config(recipe, schema=SEGMENTATION)
    if args.model is not None and args.model != cfg["model"] and cfg["model_kwargs"]:
        # The recipe's head options were chosen for its own architecture; --set model_kwargs.X=V still applies.
        print(f"--model {args.model}: the recipe's {cfg['model']} head options {cfg['model_kwargs']} are not used")
        cfg = {**cfg, "model_kwargs": {}}
    cfg = apply_overrides(
        cfg, args.set, schema=SEGMENTATION, model=args.model, backbone=args.backbone, output_stride=args.output_stride,
        aux_loss=args.aux_loss, data_path=args.data_path, train_split=args.train_split, val_split=args.val_split,
        output_dir=args.output_dir, epochs=args.epochs, max_iters=args.max_iters, batch_size=args.batch_size, lr=args.lr,
        device=args.device, amp=args.amp, weights_backbone=args.weights_backbone, workers=args.workers,
        eval_period=args.eval_period, seed=args.seed,
    )
    cfg = preflight_seg(cfg, resume=args.resume)  # every user error before the output folder is made
    if dist_utils.is_main_process():
        line, warning = recipe_notice(recipe, cfg, cpu_recipe=CPU_SEG_RECIPE, defaults="torchvision's reference settings")
        print(line + (f"\nwarning: {warning}" if warning else ""))
    result = train_segmenter(cfg, resume=args.resume, progress=not args.no_progress)
    if dist_utils.is_main_process():
        print(f"finished {result['iteration']} iterations in {result['seconds'] / 60:.1f} min; outputs in {cfg['output_dir']}")
        print(format_seg_metrics(result["metrics"]))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_tool(lambda _: work(args))


if __name__ == "__main__":
    sys.exit(main())
