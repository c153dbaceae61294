"""Pictures every task writes: a tensor image to a file, and the training curves of a run.

Both are written atomically (``engine.files``), so a reader never sees half a PNG.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .files import atomic_write

__all__ = ["plot_curves", "save_image"]


def save_image(image: torch.Tensor, path: str | os.PathLike) -> None:
    """Write a uint8 CHW tensor as PNG (or the format ``path``'s suffix names), making its folder.

    The file appears whole or not at all (a temporary file, then ``os.replace``).
    """
    from PIL import Image

    fmt = Image.registered_extensions().get(Path(path).suffix.lower(), "PNG")
    atomic_write(path, lambda f: Image.fromarray(image.permute(1, 2, 0).numpy()).save(f, format=fmt))


def plot_curves(
    metrics_jsonl: str | os.PathLike,
    out_png: str | os.PathLike,
    *,
    eval_suffixes: tuple[str, ...] = ("/AP", "/AP50"),
    eval_title: str = "validation AP (%)",
) -> Path:
    """Plot training loss and evaluation AP against iteration from ``metrics.jsonl``.

    Args:
        metrics_jsonl: the run's metrics file (one JSON object per line; training
            windows carry ``loss``, evaluations carry ``bbox/AP``).
        out_png: where to write the figure.
        eval_suffixes: evaluation keys ending so are plotted on the right
            (classification: ``("/top1",)``).
        eval_title: title of the right panel.

    Returns:
        The PNG path.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, evals = [], []
    for line in Path(metrics_jsonl).read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        if "loss" in rec:
            train.append(rec)
        if any(k.endswith(eval_suffixes) for k in rec):
            evals.append(rec)
    fig, (ax_loss, ax_ap) = plt.subplots(1, 2, figsize=(11, 4))
    if train:
        its = [r["iter"] for r in train]
        ax_loss.plot(its, [r["loss"] for r in train], label="total", linewidth=2)
        terms = sorted({k for r in train for k in r if k.startswith("loss_")})
        for term in terms:
            ax_loss.plot(its, [r.get(term, float("nan")) for r in train], label=term, linewidth=1, alpha=0.8)
        ax_loss.set_yscale("log")
        ax_loss.legend(fontsize=7)
    ax_loss.set_xlabel("iteration")
    ax_loss.set_title("training loss")
    for key in sorted({k for r in evals for k in r if k.endswith(eval_suffixes)}):
        values = [r.get(key) for r in evals]
        ax_ap.plot([r["iter"] for r in evals], [v if v is not None else float("nan") for v in values], marker="o", label=key)
    if evals:
        ax_ap.legend(fontsize=8)
    ax_ap.set_xlabel("iteration")
    ax_ap.set_title(eval_title)
    fig.tight_layout()
    out_png = atomic_write(out_png, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
    return out_png
