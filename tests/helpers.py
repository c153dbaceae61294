"""Plain helpers shared by the test files (fixtures live in conftest.py).

``run_tool`` runs ``tools/<name>.py`` as a user would, in a new interpreter. With
``fresh=False`` the tool runs as ``__main__`` in a child forked from the test process
instead (the same file, flags, environment, exit code and output, minus the 4-5 CPU
seconds of imports); that is opt-in: three fresh-clone CI runs with forked tools had the
pytest process die of SIGSEGV two thirds of the way through, and forking the test process
(its thread pools) is the suspect, not proven.
"""

from __future__ import annotations

import importlib.util
import io
import logging
import os
import runpy
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

REPO = Path(__file__).resolve().parent.parent


def tool_env(cache: Path | None = None, **extra: str) -> dict[str, str]:
    """The environment tools run with in tests: one thread, no warnings, a private data cache."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", **extra)
    if cache is not None:
        env["RESFPN_CACHE"] = str(cache)
    return env


def run_tool(
    args: list[str], *, cache: Path | None = None, timeout: float = 300, fresh: bool = True, env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """Run ``python tools/<name>.py ...`` from the repository root and capture its output.

    Args:
        args: the script's path relative to the repository (``tools/train_det.py``) and its flags.
        cache: ``RESFPN_CACHE`` for the run (shapes data sets, downloaded weights).
        timeout: seconds before the run is killed and ``subprocess.TimeoutExpired`` raised.
        fresh: a new interpreter (default) rather than a child forked from this process.
        env: the whole environment (default ``tool_env(cache)``).
    """
    env = env if env is not None else tool_env(cache)
    if fresh:
        return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        pid = os.fork()
        if pid == 0:  # the child: become `python <script> <flags>` and never return into pytest
            code = 1
            try:
                os.dup2(out.fileno(), 1)
                os.dup2(err.fileno(), 2)
                sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), write_through=True)
                sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), write_through=True)
                os.chdir(REPO)
                os.environ.clear()
                os.environ.update(env)
                torch.set_num_threads(int(env.get("OMP_NUM_THREADS", "1")))  # what the variable does at torch's import
                _interpreter_warnings(ignore=env.get("PYTHONWARNINGS") == "ignore")
                script = REPO / args[0]
                sys.argv = [str(script), *args[1:]]
                sys.path[0] = str(script.parent)
                try:
                    runpy.run_path(str(script), run_name="__main__")
                    code = 0
                except SystemExit as e:  # sys.exit(n), sys.exit("message") and argparse's exit 2, as the interpreter reads them
                    if e.code is None or isinstance(e.code, int):
                        code = e.code or 0
                    else:
                        print(e.code, file=sys.stderr)
                        code = 1
                except BaseException:  # noqa: BLE001 - what the interpreter would do: the traceback, exit 1
                    import traceback

                    traceback.print_exc()
                    code = 1
            finally:
                try:
                    logging.shutdown()  # what the interpreter does at exit: flush the tool's log files
                    sys.stdout.flush()
                    sys.stderr.flush()
                finally:
                    os._exit(code)
        deadline = time.monotonic() + timeout
        try:
            while True:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    break
                if time.monotonic() > deadline:
                    raise subprocess.TimeoutExpired(args, timeout)
                time.sleep(0.02)
        except BaseException:  # a timeout, or the test run interrupted: leave no child behind
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise
        returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = (f.read().decode(errors="replace") for f in (out, err))
    return subprocess.CompletedProcess([sys.executable, *args], returncode, stdout, stderr)


def load_tool(name: str):
    """``tools/<name>.py`` as a module, to call its ``main`` in this process (no fork, no new interpreter).

    Args:
        name: the script's name without ``.py`` (``"infer"``).
    """
    spec = importlib.util.spec_from_file_location(f"tool_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def one_error_line(err: str) -> str:
    """The one ``error: ...`` line a tool printed for a user's mistake; fails when there are other lines.

    Args:
        err: what the tool wrote to stderr.
    """
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def _interpreter_warnings(*, ignore: bool) -> None:
    """Warnings as a new interpreter shows them (pytest records them instead): on stderr, default filters."""
    warnings.resetwarnings()
    if ignore:
        warnings.simplefilter("ignore")
    else:
        for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
            warnings.simplefilter("ignore", category)
        warnings.filterwarnings("default", category=DeprecationWarning, module="__main__")
    warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: sys.stderr.write(
        warnings.formatwarning(message, category, filename, lineno, line))


def random_statistics(model: nn.Module, seed: int = 0, *, affine: bool = False) -> nn.Module:
    """Give every BatchNorm statistics like a trained network's, in place; returns ``model``.

    Non-trivial running statistics show a checkpoint or an export that dropped or mangled
    them; activations neither vanish nor explode over 34 layers.

    Args:
        model: any module; its ``BatchNorm2d`` and ``FrozenBatchNorm2d`` layers are changed.
        seed: the generator's seed (the same seed gives the same numbers).
        affine: also draw the scale and shift (``weight``, ``bias``).
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)):
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) * 0.2 - 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 0.4 + 0.8)
                if affine:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 0.4 + 0.6)
                    m.bias.copy_(torch.rand(m.bias.shape, generator=g) * 0.2 - 0.1)
    return model


def json_lines(path: Path) -> list[dict]:
    """The JSON objects of a ``*.jsonl`` file, one a line."""
    import json

    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


def records(out: Path) -> list[dict]:
    """A run folder's ``metrics.jsonl`` records."""
    return json_lines(Path(out) / "metrics.jsonl")


def small_detector(arch: str, depth: int = 18) -> nn.Module:
    """A small random detector in eval mode, deterministic per depth: 4 classes, 96-128 px, 64-channel pyramid,
    every box kept (score threshold 0) and at most 20 detections; BatchNorm statistics random (``random_statistics``)."""
    from detection import build_detector

    torch.manual_seed(depth)
    kwargs = dict(num_classes=4, min_size=96, max_size=128, out_channels=64)
    if arch in ("faster_rcnn", "mask_rcnn"):
        kwargs.update(representation_size=128, rpn_pre_nms_top_n_test=200, rpn_post_nms_top_n_test=40,
                      box_score_thresh=0.0, box_detections_per_img=20)
    else:
        kwargs.update(score_thresh=0.0, detections_per_img=20, topk_candidates=50)
    return random_statistics(build_detector(arch, backbone=f"resnet{depth}", **kwargs)).eval()
