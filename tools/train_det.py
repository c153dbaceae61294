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

from engine.cli import add_train_flags, recipe_table, run_tool, train_overrides, training_summary
from detection.config import apply_overrides, default_recipe, load_config
from detection.models import ARCHS, BACKBONES


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", choices=list(BACKBONES))
    p.add_argument("--model", choices=list(ARCHS))
    add_train_flags(
        p, default_recipe="the shapes CPU recipe without --data-path, the COCO 1x defaults with it",
        data="COCO-layout root; omitted: the built-in shapes data set",
        train_split="annotations/instances_<split>.json (default: the one *train* file)",
        val_split="annotations/instances_<split>.json (default: the one *val* file)",
        set_help="override any config key (model_kwargs.NAME=V for one option)",
    )
    p.add_argument("--init-checkpoint", help="start from this detector file, architecture and weights (fine-tuning, e.g. a file "
                                             "from tools/prune.py; see docs/pruning.md)")
    p.add_argument("--trainable-layers", type=int)
    p.add_argument("--augment", choices=["none", "hflip", "multiscale", "lsj"])
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list_configs:
        print(recipe_table("detection"))
        return 0
    from detection.training import EvaluationError

    return run_tool(_train, check=lambda: _check(args), failures=(EvaluationError,))


def _check(args: argparse.Namespace) -> tuple[dict, argparse.Namespace]:
    from detection.training import preflight

    recipe = args.config or default_recipe(args.model, args.data_path)
    own = ("backbone", "model", "weights_backbone", "trainable_layers", "init_checkpoint", "augment")
    cfg = apply_overrides(load_config(recipe), args.set, **train_overrides(args, *own))
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

    cfg, args = checked
    result = train(cfg, resume=args.resume, progress=not args.no_progress)
    summary = training_summary(result, cfg, format_metrics(result["metrics"]) if result["metrics"] else None)
    if summary:
        print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
