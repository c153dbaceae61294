"""Train a detector on a ResNet-18/34 pyramid.

    python tools/train_det.py --backbone resnet18                      # shapes demo (CPU)
    python tools/train_det.py --model mask_rcnn                        # Mask R-CNN shapes demo
    python tools/train_det.py --config faster_rcnn_r18_fpn_1x_coco --data-path /data/coco
    torchrun --nproc_per_node=8 tools/train_det.py --config faster_rcnn_r18_fpn_1x_coco --data-path /data/coco
    python tools/train_det.py --list-configs
    python tools/train_det.py --config outputs/run/config.yaml --init-checkpoint pruned.pth --epochs 2 --lr 0.0002   # fine-tune
"""

from __future__ import annotations

import argparse
import sys

from engine.cli import DEVICES, run_tool
from detection.config import apply_overrides, default_recipe, list_recipes, load_config
from detection.models import ARCHS, BACKBONES


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="recipe: a YAML path or a name from configs/ (default: the shapes CPU recipe "
                                    "without --data-path, the COCO 1x defaults with it)")
    p.add_argument("--list-configs", action="store_true", help="list the shipped recipes and exit")
    p.add_argument("--backbone", choices=list(BACKBONES))
    p.add_argument("--model", choices=list(ARCHS))
    p.add_argument("--data-path", help="COCO-layout root; omitted: the built-in shapes data set")
    p.add_argument("--train-split", help="annotations/instances_<split>.json (default: the one *train* file)")
    p.add_argument("--val-split", help="annotations/instances_<split>.json (default: the one *val* file)")
    p.add_argument("--output-dir")
    p.add_argument("--epochs", type=int)
    p.add_argument("--max-iters", type=int, help="stop after this many iterations (smoke runs)")
    p.add_argument("--batch-size", type=int, help="images per process")
    p.add_argument("--lr", type=float, help="learning rate for lr_reference_batch images (scaled by the total batch)")
    p.add_argument("--device", choices=list(DEVICES), help="default: the recipe's (auto: cuda when available)")
    p.add_argument("--amp", action="store_true", default=None, help="autocast: fp16 + GradScaler on CUDA, bf16 on CPU")
    p.add_argument("--resume", nargs="?", const=True, default=None, metavar="PATH", help="resume from PATH or OUTPUT_DIR/checkpoint.pth")
    p.add_argument("--weights-backbone", help="imagenet, none, or a checkpoint path (e.g. from tools/train_cls.py)")
    p.add_argument("--init-checkpoint", help="start from this detector file, architecture and weights (fine-tuning, e.g. a file "
                                             "from tools/prune.py; see docs/pruning.md)")
    p.add_argument("--trainable-layers", type=int)
    p.add_argument("--augment", choices=["none", "hflip", "multiscale", "lsj"])
    p.add_argument("--workers", type=int)
    p.add_argument("--eval-period", type=int, help="epochs between evaluations (0: only at the end)")
    p.add_argument("--seed", type=int)
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="override any config key (model_kwargs.NAME=V for one option)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list_configs:
        for recipe in list_recipes():
            print(f"{recipe['name']:<34} {recipe['description']}")
        return 0
    from detection.training import EvaluationError

    return run_tool(_train, check=lambda: _check(args), failures=(EvaluationError,))


def _check(args: argparse.Namespace) -> tuple[dict, argparse.Namespace]:
    from detection.training import preflight

    recipe = args.config or default_recipe(args.model, args.data_path)
    cfg = load_config(recipe)
    cfg = apply_overrides(
        cfg, args.set, backbone=args.backbone, model=args.model, data_path=args.data_path,
        train_split=args.train_split, val_split=args.val_split, output_dir=args.output_dir,
        epochs=args.epochs, max_iters=args.max_iters, batch_size=args.batch_size, lr=args.lr,
        device=args.device, amp=args.amp, weights_backbone=args.weights_backbone, trainable_layers=args.trainable_layers,
        init_checkpoint=args.init_checkpoint,
        augment=args.augment, workers=args.workers, eval_period=args.eval_period, seed=args.seed,
    )
    cfg = preflight(cfg, resume=args.resume)  # every input checked before any work
    from engine import distributed as dist_utils
    from engine.recipes import recipe_notice

    if dist_utils.is_main_process():
        line, warning = recipe_notice(recipe, cfg, cpu_recipe="faster_rcnn_r18_fpn_cpu", defaults="the COCO 1x schedule at 800 px")
        print(line + (f"\nwarning: {warning}" if warning else ""))
    return cfg, args


def _train(checked: tuple[dict, argparse.Namespace]) -> int:
    from detection.evaluation import format_metrics
    from detection.training import train
    from engine import distributed as dist_utils

    cfg, args = checked
    result = train(cfg, resume=args.resume, progress=not args.no_progress)
    if dist_utils.is_main_process():
        print(f"finished {result['iteration']} iterations in {result['seconds'] / 60:.1f} min; outputs in {cfg['output_dir']}")
        if result["metrics"]:
            print(format_metrics(result["metrics"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
