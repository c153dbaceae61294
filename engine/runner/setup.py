"""A run's set-up: the process group, device, seed, output folder and ``config.yaml``."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import distributed as dist_utils
from ..config import resolve_device, save_config

__all__ = ["NonFiniteLossError", "Run", "setup_run"]


class NonFiniteLossError(FloatingPointError):
    """Training produced non-finite losses too many times in a row."""


@dataclass
class Run:
    """One process's view of a run: its config, device, rank and output folder."""

    cfg: dict[str, Any]
    device: torch.device
    rank: int
    world: int
    out: Path
    progress: bool = True
    requested_device: str = "auto"

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that logs and writes files."""
        return self.rank == 0


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def setup_run(cfg: dict[str, Any], *, progress: bool = True) -> Run:
    """Join the process group, pick the device, seed, create the output folder, save ``config.yaml``.

    Args:
        cfg: a validated config; ``device: auto`` is resolved here and recorded.
        progress: show progress bars (rank 0).
    """
    cfg = dict(cfg)
    requested = cfg["device"]
    cfg["device"] = resolve_device(requested)
    device = dist_utils.init_distributed(cfg["device"])
    rank, world = dist_utils.rank(), dist_utils.world_size()
    _seed_everything(int(cfg["seed"]) + rank)
    if cfg["deterministic"]:
        torch.use_deterministic_algorithms(True, warn_only=True)
    out = Path(cfg["output_dir"])
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    dist_utils.barrier()
    return Run(cfg=cfg, device=device, rank=rank, world=world, out=out, progress=progress, requested_device=requested)
