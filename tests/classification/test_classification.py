"""Trunk pretraining: the ImageFolder data, the classification engine, its checkpoints and tools."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from backbones import load_pretrained, resnet18, resnet18_fpn
from backbones.weights import WeightsError
from detection.checkpoint import CheckpointError, read_checkpoint
from classification.checkpoint import load_classifier, read_classifier_training_state, save_classifier
from classification import (
    CLASSIFICATION,
    accuracy,
    build_ema,
    evaluate_classifier,
    load_classifier_weights,
    preflight_cls,
    train_classifier,
)
from detection.config import ConfigError, apply_overrides, load_config
from classification.data import ImageFolder, ImageFolderError, build_cls_transform, generate_shapes_classification
from engine.runner import build_optimizer
from helpers import REPO, load_tool, one_error_line, records, run_tool, tool_env

CLASSES = ("cat", "dog", "fox")


pytestmark = pytest.mark.usefixtures("one_thread")


def _write_image(path: Path, colour: int, seed: int, size: int = 24) -> None:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 60, size=(size, size, 3), dtype=np.uint8)
    pixels[..., colour] += 180
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def _folder(root: Path, train: int = 6, val: int = 2) -> Path:
    for split, count in (("train", train), ("val", val)):
        for c, name in enumerate(CLASSES):
            for i in range(count):
                _write_image(root / split / name / f"{i}.png", c, hash((split, c, i)) % 2**32)
    return root


def _cfg(root: Path, out: Path, *extra: str) -> dict:
    tiny = ["train_crop_size=32", "val_resize_size=36", "val_crop_size=32", "batch_size=4", "workers=0", "epochs=2",
            "log_period=1", "lr=0.01", "warmup_epochs=0.5"]
    return apply_overrides(load_config(schema=CLASSIFICATION), [*tiny, *extra], schema=CLASSIFICATION,
                           data_path=str(root), output_dir=str(out), device="cpu")


def _env(tmp_path: Path) -> dict[str, str]:
    return tool_env(tmp_path / "cache", TORCH_HOME=str(tmp_path / "torch"))


def _run(args: list[str], tmp_path: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    return run_tool(args, env=_env(tmp_path), timeout=timeout)


# ---------------------------------------------------------------------------------------------
# Data


def test_image_folder_numbers_sorted_classes_and_reads_val_through_train(tmp_path):
    root = _folder(tmp_path / "data")
    (root / "val" / "dog").rename(root / "val" / ".dog_hidden")  # hidden folders are not classes
    train = ImageFolder(root, "train")
    val = ImageFolder(root, "val", classes=train.classes)
    assert train.classes == ["cat", "dog", "fox"] and len(train) == 18
    assert val.class_to_idx == {"cat": 0, "dog": 1, "fox": 2} and sorted(set(val.targets)) == [0, 2]
    assert val.missing_classes == ["dog"]
    image, label = train[7]
    assert image.dtype == torch.uint8 and image.shape == (3, 24, 24) and label == 1


def test_empty_class_folder_is_an_error_naming_it(tmp_path):
    root = _folder(tmp_path / "data")
    (root / "train" / "emu").mkdir()
    (root / "train" / "emu" / "notes.txt").write_text("no pictures yet")
    with pytest.raises(ImageFolderError, match=r"class folder .*train/emu holds no image.*add images or remove the folder"):
        ImageFolder(root, "train")


def test_val_class_missing_from_train_is_an_error_naming_it(tmp_path):
    root = _folder(tmp_path / "data")
    _write_image(root / "val" / "owl" / "0.png", 0, 1)
    train = ImageFolder(root, "train")
    with pytest.raises(ImageFolderError, match=r"class 'owl' of .*val is not a class of the training data \(3 classes: cat, dog, fox\)"):
        ImageFolder(root, "val", classes=train.classes)


def test_non_image_files_are_skipped_and_counted(tmp_path, caplog):
    root = _folder(tmp_path / "data")
    (root / "train" / "cat" / "README.txt").write_text("x")
    (root / "train" / "labels.csv").write_text("x")
    (root / "train" / "cat" / ".DS_Store").write_bytes(b"x")  # hidden: not even counted
    with caplog.at_level(logging.WARNING, logger="detection"):
        train = ImageFolder(root, "train")
    assert len(train) == 18 and train.num_ignored == 2
    assert "skipped 2 files that are not images" in caplog.text and "README.txt" in caplog.text


def test_unreadable_images_fall_back_are_counted_and_named_once(tmp_path, caplog):
    root = _folder(tmp_path / "data")
    bad = root / "train" / "cat" / "0.png"
    bad.write_bytes(b"\x89PNG not really")
    train = ImageFolder(root, "train")
    with caplog.at_level(logging.WARNING, logger="detection"):
        for _ in range(3):
            image, label = train[0]
    assert label == 0 and image.shape == (3, 24, 24)  # the next sample, cat/1.png
    assert train.num_skipped == 3 and caplog.text.count(f"skipping image {bad}") == 1
    train.reset_skipped()
    assert train.num_skipped == 0


def test_eval_transform_is_resize_then_centre_crop_then_imagenet_normalisation():
    image = torch.full((3, 40, 80), 128, dtype=torch.uint8)
    image[:, :, :20] = 0  # the left quarter is cut off by the centre crop
    out = build_cls_transform(False, crop_size=16, resize_size=20)(image)
    assert out.shape == (3, 16, 16) and out.dtype == torch.float32
    expected = (128 / 255 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(out[:, :, 8], expected[:, None].expand(3, 16), atol=2e-2, rtol=0)


def test_shapes_classification_set_is_deterministic_and_has_every_class(tmp_path):
    a = generate_shapes_classification(tmp_path / "a", num_train=12, num_val=3, seed=5)
    generate_shapes_classification(tmp_path / "b", num_train=12, num_val=3, seed=5)
    names = ["background", "circle", "ellipse", "hexagon", "square", "star", "triangle"]
    assert sorted(p.name for p in (tmp_path / "a" / "train").iterdir()) == names
    assert sum(a["train"].values()) == len(list((tmp_path / "a" / "train").rglob("*.jpg"))) > 12
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.jpg"))
    assert files == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*.jpg"))
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    assert Image.open(tmp_path / "a" / files[0]).size == (64, 64)


# ---------------------------------------------------------------------------------------------
# Arithmetic and recipe pieces


def test_topk_counts_on_a_fixed_case():
    logits = torch.tensor([
        [0.9, 0.1, 0.0, 0.0, 0.0, 0.0],  # label 0: rank 1
        [0.1, 0.2, 0.9, 0.3, 0.0, 0.0],  # label 1: rank 3
        [0.6, 0.5, 0.4, 0.3, 0.2, 0.1],  # label 5: rank 6
        [0.0, 0.0, 0.0, 0.1, 0.2, 0.3],  # label 2: rank 4 (ties broken by topk)
    ])
    targets = torch.tensor([0, 1, 5, 3])
    assert accuracy(logits, targets, (1, 2, 3, 5)) == [1, 1, 3, 3]
    assert accuracy(logits[:, :3], torch.tensor([0, 1, 2, 2]), (1, 5)) == [1, 4]  # top-5 of 3 classes: all


def test_no_weight_decay_on_norm_and_bias():
    model = resnet18(num_classes=7)
    optimizer = build_optimizer(model, {"optimizer": "sgd", "momentum": 0.9, "weight_decay": 1e-4,
                                        "norm_weight_decay": 0.0, "bias_weight_decay": 0.0}, 0.1)
    by_decay = {g["weight_decay"]: g["params"] for g in optimizer.param_groups}
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = sorted(names[id(p)] for p in by_decay[0.0])
    assert set(by_decay) == {0.0, 1e-4}
    assert all(".bn" in n or "downsample.1" in n or n.startswith("bn1") or n == "fc.bias" for n in no_decay)
    assert len(no_decay) == 2 * 20 + 1  # weight and bias of 20 BatchNorms, and fc.bias
    assert len(by_decay[1e-4]) == 21  # 20 convolutions and fc.weight
    plain = build_optimizer(model, {"optimizer": "sgd", "momentum": 0.9, "weight_decay": 1e-4, "norm_weight_decay": None, "bias_weight_decay": None}, 0.1)
    assert len(plain.param_groups) == 1 and plain.param_groups[0]["weight_decay"] == 1e-4


def test_ema_decay_follows_torchvisions_adjustment():
    cfg = {"ema": True, "ema_decay": 0.99998, "ema_steps": 32, "batch_size": 32, "epochs": 600}
    ema = build_ema(torch.nn.Linear(2, 2), cfg, world=8)
    assert ema.decay == pytest.approx(1 - 2e-5 * 8 * 32 * 32 / 600)
    assert build_ema(torch.nn.Linear(2, 2), {**cfg, "ema": False}, world=1) is None


def test_ema_update_keeps_decay_of_the_average_and_the_rest_of_the_new_weights():
    # alpha = (1 - 0.9) * 1 * 2 * 1 / 1 = 0.2: decay 0.8, far from 0.5 so an inverted decay shows.
    cfg = {"ema": True, "ema_decay": 0.9, "ema_steps": 1, "batch_size": 2, "epochs": 1}
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    ema = build_ema(model, cfg, world=1)
    assert ema.decay == pytest.approx(0.8)
    g = torch.Generator().manual_seed(0)

    def randomise() -> dict[str, torch.Tensor]:
        with torch.no_grad():
            for t in (*model.parameters(), model[1].running_mean, model[1].running_var):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
        return {k: v.clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    old = randomise()
    ema.update_parameters(model)  # the first update copies the weights (AveragedModel)
    new = randomise()
    ema.update_parameters(model)
    averaged = ema.module.state_dict()
    assert set(old) == {"0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var"}
    for k in old:  # buffers too: the running statistics are averaged like the weights (use_buffers)
        torch.testing.assert_close(averaged[k], 0.8 * old[k] + 0.2 * new[k], rtol=1e-6, atol=0, msg=k)


def test_recipes_load_and_match_torchvisions_reference():
    for depth in (18, 34):
        ref = load_config(f"cls_resnet{depth}_imagenet", schema=CLASSIFICATION)
        assert ref["backbone"] == f"resnet{depth}" and ref["epochs"] == 90 and ref["lr_steps"] == [30, 60]
        assert (ref["lr"], ref["lr_reference_batch"], ref["momentum"], ref["weight_decay"]) == (0.1, 256, 0.9, 1e-4)
        modern = load_config(f"cls_resnet{depth}_imagenet_modern", schema=CLASSIFICATION)
        assert modern["scheduler"] == "cosine" and modern["label_smoothing"] > 0 and modern["ema"] and modern["amp"]
        assert modern["norm_weight_decay"] == 0 and modern["channels_last"] and modern["clip_grad_norm"]
    with pytest.raises(ConfigError, match="unknown config key 'lerning_rate'"):
        apply_overrides(load_config(schema=CLASSIFICATION), ["lerning_rate=1"], schema=CLASSIFICATION)
    with pytest.raises(ConfigError, match=r"crop_scale must be \[min, max\]"):
        apply_overrides(load_config(schema=CLASSIFICATION), ["crop_scale=[0.5, 0.1]"], schema=CLASSIFICATION)


# ---------------------------------------------------------------------------------------------
# Training


def test_a_few_iterations_write_every_output(tmp_path):
    root = _folder(tmp_path / "data")
    result = train_classifier(_cfg(root, tmp_path / "run", "max_iters=3", "checkpoint_period=2"), progress=False)
    out = tmp_path / "run"
    assert result["iteration"] == 3 and result["classes"] == list(CLASSES)
    for name in ("config.yaml", "log.txt", "metrics.jsonl", "checkpoint.pth", "model_final.pth", "metrics.json", "curves.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    recs = records(out)
    train_recs = [r for r in recs if "loss" in r]
    assert [r["iter"] for r in train_recs] == [1, 2, 3] and all(r["loss"] > 0 and r["lr"] > 0 for r in train_recs)
    assert {"val/top1", "val/top5", "val/loss"} <= set(recs[-1]) and 0 <= recs[-1]["val/top1"] <= 100
    assert recs[-1]["val/top5"] == 100.0  # 3 classes
    assert json.loads((out / "metrics.json").read_text()) == {k: v for k, v in recs[-1].items() if "/" in k}
    ckpt = read_classifier_training_state(out / "checkpoint.pth")
    assert ckpt["iteration"] == 3 and ckpt["classes"] == list(CLASSES) and ckpt["arch"] == "resnet18" and ckpt["model_ema"] == {}
    assert "training a resnet18 classifier" in (out / "log.txt").read_text()


# Resume mid-epoch (the batches and rates of an uninterrupted run): tests/test_task_contract.py, for every task.


def test_resume_runs_the_epoch_end_evaluation_a_stop_cut_short(tmp_path):
    root = _folder(tmp_path / "data")
    per_epoch = 18 // 4
    train_classifier(_cfg(root, tmp_path / "run", "eval_period=1", f"max_iters={per_epoch}"), progress=False)
    # Stopped during the evaluation after the first epoch's checkpoint: its record was never written.
    kept = [r for r in records(tmp_path / "run") if "val/top1" not in r]
    (tmp_path / "run" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    train_classifier(_cfg(root, tmp_path / "run", "eval_period=1"), resume=True, progress=False)
    assert [r["iter"] for r in records(tmp_path / "run") if "val/top1" in r] == [per_epoch, 2 * per_epoch]
    assert "did not finish before the run stopped" in (tmp_path / "run" / "log.txt").read_text()


def test_modern_recipe_pieces_run_together(tmp_path):
    root = _folder(tmp_path / "data")
    cfg = _cfg(root, tmp_path / "run", "max_iters=6", "ema=true", "ema_steps=1", "amp=true", "channels_last=true",
               "label_smoothing=0.1", "norm_weight_decay=0.0", "bias_weight_decay=0.0", "scheduler=cosine", "clip_grad_norm=1.0",
               "optimizer=adamw", "lr=0.001")
    result = train_classifier(cfg, progress=False)
    out = tmp_path / "run"
    assert {"val/top1", "ema/top1", "ema/top5"} <= set(result["metrics"])
    ema, raw = load_classifier(out / "model_ema.pth"), load_classifier(out / "model_final.pth")
    assert not torch.equal(ema.conv1.weight, raw.conv1.weight)
    assert read_classifier_training_state(out / "checkpoint.pth")["model_ema"]["n_averaged"] == 2  # restarted at every update of epoch 0 (warm-up), then 2 in epoch 1


# ---------------------------------------------------------------------------------------------
# Checkpoints into trunks


def test_classifier_file_loads_into_a_trunk_and_a_pyramid_unchanged(tmp_path):
    torch.manual_seed(3)
    trained = resnet18(num_classes=7)
    save_classifier(trained, tmp_path / "model_final.pth", arch="resnet18", classes=[str(i) for i in range(7)])
    trunk = resnet18()  # 1000 classes: fc is skipped
    report = load_pretrained(trunk, tmp_path / "model_final.pth", strict=True)
    assert report.ok and report.skipped == ["fc.weight", "fc.bias"] and len(report.loaded) == 120  # 20 BNs' counters too
    assert all(torch.equal(v, trained.state_dict()[k]) for k, v in trunk.state_dict().items() if not k.startswith("fc."))
    same = load_pretrained(resnet18(num_classes=7), tmp_path / "model_final.pth", strict=True)
    assert same.skipped == [] and "fc.weight" in same.loaded
    fpn = resnet18_fpn(weights=str(tmp_path / "model_final.pth"))
    assert type(fpn.body.bn1).__name__ == "FrozenBatchNorm2d"
    torch.testing.assert_close(fpn.body.layer3[0].bn1.running_var, trained.layer3[0].bn1.running_var)
    trainable = {n.split(".")[0] for n, p in fpn.body.named_parameters() if p.requires_grad}
    assert trainable == {"layer2", "layer3", "layer4"}
    assert fpn.load_report.skipped == ["fc.weight", "fc.bias"] and len(fpn.load_report.loaded) == 100  # FrozenBN: no counters


def test_classifier_file_round_trips_and_refuses_other_files(tmp_path):
    torch.manual_seed(0)
    model = resnet18(num_classes=3).eval()
    save_classifier(model, tmp_path / "m.pth", arch="resnet18", classes=list(CLASSES), config={"lr": 0.1}, iteration=9)
    loaded = load_classifier(tmp_path / "m.pth")
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert loaded.classes == list(CLASSES) and loaded.train_config == {"lr": 0.1} and read_checkpoint(tmp_path / "m.pth")["iteration"] == 9
    torch.save({"model": model.state_dict()}, tmp_path / "plain.pth")
    with pytest.raises(CheckpointError, match=r"not a classifier checkpoint.*lacks \['arch', 'classes'\]"):
        load_classifier(tmp_path / "plain.pth")
    with pytest.raises(CheckpointError, match="not a classifier training checkpoint"):
        read_classifier_training_state(tmp_path / "m.pth")


def test_weights_for_evaluation_from_every_source(tmp_path, monkeypatch):
    torch.manual_seed(0)
    save_classifier(resnet18(num_classes=3), tmp_path / "mine.pth", arch="resnet18", classes=list(CLASSES))
    model, classes, what = load_classifier_weights(str(tmp_path / "mine.pth"))
    assert classes == list(CLASSES) and model.fc.out_features == 3 and "resnet18 classifier" in what
    with pytest.raises(Exception, match="holds a resnet18 classifier, not a resnet34"):
        load_classifier_weights(str(tmp_path / "mine.pth"), backbone="resnet34")
    torch.save(resnet18(num_classes=5).state_dict(), tmp_path / "plain.pth")
    model, classes, _ = load_classifier_weights(str(tmp_path / "plain.pth"))
    assert classes is None and model.fc.out_features == 5
    # "imagenet" offline: one error naming the file, its URL and the cache folder, nothing fetched.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(Exception, match=r"resnet18-f37072fd.pth.*https://download.pytorch.org/models/resnet18-f37072fd.pth.*network unreachable"):
        load_classifier_weights("imagenet", backbone="resnet18")


def test_evaluation_counts_every_image_once(tmp_path):
    root = _folder(tmp_path / "data", val=3)
    val = ImageFolder(root, "val", transform=build_cls_transform(False, crop_size=16, resize_size=20))
    torch.manual_seed(0)
    model = resnet18(num_classes=3)
    result = evaluate_classifier(model, val, batch_size=4)
    with torch.no_grad():
        logits = model.eval()(torch.stack([val[i][0] for i in range(len(val))]))
    labels = torch.tensor(val.targets)
    assert result["images"] == 9
    assert result["top1"] == pytest.approx(100 * float((logits.argmax(1) == labels).float().mean()))
    assert result["loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(logits, labels)), rel=1e-5)


def test_preflight_rejects_bad_inputs_before_any_work(tmp_path):
    root = _folder(tmp_path / "data")
    with pytest.raises(ImageFolderError, match="data path .* does not exist"):
        preflight_cls(_cfg(tmp_path / "nope", tmp_path / "run"))
    with pytest.raises(ConfigError, match="18 images, fewer than one batch of 64"):
        preflight_cls(_cfg(root, tmp_path / "run", "batch_size=64"))
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        preflight_cls(_cfg(root, tmp_path / "run"), resume=True)


def test_preflight_finds_the_imagenet_file_before_any_work(tmp_path, monkeypatch):
    root = _folder(tmp_path / "data")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(WeightsError, match=r"ResNet-18 are not cached\. Put resnet18-f37072fd\.pth .*no network"):
        preflight_cls(_cfg(root, tmp_path / "run", "weights=imagenet"))
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------
# Tools


def _main(args: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> int:
    """A tool's ``main`` in this process with the tools' test environment (its own data cache and torch home)."""
    monkeypatch.setenv("RESFPN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return load_tool(Path(args[0]).stem).main(args[1:])


@pytest.mark.parametrize(
    "args, message",
    [
        (["tools/train_cls.py", "--data-path", "/nonexistent/imagenet"], "data path /nonexistent/imagenet does not exist"),
        (["tools/train_cls.py", "--set", "lerning_rate=0.1"], "unknown config key 'lerning_rate'"),
        (["tools/train_cls.py", "--set", "label_smoothing=1.5"], "label_smoothing must be a number in [0, 1), got 1.5"),
        (["tools/train_cls.py", "--weights", "/nonexistent.pth"], "checkpoint file not found: /nonexistent.pth"),
        (["tools/train_cls.py", "--resume", "--output-dir", "/nonexistent/run"], "nothing to resume: no checkpoint at /nonexistent/run/checkpoint.pth"),
        (["tools/eval_cls.py", "--weights", "/nonexistent.pth"], "checkpoint file not found: /nonexistent.pth"),
        (["tools/eval_cls.py", "--weights", "imagenet"], "--weights imagenet needs --backbone resnet18 or resnet34"),
        (["tools/eval_cls.py", "--weights", "imagenet", "--backbone", "resnet18", "--workers", "-1"], "--workers must be 0 (load in this process) or more, got -1"),
    ],
)
def test_bad_invocations_are_one_error_line_and_exit_2(args, message, tmp_path, monkeypatch, capsys):
    # In this process (a new interpreter for each was 8 x 5 s of imports); tests/detection/test_tools.py runs tools as users do.
    assert _main(args, tmp_path, monkeypatch) == 2
    assert message in one_error_line(capsys.readouterr().err)


def test_bad_folders_are_one_error_line_and_exit_2(tmp_path, monkeypatch, capsys):
    root = _folder(tmp_path / "data")
    (root / "train" / "emu").mkdir()
    assert _main(["tools/train_cls.py", "--data-path", str(root), "--device", "cpu"], tmp_path, monkeypatch) == 2
    assert f"{root / 'train' / 'emu'} holds no image" in one_error_line(capsys.readouterr().err)
    (root / "train" / "emu").rmdir()
    _write_image(root / "val" / "owl" / "0.png", 0, 1)
    assert _main(["tools/train_cls.py", "--data-path", str(root), "--device", "cpu"], tmp_path, monkeypatch) == 2
    assert "class 'owl'" in one_error_line(capsys.readouterr().err)
    torch.save(resnet18(num_classes=5).state_dict(), tmp_path / "five.pth")
    assert _main(["tools/eval_cls.py", "--weights", str(tmp_path / "five.pth"), "--data-path", str(root), "--split", "train"],
                 tmp_path, monkeypatch) == 2
    assert "needs exactly 5 of them" in one_error_line(capsys.readouterr().err)


def test_cli_trains_then_eval_cli_reproduces_its_accuracy(tmp_path):
    root = _folder(tmp_path / "data")
    out = tmp_path / "run"
    proc = _run(["tools/train_cls.py", "--data-path", str(root), "--output-dir", str(out), "--device", "cpu", "--max-iters", "2",
                 "--batch-size", "4", "--no-progress", "--set", "train_crop_size=32", "val_resize_size=36", "val_crop_size=32",
                 "workers=0"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "val/top1" in proc.stdout
    trained = json.loads((out / "metrics.json").read_text())
    proc = _run(["tools/eval_cls.py", "--weights", str(out / "model_final.pth"), "--output-dir", str(tmp_path / "eval"),
                 "--device", "cpu", "--workers", "0", "--no-progress"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(resize 36, centre crop 32)" in proc.stdout
    evaluated = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert evaluated["images"] == 6 and evaluated["top1"] == pytest.approx(trained["val/top1"])
    assert evaluated["top5"] == pytest.approx(trained["val/top5"])


def test_detection_run_reports_loading_a_classification_checkpoint(tmp_path):
    torch.manual_seed(0)
    weights = tmp_path / "cls" / "model_final.pth"
    save_classifier(resnet18(num_classes=7), weights, arch="resnet18", classes=[str(i) for i in range(7)])
    out = tmp_path / "det"
    tiny = ["shapes_train=4", "shapes_val=2", "shapes_size=64", "min_size=64", "max_size=64", "workers=0", "batch_size=2", "num_vis=0"]
    proc = _run(["tools/train_det.py", "--output-dir", str(out), "--max-iters", "1", "--device", "cpu", "--no-progress",
                 "--weights-backbone", str(weights), "--set", *tiny, "norm=frozen_bn", "trainable_layers=3"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = [f"loaded 100 tensors from {weights}", "skipped 2 (classifier with another class count): fc.weight, fc.bias"]
    log = (out / "log.txt").read_text()
    for line in expected:
        assert proc.stderr.count(line) == 1 and log.count(line) == 1, (line, proc.stderr[-2000:])


def test_ddp_two_processes_train_and_evaluate_exactly_like_one(tmp_path):
    root = _folder(tmp_path / "data", val=3)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29743"]
    common = ["--data-path", str(root), "--device", "cpu", "--no-progress"]
    tiny = ["--set", "train_crop_size=32", "val_resize_size=36", "val_crop_size=32", "workers=0"]
    proc = subprocess.run([*torchrun, "tools/train_cls.py", *common, "--output-dir", str(tmp_path / "ddp"), "--max-iters", "2",
                           "--batch-size", "2", *tiny], cwd=REPO, env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = read_classifier_training_state(tmp_path / "ddp" / "checkpoint.pth")
    assert ckpt["iteration"] == 2 and ckpt["config"]["batch_size"] == 2
    assert json.loads((tmp_path / "ddp" / "metrics.json").read_text())["val/top1"] >= 0
    # 9 validation images over 2 ranks: 5 + 4, counted once each, the same numbers as one process.
    weights = str(tmp_path / "ddp" / "model_final.pth")
    single = _run(["tools/eval_cls.py", "--weights", weights, "--data-path", str(root), "--output-dir", str(tmp_path / "e1"),
                   "--device", "cpu", "--workers", "0", "--no-progress"], tmp_path)
    assert single.returncode == 0, single.stderr[-2000:]
    double = subprocess.run([*torchrun, "tools/eval_cls.py", "--weights", weights, "--data-path", str(root), "--output-dir",
                             str(tmp_path / "e2"), "--device", "cpu", "--workers", "0", "--no-progress"],
                            cwd=REPO, env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert double.returncode == 0, double.stderr[-2000:]
    m1, m2 = (json.loads((tmp_path / e / "metrics.json").read_text()) for e in ("e1", "e2"))
    assert m1["images"] == m2["images"] == 9
    assert m1["top1"] == pytest.approx(m2["top1"]) and m1["loss"] == pytest.approx(m2["loss"], rel=1e-5)
