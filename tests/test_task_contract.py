"""One contract, every task: the same public names, the same training-state file, and the runner's promises
(iteration-exact resume, non-finite losses skipped then stopped, hooks) proved once for detection,
classification and segmentation alike."""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image

from engine import runner
from helpers import json_lines
from engine.config import apply_overrides, load_config

CONTRACT = ("TASK", "train", "preflight", "evaluate", "format_metrics", "save_model", "load_model")


def _detection_cfg(tmp_path: Path, out: Path, *flags: str) -> dict:
    from detection.config import DETECTION

    tiny = ["shapes_train=8", "shapes_val=4", "shapes_size=64", "min_size=64", "max_size=64", "log_period=1", "workers=0",
            "warmup_iters=2", "batch_size=2", "num_vis=0", "epochs=2"]
    cfg = load_config("shapes_faster_rcnn_r18_fpn", schema=DETECTION)
    return apply_overrides(cfg, [*tiny, *flags], schema=DETECTION, output_dir=str(out), device="cpu")


def _image_folder(root: Path) -> Path:
    if not root.is_dir():
        for split, count in (("train", 6), ("val", 2)):
            for c, name in enumerate(("cat", "dog", "fox")):
                for i in range(count):
                    pixels = np.random.default_rng(hash((split, c, i)) % 2**32).integers(0, 60, size=(24, 24, 3), dtype=np.uint8)
                    pixels[..., c] += 180
                    (root / split / name).mkdir(parents=True, exist_ok=True)
                    Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    return root


def _classification_cfg(tmp_path: Path, out: Path, *flags: str) -> dict:
    from classification import CLASSIFICATION

    tiny = ["train_crop_size=32", "val_resize_size=36", "val_crop_size=32", "batch_size=4", "workers=0", "epochs=2",
            "log_period=1", "lr=0.01", "warmup_epochs=0.5"]
    return apply_overrides(load_config(None, schema=CLASSIFICATION), [*tiny, *flags], schema=CLASSIFICATION,
                           data_path=str(_image_folder(tmp_path / "folder")), output_dir=str(out), device="cpu")


def _segmentation_cfg(tmp_path: Path, out: Path, *flags: str) -> dict:
    from segmentation.config import SEGMENTATION

    tiny = ["shapes_train=8", "shapes_val=4", "shapes_size=64", "crop_size=64", "batch_size=4", "val_batch_size=4", "workers=0",
            "log_period=1", "warmup_iters=2", "num_vis=0", "amp=false", "channels_last=false", "epochs=2",
            "model_kwargs={fpn_channels: 32, head_channels: 32}"]
    cfg = load_config("seg_shapes_semantic_fpn_r18", schema=SEGMENTATION)
    return apply_overrides(cfg, [*tiny, *flags], schema=SEGMENTATION, output_dir=str(out), device="cpu")


@dataclass(frozen=True)
class Case:
    package: str
    cfg: Callable[..., dict]
    #: what a training state holds: the task's model record and the runner's keys (the file format, pinned).
    state_keys: frozenset[str]

    @property
    def module(self):
        return importlib.import_module(self.package)


_RUNNER_KEYS = {"format_version", "optimizer", "scheduler", "scaler", "epoch", "iteration", "config"}
CASES = {
    "detection": Case("detection", _detection_cfg, frozenset(_RUNNER_KEYS | {"model", "build_args", "category_mapping"})),
    "classification": Case("classification", _classification_cfg, frozenset(_RUNNER_KEYS | {"model", "arch", "classes", "model_ema"})),
    "segmentation": Case("segmentation", _segmentation_cfg, frozenset(_RUNNER_KEYS | {"model", "build_args", "class_names"})),
}


@pytest.fixture(params=sorted(CASES))
def case(request, tmp_path, monkeypatch) -> Case:
    monkeypatch.setenv("RESFPN_CACHE", str(tmp_path / "cache"))
    torch.set_num_threads(1)
    return CASES[request.param]


def test_every_task_package_has_the_contracts_names(case):
    module = case.module
    missing = [name for name in CONTRACT if not hasattr(module, name)]
    assert not missing, f"{case.package} lacks {missing}"
    task = module.TASK
    assert isinstance(task, runner.Task) and task.tool.startswith("tools/train_") and set(task.model_keys)
    for name in CONTRACT[1:]:
        assert callable(getattr(module, name)), name


