"""The scaffold every tool stands on: logging once, the device, the process group, user errors, clean-up.

A tool parses its flags, checks what it will read, then does its work inside
``run_tool``; only ``tools/`` print and exit, so this module returns exit codes and
prints nothing but the one ``error:`` line a user's mistake deserves:

    def main(argv=None) -> int:
        args = parse_args(argv)
        return run_tool(lambda cfg: train(cfg), check=lambda: preflight(args))

A user's mistake (a flag, a file, a folder; the ``user_errors`` types) is one
``error: ...`` line and exit 2; training that diverged (``NonFiniteLossError``) is one
line and exit 1; Ctrl-C is exit 130; the process group is left in every case.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
from collections.abc import Callable, Iterator
from typing import Any
from pathlib import Path

import torch

from backbones.weights import WeightsError

from .coco import AnnotationError
from .datasets import DataPathError

from . import distributed as dist_utils
from .config import ConfigError, list_recipes, resolve_device
from .logs import setup_logging
from .runner import NonFiniteLossError

__all__ = [
    "DEVICES", "DTYPES", "USER_ERRORS", "add_eval_flags", "add_train_flags", "fail", "init_device", "parse_dtype", "recipe_table", "training_summary", "removed_on_failure",
    "run_tool", "train_overrides",
]

# A user's mistake (a flag, a file, a folder): one "error: ..." line and exit 2, no traceback.
# WeightsError covers FileFormatError and the checkpoint errors; DataPathError the data layouts.
USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, WeightsError, DataPathError, AnnotationError, FileNotFoundError)
DEVICES = ("auto", "cpu", "cuda")
DTYPES = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str) -> torch.dtype | None:
    """``"float32"`` -> ``None`` (full precision), ``"bfloat16"`` / ``"float16"`` -> the torch dtype.

    Args:
        name: one of ``DTYPES``.
    """
    if name not in DTYPES:
        raise ConfigError(f"dtype must be one of {list(DTYPES)}, got {name!r}")
    return DTYPES[name]


def fail(message: object, code: int = 2) -> int:
    """Print ``error: message`` on stderr and return ``code``."""
    text = str(message).strip() or type(message).__name__
    print(f"error: {text}", file=sys.stderr)
    return code


def run_tool(
    work: Callable[[Any], int | None],
    *,
    check: Callable[[], Any] = lambda: None,
    user_errors: tuple[type[BaseException], ...] = USER_ERRORS,
    failures: tuple[type[BaseException], ...] = (),
    logging: bool = True,
) -> int:
    """Run a tool: its checks, then (with the project's logging) its work, with the error and exit-code conventions.

    Args:
        check: reads and checks every input before any work, with logging not yet set up,
            so a mistake is one line; its result is passed to ``work``.
        work: the tool's body, given what ``check`` returned; returns its exit code (``None``: 0).
        user_errors: exception types that are the user's mistake (one line, exit 2).
        failures: exception types whose message says what went wrong and what to do (one
            line, exit 1), besides ``NonFiniteLossError``.
        logging: set up the project's console logging after the checks.

    Returns:
        The exit code: the work's, 2 for a user's mistake, 1 for a failure, 130 for Ctrl-C.
    """
    try:
        checked = check()
        if logging:
            setup_logging()
        code = work(checked)
        return 0 if code is None else int(code)
    except user_errors as e:
        return fail(e)
    except (NonFiniteLossError, *failures) as e:
        return fail(e, code=1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        dist_utils.cleanup()


def init_device(device: str) -> torch.device:
    """Resolve ``auto``, join the process group under ``torchrun`` and return this rank's device.

    Args:
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.

    Raises:
        ConfigError: ``"cuda"`` without a CUDA device.
    """
    return dist_utils.init_distributed(resolve_device(device))


@contextlib.contextmanager
def removed_on_failure(folder: str | Path) -> Iterator[Path]:
    """Yield ``folder``; if it did not exist before and the block raises, remove it again (nothing half-written).

    Args:
        folder: the output folder a tool is about to fill.
    """
    folder = Path(folder)
    existed = folder.exists()
    try:
        yield folder
    except BaseException:
        if not existed and folder.is_dir():
            shutil.rmtree(folder, ignore_errors=True)
        raise


# The config keys the shared training flags set (flag --x-y sets key x_y); the task's own flags come on top.
TRAIN_FLAG_KEYS = ("data_path", "train_split", "val_split", "output_dir", "epochs", "max_iters", "batch_size", "lr", "device", "amp",
                   "workers", "eval_period", "seed")


def add_train_flags(
    p: argparse.ArgumentParser,
    *,
    default_recipe: str,
    data: str,
    train_split: str,
    val_split: str,
    weights_flag: str = "--weights-backbone",
    weights: str = "imagenet, none, or a checkpoint path (e.g. from tools/train_cls.py)",
    set_help: str = "override any config key",
) -> None:
    """The flags every training tool shares, defined once: recipe, data, run length, optimiser, device, resume, weights, ``--set``.

    Args:
        p: the tool's parser (its own flags are added before or after).
        default_recipe: what runs without ``--config``, for its help line.
        data: what ``--data-path`` reads.
        train_split: help of ``--train-split``.
        val_split: help of ``--val-split``.
        weights_flag: the initial weights' flag (``--weights-backbone``; ``--weights`` for a classifier).
        weights: its help line.
        set_help: help of ``--set``.
    """
    p.add_argument("--config", help=f"recipe: a YAML path or a name from configs/ (default: {default_recipe})")
    p.add_argument("--list-configs", action="store_true", help="list the shipped recipes of this task and exit")
    p.add_argument("--data-path", help=data)
    p.add_argument("--train-split", help=train_split)
    p.add_argument("--val-split", help=val_split)
    p.add_argument("--output-dir")
    p.add_argument("--epochs", type=int)
    p.add_argument("--max-iters", type=int, help="stop after this many iterations (smoke runs)")
    p.add_argument("--batch-size", type=int, help="images per process")
    p.add_argument("--lr", type=float, help="learning rate for lr_reference_batch images (scaled by the total batch)")
    p.add_argument("--device", choices=list(DEVICES), help="default: the recipe's (auto: cuda when available)")
    p.add_argument("--amp", action="store_true", default=None, help="autocast: fp16 + GradScaler on CUDA, bf16 on CPU")
    p.add_argument("--resume", nargs="?", const=True, default=None, metavar="PATH", help="resume from PATH or OUTPUT_DIR/checkpoint.pth")
    p.add_argument(weights_flag, help=weights)
    p.add_argument("--workers", type=int)
    p.add_argument("--eval-period", type=int, help="epochs between evaluations (0: only at the end)")
    p.add_argument("--seed", type=int)
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help=set_help)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def train_overrides(args: argparse.Namespace, *own: str) -> dict[str, Any]:
    """The config overrides of the shared training flags and of the tool's ``own`` keys (``None``: not given).

    Args:
        args: parsed flags (``add_train_flags`` and the tool's own).
        own: the tool's own keys, read from the flag of the same name (``weights_backbone``, ``model``, ...).
    """
    return {key: getattr(args, key) for key in (*TRAIN_FLAG_KEYS, *own)}


def recipe_table(kind: str) -> str:
    """The shipped recipes of ``kind``, a line each (name, description): what ``--list-configs`` prints.

    Args:
        kind: ``"detection"``, ``"classification"`` or ``"segmentation"``.
    """
    return "\n".join(f"{recipe['name']:<34} {recipe['description']}" for recipe in list_recipes(kind))


def training_summary(result: dict[str, Any], cfg: dict[str, Any], metrics_line: str | None) -> str | None:
    """What a training tool prints at the end, on rank 0 only (``None`` elsewhere): length, time, outputs, metrics.

    Args:
        result: a task's ``train`` result (``iteration``, ``seconds``).
        cfg: the run's config (``output_dir``).
        metrics_line: the task's one-line metrics, or ``None``.
    """
    if not dist_utils.is_main_process():
        return None
    lines = [f"finished {result['iteration']} iterations in {result['seconds'] / 60:.1f} min; outputs in {cfg['output_dir']}"]
    return "\n".join(lines + ([metrics_line] if metrics_line else []))


def add_eval_flags(
    p: argparse.ArgumentParser,
    *,
    data: str,
    split: str,
    output_dir: str = "write metrics.json here",
    batch_size: int = 1,
    batch_help: str | None = None,
    workers: int = 2,
    amp: bool = True,
) -> None:
    """The flags every evaluation tool shares, defined once: data, split, output, batch, loader, device, AMP, progress.

    Args:
        p: the tool's parser (its own flags before or after).
        data: what ``--data-path`` reads.
        split: help of ``--split``.
        output_dir: help of ``--output-dir``.
        batch_size: ``--batch-size``'s default.
        batch_help: its help, if any.
        workers: ``--workers``' default.
        amp: add ``--amp`` (autocast).
    """
    p.add_argument("--data-path", help=data)
    p.add_argument("--split", help=split)
    p.add_argument("--output-dir", help=output_dir)
    p.add_argument("--device", choices=list(DEVICES), default="auto")
    p.add_argument("--batch-size", type=int, default=batch_size, help=batch_help)
    p.add_argument("--workers", type=int, default=workers, help="loader processes")
    if amp:
        p.add_argument("--amp", action="store_true", help="autocast: fp16 on CUDA, bf16 on CPU")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
