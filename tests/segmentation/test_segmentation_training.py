"""Semantic segmentation on the shared runner: config, poly schedule, loss, evaluation, the task end to end, resume."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from engine import runner
from engine.config import ConfigError, apply_overrides, list_recipes, load_config
from engine.datasets import DataPathError
from segmentation import SHAPES_SEG_CLASSES, CocoSegmentation, load_segmenter, make_shapes
from segmentation.checkpoint import read_segmenter_training_state, save_segmenter
from segmentation.config import SEGMENTATION
from segmentation.evaluation import evaluate_segmenter, seg_metrics
from helpers import records
from segmentation.training import TASK, SegmentationLoss, evaluation_dataset, preflight_seg, resolve_seg_data, train_segmenter

TINY = [
    "shapes_train=16", "shapes_val=4", "shapes_size=64", "crop_size=64", "batch_size=4", "val_batch_size=4",
    "workers=0", "log_period=1", "warmup_iters=2", "num_vis=2", "amp=false", "channels_last=false",
    "model_kwargs={fpn_channels: 32, head_channels: 32}",
]


def _cfg(out: Path, *extra: str) -> dict:
    cfg = load_config("seg_shapes_semantic_fpn_r18", schema=SEGMENTATION)
    return apply_overrides(cfg, [*TINY, *extra], schema=SEGMENTATION, output_dir=str(out), device="cpu")


# ---------------------------------------------------------------------------------------------
# Config and schedule


def test_poly_schedule_is_torchvisions_after_the_warm_up():
    model = nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.02)
    cfg = load_config(None, schema=SEGMENTATION)
    assert cfg["scheduler"] == "poly"
    total = 50
    sched = runner.build_scheduler(opt, {**cfg, "warmup_iters": 0}, 10, total)
    lrs = []
    for _ in range(total + 1):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    # torchvision's references/segmentation: LambdaLR(lambda x: (1 - x / total) ** 0.9).
    assert lrs == pytest.approx([0.02 * (1 - t / total) ** 0.9 for t in range(total + 1)], rel=1e-9, abs=1e-12)
    assert lrs[-1] == 0.0
    warm = runner.build_scheduler(torch.optim.SGD(model.parameters(), lr=1.0), {**cfg, "warmup_iters": 10, "warmup_factor": 0.1}, 10, total)
    # Warm-up multiplies the poly factor: at iteration 5, halfway from 0.1 to 1.
    assert warm.lr_lambdas[0](5) == pytest.approx(0.55 * (1 - 5 / total) ** 0.9)


def test_every_segmentation_recipe_loads_and_the_gpu_ones_carry_torchvisions_settings():
    recipes = {r["name"]: r for r in list_recipes("segmentation")}
    assert "seg_shapes_semantic_fpn_r18" in recipes and all(r["description"] for r in recipes.values())
    gpu = [name for name in recipes if "shapes" not in name and not name.endswith("_cpu")]  # the CPU recipes: tests/engine/test_recipes.py
    assert {"seg_deeplabv3_r18_voc", "seg_deeplabv3_r34_voc", "seg_fcn_r18_voc", "seg_semantic_fpn_r18_coco"} <= set(gpu)
    for name in recipes:
        load_config(name, schema=SEGMENTATION)
    for name in gpu:
        cfg = load_config(name, schema=SEGMENTATION)
        total_batch = cfg["batch_size"] * 8  # torchrun --nproc_per_node=8, as the recipes say
        assert (cfg["optimizer"], cfg["scheduler"], cfg["epochs"], cfg["momentum"], cfg["weight_decay"]) == ("sgd", "poly", 30, 0.9, 1e-4), name
        assert cfg["lr"] * total_batch / cfg["lr_reference_batch"] == pytest.approx(0.02), name
        assert (cfg["base_size"], cfg["crop_size"], cfg["scale_range"], cfg["val_resize"]) == (520, 480, [0.5, 2.0], 520), name
        assert cfg["aux_loss"] and cfg["aux_weight"] == 0.5 and cfg["weights_backbone"] == "imagenet", name
        assert cfg["device"] == "auto" and cfg["data_path"] is None, name  # --data-path given on the command line


@pytest.mark.parametrize("override, message", [
    ("model_kwargs={head_chanels: 64}", "unknown option 'head_chanels' for semantic_fpn; did you mean head_channels"),
    ("model_kwargs={atrous_rates: [6, 12]}", "option 'atrous_rates' only applies to deeplabv3"),
    ("model_kwargs={output_stride: 8}", "model_kwargs.output_stride: output_stride is a config key of its own"),
    ("output_stride=4", r"output_stride must be one of \[None, 8, 16, 32\], got 4"),
    ("scheduler=linear", r"scheduler must be one of \['multistep', 'cosine', 'poly'\]"),
    ("scale_range=[2.0, 0.5]", r"scale_range must be \[low, high\] with low <= high"),
    ("coco_categories=[1, 1]", "coco_categories must be null, 'voc' or a non-empty list of distinct"),
    ("data_format=cityscapes", r"data_format must be one of \['auto', 'coco', 'voc'\]"),
    ("crop_sise=64", "unknown config key 'crop_sise'.*did you mean crop_size"),
])
def test_a_bad_setting_names_the_key_and_what_it_must_be(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        _cfg(tmp_path / "run", override)


def test_class_weights_need_one_weight_per_label(tmp_path, cache):
    with pytest.raises(ConfigError, match="class_weights must be a list of non-negative numbers"):
        _cfg(tmp_path / "run", "class_weights=[0, 0]")
    cfg = _cfg(tmp_path / "run", "class_weights=[0.25, 1, 1]")
    run = runner.setup_run(cfg, progress=False)
    with pytest.raises(ConfigError, match=r"class_weights has 3 weights for 7 labels \(__background__, circle"):
        TASK.build_model(cfg, run, TASK.build_data(cfg, run))


def test_deeplabv3_needs_two_images_per_batch(tmp_path):
    with pytest.raises(ConfigError, match="batch_size must be at least 2 for deeplabv3"):
        _cfg(tmp_path / "run", "model=deeplabv3", "model_kwargs={}", "batch_size=1")
    assert _cfg(tmp_path / "run", "model=fcn", "model_kwargs={}", "batch_size=1")["batch_size"] == 1


# ---------------------------------------------------------------------------------------------
# Loss and evaluation


class _Fixed(nn.Module):
    """A "segmenter" that returns the logits it was given (and the same as aux logits)."""

    def __init__(self, logits: torch.Tensor, aux: bool = False) -> None:
        super().__init__()
        self.logits, self.aux = logits, aux
        self.w = nn.Parameter(torch.ones(()))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {"out": self.logits * self.w}
        if self.aux:
            out["aux"] = 2 * self.logits * self.w
        return out


def test_loss_is_cross_entropy_over_counted_pixels_plus_half_the_aux_loss():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 4, 5, generator=g)
    masks = torch.randint(0, 3, (2, 4, 5), generator=g)
    masks[0, :2] = 255
    losses = SegmentationLoss(_Fixed(logits, aux=True))(torch.zeros(2, 3, 4, 5), masks)
    keep = masks != 255
    expected = nn.functional.cross_entropy(logits.permute(0, 2, 3, 1)[keep], masks[keep])
    assert losses["loss_seg"].item() == pytest.approx(expected.item(), rel=1e-6)
    aux = nn.functional.cross_entropy((2 * logits).permute(0, 2, 3, 1)[keep], masks[keep])
    assert losses["loss_aux"].item() == pytest.approx(0.5 * aux.item(), rel=1e-6)
    # Class weights: torch's weighted mean over the counted pixels (the background counts a quarter here).
    weight = [0.25, 1.0, 2.0]
    weighted = SegmentationLoss(_Fixed(logits), class_weights=weight)(torch.zeros(2, 3, 4, 5), masks)["loss_seg"]
    torch_weighted = nn.functional.cross_entropy(logits, masks, weight=torch.tensor(weight), ignore_index=255)
    assert weighted.item() == pytest.approx(torch_weighted.item(), rel=1e-6) and weighted.item() != pytest.approx(expected.item())
    # A crop that fell entirely on ignored pixels adds nothing; it is not a non-finite loss.
    for w in (None, weight):
        empty = SegmentationLoss(_Fixed(logits), class_weights=w)(torch.zeros(2, 3, 4, 5), torch.full((2, 4, 5), 255))
        assert set(empty) == {"loss_seg"} and empty["loss_seg"].item() == 0.0
        empty["loss_seg"].backward()


class _Oracle(nn.Module):
    """Logits that say the masks of a list of samples, at half resolution, looked up by the image's first pixel."""

    def __init__(self, masks: list[torch.Tensor], num_classes: int, wrong: int | None = None) -> None:
        super().__init__()
        self.masks, self.num_classes, self.wrong = masks, num_classes, wrong

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        out = []
        for image in images:
            mask = self.masks[int(image[0, 0, 0])].clone()
            mask[mask == 255] = 0
            if self.wrong is not None:
                mask[:] = self.wrong
            onehot = nn.functional.one_hot(mask, self.num_classes).permute(2, 0, 1).float()
            out.append(onehot[:, ::2, ::2])  # lower resolution: evaluation resizes logits to the masks
        return {"out": torch.stack(out)}


