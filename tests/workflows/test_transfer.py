"""The pretrained-trunk demo (make pretrain-demo) end to end on tiny data: both arms, the summary and the figure."""

from __future__ import annotations

import json

import pytest

from workflows.transfer import ARMS, run_transfer_demo
from helpers import REPO


DET = ["shapes_train=6", "shapes_val=2", "shapes_size=64", "min_size=64", "max_size=64", "workers=0", "batch_size=2",
       "max_iters=2", "epochs=1", "num_vis=0", "warmup_iters=1"]
CLS = ["shapes_train=6", "shapes_val=2", "shapes_size=64", "shapes_crop_size=32", "train_crop_size=32", "val_resize_size=36",
       "val_crop_size=32", "batch_size=4", "workers=0", "epochs=1", "max_iters=2"]


pytestmark = pytest.mark.usefixtures("one_thread")


def test_both_arms_run_and_are_timed_from_their_start(tmp_path, monkeypatch):
    monkeypatch.setenv("RESFPN_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    scratch_set = [o for o in DET if o != "epochs=1"]
    summary = run_transfer_demo(out, scratch_set=scratch_set, pretrain_set=CLS, finetune_set=DET, progress=False)
    assert set(summary) == set(ARMS) == {"scratch", "pretrained"}
    pre = summary["pretrained"]
    assert set(pre["phases"]) == {"generate_crops", "pretrain", "detection"}
    assert pre["seconds"] == pytest.approx(sum(p["seconds"] for p in pre["phases"].values()), rel=1e-6)
    assert pre["pretrain_seconds"] < pre["seconds"] and pre["cpu_seconds"] > pre["phases"]["detection"]["cpu_seconds"] > 0
    # The fine-tuning's one evaluation lies after the pretraining on the arm's clock.
    assert len(pre["curve"]) == 1 and pre["pretrain_seconds"] < pre["curve"][0]["seconds"] <= pre["seconds"]
    assert len(summary["scratch"]["curve"]) == 1 and 0 < summary["scratch"]["curve"][0]["seconds"] <= summary["scratch"]["seconds"]
    # The scratch arm's longer schedule (equal time) applies; the user's overrides come after it.
    assert "epochs: 7" in (out / "scratch" / "config.yaml").read_text()
    assert run_transfer_demo(out, arms=["scratch"], scratch_set=DET, progress=False)["scratch"]["curve"][0]["iter"] == 2
    assert "epochs: 1" in (out / "scratch" / "config.yaml").read_text()
    assert (out / "finetune" / "model_final.pth").is_file() and (out / "pretrain" / "model_final.pth").is_file()
    log = (out / "finetune" / "log.txt").read_text()
    assert f"loaded 100 tensors from {out / 'pretrain' / 'model_final.pth'}" in log and "skipped 2 (classifier" in log
    saved = (out / "finetune" / "config.yaml").read_text()
    assert "trainable_layers: 3" in saved and "norm: frozen_bn" in saved
    table = (out / "summary.md").read_text()
    assert table.count("\n") == 4 and "| scratch | - |" in table and "| pretrained |" in table
    assert (out / "transfer.png").stat().st_size > 10_000
    assert json.loads((out / "summary.json").read_text())["pretrained"]["crops"]["train"]["background"] > 0


def test_the_tools_arm_choices_are_the_demos_arms():
    import importlib.util

    spec = importlib.util.spec_from_file_location("pretrain_demo", REPO / "tools" / "pretrain_demo.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.ARM_NAMES == list(ARMS)
    assert tool.parse_args([]).arms == list(ARMS)


def test_a_bad_override_is_an_error_before_anything_is_written(tmp_path):
    from detection.config import ConfigError

    for kwargs in ({"scratch_set": ["lr=fast"]}, {"pretrain_set": ["epochs=0"]}, {"finetune_set": ["trainable_layers=9"]}):
        with pytest.raises(ConfigError):
            run_transfer_demo(tmp_path / "demo", progress=False, **kwargs)
    assert not (tmp_path / "demo").exists()
    with pytest.raises(ValueError, match="arms must be among"):
        run_transfer_demo(tmp_path / "demo", arms=["both"], progress=False)