def test_resume_mid_epoch_sees_exactly_the_batches_and_rates_of_an_uninterrupted_run(case, tmp_path):
    module = case.module
    flags = ("log_batches=true", "eval_period=0", "checkpoint_period=1")
    total = module.train(case.cfg(tmp_path, tmp_path / "straight", *flags), progress=False)["iteration"]
    # The uninterrupted run itself: two whole epochs, the first one the sampler's batches in its order.
    probe = runner.setup_run(case.cfg(tmp_path, tmp_path / "probe", *flags), progress=False)
    data = module.TASK.build_data(probe.cfg, probe)
    per_epoch = data.iters_per_epoch
    data.sampler.set_epoch(0)
    sampled = [list(map(int, b)) for b in data.batch_sampler][:per_epoch]
    assert total == 2 * per_epoch
    assert [r["indices"] for r in json_lines(tmp_path / "straight" / "batches.jsonl")[:per_epoch]] == sampled
    stop = max(per_epoch // 2, 1)  # inside the first epoch
    module.train(case.cfg(tmp_path, tmp_path / "resumed", *flags, f"max_iters={stop}"), progress=False)
    state = module.TASK.read_checkpoint(tmp_path / "resumed" / "checkpoint.pth")
    assert state["iteration"] == stop and state["epoch"] == 0 and set(state) == case.state_keys
    # An interruption after the checkpoint leaves records of an iteration that resuming redoes.
    for name, extra in (("batches.jsonl", {"epoch": 0, "indices": [-1]}), ("metrics.jsonl", {"loss": 9.0, "lr": 9.0})):
        with open(tmp_path / "resumed" / name, "a") as f:
            f.write(json.dumps({"iter": stop + 1, **extra}) + "\n" + '{"iter": ')
    assert module.train(case.cfg(tmp_path, tmp_path / "resumed", *flags), resume=True, progress=False)["iteration"] == total
    seen, expected = json_lines(tmp_path / "resumed" / "batches.jsonl"), json_lines(tmp_path / "straight" / "batches.jsonl")
    assert [r["iter"] for r in seen] == list(range(1, total + 1)) and seen == expected
    first_epoch = [i for r in seen[:per_epoch] for i in r["indices"]]
    assert len(first_epoch) == len(set(first_epoch))  # no sample twice in the resumed epoch
    steps = [r["iter"] for r in json_lines(tmp_path / "resumed" / "metrics.jsonl") if "lr" in r]
    assert steps == sorted(set(steps))  # the records past the checkpoint were dropped, not kept beside the redone ones
    rates = {r["iter"]: r["lr"] for r in json_lines(tmp_path / "resumed" / "metrics.jsonl") if "lr" in r}
    assert rates == pytest.approx({r["iter"]: r["lr"] for r in json_lines(tmp_path / "straight" / "metrics.jsonl") if "lr" in r})
    assert "resumed from" in (tmp_path / "resumed" / "log.txt").read_text()


class _Poisoned(torch.nn.Module):
    """The task's loss module, whose losses turn NaN after ``good`` steps."""

    def __init__(self, inner: torch.nn.Module, good: int) -> None:
        super().__init__()
        self.inner, self.good, self.calls, self.term = inner, good, 0, None

    def forward(self, inputs, targets):
        self.calls += 1
        losses = self.inner(inputs, targets)
        if self.calls > self.good:
            self.term = sorted(losses)[0]
            losses = {**losses, self.term: losses[self.term] * float("nan")}
        return losses


def test_nonfinite_losses_are_skipped_then_stop_naming_the_term_and_the_last_good_checkpoint(case, tmp_path, monkeypatch):
    task = case.module.TASK
    build = task.build_model
    made = []

    def poisoned(cfg, run, data):
        model, loss_model = build(cfg, run, data)
        made.append(_Poisoned(loss_model, good=3))
        return model, made[-1]

    monkeypatch.setattr(task, "build_model", poisoned)
    out = tmp_path / "nan"
    with pytest.raises(runner.NonFiniteLossError, match=rf"3 non-finite losses in a row.*in loss.*last good checkpoint is {out / 'checkpoint.pth'} \(iteration 2\)"):
        case.module.train(case.cfg(tmp_path, out, "max_nonfinite=3", "epochs=4", "max_iters=8", "checkpoint_period=2", "eval_period=0"), progress=False)
    assert task.read_checkpoint(out / "checkpoint.pth")["iteration"] == 2
    log = (out / "log.txt").read_text()
    term = made[0].term
    assert f"non-finite loss at iteration 3 in {term}; step skipped (1 in a row)" in log and log.count("non-finite loss at iteration") == 3
    assert f"not writing {out / 'checkpoint.pth'} at iteration 4" in log


def test_a_model_file_is_not_a_training_state(case, tmp_path):
    module = case.module
    module.train(case.cfg(tmp_path, tmp_path / "run", "max_iters=1", "eval_period=0"), progress=False)
    final = tmp_path / "run" / "model_final.pth"
    model = module.load_model(final)
    assert isinstance(model, torch.nn.Module) and not model.training
    with pytest.raises(Exception, match=r"lacks \['optimizer', 'scheduler'"):
        module.TASK.read_checkpoint(final)
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        module.preflight(case.cfg(tmp_path, tmp_path / "fresh"), resume=True)
