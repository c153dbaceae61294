"""The pretrained-trunk path on the CPU, offline: scratch vs pretrained at equal total time (`make pretrain-demo`).

    python tools/pretrain_demo.py                                  # both arms, into outputs/pretrain_demo
    python tools/pretrain_demo.py --arms pretrained --finetune-set trainable_layers=5 norm=bn

Arm "scratch": the shapes detector from a random trunk (configs/shapes_faster_rcnn_r18_fpn.yaml, 7 epochs).
Arm "pretrained": shapes crops generated, a ResNet-18 pretrained on them (configs/cls_shapes_r18.yaml),
the detector fine-tuned from it with FrozenBatchNorm2d and 3 trainable stages
(configs/shapes_faster_rcnn_r18_fpn_pretrained.yaml); crops and pretraining count in its time.
Writes summary.json, summary.md and transfer.png (AP against time).
"""

from __future__ import annotations

import argparse
import sys

from engine.cli import run_tool

ARM_NAMES = ["scratch", "pretrained"]  # workflows.transfer.ARMS, without importing torch here


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", default="outputs/pretrain_demo")
    p.add_argument("--arms", nargs="+", choices=ARM_NAMES, default=ARM_NAMES)
    p.add_argument("--scratch-set", nargs="+", default=[], metavar="KEY=VALUE", help="overrides of the scratch recipe")
    p.add_argument("--pretrain-set", nargs="+", default=[], metavar="KEY=VALUE", help="overrides of the pretraining recipe")
    p.add_argument("--finetune-set", nargs="+", default=[], metavar="KEY=VALUE", help="overrides of the fine-tuning recipe")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_tool(lambda _: _demo(args))


def _demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from workflows.transfer import run_transfer_demo

    summary = run_transfer_demo(args.output_dir, arms=args.arms, scratch_set=args.scratch_set, pretrain_set=args.pretrain_set,
                                finetune_set=args.finetune_set, progress=not args.no_progress)
    print((Path(args.output_dir) / "summary.md").read_text(), end="")
    print(f"figure: {Path(args.output_dir) / 'transfer.png'}; runs and summary.json in {args.output_dir}")
    return 0 if summary else 1


if __name__ == "__main__":
    sys.exit(main())
