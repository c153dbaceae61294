"""Recipes: every key is known, flags and --set override, the schedule is what it says."""

import math

import pytest
import torch
import yaml

from detection.config import DEFAULTS, ConfigError, apply_overrides, load_config
from detection.engine import build_scheduler
from pathlib import Path

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_recipe_loads(path):
    cfg = load_config(path)
    assert set(cfg) == set(DEFAULTS)


def test_coco_1x_recipe_is_the_standard_one():
    cfg = load_config(Path(__file__).resolve().parent.parent / "configs" / "faster_rcnn_r18_fpn_1x_coco.yaml")
    assert (cfg["epochs"], cfg["lr"], cfg["lr_reference_batch"], cfg["lr_steps"]) == (12, 0.02, 16, [8, 11])
    assert (cfg["momentum"], cfg["weight_decay"], cfg["warmup_iters"]) == (0.9, 1e-4, 500)
    assert (cfg["min_size"], cfg["max_size"], cfg["augment"], cfg["weights_backbone"], cfg["trainable_layers"]) == (800, 1333, "hflip", "imagenet", 3)


def test_overrides_and_errors(tmp_path):
    cfg = apply_overrides(load_config(), ["lr=0.01", "lr_steps=[3, 4]", "weights_backbone=null"], epochs=5, device=None)
    assert cfg["lr"] == 0.01 and cfg["lr_steps"] == [3, 4] and cfg["epochs"] == 5 and cfg["device"] == DEFAULTS["device"]
    with pytest.raises(ConfigError, match=r"unknown config key 'lr_stpes'.*did you mean lr_steps"):
        apply_overrides(cfg, ["lr_stpes=[1]"])
    with pytest.raises(ConfigError, match="expects key=value"):
        apply_overrides(cfg, ["lr"])
    with pytest.raises(ConfigError, match=r"optimizer must be one of \['sgd', 'adamw'\], got 'adam'"):
        apply_overrides(cfg, ["optimizer=adam"])
    with pytest.raises(ConfigError, match="batch_size must be a positive integer, got 0"):
        apply_overrides(cfg, ["batch_size=0"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: 3\nleraning_rate: 1\n")
    with pytest.raises(ConfigError, match="unknown config key 'leraning_rate'"):
        load_config(bad)
    bad.write_text("epochs: [1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def _lrs(cfg, iters_per_epoch, total):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, cfg, iters_per_epoch, total)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_warmup_then_multistep():
    cfg = dict(DEFAULTS, warmup_iters=10, warmup_factor=0.001, lr_steps=[2, 3], lr_gamma=0.1, scheduler="multistep")
    lrs = _lrs(cfg, iters_per_epoch=20, total=80)
    assert lrs[0] == pytest.approx(0.001)
    assert lrs[5] == pytest.approx(0.001 * 0.5 + 0.5)
    assert lrs[10] == pytest.approx(1.0) and lrs[39] == pytest.approx(1.0)
    assert lrs[40] == pytest.approx(0.1) and lrs[59] == pytest.approx(0.1)
    assert lrs[60] == pytest.approx(0.01)


def test_cosine_ends_near_zero():
    cfg = dict(DEFAULTS, warmup_iters=0, scheduler="cosine")
    lrs = _lrs(cfg, iters_per_epoch=10, total=100)
    assert lrs[0] == pytest.approx(1.0)
    assert lrs[50] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lrs[-1] < 0.001
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_saved_config_round_trips(tmp_path):
    from detection.config import save_config

    cfg = apply_overrides(load_config(), ["model_kwargs={box_batch_size_per_image: 64}"])
    save_config(cfg, tmp_path / "config.yaml")
    assert yaml.safe_load((tmp_path / "config.yaml").read_text()) == cfg
    assert load_config(tmp_path / "config.yaml") == cfg