def _samples(n: int = 5, size: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    samples = []
    for i in range(n):
        image = torch.full((3, size, size), float(i))
        mask = torch.zeros(size, size, dtype=torch.int64)
        mask[: size // 2, : size // 2] = 1 + i % 2
        mask[-1] = 255
        samples.append((image, mask))
    return samples


def test_evaluation_counts_every_labelled_pixel_once_and_skips_255():
    samples = _samples()
    masks = [m for _, m in samples]
    cm = evaluate_segmenter(_Oracle(masks, 3), samples, num_classes=3, batch_size=2)
    assert cm.images == 5 and int(cm.mat.sum()) == 5 * 7 * 8  # the last row of each mask is 255
    summary = cm.summary(["bg", "a", "b"])
    assert summary["mIoU"] == 100.0 and summary["pixel_acc"] == 100.0
    wrong = evaluate_segmenter(_Oracle(masks, 3, wrong=0), samples, num_classes=3, batch_size=3)
    metrics = seg_metrics(wrong, ["bg", "a", "b"])
    # Everything called background: background IoU = 40 / 56, the two classes 0.
    assert metrics["val/IoU/bg"] == pytest.approx(100 * 40 / 56, abs=1e-3)
    assert metrics["val/IoU/a"] == metrics["val/IoU/b"] == 0.0
    assert metrics["val/mIoU"] == pytest.approx(100 * 40 / 56 / 3, abs=1e-3)


def test_evaluation_does_not_depend_on_the_batch_size_when_sizes_differ():
    from segmentation import build_segmenter

    torch.manual_seed(0)
    model = build_segmenter("fcn", num_classes=3, head_channels=16, output_stride=8).eval()
    g = torch.Generator().manual_seed(2)
    samples = [(torch.randn(3, h, 32, generator=g), torch.randint(0, 3, (h, 32), generator=g)) for h in (32, 24, 32, 24, 16)]
    one = evaluate_segmenter(model, samples, num_classes=3, batch_size=1)
    # Padding the 24- and 16-row images to 32 rows would change their predictions near the border.
    assert torch.equal(evaluate_segmenter(model, samples, num_classes=3, batch_size=5).mat, one.mat)
    assert int(one.mat.sum()) == 32 * (32 + 24 + 32 + 24 + 16)


def _eval_rank(rank: int, init_file: str, out: str) -> None:
    # Spawned, not forked: a forked gloo rank crashed a whole pytest run (SIGSEGV) in a fresh-clone CI run.
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        samples = _samples()
        # A model that is right on some images only, so the sum is not trivially symmetric.
        cm = evaluate_segmenter(_Oracle([m if i % 3 else m * 0 for i, (_, m) in enumerate(samples)], 3), samples, num_classes=3)
        torch.save({"mat": cm.mat, "images": cm.images}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_two_ranks_score_disjoint_halves_and_agree_with_one_process(tmp_path):
    out = str(tmp_path / "cm")
    # The two gloo ranks run under a process of their own: started from the pytest process they
    # crashed the whole run with SIGSEGV in a fresh-clone CI run.
    import subprocess
    import sys

    here = Path(__file__).resolve().parent
    script = tmp_path / "two_ranks.py"
    script.write_text(
        f"import sys\nsys.path[:0] = [{str(here)!r}, {str(here.parent)!r}, {str(here.parents[1])!r}]\n"
        "import torch.multiprocessing as mp\nfrom test_segmentation_training import _eval_rank\n"
        "if __name__ == '__main__':\n"
        f"    mp.start_processes(_eval_rank, args=({str(tmp_path / 'init')!r}, {out!r}), nprocs=2, start_method='spawn')\n"
    )
    proc = subprocess.run([sys.executable, str(script)], cwd=here.parents[1], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    samples = _samples()
    single = evaluate_segmenter(_Oracle([m if i % 3 else m * 0 for i, (_, m) in enumerate(samples)], 3), samples, num_classes=3)
    for rank in range(2):
        got = torch.load(f"{out}.{rank}", weights_only=True)
        assert got["images"] == 5 and got["mat"].tolist() == single.mat.tolist()


# ---------------------------------------------------------------------------------------------
# Data


def test_coco_categories_pick_and_order_the_labels(tmp_path):
    root = make_shapes(tmp_path / "shapes", num_train=4, num_val=2, image_size=64, seed=3)
    every = CocoSegmentation(root, "train")
    picked = CocoSegmentation(root, "train", categories=[3, 1])  # triangle, circle
    assert picked.class_names == ["__background__", "triangle", "circle"]
    for i in range(len(every)):
        full = every.read_sample(i)[1]
        _, mask = picked.read_sample(i)
        expected = np.zeros_like(full)
        expected[full == 3] = 1
        expected[full == 1] = 2
        assert np.array_equal(mask, expected)
    from engine.coco import AnnotationError

    with pytest.raises(AnnotationError, match=r"categories \[99\] are not among its category ids \[1, 2, 3, 4, 5, 6\]"):
        CocoSegmentation(root, "train", categories=[1, 99])


def _voc(root: Path, ids=("a", "b"), lists=("train", "val")) -> Path:
    from PIL import Image

    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(ids):
        Image.fromarray(np.full((32, 40, 3), 40 * i, np.uint8)).save(root / "JPEGImages" / f"{name}.jpg")
        mask = np.zeros((32, 40), np.uint8)
        mask[4:20, 8:30] = 15
        mask[0] = 255
        Image.fromarray(mask, mode="L").save(root / "SegmentationClass" / f"{name}.png")
    for split in lists:
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return root


def test_data_layout_is_told_by_the_folders_and_a_bad_one_is_named(tmp_path, cache):
    voc = _voc(tmp_path / "VOCdevkit" / "VOC2012")
    cfg = load_config(None, schema=SEGMENTATION)
    assert resolve_seg_data({**cfg, "data_path": str(voc)}) == (voc, "voc", "train", "val")
    with pytest.raises(DataPathError, match=r"in neither layout.*VOCdevkit/VOC2012 looks like the folder to pass"):
        resolve_seg_data({**cfg, "data_path": str(tmp_path)})
    with pytest.raises(DataPathError, match=r"--val-split test: no .*test.txt \(lists found: train, val"):
        resolve_seg_data({**cfg, "data_path": str(voc), "val_split": "test"})
    with pytest.raises(DataPathError, match="does not exist"):
        resolve_seg_data({**cfg, "data_path": str(tmp_path / "nope")})
    shapes = resolve_seg_data({**cfg, "shapes_train": 4, "shapes_val": 2, "shapes_size": 64})
    assert shapes[1:] == ("coco", "train", "val") and (shapes[0] / "annotations" / "instances_val.json").is_file()


def test_evaluation_data_refuses_a_label_count_the_model_does_not_have(tmp_path, cache):
    voc = _voc(tmp_path / "voc")
    dataset, described = evaluation_dataset(None, [str(i) for i in range(21)], data_path=str(voc))
    assert len(dataset) == 2 and described.endswith("(val)")
    with pytest.raises(DataPathError, match=r"has 7 labels .* but the model has 21"):
        evaluation_dataset(_cfg(tmp_path / "x"), [str(i) for i in range(21)])  # the shapes set the config names
    with pytest.raises(ConfigError, match="--data-path is needed"):
        evaluation_dataset(None, ["a", "b"])


# ---------------------------------------------------------------------------------------------
# The task end to end


def test_a_run_writes_its_model_records_curves_and_overlays(tmp_path, cache):
    result = train_segmenter(_cfg(tmp_path / "run", "epochs=2"), progress=False)
    out = tmp_path / "run"
    assert result["iteration"] == 8 and result["class_names"] == list(SHAPES_SEG_CLASSES)
    evals = [r for r in records(out) if "val/mIoU" in r]
    assert [r["iter"] for r in evals] == [4, 8] and [r["epoch"] for r in evals] == [0, 1]
    assert all(0 <= r["val/mIoU"] <= 100 and 0 <= r["val/pixel_acc"] <= 100 for r in evals)
    assert set(json.loads((out / "metrics.json").read_text())) >= {"val/mIoU", "val/pixel_acc", "val/IoU/circle"}
    model = load_segmenter(out / "model_final.pth")
    assert model.class_names == list(SHAPES_SEG_CLASSES) and model.train_config["model"] == "semantic_fpn"
    assert model.build_args["head_channels"] == 32 and model.build_args["fpn_channels"] == 32
    assert (out / "curves.png").stat().st_size > 0
    vis = sorted((out / "vis").glob("*.png"))
    assert len(vis) == 2
    from PIL import Image

    with Image.open(vis[0]) as picture:  # ground truth | 4-pixel gap | prediction, at the image's size
        assert picture.height in (48, 64) and picture.width in (2 * 48 + 4, 2 * 64 + 4)
    # The final evaluation is the model on disk: scoring model_final.pth again gives the same numbers.
    dataset, _ = evaluation_dataset(model.train_config, model.class_names)
    again = seg_metrics(evaluate_segmenter(model, dataset, num_classes=7, batch_size=4), model.class_names)
    assert again["val/mIoU"] == pytest.approx(evals[-1]["val/mIoU"], abs=1e-3)


def test_aux_loss_is_trained_and_logged(tmp_path, cache):
    train_segmenter(_cfg(tmp_path / "run", "model=fcn", "model_kwargs={head_channels: 16}", "aux_loss=true",
                         "output_stride=16", "max_iters=2", "eval_period=0", "num_vis=0"), progress=False)
    recs = [r for r in records(tmp_path / "run") if "loss" in r]
    assert all(r["loss"] == pytest.approx(r["loss_seg"] + r["loss_aux"], rel=1e-5) for r in recs)
    model = load_segmenter(tmp_path / "run" / "model_final.pth")
    assert model.aux_classifier is not None and model.build_args["output_stride"] == 16


# Resume mid-epoch (the batches and rates of an uninterrupted run): tests/test_task_contract.py, for every task.


def test_preflight_refuses_bad_inputs_before_any_work(tmp_path, cache):
    from backbones.weights import WeightsError
    from segmentation import build_segmenter

    with pytest.raises(DataPathError, match="does not exist"):
        preflight_seg(_cfg(tmp_path / "run", f"data_path={tmp_path / 'nope'}"))
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        preflight_seg(_cfg(tmp_path / "run"), resume=True)
    final = tmp_path / "model_final.pth"
    save_segmenter(build_segmenter("fcn", num_classes=3, head_channels=16), final, class_names=["a", "b", "c"])
    with pytest.raises(WeightsError, match=r"not a segmentation training checkpoint .* lacks \['optimizer'"):
        preflight_seg(_cfg(tmp_path / "run"), resume=final)
    with pytest.raises(WeightsError, match="could not read|not found|does not exist"):
        preflight_seg(_cfg(tmp_path / "run", f"weights_backbone={tmp_path / 'trunk.pth'}"))
    assert not (tmp_path / "run").exists() and not cache.exists()  # nothing made, not even the shapes set
    voc = _voc(tmp_path / "voc")
    assert preflight_seg(_cfg(tmp_path / "run", f"data_path={voc}"))["data_format"] == "voc"


def test_preflight_says_when_mask_labels_do_not_fit_the_classes(tmp_path, cache, caplog):
    from PIL import Image

    voc = _voc(tmp_path / "voc", ids=("a", "b", "c"))  # labels 0, 15 and 255
    names = "class_names=[背景,道路,汽车,行人]"
    with pytest.raises(ConfigError, match=r"use label 15, which does not fit the 4 configured classes .*--set 'class_names=\["):
        preflight_seg(_cfg(tmp_path / "run", f"data_path={voc}", names))
    for i, name in enumerate(("a", "b", "c")):  # a set of one's own: labels 0..3
        mask = np.zeros((32, 40), np.uint8)
        mask[4:20, 8:30] = i + 1
        mask[0] = 255
        Image.fromarray(mask, mode="L").save(voc / "SegmentationClass" / f"{name}.png")
    with caplog.at_level(logging.WARNING, logger="segmentation.training"):
        preflight_seg(_cfg(tmp_path / "run", f"data_path={voc}"))  # VOC's 21 classes for 4 labels
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1 and "(4 labels) but 21 classes are configured" in warned[0] and "class_names=" in warned[0], warned
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="segmentation.training"):
        preflight_seg(_cfg(tmp_path / "run", f"data_path={voc}", names))  # named: nothing to say
    assert not caplog.records
    assert not (tmp_path / "run").exists()


def test_train_on_a_voc_folder(tmp_path):
    voc = _voc(tmp_path / "voc", ids=("a", "b", "c", "d"))
    cfg = _cfg(tmp_path / "run", f"data_path={voc}", "crop_size=32", "batch_size=2", "val_batch_size=2", "val_resize=null",
               "max_iters=2", "num_vis=1")
    result = train_segmenter(cfg, progress=False)
    assert result["class_names"][15] == "person" and len(result["class_names"]) == 21
    final = json.loads((tmp_path / "run" / "metrics.json").read_text())
    # Only background and person appear: the mean is over the labels seen in ground truth or predictions.
    seen = [v for k, v in final.items() if k.startswith("val/IoU/") and v is not None]
    assert final["val/mIoU"] == pytest.approx(sum(seen) / len(seen), abs=1e-3)
    assert (tmp_path / "run" / "vis" / "a.png").is_file()
    # A VOC-layout set of one's own names its labels; masks outside them are skipped, and when all are, an error.
    names = ["__background__", *[f"c{i}" for i in range(1, 16)]]
    cfg = _cfg(tmp_path / "own", f"data_path={voc}", "crop_size=32", "batch_size=2", "val_resize=null", "max_iters=1",
               "num_vis=0", f"class_names={names}")
    assert train_segmenter(cfg, progress=False)["class_names"] == names
    with pytest.raises(ConfigError, match="class_names names the labels of VOC-layout masks"):
        train_segmenter(_cfg(tmp_path / "coco", "class_names=[a, b]", "max_iters=1"), progress=False)


def test_checkpoint_of_another_task_is_refused_for_resume(tmp_path):
    from backbones.weights import WeightsError

    det = tmp_path / "det.pth"
    torch.save({"model": {}, "build_args": {"arch": "faster_rcnn"}, "optimizer": {}, "scheduler": {}, "scaler": {},
                "epoch": 0, "iteration": 1, "config": {}, "category_mapping": {}}, det)
    with pytest.raises(WeightsError, match=r"lacks \['class_names'\]"):
        read_segmenter_training_state(det)
    torch.save({"model": {}, "build_args": {"arch": "faster_rcnn"}, "class_names": [], "optimizer": {}, "scheduler": {},
                "scaler": {}, "epoch": 0, "iteration": 1, "config": {}}, det)
    with pytest.raises(WeightsError, match="its arch is 'faster_rcnn'"):
        read_segmenter_training_state(det)


# ---------------------------------------------------------------------------------------------
# CUDA (make check-gpu: pytest -m cuda tests/segmentation/test_segmentation_training.py); skipped without a GPU

needs_cuda = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (make check-gpu runs these)")]


def _cuda(test):
    for mark in needs_cuda:
        test = mark(test)
    return test


def _steps(arch: str, device: torch.device, dtype: torch.dtype | None, steps: int = 3, **kwargs) -> list[float]:
    """A few optimisation steps of a small segmenter under autocast; the losses."""
    from segmentation import build_segmenter

    torch.manual_seed(0)
    model = build_segmenter(arch, num_classes=4, aux_loss=True, **kwargs).to(device)
    loss_model = SegmentationLoss(model).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    g = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 96, 128, generator=g).to(device)
    masks = torch.randint(0, 4, (2, 96, 128), generator=g).to(device)
    masks[:, :8] = 255
    losses = []
    for _ in range(steps):
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            terms = loss_model(images, masks)
        loss = sum(terms.values())
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        losses.append(loss.item())
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    return losses


@_cuda
@pytest.mark.parametrize("arch, kwargs", [("deeplabv3", {"output_stride": 8}), ("deeplabv3", {"output_stride": 16}),
                                          ("fcn", {"output_stride": 8}), ("semantic_fpn", {})])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_cuda_mixed_precision_steps_are_finite_and_learn(arch, kwargs, dtype):
    losses = _steps(arch, torch.device("cuda"), dtype, steps=4, **kwargs)
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]


@_cuda
@pytest.mark.parametrize("arch", ["deeplabv3", "fcn", "semantic_fpn"])
def test_cuda_outputs_match_the_cpu_and_checkpoints_move_between_them(arch, tmp_path):
    from segmentation import build_segmenter

    torch.manual_seed(0)
    model = build_segmenter(arch, num_classes=5, head_channels=64).eval()
    x = torch.randn(1, 3, 120, 152)
    with torch.no_grad():
        expected = model(x)["out"]
        got = model.cuda()(x.cuda())["out"].cpu()
    assert (got - expected).abs().max().item() < 1e-2 * expected.abs().max().item()  # TF32 convolutions on Ampere+
    save_segmenter(model, tmp_path / "m.pth", class_names=list("abcde"))
    back = load_segmenter(tmp_path / "m.pth", device="cpu")
    assert all(t.device.type == "cpu" for t in back.state_dict().values())
    with torch.no_grad():
        assert torch.allclose(back(x)["out"], expected, atol=1e-5)


@_cuda
def test_cuda_run_trains_evaluates_and_resumes_with_amp(tmp_path, cache):
    flags = ("epochs=2", "amp=true", "eval_period=1", "checkpoint_period=2", "num_vis=1")
    cfg = apply_overrides(_cfg(tmp_path / "run", *flags, "max_iters=3"), [], schema=SEGMENTATION, device="cuda")
    assert train_segmenter(cfg, progress=False)["iteration"] == 3
    cfg = apply_overrides(_cfg(tmp_path / "run", *flags), [], schema=SEGMENTATION, device="cuda")
    result = train_segmenter(cfg, resume=True, progress=False)
    assert result["iteration"] == 8 and 0 <= result["metrics"]["val/mIoU"] <= 100
    state = read_segmenter_training_state(tmp_path / "run" / "checkpoint.pth")
    assert state["scaler"]  # fp16 on CUDA: the GradScaler's state travels with the checkpoint
    assert load_segmenter(tmp_path / "run" / "model_final.pth").class_names == list(SHAPES_SEG_CLASSES)
