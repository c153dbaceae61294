"""Fixtures shared by the test files."""

from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True)
def _no_console_handler_left_behind():
    """A tool run in-process leaves its console handler on this test's captured stderr, closed once
    the test ends; the next record logged in this worker would print a "Logging error" there."""
    yield
    from engine.logs import setup_logging

    setup_logging(console=False)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private data cache (``RESFPN_CACHE``) for this test: generated sets land in its tmp_path."""
    monkeypatch.setenv("RESFPN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def one_thread():
    """One intra-op thread: faster for tiny tensors, and it does not fight other processes for the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _session_dir(tmp_path_factory) -> Path:
    """A folder every pytest-xdist worker of this run shares (this process's own without xdist)."""
    import os

    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def overfit_detector(tmp_path_factory):
    """A small Faster R-CNN overfitted on two 96-px shapes images, trained once for the whole run.

    80 AdamW steps give it confident detections (scores >= 0.5), which the fast path, the
    exported files and the CUDA checks must keep. It is shared: a test that changes it works
    on ``copy.deepcopy(overfit_detector.model)``. Under pytest-xdist one worker trains it and
    the others load its weights (a file lock; ``filelock`` comes with torch), which saves each
    of them half a minute of training.

    Returns:
        ``model`` (eval mode, CPU), ``images`` (the two training images, CHW in [0, 1]) and
        ``root``: the shapes data set (``train`` = those two images, ``val`` = two more).
    """
    from types import SimpleNamespace

    from filelock import FileLock

    from detection import build_detector
    from detection.data import CocoDetection, collate_fn
    from engine import shapes

    shared = _session_dir(tmp_path_factory) / "overfit_detector"
    shared.mkdir(exist_ok=True)
    weights = shared / "weights.pt"
    with FileLock(str(shared / "lock")):
        root = shared / "shapes"
        if not weights.is_file():  # the first worker here; later ones must not rewrite files other tests may be reading
            shapes.generate(root, num_train=2, num_val=2, image_size=96, seed=1)
        data = CocoDetection(root, "train")
        images, targets = collate_fn([data[i] for i in range(len(data))])
        torch.manual_seed(0)
        model = build_detector("faster_rcnn", num_classes=data.num_classes, min_size=96, max_size=96, returned_layers=[2, 3, 4],
                               out_channels=64, representation_size=256)
        if weights.is_file():
            model.load_state_dict(torch.load(weights, weights_only=True))
        else:
            opt = torch.optim.AdamW(model.parameters(), 1e-3)
            # Two threads whatever the machine: the summation order follows the thread count, and the tests' margins
            # (bf16 keeps every confident detection at IoU 0.95) were set on this model; one thread trains a slightly
            # different one that misses 1 of 12.
            threads = torch.get_num_threads()
            torch.set_num_threads(2)
            try:
                for _ in range(80):
                    loss = sum(model(images, targets).values())
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
            finally:
                torch.set_num_threads(threads)
            torch.save(model.state_dict(), weights)
    return SimpleNamespace(model=model.eval(), images=list(images), root=root)


def pytest_configure(config):
    """Under pytest-xdist, each worker takes its share of the cores rather than all of them.

    With every worker running torch's default (one thread per core), two workers on two
    cores ran each test about 1.4x slower than alone; a tool a test starts gets one thread
    anyway (``helpers.tool_env``).
    """
    import os

    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(workers)))
