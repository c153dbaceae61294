"""The pretrained-trunk path, proven offline: pretrain on shapes crops, fine-tune the detector, compare.

Two arms on the same CPU, one after the other, each timed from its first step to its
final evaluation:

* **scratch**: the shapes detector trained from a random trunk (the ``make train``
  recipe, BatchNorm, every stage trainable);
* **pretrained**: a shapes classification set generated from the same scene generator,
  a ResNet trunk pretrained on it (``tools/train_cls.py``'s engine), then the same
  detector fine-tuned from that trunk with the COCO recipes' trunk settings
  (FrozenBatchNorm2d, ``trainable_layers=3``). Generating the crops and pretraining
  count towards this arm's time.

The scratch arm trains for 7 epochs instead of the recipe's 5, which brings its time
close to the pretrained arm's (measured: 421 s against 460 s on two CPU cores).
The detection data set is prepared before either arm starts (both use it). The result is
a table of times and AP and a figure of AP against time since each arm's start, so
the arms are compared at equal total time.

A workflow above the tasks (it drives the classification task, then the detection task),
so it lives in ``workflows/``, not in either task.
"""

from __future__ import annotations

import json
import logging
import resource
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

from classification import CLASSIFICATION, train_classifier
from classification.data import generate_shapes_classification
from detection.config import apply_overrides, load_config
from detection.training import train
from engine.logs import log_to_file
from engine.roots import prepare_data_root

__all__ = ["ARMS", "SCRATCH_SET", "plot_transfer", "run_transfer_demo"]

logger = logging.getLogger(__name__)

ARMS = ("scratch", "pretrained")
# The scratch arm's own overrides of its recipe (the user's scratch_set comes after): equal time with the other arm.
SCRATCH_SET = ("epochs=7",)


def _cpu_seconds() -> float:
    # Children count once reaped: DataLoader workers end with each epoch's loader.
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class _Clock:
    def __init__(self) -> None:
        self.start_unix, self.start, self.cpu = time.time(), time.perf_counter(), _cpu_seconds()

    def lap(self) -> dict[str, float]:
        return {"seconds": time.perf_counter() - self.start, "cpu_seconds": _cpu_seconds() - self.cpu}


def _ap_curve(metrics_jsonl: Path, start_unix: float) -> list[dict[str, float]]:
    out = []
    for line in metrics_jsonl.read_text().splitlines():
        rec = json.loads(line)
        if "bbox/AP" in rec:
            out.append({"iter": rec["iter"], "seconds": rec["wall_time"] - start_unix, "bbox/AP": rec["bbox/AP"], "bbox/AP50": rec["bbox/AP50"]})
    return out


