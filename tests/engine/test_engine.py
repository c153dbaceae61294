"""The shared runner's named steps with the detection task, each on its own, and resume proved by the batches it sees."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from backbones import resnet18
from detection import training
from detection.training import TASK
from engine import runner
from detection.checkpoint import read_checkpoint, read_training_state
from detection.config import apply_overrides, load_config
from helpers import REPO, records

TINY = [
    "shapes_train=16", "shapes_val=4", "shapes_size=64", "min_size=64", "max_size=64",
    "log_period=1", "workers=0", "warmup_iters=2", "batch_size=2", "num_vis=1",
]


def _cfg(out: Path, *extra: str) -> dict:
    cfg = load_config(REPO / "configs" / "shapes_faster_rcnn_r18_fpn.yaml")
    return apply_overrides(cfg, [*TINY, *extra], output_dir=str(out), device="cpu")


def test_setup_run_resolves_auto_device_and_records_it(tmp_path):
    cfg = apply_overrides(load_config(), [], output_dir=str(tmp_path / "run"), device="auto")
    run = runner.setup_run(cfg, progress=False)
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert run.device.type == expected and run.is_main and run.world == 1
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert f"device: {expected}" in saved and run.requested_device == "auto"


def test_build_data_plans_the_iterations(tmp_path, cache):
    run = runner.setup_run(_cfg(tmp_path / "run", "epochs=3", "max_iters=10"), progress=False)
    data = TASK.build_data(run.cfg, run)
    assert len(data.train_set) == 16 and len(data.val_set) == 4
    # 16 images in batches of 2, plus at most (groups - 1) split batches from aspect-ratio grouping.
    assert 8 <= data.iters_per_epoch <= 10
    assert data.total_iters == 3 * data.iters_per_epoch and data.stop_at == 10
    assert data.epoch_of(1) == 0 and data.epoch_of(data.iters_per_epoch) == 0 and data.epoch_of(data.iters_per_epoch + 1) == 1
    assert data.category_mapping["names"][:2] == ["circle", "square"]


def test_build_state_scales_lr_and_keeps_the_scaler_off_on_cpu(tmp_path, cache):
    run = runner.setup_run(_cfg(tmp_path / "run", "lr=0.004", "lr_reference_batch=4"), progress=False)
    data = TASK.build_data(run.cfg, run)
    state = runner.build_state(TASK, run.cfg, run, data)
    assert state.lr == pytest.approx(0.004 * 2 / 4)
    assert not state.scaler.is_enabled() and state.amp_dtype == torch.bfloat16 and state.iteration == 0
    trainable = {id(p) for p in state.model.parameters() if p.requires_grad}
    assert {id(p) for g in state.optimizer.param_groups for p in g["params"]} == trainable


def test_train_one_epoch_advances_logs_and_checkpoints(tmp_path, cache):
    run = runner.setup_run(_cfg(tmp_path / "run", "checkpoint_period=2", "max_iters=3"), progress=False)
    data = TASK.build_data(run.cfg, run)
    state = runner.build_state(TASK, run.cfg, run, data)
    metrics = runner.MetricsLog(run)
    runner.train_one_epoch(TASK, state, data, 0, run, metrics)
    assert state.iteration == 3  # stopped by max_iters inside the epoch
    recs = records(run.out)
    assert [r["iter"] for r in recs] == [1, 2, 3] and all(r["epoch"] == 0 for r in recs)
    assert all(r["loss"] > 0 and r["images_per_s"] > 0 for r in recs)
    assert read_training_state(run.out / "checkpoint.pth")["iteration"] == 2


def test_train_state_save_and_load_round_trip(tmp_path, cache):
    run = runner.setup_run(_cfg(tmp_path / "run", "max_iters=2"), progress=False)
    data = TASK.build_data(run.cfg, run)
    state = runner.build_state(TASK, run.cfg, run, data)
    runner.train_one_epoch(TASK, state, data, 0, run, runner.MetricsLog(run))
    TASK.save_checkpoint(state, data, run, tmp_path / "state.pth", epoch=0)
    fresh = runner.build_state(TASK, run.cfg, run, data)
    fresh.load(read_training_state(tmp_path / "state.pth"))
    assert fresh.iteration == 2 and fresh.scheduler.last_epoch == state.scheduler.last_epoch == 2
    for a, b in zip(state.model.state_dict().values(), fresh.model.state_dict().values()):
        assert torch.equal(a, b)
    sa, sb = state.optimizer.state_dict()["state"], fresh.optimizer.state_dict()["state"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k]["exp_avg"], sb[k]["exp_avg"]) for k in sa)


def test_resume_takes_this_runs_learning_rate_on_the_saved_schedule(tmp_path, cache):
    run = runner.setup_run(_cfg(tmp_path / "run", "max_iters=2", "lr=0.004", "lr_reference_batch=2"), progress=False)
    data = TASK.build_data(run.cfg, run)
    state = runner.build_state(TASK, run.cfg, run, data)
    runner.train_one_epoch(TASK, state, data, 0, run, runner.MetricsLog(run))
    TASK.save_checkpoint(state, data, run, tmp_path / "state.pth", epoch=0)
    lower = runner.setup_run(_cfg(tmp_path / "lower", "max_iters=2", "lr=0.001", "lr_reference_batch=2"), progress=False)
    fresh = runner.build_state(TASK, lower.cfg, lower, data)
    fresh.load(read_training_state(tmp_path / "state.pth"))
    # After a divergence the advice is "resume with a lower --lr": the lower rate must be the one that runs.
    scale = state.optimizer.param_groups[0]["lr"] / 0.004
    assert fresh.scheduler.last_epoch == 2 and scale < 1
    assert fresh.optimizer.param_groups[0]["lr"] == pytest.approx(0.001 * scale)
    # ... and stays this run's as the schedule goes on.
    for _ in range(3):
        state.scheduler.step()
        fresh.scheduler.step()
    assert fresh.optimizer.param_groups[0]["lr"] == pytest.approx(state.optimizer.param_groups[0]["lr"] * 0.001 / 0.004)


# Resume mid-epoch (the batches and rates of an uninterrupted run): tests/test_task_contract.py, for every task.


def test_resume_runs_an_epoch_end_evaluation_the_stop_cut_short_once(tmp_path, cache):
    import shutil

    flags = ("epochs=2", "eval_period=1", "num_vis=0", "shapes_train=8")
    probe = runner.setup_run(_cfg(tmp_path / "probe", *flags), progress=False)
    per_epoch = TASK.build_data(probe.cfg, probe).iters_per_epoch
    assert training.train(_cfg(tmp_path / "a", *flags, f"max_iters={per_epoch}"), progress=False)["iteration"] == per_epoch
    assert runner.eval_due(probe.cfg, per_epoch, per_epoch, 2 * per_epoch) and not runner.eval_due(probe.cfg, per_epoch - 1, per_epoch, 2 * per_epoch)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    # "a": stopped during the evaluation after the epoch's checkpoint (its record never written).
    kept = [r for r in records(tmp_path / "a") if "bbox/AP" not in r]
    (tmp_path / "a" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    for run in ("a", "b"):
        training.train(_cfg(tmp_path / run, *flags), resume=True, progress=False)
        evals = [r["iter"] for r in records(tmp_path / run) if "bbox/AP" in r]
        assert evals == [per_epoch, 2 * per_epoch], (run, evals)
    assert "did not finish before the run stopped" in (tmp_path / "a" / "log.txt").read_text()
    assert "did not finish before the run stopped" not in (tmp_path / "b" / "log.txt").read_text()


def test_a_fresh_run_in_a_used_folder_starts_its_ownrecords(tmp_path):
    run = runner.setup_run(_cfg(tmp_path / "run"), progress=False)
    old = [{"iter": i, "loss": 1.0} for i in (1, 2, 3)]
    for name in runner.RECORD_FILES:
        (run.out / name).write_text("".join(json.dumps(r) + "\n" for r in old))
    runner.MetricsLog(run, resumed_at=2).close()
    assert [r["iter"] for r in records(run.out)] == [1, 2]
    runner.MetricsLog(run).close()
    assert not any((run.out / name).exists() for name in runner.RECORD_FILES)


# The epoch of every record under max_iters: tests/detection/test_own_data.py (test_metrics_epoch_under_max_iters_and_parameter_counts),
# the same run with the parameter counts checked too.


def test_model_final_is_written_before_the_final_evaluation(tmp_path, cache, monkeypatch):
    def broken(*args, **kwargs):
        raise KeyError("iscrowd")

    monkeypatch.setattr(training, "evaluate", broken)
    with pytest.raises(training.EvaluationError, match=r"KeyError: 'iscrowd'.*model_final.pth.*tools/eval_coco.py --checkpoint"):
        training.train(_cfg(tmp_path / "run", "max_iters=2"), progress=False)
    ckpt = read_checkpoint(tmp_path / "run" / "model_final.pth")
    assert ckpt["iteration"] == 2 and ckpt["category_mapping"]["names"][0] == "circle"


def test_log_file_gets_the_load_report_once_and_parameter_counts(tmp_path, cache):
    weights = tmp_path / "trunk.pth"
    torch.save({"state_dict": resnet18(num_classes=7).state_dict()}, weights)
    training.train(_cfg(tmp_path / "run", "max_iters=1", f"weights_backbone={weights}"), progress=False)
    log = (tmp_path / "run" / "log.txt").read_text()
    assert log.count(f"tensors from {weights}") == 1
    assert "skipped 2 (classifier with another class count)" in log
    assert "parameters" in log and "trainable" in log
    # No handler is left behind on the package loggers after train() returns.
    assert not [h for h in logging.getLogger("detection").handlers if getattr(h, "_resfpn_handler", None) == "file"]


def test_preflight_rejects_bad_inputs_before_any_work(tmp_path):
    from backbones.weights import WeightsError
    from detection.checkpoint import CheckpointError
    from engine.datasets import DataPathError

    with pytest.raises(DataPathError, match="data path .* does not exist"):
        training.preflight(_cfg(tmp_path / "run", f"data_path={tmp_path / 'nope'}"))
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="could not read"):
        training.preflight(_cfg(tmp_path / "run", f"weights_backbone={bad}"))
    final = tmp_path / "model_final.pth"
    torch.save({"model": {}, "build_args": {}}, final)
    with pytest.raises(CheckpointError, match=r"not a training checkpoint.*lacks \['optimizer'"):
        training.preflight(_cfg(tmp_path / "run"), resume=final)
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        training.preflight(_cfg(tmp_path / "run"), resume=True)
    assert not (tmp_path / "run").exists()


def test_preflight_finds_the_imagenet_file_before_any_work(tmp_path, monkeypatch):
    from backbones.weights import WeightsError, imagenet_cache_path

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(WeightsError, match=r"ResNet-34 are not cached\. Put resnet34-b627a593\.pth .*no network"):
        training.preflight(_cfg(tmp_path / "run", "backbone=resnet34", "weights_backbone=imagenet"))
    assert not (tmp_path / "run").exists()
    imagenet_cache_path(34).parent.mkdir(parents=True, exist_ok=True)
    imagenet_cache_path(34).write_bytes(b"present")  # preflight checks presence; loading verifies the hash
    assert training.preflight(_cfg(tmp_path / "run", "backbone=resnet34", "weights_backbone=imagenet"))["backbone"] == "resnet34"


class _Recorder(runner.Hook):
    def __init__(self, events: list) -> None:
        self.events = events

    def before_train(self, state, data, run):
        self.events.append(("before_train", state.iteration))

    def after_step(self, state, data, run, epoch):
        self.events.append(("step", state.iteration))

    def after_checkpoint(self, state, data, run, path):
        assert path.is_file()
        self.events.append(("checkpoint", state.iteration))

    def after_evaluation(self, state, data, run, metrics):
        self.events.append(("evaluation", state.iteration, "bbox/AP" in metrics))

    def after_train(self, state, data, run, final):
        self.events.append(("after_train", state.iteration))


def test_hooks_see_every_event_in_order_task_hooks_first(tmp_path, cache, monkeypatch):
    events: list = []
    # A task's own hooks run before the user's.
    monkeypatch.setattr(TASK, "hooks", lambda cfg, run: [_Recorder(events)], raising=False)
    user: list = []
    result = training.train(_cfg(tmp_path / "run", "max_iters=3", "checkpoint_period=2", "num_vis=0"), progress=False,
                            hooks=[_Recorder(user)])
    assert result["iteration"] == 3
    expected = [("before_train", 0), ("step", 1), ("step", 2), ("checkpoint", 2), ("step", 3), ("checkpoint", 3),
                ("evaluation", 3, True), ("after_train", 3)]
    assert events == expected and user == expected


def test_the_runner_reads_only_config_keys_that_RUN_declares():
    import ast

    from engine.config import RUN

    read = set()
    for path in (REPO / "engine" / "runner").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, str):
                target = node.value
                if (isinstance(target, ast.Name) and target.id == "cfg") or (isinstance(target, ast.Attribute) and target.attr == "cfg"):
                    read.add(node.slice.value)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get":
                owner = node.func.value
                assert not ((isinstance(owner, ast.Name) and owner.id == "cfg") or (isinstance(owner, ast.Attribute) and owner.attr == "cfg")), (
                    f"{path.name}:{node.lineno} reads cfg.get(...): a key the runner reads is declared in RUN and read as cfg[key]")
    assert {"warmup_iters", "warmup_epochs", "norm_weight_decay", "clip_grad_norm", "max_nonfinite"} <= read
    assert read <= set(RUN.defaults), sorted(read - set(RUN.defaults))


class _SteppedLoss(torch.nn.Module):
    """A loss model over a tiny linear layer whose loss is non-finite when its input is ``"bad"``."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs, targets):
        loss = (self.model(torch.full((4, 3), 100.0)) - targets).pow(2).mean()
        return {"loss_a": loss * float("nan") if inputs == "bad" else loss}


