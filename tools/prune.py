"""Prune a trained detector's channels (structured: whole filters), optionally fine-tune it, and write it as data.

    python tools/prune.py --checkpoint outputs/shapes_faster_rcnn_r18/model_final.pth --ratio 0.5 --output pruned.pth
    python tools/prune.py --checkpoint model_final.pth --ratio 0.5 --scope pyramid --importance taylor --output pruned.pth
    python tools/prune.py --checkpoint model_final.pth --ratio 0.75 --steps 3 --finetune-epochs 1 --output pruned_ft.pth

Every group of coupled channels in --scope (trunk: the ResNet; pyramid: the feature pyramid
and every head; all) loses --ratio of its channels, the least important by --importance
(l1: weight magnitude; bn_scale: BatchNorm scale; taylor: |weight x gradient| of the training
loss on --calib-images training images). Prints parameters and GMACs before and after, at an
800x1216 network input (--mac-size). The output is an ordinary detector file with its channel
plan: eval_coco.py, infer.py, export.py and train_det.py --init-checkpoint take it unchanged.

With --finetune-epochs E the pruned model is fine-tuned with the recipe it was trained with
(E epochs, learning rate x --finetune-lr-scale, --finetune-set KEY=VALUE overrides) by the
detection trainer; --steps N repeats prune -> fine-tune N times, each step removing the same
fraction of what is left. The steps' files and runs go to --work-dir (default: beside
--output); run the same command again to resume. See docs/pruning.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from engine.cli import USER_ERRORS, run_tool


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="model_final.pth / checkpoint.pth from tools/train_det.py (pruned before or not)")
    p.add_argument("--ratio", type=float, required=True, help="fraction of each group's channels to remove, in (0, 1)")
    p.add_argument("--output", required=True, help="the pruned detector file (.pth), written only when everything succeeded")
    p.add_argument("--scope", default="all", help="trunk, pyramid (the feature pyramid and the heads) or all (default)")
    p.add_argument("--importance", default="l1", help="l1 (default), bn_scale or taylor")
    p.add_argument("--calib-images", type=int, default=16, help="training images taylor scores on (default 16)")
    p.add_argument("--data-path", help="COCO-layout training data for taylor and fine-tuning (default: the checkpoint's)")
    p.add_argument("--round-to", type=int, default=1, help="round kept widths to a multiple of this (e.g. 8; default 1)")
    p.add_argument("--mac-size", type=int, nargs=2, default=[800, 1216], metavar=("H", "W"), help="network input the GMACs are counted at")
    tune = p.add_argument_group("fine-tuning (the detection trainer, the checkpoint's own recipe)")
    tune.add_argument("--finetune-epochs", type=int, help="fine-tune each pruned model for this many epochs")
    tune.add_argument("--steps", type=int, default=1, help="prune -> fine-tune rounds (default 1); more than 1 needs --finetune-epochs")
    tune.add_argument("--finetune-lr-scale", type=float, default=0.1, help="the recipe's learning rate times this (default 0.1)")
    tune.add_argument("--finetune-set", nargs="+", default=[], metavar="KEY=VALUE", help="config overrides of the fine-tuning runs")
    tune.add_argument("--work-dir", help="the steps' pruned files and runs (default: OUTPUT's name + _steps, beside it)")
    tune.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_tool(_work, check=lambda: _check(args), user_errors=(*USER_ERRORS, ValueError))


def _check(args: argparse.Namespace) -> dict[str, Any]:
    """Every input, before any work: one error line and exit 2 for a mistake."""
    from detection.pruning import check_prune_args

    check_prune_args(ratio=args.ratio, scope=args.scope, importance=args.importance, round_to=args.round_to, steps=args.steps)
    if args.calib_images < 1:
        raise ValueError(f"--calib-images must be a positive integer, got {args.calib_images}")
    if min(args.mac_size) < 32:
        raise ValueError(f"--mac-size must be two sides of at least 32 pixels, got {args.mac_size}")
    if args.steps > 1 and args.finetune_epochs is None:
        raise ValueError(f"--steps {args.steps} prunes and fine-tunes in turns: pass --finetune-epochs E")
    if args.finetune_epochs is not None and args.finetune_epochs < 1:
        raise ValueError(f"--finetune-epochs must be a positive integer, got {args.finetune_epochs}")
    output = Path(args.output)
    if output.is_dir():
        raise ValueError(f"--output {output} is a folder; pass a file name such as pruned.pth")
    checkpoint = Path(args.checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint {checkpoint} not found: pass --checkpoint model_final.pth from tools/train_det.py")

    from deploy.files import KIND_DESCRIPTIONS, kind_of
    from engine.files import read_torch_file

    ckpt = read_torch_file(checkpoint)  # an exported file, junk, pickled code: refused here, naming the file
    kind = kind_of(ckpt)
    if kind not in ("detector", "training_state"):
        raise ValueError(f"{checkpoint} is not a detector checkpoint (it is {KIND_DESCRIPTIONS[kind] if kind else 'no file this project reads'}): "
                         "tools/prune.py prunes model_final.pth / checkpoint.pth from tools/train_det.py")
    train_config = ckpt.get("config")
    if args.importance == "taylor" and args.data_path is None and not train_config:
        raise ValueError(f"importance taylor scores training images and {checkpoint} records no training data: pass --data-path DIR")
    work_dir = Path(args.work_dir) if args.work_dir else output.with_name(output.stem + "_steps")
    if args.finetune_epochs is not None:
        from detection.pruning import prune_detector
        from detection.training import preflight
        from workflows.prune import finetune_config

        overrides = [*args.finetune_set, *([f"data_path={args.data_path}"] if args.data_path else [])]
        # The recipe, the data and the device are checked now, with the unpruned file standing in for the steps' ones.
        from detection.checkpoint import load_detector

        cfg = finetune_config(train_config, init_checkpoint=checkpoint, output_dir=work_dir / "step1",
                              epochs=args.finetune_epochs, lr_scale=args.finetune_lr_scale, overrides=overrides)
        preflight(cfg)
        model = load_detector(ckpt)
        prune_detector(model, ratio=args.ratio, scope=args.scope, round_to=args.round_to, inplace=True)  # a ratio too high fails now
        args.finetune_set = overrides
    return {"args": args, "work_dir": work_dir}


def _gmacs(macs: dict[str, float]) -> dict[str, str]:
    return {k: f"{v / 1e9:.2f}" for k, v in macs.items()}


def _print_summary(summary: Any, title: str) -> None:
    (p0, p1), (m0, m1) = summary.params, summary.macs
    print(f"{title}: {sum(g.kept < g.channels for g in summary.groups)} of {len(summary.groups)} groups of coupled channels pruned")
    for g in summary.groups:
        if g.kept < g.channels:
            print(f"  {g.scope:<8} {g.root:<44} {g.channels:>5} -> {g.kept}")
    print(f"parameters: {p0:,} -> {p1:,} ({p1 / p0:.2f}x)")
    rois = f", box head on {summary.rois} RoIs" if summary.rois else ""
    print(f"GMACs at {summary.mac_size[0]}x{summary.mac_size[1]}{rois}:")
    before, after = _gmacs(m0), _gmacs(m1)
    for part in m0:
        print(f"  {part:<10} {before[part]:>9} -> {after[part]:>9}  ({m1[part] / m0[part]:.2f}x)" if m0[part] else f"  {part:<10} 0")


def _work(checked: dict[str, Any]) -> int:
    from workflows.prune import iterative_prune, prune_checkpoint

    args, work_dir = checked["args"], checked["work_dir"]
    common = dict(scope=args.scope, importance=args.importance, data_path=args.data_path, calib_images=args.calib_images,
                  round_to=args.round_to, mac_size=tuple(args.mac_size))
    if args.finetune_epochs is None:
        summary = prune_checkpoint(args.checkpoint, args.output, ratio=args.ratio, **common)
        _print_summary(summary, f"pruned {args.checkpoint} by {args.ratio} ({args.scope}, {args.importance})")
    else:
        summaries = iterative_prune(
            args.checkpoint, args.output, ratio=args.ratio, steps=args.steps, finetune_epochs=args.finetune_epochs,
            work_dir=work_dir, lr_scale=args.finetune_lr_scale, overrides=args.finetune_set, progress=not args.no_progress, **common,
        )
        for summary in summaries:
            _print_summary(summary, f"step {summary.output}")
        print(f"fine-tuned {args.steps} step(s) of {args.finetune_epochs} epoch(s) in {work_dir}")
    size = Path(args.output).stat().st_size / 2**20
    print(f"wrote {args.output} ({size:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
