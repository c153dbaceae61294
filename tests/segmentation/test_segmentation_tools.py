"""tools/train_seg.py, tools/eval_seg.py and tools/infer_seg.py as users run them, bad input included."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import REPO, one_error_line

sys.path.insert(0, str(REPO / "tools"))

import eval_seg  # noqa: E402
import infer_seg  # noqa: E402
import train_seg  # noqa: E402

TINY = [
    "shapes_train=16", "shapes_val=4", "shapes_size=64", "crop_size=64", "val_batch_size=4", "workers=0",
    "log_period=1", "warmup_iters=2", "num_vis=1", "model_kwargs={fpn_channels: 32, head_channels: 32}", "amp=false",
    "channels_last=false",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny semantic FPN trained for two epochs of four iterations by the tool itself."""
    base = tmp_path_factory.mktemp("seg")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RESFPN_CACHE", str(base / "cache"))
        code = train_seg.main(["--output-dir", str(base / "run"), "--epochs", "2", "--batch-size", "4", "--device", "cpu",
                               "--no-progress", "--set", *TINY])
    assert code == 0
    return base / "run"


@pytest.fixture
def cache(trained: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("RESFPN_CACHE", str(trained.parent / "cache"))  # the shapes set the model was trained on
    return trained.parent / "cache"


def test_train_seg_writes_the_run_and_prints_the_metrics(trained: Path, capsys) -> None:
    for name in ("config.yaml", "log.txt", "metrics.jsonl", "checkpoint.pth", "model_final.pth", "metrics.json", "curves.png"):
        assert (trained / name).is_file(), name
    assert len(list((trained / "vis").glob("*.png"))) == 1
    evals = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines() if "val/mIoU" in line]
    assert [r["iter"] for r in evals] == [4, 8]
    assert train_seg.main(["--list-configs"]) == 0
    listed = capsys.readouterr().out
    assert "seg_shapes_semantic_fpn_r18" in listed and "seg_deeplabv3_r18_voc" in listed and "shapes_faster_rcnn" not in listed


@pytest.mark.parametrize("args, message", [
    (["--set", "crop_sise=64"], "unknown config key 'crop_sise'"),
    (["--config", "seg_nope"], "config file not found: seg_nope"),
    (["--data-path", "{tmp}/nope"], "data path .*nope does not exist"),
    (["--resume"], "nothing to resume: no checkpoint at"),
    (["--weights-backbone", "{tmp}/trunk.pth"], "trunk.pth"),
    (["--model", "deeplabv3", "--batch-size", "1"], "batch_size must be at least 2 for deeplabv3"),
    (["--set", "model_kwargs.atrous_rates=[6, 12]"], "option 'atrous_rates' only applies to deeplabv3"),
    (["--set", "scheduler=poyl"], r"scheduler must be one of \['multistep', 'cosine', 'poly'\], got 'poyl'"),
])
def test_train_seg_bad_input_is_one_error_line_before_any_work(tmp_path, monkeypatch, capsys, args, message) -> None:
    monkeypatch.setenv("RESFPN_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    code = train_seg.main(["--output-dir", str(out), "--device", "cpu", "--no-progress",
                           *[a.format(tmp=tmp_path) for a in args]])
    line = one_error_line(capsys.readouterr().err)
    assert code == 2 and re.search(message, line), line
    assert not out.exists() and not (tmp_path / "cache").exists()


def test_eval_seg_prints_torchvisions_summary_and_agrees_with_training(trained: Path, cache: Path, tmp_path, capsys) -> None:
    final = json.loads((trained / "metrics.json").read_text())
    for name in ("model_final.pth", "checkpoint.pth"):  # the training state is a segmenter file too
        out = tmp_path / name
        assert eval_seg.main(["--checkpoint", str(trained / name), "--device", "cpu", "--workers", "0", "--batch-size", "4",
                              "--output-dir", str(out), "--no-progress"]) == 0
        printed = capsys.readouterr().out
        for line in ("global correct: ", "average row correct: [", "IoU: [", "mean IoU: ", "__background__", "ellipse"):
            assert line in printed, (line, printed)
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["images"] == 4 and set(metrics["IoU"]) == {"__background__", "circle", "square", "triangle", "star", "hexagon", "ellipse"}
        # Same model, same data, same batches: the training run's final numbers.
        assert metrics["mIoU"] == pytest.approx(final["val/mIoU"], abs=1e-3)
        assert metrics["pixel_acc"] == pytest.approx(final["val/pixel_acc"], abs=1e-3)
        assert f"mean IoU: {final['val/mIoU']:.1f}" in printed


def _voc(root: Path) -> Path:
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(root / "JPEGImages" / "a.jpg")
    Image.fromarray(np.full((32, 32), 15, np.uint8), mode="L").save(root / "SegmentationClass" / "a.png")
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("a\n")
    return root