def _step_state(lr: float = 0.0):
    # Only what guarded_step reads: the models, optimizer, scaler and autocast settings.
    from types import SimpleNamespace

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    return SimpleNamespace(model=model, train_model=_SteppedLoss(model), optimizer=optimizer, amp=False, amp_dtype=torch.bfloat16,
                           scaler=torch.amp.GradScaler("cpu", enabled=False), iteration=0)


def _grad_norm(model: torch.nn.Module) -> float:
    return float(torch.cat([p.grad.flatten() for p in model.parameters()]).norm())


def test_a_clipped_step_leaves_gradients_within_the_limit():
    target = torch.zeros(4, 2)
    unclipped = _step_state()
    runner.guarded_step(unclipped, {"clip_grad_norm": 0.0, "max_nonfinite": 3}, "good", target, 0, device_type="cpu")
    assert _grad_norm(unclipped.model) > 10  # the loss is steep: clipping has something to do
    clipped = _step_state()
    terms, bad = runner.guarded_step(clipped, {"clip_grad_norm": 1.0, "max_nonfinite": 3}, "good", target, 0, device_type="cpu")
    assert terms is not None and bad == 0
    assert _grad_norm(clipped.model) <= 1.0 + 1e-4, f"gradient norm {_grad_norm(clipped.model):.3g} after a step clipped at 1.0"


def test_a_good_step_resets_the_non_finite_count():
    state, cfg, target = _step_state(lr=1e-6), {"clip_grad_norm": 0.0, "max_nonfinite": 2}, torch.zeros(4, 2)
    bad = 0
    for inputs in ["bad", "good", "bad", "good", "bad", "good"]:  # never two bad steps in a row: the run goes on
        terms, bad = runner.guarded_step(state, cfg, inputs, target, bad, device_type="cpu")
        assert (terms is None) == (inputs == "bad")
        assert bad == (1 if inputs == "bad" else 0), f"after a {inputs} step the non-finite count is {bad}"
    _, bad = runner.guarded_step(state, cfg, "bad", target, bad, device_type="cpu")
    with pytest.raises(runner.NonFiniteLossError, match="2 non-finite losses in a row"):  # two in a row stop it
        runner.guarded_step(state, cfg, "bad", target, bad, device_type="cpu")
