"""Recipes: every key is known, flags and --set override, the schedule is what it says."""

import math

import pytest
import torch
import yaml

from detection.config import DEFAULTS, ConfigError, apply_overrides, load_config
from engine.runner import build_scheduler
from helpers import REPO

ALL_CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
CONFIGS = [p for p in ALL_CONFIGS if not p.name.startswith(("cls_", "seg_"))]
CLS_CONFIGS = [p for p in ALL_CONFIGS if p.name.startswith("cls_")]


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_recipe_loads(path):
    cfg = load_config(path)
    assert set(cfg) == set(DEFAULTS)


def test_coco_1x_recipe_is_the_standard_one():
    cfg = load_config(REPO / "configs" / "faster_rcnn_r18_fpn_1x_coco.yaml")
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


def test_warmup_in_epochs_adds_to_warmup_in_iterations():
    # 0.5 epoch of 20 iterations, plus 4 iterations: the rate reaches 1.0 at iteration 14.
    cfg = dict(DEFAULTS, warmup_iters=4, warmup_epochs=0.5, warmup_factor=0.001, lr_steps=[9], scheduler="multistep")
    lrs = _lrs(cfg, iters_per_epoch=20, total=40)
    assert lrs[7] == pytest.approx(0.001 * 0.5 + 0.5) and lrs[13] < 1.0 and lrs[14] == pytest.approx(1.0)


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


def test_values_are_typed_and_range_checked(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("lr: fast\n")
    with pytest.raises(ConfigError, match="lr must be a positive number, got 'fast'"):
        load_config(recipe)
    for item, message in [
        ("lr=-1", "lr must be a positive number, got -1"),
        ("model=yolo", "model must be one of"),
        ("backbone=resnet50", "backbone must be one of"),
        ("norm=ln", "norm must be one of"),
        ("trainable_layers=6", r"trainable_layers must be an integer in \[0, 5\]"),
        ("returned_layers=[0, 5]", "returned_layers must be a non-empty list"),
        ("amp=maybe", "amp must be true or false"),
        ("workers=-1", "workers must be a non-negative integer"),
        ("device=tpu", "device must be one of"),
    ]:
        with pytest.raises(ConfigError, match=message):
            apply_overrides(load_config(), [item])
    # PyYAML reads 1e-3 (no dot) as a string; a number it is.
    assert apply_overrides(load_config(), ["lr=1e-3"])["lr"] == pytest.approx(1e-3)


def test_dotted_overrides_set_one_option_and_typos_are_named():
    cfg = apply_overrides(load_config(), ["model_kwargs={rpn_batch_size_per_image: 64}", "model_kwargs.anchor_scale=4"])
    assert cfg["model_kwargs"] == {"rpn_batch_size_per_image": 64, "anchor_scale": 4}
    with pytest.raises(ConfigError, match="unknown option 'anchor_scal'.*did you mean anchor_scale"):
        apply_overrides(cfg, ["model_kwargs.anchor_scal=4"])
    with pytest.raises(ConfigError, match="lr is not a mapping"):
        apply_overrides(cfg, ["lr.x=1"])
    with pytest.raises(ConfigError, match="'min_size' is a config key of its own"):
        apply_overrides(cfg, ["model_kwargs.min_size=4"])


def test_device_auto_is_the_default_and_resolves_to_what_is_present():
    from detection.config import resolve_device

    assert load_config()["device"] == "auto"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device is available"):
            resolve_device("cuda")


def test_recipes_are_found_by_name_and_listed():
    from detection.config import default_recipe, find_recipe, list_recipes

    names = [r["name"] for r in list_recipes()]
    assert names == sorted(p.stem for p in CONFIGS)
    assert find_recipe("faster_rcnn_r18_fpn_1x_coco").resolve() == (REPO / "configs" / "faster_rcnn_r18_fpn_1x_coco.yaml").resolve()
    assert load_config("faster_rcnn_r18_fpn_1x_coco.yaml")["model"] == "faster_rcnn"
    with pytest.raises(ConfigError, match=r"config file not found: faster_rcnn_r18.*recipes in .*shapes_faster_rcnn_r18_fpn"):
        find_recipe("faster_rcnn_r18")
    assert default_recipe("faster_rcnn", None).name == "shapes_faster_rcnn_r18_fpn.yaml"
    assert default_recipe("faster_rcnn", "/data/coco") is None


@pytest.mark.parametrize("path", CLS_CONFIGS, ids=[p.name for p in CLS_CONFIGS])
def test_every_classification_recipe_loads_with_its_schema(path):
    from classification import CLASSIFICATION

    cfg = load_config(path, schema=CLASSIFICATION)
    assert set(cfg) == set(CLASSIFICATION.defaults)
    with pytest.raises(ConfigError, match="unknown config key"):
        load_config(path)  # not a detection recipe
