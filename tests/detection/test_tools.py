"""Training and evaluation tools end to end, on a tiny shapes set, as users run them."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from engine.files import atomic_save

from detection import load_detector
from detection.checkpoint import read_checkpoint
from detection.config import apply_overrides, load_config
from detection.training import train
from helpers import REPO, run_tool, tool_env

TINY = [
    "shapes_train=8", "shapes_val=4", "shapes_size=64", "min_size=64", "max_size=64",
    "log_period=1", "workers=0", "warmup_iters=2",
]


def _run(args: list[str], cache: Path, timeout: int = 240, fresh: bool = False) -> subprocess.CompletedProcess:
    return run_tool(args, cache=cache, timeout=timeout, fresh=fresh)


def _tiny_cfg(out: Path, *extra: str, **flags) -> dict:
    cfg = load_config(REPO / "configs" / "shapes_faster_rcnn_r18_fpn.yaml")
    return apply_overrides(cfg, [*TINY, *extra], output_dir=str(out), device="cpu", batch_size=2, **flags)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One CLI training run shared by the tests that only read its outputs."""
    cache = tmp_path_factory.mktemp("cache")
    out = tmp_path_factory.mktemp("run")
    proc = _run(["tools/train_det.py", "--backbone", "resnet18", "--output-dir", str(out), "--max-iters", "3",
                 "--batch-size", "2", "--device", "cpu", "--no-progress", "--set", *TINY, "checkpoint_period=2"], cache, fresh=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, cache, proc


def test_train_cli_writes_every_output(trained):
    out, _, proc = trained
    for name in ("config.yaml", "log.txt", "metrics.jsonl", "checkpoint.pth", "model_final.pth", "metrics.json",
                 "detections_bbox.json", "curves.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert len(list((out / "vis").glob("*.png"))) == 4
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_recs = [r for r in records if "loss" in r]
    assert [r["iter"] for r in train_recs] == [1, 2, 3]
    assert all(r["loss"] > 0 and r["lr"] > 0 and "loss_classifier" in r for r in train_recs)
    assert "bbox/AP" in records[-1]
    ckpt = read_checkpoint(out / "checkpoint.pth")
    assert ckpt["iteration"] == 3 and ckpt["config"]["max_iters"] == 3
    assert set(ckpt) >= {"model", "optimizer", "scheduler", "scaler", "epoch", "iteration", "config", "build_args", "category_mapping"}
    assert ckpt["category_mapping"]["names"][:2] == ["circle", "square"]
    assert "bbox/AP" in proc.stdout
    assert load_detector(out / "model_final.pth").build_args["arch"] == "faster_rcnn"


def test_eval_cli_matches_pycocotools_directly(trained, tmp_path):
    out, cache, _ = trained
    proc = _run(["tools/eval_coco.py", "--checkpoint", str(out / "model_final.pth"), "--output-dir", str(tmp_path),
                 "--device", "cpu", "--workers", "0", "--no-progress"], cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]" in proc.stdout
    assert "category" in proc.stdout and "circle" in proc.stdout
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics) == {f"bbox/{k}" for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")}
    gt_file = next(cache.glob("shapes-*/annotations/instances_val.json"))
    dets = json.loads((tmp_path / "detections_bbox.json").read_text())
    assert dets and {d["category_id"] for d in dets} <= {c["id"] for c in json.loads(gt_file.read_text())["categories"]}
    gt = COCO(str(gt_file))
    ev = COCOeval(gt, gt.loadRes(str(tmp_path / "detections_bbox.json")), "bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    for i, k in enumerate(("AP", "AP50", "AP75", "APs", "APm", "APl")):
        expected = ev.stats[i] * 100 if ev.stats[i] >= 0 else None  # -1: no ground truth of that size
        assert metrics[f"bbox/{k}"] == (pytest.approx(expected, abs=1e-9) if expected is not None else None)


def test_infer_cli_draws_one_png_per_image(trained, tmp_path):
    out, cache, _ = trained
    images = next(cache.glob("shapes-*/val"))
    proc = _run(["tools/infer.py", "--checkpoint", str(out / "model_final.pth"), "--input", str(images),
                 "--output", str(tmp_path), "--device", "cpu", "--score-thresh", "0.0"], cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.glob("*.png")) == sorted(f"{p.name}.png" for p in images.glob("*.jpg"))
    dets = json.loads((tmp_path / "detections.json").read_text())
    assert len(dets) == 4 and all(isinstance(v, list) for v in dets.values())


@pytest.mark.parametrize(
    "args, message",
    [
        (["tools/train_det.py", "--backbone", "resnet50"], "invalid choice: 'resnet50'"),
        (["tools/train_det.py", "--data-path", "/nonexistent/coco"], "data path /nonexistent/coco does not exist"),
        (["tools/train_det.py", "--set", "lerning_rate=0.1"], "unknown config key 'lerning_rate'"),
        (["tools/train_det.py", "--config", "/nonexistent.yaml"], "config file not found"),
        (["tools/train_det.py", "--resume", "--output-dir", "/nonexistent/run"], "nothing to resume: no checkpoint at /nonexistent/run/checkpoint.pth"),
        (["tools/eval_coco.py", "--checkpoint", "/nonexistent.pth"], "checkpoint /nonexistent.pth not found"),
        (["tools/infer.py", "--checkpoint", "x.pth", "--input", "/nonexistent", "--output", "o"], "input /nonexistent does not exist"),
    ],
)
def test_bad_invocations_fail_fast(args, message, tmp_path):
    proc = _run(args, tmp_path, timeout=60)
    assert proc.returncode == 2
    assert message in proc.stderr


def test_unreadable_checkpoint_is_a_clear_error(tmp_path):
    bad = tmp_path / "model_final.pth"
    bad.write_bytes(b"\x00garbage")
    proc = _run(["tools/eval_coco.py", "--checkpoint", str(bad), "--device", "cpu"], tmp_path, timeout=60)
    assert proc.returncode == 2 and "could not read" in proc.stderr


def _optimizer_steps(ckpt: dict) -> set[int]:
    return {int(s["step"]) for s in ckpt["optimizer"]["state"].values()}


def test_resume_after_sigkill_continues_the_schedule(tmp_path, monkeypatch):
    monkeypatch.setenv("RESFPN_CACHE", str(tmp_path / "cache"))
    flags = ["--set", *TINY, "shapes_train=16", "epochs=2", "scheduler=multistep", "lr_steps=[1]"]
    args = ["tools/train_det.py", "--output-dir", str(tmp_path / "killed"), "--batch-size", "2", "--device", "cpu", "--no-progress",
            *flags, "checkpoint_period=1"]
    proc = subprocess.Popen([sys.executable, *args], cwd=REPO, env=tool_env(tmp_path / "cache"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpt_file = tmp_path / "killed" / "checkpoint.pth"
    deadline = time.time() + 180
    seen = None
    while time.time() < deadline:
        # Read the checkpoint (~180 MB with AdamW's state) only when a new one has been written.
        stamp = ckpt_file.stat().st_mtime_ns if ckpt_file.is_file() else None
        if stamp != seen and read_checkpoint(ckpt_file)["iteration"] >= 3:
            break
        seen = stamp
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stopped_at = read_checkpoint(ckpt_file)["iteration"]

    # Both runs write checkpoint.pth at each epoch's end only: what is compared is the final one.
    resumed = train(_tiny_cfg(tmp_path / "killed", *flags[1:]), resume=True, progress=False)
    straight = train(_tiny_cfg(tmp_path / "straight", *flags[1:]), progress=False)
    n = straight["iteration"]
    assert 3 <= stopped_at < n and resumed["iteration"] == n
    a, b = read_checkpoint(tmp_path / "killed" / "checkpoint.pth"), read_checkpoint(tmp_path / "straight" / "checkpoint.pth")
    assert a["iteration"] == b["iteration"] == n and a["epoch"] == b["epoch"] == 2
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"] == n
    # lr_steps=[1]: the decayed rate proves the resumed run kept the schedule's position.
    assert a["optimizer"]["param_groups"][0]["lr"] == pytest.approx(b["optimizer"]["param_groups"][0]["lr"])
    assert a["optimizer"]["param_groups"][0]["lr"] == pytest.approx(b["optimizer"]["param_groups"][0]["initial_lr"] * 0.1)
    assert _optimizer_steps(a) == _optimizer_steps(b) == {n}
    log = (tmp_path / "killed" / "log.txt").read_text()
    assert f"resumed from {tmp_path / 'killed' / 'checkpoint.pth'} at iteration {stopped_at}" in log


def test_interrupted_checkpoint_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pth"
    atomic_save({"iteration": 1, "w": torch.ones(3)}, path)

    def explode(obj, f, *args, **kwargs):
        f.write(b"partial bytes")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(torch, "save", explode)
    with pytest.raises(KeyboardInterrupt):
        atomic_save({"iteration": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    ckpt = read_checkpoint(path)
    assert ckpt["iteration"] == 1 and torch.equal(ckpt["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pth"]


# Mask R-CNN training and segm evaluation end to end: tests/detection/test_mask_recipe.py (a two-iteration run of the
# CLI, its segm detections decoded and its metrics); the default mask head training: tests/detection/test_models.py.


# Non-finite losses skipped, then the run stopped naming the term and the last good checkpoint:
# tests/test_task_contract.py, for every task.


def test_ddp_two_processes_train_and_evaluate_like_one(trained, tmp_path):
    out, cache, _ = trained
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29731"]
    proc = subprocess.run(
        [*torchrun, "tools/train_det.py", "--output-dir", str(tmp_path / "ddp"), "--max-iters", "2", "--batch-size", "1",
         "--device", "cpu", "--no-progress", "--set", *TINY],
        cwd=REPO, env=tool_env(cache), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = read_checkpoint(tmp_path / "ddp" / "checkpoint.pth")
    assert ckpt["iteration"] == 2
    assert (tmp_path / "ddp" / "metrics.json").is_file()

    # The same checkpoint evaluated by one process and by two gives identical metrics.
    single = _run(["tools/eval_coco.py", "--checkpoint", str(out / "model_final.pth"), "--output-dir", str(tmp_path / "e1"),
                   "--device", "cpu", "--workers", "0", "--no-progress"], cache)
    assert single.returncode == 0, single.stderr[-2000:]
    double = subprocess.run(
        [*torchrun, "tools/eval_coco.py", "--checkpoint", str(out / "model_final.pth"), "--output-dir", str(tmp_path / "e2"),
         "--device", "cpu", "--workers", "0", "--no-progress"],
        cwd=REPO, env=tool_env(cache), capture_output=True, text=True, timeout=300,
    )
    assert double.returncode == 0, double.stderr[-2000:]
    m1 = json.loads((tmp_path / "e1" / "metrics.json").read_text())
    m2 = json.loads((tmp_path / "e2" / "metrics.json").read_text())
    assert m1 == m2
    d1 = json.loads((tmp_path / "e1" / "detections_bbox.json").read_text())
    d2 = json.loads((tmp_path / "e2" / "detections_bbox.json").read_text())
    assert len(d1) == len(d2) > 0


def test_unreadable_training_images_are_skipped_counted_and_logged(tmp_path, monkeypatch):
    from engine import shapes

    root = shapes.generate(tmp_path / "data", num_train=8, num_val=2, image_size=64, seed=3)
    broken = sorted((root / "train").glob("*.jpg"))[:2]
    for path in broken:
        path.write_bytes(b"\xff\xd8 not really a jpeg")
    cfg = _tiny_cfg(tmp_path / "run", "epochs=2", "max_iters=null", f"data_path={root}", "train_split=train", "val_split=val")
    result = train(cfg, progress=False)
    assert result["iteration"] >= 8
    log = (tmp_path / "run" / "log.txt").read_text()
    assert "epoch 0: 2 samples fell back to another image, from 2 bad files: 2 unreadable image" in log
    assert log.count("samples fell back") == 1  # the same files in epoch 1: not said again
    # Each bad file is named once, however often it is drawn.
    assert all(log.count(f"skipping image {p}") == 1 for p in broken)


def test_amp_on_cpu_trains_in_bfloat16(tmp_path, monkeypatch):
    monkeypatch.setenv("RESFPN_CACHE", str(tmp_path / "cache"))
    seen = []
    original = torch.nn.Conv2d.forward

    def spy(self, x):
        out = original(self, x)
        seen.append(out.dtype)
        return out

    monkeypatch.setattr(torch.nn.Conv2d, "forward", spy)
    result = train(_tiny_cfg(tmp_path / "amp", "max_iters=2", "amp=true", "channels_last=true"), progress=False)
    assert result["iteration"] == 2
    assert torch.bfloat16 in seen
    records = [json.loads(line) for line in (tmp_path / "amp" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in records if "loss" in r)
