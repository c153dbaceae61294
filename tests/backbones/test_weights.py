"""load_pretrained: every accepted layout loads, everything else fails clearly."""

import hashlib
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torchvision

from backbones import WeightsError, load_pretrained, resnet18, resnet34
from backbones.weights import IMAGENET_WEIGHTS, imagenet_cache_path


@pytest.fixture(scope="module")
def tv_state():
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None).state_dict()


def _same_weights(model, state):
    own = model.state_dict()
    return all(torch.equal(own[k], v) for k, v in state.items() if k in own)


def _tutorial_naming(state):
    return OrderedDict((k.replace(".downsample.", ".shortcut."), v) for k, v in state.items())


LAYOUTS = {
    "plain": lambda s: s,
    "state_dict": lambda s: {"state_dict": s, "epoch": 3},
    "model": lambda s: {"model": s, "optimizer": {}},
    "module.": lambda s: {f"module.{k}": v for k, v in s.items()},
    "backbone.body.": lambda s: {f"backbone.body.{k}": v for k, v in s.items() if not k.startswith("fc.")},
    "backbone.": lambda s: {f"backbone.{k}": v for k, v in s.items()},
    "shortcut": _tutorial_naming,
    "wrapped module.": lambda s: {"model": {f"module.{k}": v for k, v in s.items()}},
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_layout_loads(layout, tv_state, tmp_path):
    path = tmp_path / "ckpt.pth"
    torch.save(LAYOUTS[layout](tv_state), path)
    model = resnet18()
    report = load_pretrained(model, path)
    assert not report.unexpected and not report.mismatched
    expect_missing = ["fc.weight", "fc.bias"] if layout == "backbone.body." else []
    assert report.missing == expect_missing
    assert len(report.loaded) == len(tv_state) - len(expect_missing)
    assert _same_weights(model, {k: v for k, v in tv_state.items() if k not in expect_missing})


def test_state_dict_in_memory_and_strict(tv_state):
    model = resnet18()
    report = load_pretrained(model, tv_state, strict=True)
    assert report.ok and _same_weights(model, tv_state)
    partial = {k: v for k, v in tv_state.items() if not k.startswith("layer4.")}
    with pytest.raises(WeightsError, match="strict loading failed"):
        load_pretrained(resnet18(), partial, strict=True)


def test_frozen_bn_ignores_batch_counters(tv_state):
    model = resnet18(norm_layer=torchvision.ops.FrozenBatchNorm2d)
    report = load_pretrained(model, tv_state, strict=True)
    assert report.ok
    assert torch.equal(model.bn1.running_var, tv_state["bn1.running_var"])


def test_fine_tuning_skips_classifier_with_other_class_count(tv_state):
    model = resnet18(num_classes=10)
    report = load_pretrained(model, tv_state)
    assert sorted(report.skipped) == ["fc.bias", "fc.weight"]
    assert not report.missing and not report.unexpected and not report.mismatched
    assert model.fc.weight.shape == (10, 512)
    assert _same_weights(model, {k: v for k, v in tv_state.items() if not k.startswith("fc.")})
    assert "skipped 2" in str(report)


def test_depth_mismatch_reports_shapes_and_missing():
    state34 = resnet34().state_dict()
    report = load_pretrained(resnet18(), state34)
    assert any(k.startswith("layer3.2.") for k in report.unexpected)
    with pytest.raises(WeightsError, match="strict"):
        load_pretrained(resnet18(), state34, strict=True)


def test_unknown_layout_lists_keys_on_both_sides(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"encoder_x.w": torch.zeros(3), "head.b": torch.zeros(1)}, path)
    with pytest.raises(WeightsError, match=r"unrecognised checkpoint layout.*encoder_x\.w.*model keys: \['conv1\.weight'"):
        load_pretrained(resnet18(), path)
    torch.save({"epoch": 3, "step": 10}, path)
    with pytest.raises(WeightsError, match="holds no state dict"):
        load_pretrained(resnet18(), path)


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_code_carrying_file_is_refused_and_never_runs(tmp_path, tv_state):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": tv_state, "extra": _Payload(marker)}, path)
    with pytest.raises(WeightsError, match="refused to load .*evil.pth"):
        load_pretrained(resnet18(), path)
    assert not marker.exists()


def test_hash_in_name_is_verified(tmp_path, tv_state):
    raw = tmp_path / "raw.pth"
    torch.save(tv_state, raw)
    digest = hashlib.sha256(raw.read_bytes()).hexdigest()
    good = tmp_path / f"resnet18-{digest[:8]}.pth"
    raw.rename(good)
    assert load_pretrained(resnet18(), good).ok
    bad = tmp_path / ("resnet18-" + ("0" * 8 if not digest.startswith("0" * 8) else "1" * 8) + ".pth")
    good.rename(bad)
    with pytest.raises(WeightsError, match="is corrupt"):
        load_pretrained(resnet18(), bad)


def test_uncached_imagenet_without_download_names_file_url_and_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    folder = tmp_path / "hub" / "checkpoints"
    assert imagenet_cache_path(34) == folder / "resnet34-b627a593.pth"
    with pytest.raises(WeightsError) as err:
        load_pretrained(resnet34(), "imagenet", download=False)
    msg = str(err.value)
    assert "resnet34-b627a593.pth" in msg and IMAGENET_WEIGHTS[34].url in msg and str(folder) in msg


def test_failed_download_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(WeightsError, match=r"resnet18-f37072fd\.pth.*downloading failed: Network is unreachable"):
        load_pretrained(resnet18(), "imagenet")


def test_cached_imagenet_file_is_found_and_verified(tmp_path, monkeypatch, tv_state):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    path = imagenet_cache_path(18)
    path.parent.mkdir(parents=True)
    torch.save(tv_state, path)  # random weights: the name's hash cannot match
    with pytest.raises(WeightsError, match="resnet18-f37072fd.pth is corrupt"):
        load_pretrained(resnet18(), "imagenet", download=False)


def test_bad_source_type():
    with pytest.raises(WeightsError, match="got int"):
        load_pretrained(resnet18(), 3)
    with pytest.raises(WeightsError, match="not found"):
        load_pretrained(resnet18(), "/nonexistent/x.pth")


def test_check_weights_is_every_tasks_preflight_of_trunk_weights(tmp_path):
    from backbones.weights import check_weights

    check_weights(None, 18)  # random trunk: nothing to read
    good = tmp_path / "trunk.pth"
    torch.save({"model": resnet18().state_dict()}, good)
    check_weights(str(good), 18)
    pruned = tmp_path / "pruned.pth"
    torch.save({"model": resnet18().state_dict(), "build_args": {}, "channel_plan": {"backbone.body.conv1": {"out_channels": 32}}}, pruned)
    with pytest.raises(WeightsError, match=r"pruned detector.*standard resnet34.*--init-checkpoint"):
        check_weights(str(pruned), 34)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="junk.pth"):
        check_weights(str(junk), 18)
    with pytest.raises(WeightsError, match="junk.pth"):  # the segmentation task's preflight goes through it too
        from segmentation.config import SEGMENTATION
        from engine.config import load_config, apply_overrides
        from segmentation.training import preflight_seg

        preflight_seg(apply_overrides(load_config(None, schema=SEGMENTATION), [], schema=SEGMENTATION, weights_backbone=str(junk),
                                      device="cpu", output_dir=str(tmp_path / "run")))
