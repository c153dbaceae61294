"""The report: the rows as a table and as a picture."""

from __future__ import annotations

import logging
from pathlib import Path




__all__ = ["format_table", "plot"]

logger = logging.getLogger(__name__)


def format_table(rows: list[dict]) -> str:
    lines = [f"{'group':<20} {'case':<34} {'candidate':<42} {'img/s':>9} {'ms':>9} {'ratio':>6} {'peak MiB':>9}"]
    lines.append("-" * len(lines[0]))
    for r in rows:
        mem = r.get("peak_mb")
        lines.append(
            f"{r['group']:<20} {r['case']:<34} {r['candidate']:<42} {r['images_per_s']:9.2f} {r['seconds'] * 1000:9.1f} "
            f"{r['ratio']:6.2f} {(f'{mem:9.0f}' if mem is not None else '        -')}"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['case']} | {r['candidate']}" for r in rows]
    fig, ax = plt.subplots(figsize=(10, 0.28 * len(rows) + 1.5))
    colors = ["tab:gray" if r["candidate"].startswith("torchvision") or r["candidate"] == "pycocotools" else "tab:blue" for r in rows]
    ax.barh(range(len(rows)), [r["ratio"] for r in rows], color=colors)
    ax.axvline(1.0, color="k", linewidth=0.8)
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("speed relative to the reference of the row (higher is faster)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