def test_eval_seg_bad_input_is_one_error_line(trained: Path, cache: Path, tmp_path, capsys) -> None:
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint at all")
    detector = tmp_path / "det.pth"
    torch.save({"model": {}, "build_args": {"arch": "faster_rcnn"}}, detector)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    model = str(trained / "model_final.pth")
    cases = [
        (["--checkpoint", str(tmp_path / "missing.pth")], "missing.pth"),
        (["--checkpoint", str(junk)], "junk.pth"),
        (["--checkpoint", str(detector)], r"det.pth is a detector file \(tools/train_det.py\), not a segmenter: score it with tools/eval_coco.py"),
        (["--checkpoint", model, "--batch-size", "0"], "--batch-size must be an integer >= 1, got 0"),
        (["--checkpoint", model, "--output-dir", str(a_file)], "is a file; pass a folder"),
        (["--checkpoint", model, "--data-path", str(_voc(tmp_path / "voc"))], r"label values 15 are outside 0..6 .*; the model has 7 labels \(__background__, circle"),
        (["--checkpoint", model, "--data-path", str(tmp_path / "nope")], "nope does not exist"),
        (["--checkpoint", model, "--split", "test"], "--split test: no .*instances_test.json"),
    ]
    for args, message in cases:
        if "--output-dir" not in args:
            args = [*args, "--output-dir", str(tmp_path / "out")]
        code = eval_seg.main([*args, "--device", "cpu", "--workers", "0", "--no-progress"])
        line = one_error_line(capsys.readouterr().err)
        assert code == 2 and re.search(message, line), (args, line)
        assert not (tmp_path / "out").exists()


def _noise(height: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_infer_seg_draws_overlays_and_class_maps_for_a_folder(trained: Path, tmp_path, capsys) -> None:
    from deploy import SegmentationPredictor

    src = tmp_path / "pics"
    (src / "sub").mkdir(parents=True)
    (src / ".hidden").mkdir()
    Image.fromarray(_noise(48, 64, 0)).save(src / "a.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 40 wide x 56 tall, shown turned: 56 wide x 40 tall
    Image.fromarray(_noise(56, 40, 1)).save(src / "sub" / "phone.jpg", exif=exif)
    Image.fromarray(_noise(32, 32, 2)).save(src / ".hidden" / "h.png")
    (src / "notes.txt").write_text("not a picture")
    out = tmp_path / "vis"
    assert infer_seg.main(["--checkpoint", str(trained / "model_final.pth"), "--input", str(src), "--output", str(out),
                           "--device", "cpu", "--masks"]) == 0
    printed = capsys.readouterr().out
    assert "a.jpg: " in printed and "sub/phone.jpg: " in printed and "wrote 2 overlays" in printed
    summary = json.loads((out / "segmentation.json").read_text())
    assert sorted(summary) == ["a.jpg", "sub/phone.jpg"]
    predictor = SegmentationPredictor(trained / "model_final.pth", device="cpu")
    for name, size in (("a.jpg", (48, 64)), ("sub/phone.jpg", (40, 56))):
        with Image.open(out / f"{name}.png") as overlay:
            assert (overlay.height, overlay.width) == size
        with Image.open(out / f"{name}.mask.png") as mask:
            assert mask.mode == "P"
            expected = predictor(src / name).class_map
            assert np.array_equal(np.asarray(mask), expected)
        assert summary[name]["image_size"] == list(size)
        assert sum(c["pixels"] for c in summary[name]["classes"]) == size[0] * size[1]
    assert not (out / ".hidden").exists() and not (out / "notes.txt.png").exists()


def test_infer_seg_bad_input_is_one_error_line_and_writes_nothing(trained: Path, tmp_path, capsys) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("not a picture")
    picture = tmp_path / "p.png"
    Image.fromarray(_noise(32, 32, 0)).save(picture)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    model = str(trained / "model_final.pth")
    out = str(tmp_path / "out")
    cases = [
        (["--checkpoint", model, "--input", str(tmp_path / "missing"), "--output", out], "missing does not exist"),
        (["--checkpoint", model, "--input", str(text), "--output", out], "is not an image PIL can read"),
        (["--checkpoint", model, "--input", str(picture), "--output", str(a_file / "sub")], "cannot be a folder"),
        (["--checkpoint", str(tmp_path / "nope.pth"), "--input", str(picture), "--output", out], "nope.pth"),
        (["--checkpoint", model, "--input", str(picture), "--output", out, "--alpha", "2"], r"--alpha must be in \[0, 1\]"),
    ]
    for args, message in cases:
        code = infer_seg.main([*args, "--device", "cpu"])
        line = one_error_line(capsys.readouterr().err)
        assert code == 2 and re.search(message, line), (args, line)
        assert not (tmp_path / "out").exists()


def _env(cache: Path) -> dict[str, str]:
    return dict(os.environ, RESFPN_CACHE=str(cache), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


def test_ddp_two_processes_train_and_evaluate_like_one(trained: Path, cache: Path, tmp_path) -> None:
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29751"]
    proc = subprocess.run([*torchrun, "tools/train_seg.py", "--output-dir", str(tmp_path / "ddp"), "--max-iters", "2",
                           "--batch-size", "2", "--device", "cpu", "--no-progress", "--set", *TINY, "num_vis=0"],
                          cwd=REPO, env=_env(cache), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = torch.load(tmp_path / "ddp" / "checkpoint.pth", weights_only=True)
    assert state["iteration"] == 2 and state["config"]["batch_size"] == 2
    # 4 validation images over 2 ranks, counted once each: the numbers of one process.
    common = ["--checkpoint", str(trained / "model_final.pth"), "--device", "cpu", "--workers", "0", "--no-progress"]
    double = subprocess.run([*torchrun, "tools/eval_seg.py", *common, "--output-dir", str(tmp_path / "e2")],
                            cwd=REPO, env=_env(cache), capture_output=True, text=True, timeout=400)
    assert double.returncode == 0, double.stderr[-3000:]
    assert double.stdout.count("mean IoU:") == 2  # rank 0 only: torchvision's line and the table's
    m2 = json.loads((tmp_path / "e2" / "metrics.json").read_text())
    final = json.loads((trained / "metrics.json").read_text())
    assert m2["images"] == 4 and m2["mIoU"] == pytest.approx(final["val/mIoU"], abs=1e-3)