def run_transfer_demo(
    out_dir: str | Path,
    *,
    arms: Sequence[str] = ARMS,
    scratch_recipe: str = "shapes_faster_rcnn_r18_fpn",
    pretrain_recipe: str = "cls_shapes_r18",
    finetune_recipe: str = "shapes_faster_rcnn_r18_fpn_pretrained",
    scratch_set: Sequence[str] = (),
    pretrain_set: Sequence[str] = (),
    finetune_set: Sequence[str] = (),
    progress: bool = True,
) -> dict[str, Any]:
    """Run the arms, write ``summary.json``, ``summary.md`` and ``transfer.png`` to ``out_dir``.

    Args:
        out_dir: where each arm's runs and the summary go.
        arms: ``"scratch"`` and/or ``"pretrained"``.
        scratch_recipe: detection recipe of the scratch arm.
        pretrain_recipe: classification recipe of the pretraining (its ``shapes_*``
            keys say which crops to generate).
        finetune_recipe: detection recipe of the fine-tuning (its trunk settings).
        scratch_set: ``key=value`` overrides of the scratch recipe (after ``SCRATCH_SET``).
        pretrain_set: ``key=value`` overrides of the pretraining recipe.
        finetune_set: ``key=value`` overrides of the fine-tuning recipe.
        progress: show tqdm bars.

    Returns:
        The summary: per arm its phases' wall and CPU seconds, the final AP, the AP curve.
    """
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise ValueError(f"arms must be among {list(ARMS)}, got {unknown}")
    out = Path(out_dir)
    scratch_cfg = apply_overrides(load_config(scratch_recipe), [*SCRATCH_SET, *scratch_set], output_dir=str(out / "scratch"))
    cls_cfg = apply_overrides(load_config(pretrain_recipe, schema=CLASSIFICATION), pretrain_set, schema=CLASSIFICATION,
                              data_path=str(out / "shapes_cls"), output_dir=str(out / "pretrain"))
    ft_cfg = apply_overrides(load_config(finetune_recipe), finetune_set, output_dir=str(out / "finetune"),
                             weights_backbone=str(out / "pretrain" / "model_final.pth"))
    summary: dict[str, Any] = {}
    out.mkdir(parents=True, exist_ok=True)  # after the configs are checked: a bad override leaves nothing behind
    with log_to_file(out / "log.txt"):
        # Shared by both arms, so outside both clocks.
        for cfg in (scratch_cfg, ft_cfg):
            prepare_data_root(cfg)
        if "scratch" in arms:
            clock = _Clock()
            result = train(scratch_cfg, progress=progress)
            phases = {"detection": clock.lap()}
            summary["scratch"] = {"phases": phases, **phases["detection"], "metrics": result["metrics"],
                                  "curve": _ap_curve(out / "scratch" / "metrics.jsonl", clock.start_unix)}
            logger.info("scratch: bbox AP %.1f in %.0f s", result["metrics"]["bbox/AP"], phases["detection"]["seconds"])
        if "pretrained" in arms:
            clock = _Clock()
            if (out / "shapes_cls").exists():
                shutil.rmtree(out / "shapes_cls")
            counts = generate_shapes_classification(
                out / "shapes_cls", num_train=cls_cfg["shapes_train"], num_val=cls_cfg["shapes_val"],
                image_size=cls_cfg["shapes_size"], crop_size=cls_cfg["shapes_crop_size"], seed=cls_cfg["shapes_seed"])
            generated = clock.lap()
            cls_result = train_classifier(cls_cfg, progress=progress)
            pretrained = clock.lap()
            result = train(ft_cfg, progress=progress)
            total = clock.lap()
            phases = {
                "generate_crops": generated,
                "pretrain": {k: pretrained[k] - generated[k] for k in generated},
                "detection": {k: total[k] - pretrained[k] for k in total},
            }
            summary["pretrained"] = {
                "phases": phases, **total, "metrics": result["metrics"], "pretrain_metrics": cls_result["metrics"],
                "crops": counts, "curve": _ap_curve(out / "finetune" / "metrics.jsonl", clock.start_unix),
                "pretrain_seconds": pretrained["seconds"],
            }
            logger.info("pretrained: bbox AP %.1f in %.0f s (%.0f s of it generating crops and pretraining)",
                        result["metrics"]["bbox/AP"], total["seconds"], pretrained["seconds"])
    previous = json.loads((out / "summary.json").read_text()) if (out / "summary.json").is_file() else {}
    summary = {**previous, **summary}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "summary.md").write_text(_markdown(summary))
    plot_transfer(summary, out / "transfer.png")
    return summary


def _markdown(summary: dict[str, Any]) -> str:
    lines = ["| arm | crops + pretraining | detection training | total | CPU seconds | bbox AP | AP50 |", "|---|---|---|---|---|---|---|"]
    for arm in ARMS:
        if arm not in summary:
            continue
        s = summary[arm]
        pre = s.get("pretrain_seconds")
        lines.append(
            f"| {arm} | {'-' if pre is None else f'{pre:.0f} s'} | {s['phases']['detection']['seconds']:.0f} s | {s['seconds']:.0f} s "
            f"| {s['cpu_seconds']:.0f} | {s['metrics']['bbox/AP']:.1f} | {s['metrics']['bbox/AP50']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def plot_transfer(summary: dict[str, Any], out_png: str | Path) -> Path:
    """Bbox AP against minutes since each arm's start; the pretraining phase shaded.

    Args:
        summary: from ``run_transfer_demo`` (``summary.json``).
        out_png: where to write the figure.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    colours = {"scratch": "tab:blue", "pretrained": "tab:orange"}
    for arm in ARMS:
        if arm not in summary:
            continue
        s = summary[arm]
        curve = s["curve"]
        label = f"{arm}: {s['metrics']['bbox/AP']:.1f} AP in {s['seconds'] / 60:.1f} min"
        start = s.get("pretrain_seconds") or 0.0  # the detector exists from here on
        ax.plot([start / 60] + [p["seconds"] / 60 for p in curve], [0.0] + [p["bbox/AP"] for p in curve], marker="o", color=colours[arm], label=label)
        if s.get("pretrain_seconds"):
            ax.axvspan(0, s["pretrain_seconds"] / 60, color=colours[arm], alpha=0.12, label="crops + pretraining")
    ax.set_xlabel("minutes since the arm started (one arm at a time, same machine)")
    ax.set_ylabel("shapes val bbox AP (%)")
    ax.set_title("Faster R-CNN R18-FPN on shapes: from scratch vs pretrained trunk")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=80)
    plt.close(fig)
    return out_png
