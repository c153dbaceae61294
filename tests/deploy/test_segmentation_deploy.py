"""Segmenters deployed as detectors are (issue 21 items 6 and 7).

ONNX and TorchScript export with dynamic sizes, ONNX Runtime and OpenVINO (fp32 and int8)
behind the eager segmenter's call, mIoU measured on each exported file by
``tools/eval_seg.py --runtime``, bad input as one error line, the segmenter benchmark rows,
and the GPU check's segmentation step (its figures faked, as tests/devtools/test_check_gpu.py does).
Tiny models at 64-100 px; every export here is done once.
"""

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deploy.export import ExportError, export_onnx, export_torchscript, read_metadata
from deploy.files import FileFormatError, identify, kind_of
from deploy.runtime import ExportedSegmenter, load_exported
from deploy.segmenter import seg_calibration_images
from engine.images import read_image_rgb
from deploy import SegmentationPredictor
from segmentation import SHAPES_SEG_CLASSES, CocoSegmentation, build_segmenter, load_segmenter, make_shapes, save_segmenter
from segmentation.checkpoint import SEGMENTER_TRAINING_KEYS
from helpers import REPO, load_tool, one_error_line, random_statistics

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


def _runtimes() -> list[str]:
    try:
        import openvino  # noqa: F401

        return ["onnxruntime", "openvino"]
    except ImportError:
        return ["onnxruntime"]


def _segmenter(arch: str, num_classes: int = 5, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    model = random_statistics(build_segmenter(arch, num_classes=num_classes, head_channels=32, **kwargs)).eval()
    model.class_names = [f"c{i}" for i in range(num_classes)]
    return model


def _close(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert out.dtype == torch.float32 and out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().amax()))


# Batch 2 and 1, landscape and portrait, sizes no stride divides: the file was traced at 64x64.
BATCHES = [(2, 3, 72, 90), (1, 3, 97, 61)]


# ---------------------------------------------------------------------------------------------
# Export and runtimes


@pytest.mark.parametrize("arch, kwargs", [("deeplabv3", {"output_stride": 8, "aux_loss": True}), ("fcn", {"output_stride": 16}),
                                          ("semantic_fpn", {"fpn_channels": 32})])
def test_onnx_export_runs_at_any_size_in_both_runtimes_as_eager(arch, kwargs, tmp_path):
    model = _segmenter(arch, **kwargs)
    path = export_onnx(model, tmp_path / "seg.onnx", export_size=(64, 64))
    meta = read_metadata(path)
    assert meta["task"] == "segmentation" and meta["arch"] == arch and meta["num_classes"] == 5
    assert meta["class_names"] == model.class_names and meta["outputs"] == ["out"] and meta["precision"] == "fp32"
    assert meta["normalize"]["mean"] == [0.485, 0.456, 0.406] and meta["normalize"]["std"] == [0.229, 0.224, 0.225]
    assert meta["input"]["range"] == [0.0, 1.0] and meta["export_size"] == [64, 64]
    assert meta["build_args"]["output_stride"] == model.build_args["output_stride"]
    proto = onnx.load(str(path))
    dims = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, "height", "width"]
    assert not [i.name for i in proto.graph.initializer if "aux_classifier" in i.name]  # the training aid is left out
    batches = [torch.randn(*shape, generator=torch.Generator().manual_seed(i)) for i, shape in enumerate(BATCHES)]
    with torch.no_grad():
        refs = [model(x)["out"] for x in batches]
    for runtime in _runtimes():
        exported = load_exported(path, runtime=runtime, num_threads=1)
        assert isinstance(exported, ExportedSegmenter) and exported.runtime == f"{runtime} fp32"
        for x, ref in zip(batches, refs):
            out = exported(x)
            assert set(out) == {"out"}
            _close(out["out"], ref)


def test_torchscript_file_runs_behind_the_same_call(tmp_path):
    model = _segmenter("fcn", output_stride=16)
    path = export_torchscript(model, tmp_path / "seg.pt")
    info = identify(path)
    assert info.kind == "torchscript" and info.metadata["task"] == "segmentation" and info.metadata["class_names"] == model.class_names
    exported = load_exported(path)
    assert exported.runtime == "torchscript fp32"
    for shape in BATCHES:
        x = torch.randn(*shape)
        with torch.no_grad():
            _close(exported(x)["out"], model(x)["out"])
    scripted = torch.jit.load(str(path))  # needs no resfpn: pixels in [0, 1] in, logits out
    pixels = torch.rand(1, 3, 50, 70)
    with torch.no_grad():
        _close(scripted(pixels), model((pixels - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) / torch.tensor([0.229, 0.224, 0.225])[:, None, None])["out"])


def test_export_refusals(tmp_path):
    model = _segmenter("fcn", output_stride=16)
    with pytest.raises(ExportError, match="category_mapping is a detector's"):
        export_onnx(model, tmp_path / "x.onnx", category_mapping={"cat_ids": [1], "names": ["a"]})
    with pytest.raises(ExportError, match=r"opset must be an integer in \[16"):
        export_onnx(model, tmp_path / "x.onnx", opset=11)
    model.class_names = ["a", "b"]
    with pytest.raises(ExportError, match="2 class names for num_classes=5"):
        export_onnx(model, tmp_path / "x.onnx", export_size=(64, 64))
    assert not list(tmp_path.iterdir())  # nothing half-written


# ---------------------------------------------------------------------------------------------
# A checkpoint on a tiny shapes set, exported by tools/export.py (fp32, int8 calibrated on its training images, TorchScript)


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    base = tmp_path_factory.mktemp("segdeploy")
    root = make_shapes(base / "shapes", num_train=4, num_val=4, image_size=64)
    model = _segmenter("semantic_fpn", num_classes=len(SHAPES_SEG_CLASSES), fpn_channels=32)
    config = {"data_path": str(root), "data_format": "coco", "train_split": "train", "val_split": "val"}
    ckpt = save_segmenter(model, base / "model_final.pth", class_names=SHAPES_SEG_CLASSES, config=config)
    export = load_tool("export")
    files = {"onnx": base / "seg.onnx", "int8": base / "seg_int8.onnx", "pt": base / "seg.pt"}
    for key, flags in (("onnx", ["--export-size", "64", "64"]), ("int8", ["--export-size", "64", "64", "--int8", "--calib-images", "2"]),
                       ("pt", ["--format", "torchscript"])):
        assert export.main(["--checkpoint", str(ckpt), "--output", str(files[key]), *flags]) == 0
    return {"root": root, "ckpt": ckpt, "model": load_segmenter(ckpt), "config": config, **files}


def test_exported_segmenter_is_the_eager_model_to_prediction(deployed):
    exported = load_exported(deployed["onnx"])
    assert exported.eval() is exported and exported.to("cpu") is exported and exported.train(False) is exported and not exported.training
    assert exported.class_names == list(SHAPES_SEG_CLASSES) and exported.build_args["arch"] == "semantic_fpn"
    assert exported.train_config["data_path"] == str(deployed["root"])  # eval_seg finds the data by it
    with pytest.raises(ValueError, match="runs on the CPU"):
        exported.to("cuda")
    with pytest.raises(ValueError, match="exported inference file"):
        exported.train()
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        exported(torch.rand(3, 64, 64))
    image = np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    ours, eager = SegmentationPredictor(exported, device="cpu")(image), SegmentationPredictor(deployed["model"], device="cpu")(image)
    assert ours.class_names == eager.class_names and ours.class_map.shape == (50, 70)
    _close(ours.logits, eager.logits)


def test_int8_is_calibrated_on_the_training_pixels_and_keeps_the_labels(deployed):
    calib = seg_calibration_images(config=deployed["config"], count=2)
    files = sorted((deployed["root"] / "train").glob("*.jpg"))
    assert len(calib) == 2 and len(files) == 4
    # What the file is fed: the pixels in [0, 1] (spread over the split: images 0 and 2), not normalised ones.
    for image, file in zip(calib, files[::2]):
        pixels = torch.from_numpy(read_image_rgb(file).transpose(2, 0, 1).astype(np.float32) / 255)
        torch.testing.assert_close(image, pixels, rtol=0, atol=1e-6)
    meta = read_metadata(deployed["int8"])
    assert meta["precision"] == "int8" and meta["int8"]["calibration_images"] == 2 and meta["task"] == "segmentation"
    assert sum(n.op_type == "QuantizeLinear" for n in onnx.load(str(deployed["int8"])).graph.node) > 10
    val = CocoSegmentation(deployed["root"], "val")  # normalised, as evaluation feeds them; of several sizes
    images = [val[i][0][None] for i in range(len(val))]
    with torch.no_grad():
        labels = torch.cat([deployed["model"](x)["out"].argmax(1).flatten() for x in images])
    for runtime in _runtimes():
        exported = load_exported(deployed["int8"], runtime=runtime, num_threads=1)
        assert exported.runtime == f"{runtime} int8"
        agreement = (torch.cat([exported(x)["out"].argmax(1).flatten() for x in images]) == labels).float().mean().item()
        assert agreement >= 0.9, f"{runtime} int8 keeps {agreement:.1%} of the eager labels"


def test_eval_seg_scores_each_exported_file_as_its_checkpoint(deployed, tmp_path, capsys):
    eval_seg = load_tool("eval_seg")
    cases = {"torch": [str(deployed["ckpt"])], "onnxruntime fp32": [str(deployed["onnx"])],
             "torchscript fp32": [str(deployed["pt"])], "onnxruntime int8": [str(deployed["int8"])]}
    if "openvino" in _runtimes():
        cases["openvino fp32"] = [str(deployed["onnx"]), "--runtime", "openvino"]
        cases["openvino int8"] = [str(deployed["int8"]), "--runtime", "openvino"]
    metrics = {}
    for runtime, (path, *flags) in cases.items():
        out = tmp_path / runtime.replace(" ", "_")
        assert eval_seg.main(["--checkpoint", path, *flags, "--workers", "0", "--no-progress", "--output-dir", str(out)]) == 0
        printed = capsys.readouterr().out
        assert f"({runtime}) on {deployed['root']} (val): 4 images" in printed and "mean IoU: " in printed
        metrics[runtime] = json.loads((out / "metrics.json").read_text())
        assert metrics[runtime]["runtime"] == runtime and metrics[runtime]["images"] == 4
    for runtime, m in metrics.items():
        gap = 3.0 if "int8" in runtime else 1e-3  # fp32 files give the checkpoint's numbers
        assert abs(m["mIoU"] - metrics["torch"]["mIoU"]) <= gap, (runtime, m["mIoU"], metrics["torch"]["mIoU"])
        assert abs(m["pixel_acc"] - metrics["torch"]["pixel_acc"]) <= gap, runtime


def _detector_onnx(path: Path) -> Path:
    """An ONNX file with a detector export's metadata (the graph is never loaded: the task is read first)."""
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["image"], ["boxes"])], "g",
        [onnx.helper.make_tensor_value_info("image", onnx.TensorProto.FLOAT, [3, "height", "width"])],
        [onnx.helper.make_tensor_value_info("boxes", onnx.TensorProto.FLOAT, [3, "height", "width"])],
    )
    proto = onnx.helper.make_model(graph)
    for key, value in {"resfpn.task": "detection", "resfpn.arch": "faster_rcnn", "resfpn.outputs": '["boxes", "labels", "scores"]'}.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(path))
    return path


def test_bad_input_is_one_error_line_before_any_work(deployed, tmp_path, capsys, monkeypatch):
    eval_seg, eval_coco = load_tool("eval_seg"), load_tool("eval_coco")
    seg_onnx, ckpt = str(deployed["onnx"]), str(deployed["ckpt"])
    detector = str(_detector_onnx(tmp_path / "det.onnx"))
    out = tmp_path / "out"
    seg_cases = [
        ([detector], r"det.onnx is an exported detector \(faster_rcnn\), not a segmenter: score it with tools/eval_coco.py"),
        ([str(tmp_path / "missing.onnx"), "--runtime", "onnxruntime"], "missing.onnx not found"),
        ([str(tmp_path / "missing.onnx")], "missing.onnx"),
        ([seg_onnx, "--runtime", "torch"], "runtime 'torch' does not run .*seg.onnx: it is an exported ONNX file"),
        ([ckpt, "--runtime", "openvino"], "runtime 'openvino' does not run .*model_final.pth: it is a PyTorch checkpoint"),
        ([seg_onnx, "--device", "cuda"], "exported files run on the CPU"),
        ([seg_onnx, "--amp"], "--amp is for PyTorch checkpoints"),
    ]
    for args, message in seg_cases:
        code = eval_seg.main(["--checkpoint", *args, "--workers", "0", "--no-progress", "--output-dir", str(out)])
        line = one_error_line(capsys.readouterr().err)
        assert code == 2 and re.search(message, line), (args, line)
    coco_cases = [
        ([seg_onnx], r"seg.onnx is an exported segmenter \(semantic_fpn\), not a detector: score it with tools/eval_seg.py"),
        ([str(deployed["pt"])], "seg.pt is an exported segmenter"),
        ([ckpt], r"model_final.pth is a segmenter file \(tools/train_seg.py\), not a detector: score it with tools/eval_seg.py"),
    ]
    for args, message in coco_cases:
        code = eval_coco.main(["--checkpoint", *args, "--workers", "0", "--no-progress", "--output-dir", str(out)])
        line = one_error_line(capsys.readouterr().err)
        assert code == 2 and re.search(message, line), (args, line)
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino now raises ImportError
    assert eval_seg.main(["--checkpoint", seg_onnx, "--runtime", "openvino", "--output-dir", str(out)]) == 2
    assert re.search("runtime 'openvino' is not installed: pip install openvino", one_error_line(capsys.readouterr().err))
    export = load_tool("export")
    code = export.main(["--checkpoint", ckpt, "--output", str(tmp_path / "x.onnx"), "--int8", "--data-path", str(tmp_path / "nope")])
    assert code == 2 and re.search("int8 needs calibration images; .*nope does not exist", one_error_line(capsys.readouterr().err))
    assert not out.exists() and not (tmp_path / "x.onnx").exists()


def test_files_tell_segmenters_from_detectors(deployed):
    assert kind_of(torch.load(deployed["ckpt"], weights_only=True)) == "segmenter"
    assert identify(deployed["ckpt"]).runtimes == ("torch",)
    assert kind_of({k: {} for k in SEGMENTER_TRAINING_KEYS}) == "segmenter_training_state"
    assert kind_of({"model": {}, "build_args": {"arch": "faster_rcnn"}}) == "detector"
    info = identify(deployed["int8"])
    assert info.kind == "onnx" and info.metadata["task"] == "segmentation" and info.runtimes == ("onnxruntime", "openvino")


# ---------------------------------------------------------------------------------------------
# Benchmark rows and the GPU check's segmentation step


def test_seg_benchmark_rows_at_the_smallest_size(tmp_path, monkeypatch):
    from deploy.benchmark import segmenters as benchmark

    # One exported model (the full run also exports Semantic FPN R18): the rows are made the same way for each.
    assert ("deeplabv3", 18, 8) in benchmark._SEG_EXPORTED
    monkeypatch.setattr(benchmark, "_SEG_EXPORTED", (("deeplabv3", 18, 8),))
    # A trained file (tools/train_seg.py) is timed as built: its class count, its head widths.
    (tmp_path / "fcn_run").mkdir()
    trained = save_segmenter(_segmenter("fcn", num_classes=7), tmp_path / "fcn_run" / "model_final.pth", class_names=SHAPES_SEG_CLASSES)
    tool = load_tool("benchmark")
    # --in-process: each candidate timed here, not in a spawned process (~5 s of imports each; the spawned path
    # itself is tests/deploy/test_benchmark.py's).
    assert tool.main(["--only", "seg", "--quick", "--size", "32", "--depths", "18", "--reps", "1", "--warmup", "0",
                      "--in-process", "--output-dir", str(tmp_path), "--checkpoints", str(trained)]) == 0
    rows = json.loads((tmp_path / "benchmark.json").read_text())["rows"]
    assert {r["group"] for r in rows} == {"segmenter inference"} and {r["case"] for r in rows} == {"1x32x32, 21 classes"}
    candidates = {r["candidate"]: r for r in rows}
    expected = {"torchvision deeplabv3_resnet50", "deeplabv3 R18 OS8", "deeplabv3 R18 OS16", "semantic_fpn R18", "fcn_run"}  # its run folder
    expected |= {"deeplabv3 R18 OS8 onnxruntime fp32", "deeplabv3 R18 OS8 onnxruntime int8"}
    if "openvino" in _runtimes():
        expected |= {f"deeplabv3 R18 OS8 openvino {p}" for p in ("fp32", "bf16", "int8")}
    assert set(candidates) == expected  # ResNet-34 rows only with --depths 34
    assert candidates["torchvision deeplabv3_resnet50"]["ratio"] == 1.0
    for r in rows:
        classes = 7 if r["candidate"] == "fcn_run" else 21
        assert r["output"] == [1, classes, 32, 32] and r["seconds"] > 0 and r["ratio"] > 0 and r["peak_mb"] >= 0
    assert set(benchmark._seg_specs([18, 34])) >= {"deeplabv3 R34 OS8", "deeplabv3 R34 OS16"}


def _fake_seg_run(run_dir: Path, losses: list[float], miou: float | None, last_iter: int = 200) -> None:
    run_dir.mkdir(parents=True)
    records = [{"iter": 20 * (i + 1), "epoch": 0, "loss": loss, "images_per_s": 100.0 + i, "seconds_per_iter": 0.16,
                "data_seconds_per_iter": 0.01} for i, loss in enumerate(losses)]
    records[-1]["iter"] = last_iter
    if miou is not None:
        records.append({"iter": last_iter, "epoch": 1, "val/mIoU": miou, "val/pixel_acc": 90.0})
    (run_dir / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    (run_dir / "model_final.pth").write_bytes(b"weights")


def test_gpu_check_trains_the_shapes_seg_recipe_and_reads_its_figures(tmp_path):
    from devtools import gpu_check as cg

    steps = {s.name: s for s in cg.build_steps(tmp_path, "python")}
    assert "tests/segmentation/test_segmentation_training.py" in steps["tests"].cmd  # the segmenters' own CUDA tests run too
    seg = steps["seg"].cmd
    assert seg[1] == "tools/train_seg.py" and seg[seg.index("--config") + 1] == cg.SEG_RECIPE
    assert (REPO / "configs" / f"{cg.SEG_RECIPE}.yaml").is_file()
    assert "--amp" in seg and seg[seg.index("--device") + 1] == "cuda" and seg[seg.index("--max-iters") + 1] == str(cg.SEG_TRAIN_ITERS)
    parsed = load_tool("train_seg").parse_args(seg[2:])  # every flag is one train_seg.py takes
    assert parsed.amp and parsed.max_iters == cg.SEG_TRAIN_ITERS and parsed.set == ["eval_period=0"]

    _fake_seg_run(tmp_path / "ok", [2.0, 1.5, 1.2, 1.0], miou=41.5)
    figures = cg.seg_training_figures(tmp_path / "ok")
    assert figures["mIoU"] == 41.5 and figures["iterations"] == 200 and figures["images_per_s"] == 102.0
    _fake_seg_run(tmp_path / "flat", [1.0, 1.2], miou=20.0)
    with pytest.raises(cg.CheckFailed, match="loss did not fall: 1.0 in the first logging window, 1.2 in the last"):
        cg.seg_training_figures(tmp_path / "flat")
    _fake_seg_run(tmp_path / "short", [2.0, 1.0], miou=20.0, last_iter=120)
    with pytest.raises(cg.CheckFailed, match="trained 120 iterations, expected 200"):
        cg.seg_training_figures(tmp_path / "short")
    _fake_seg_run(tmp_path / "unscored", [2.0, 1.0], miou=None)
    with pytest.raises(cg.CheckFailed, match="no val/mIoU"):
        cg.seg_training_figures(tmp_path / "unscored")

    step = {"status": "pass", "seconds": 1.0, "notes": [], "returncode": 0, "command": "x", "what": "w", "name": "seg", "figures": figures}
    summary = {"passed": True, "complete": True, "started": "2026-01-01T00:00:00+00:00", "seconds": 60.0, "budget_s": 450.0,
               "output_dir": "outputs/check_gpu", "environment": {}, "steps": [step]}
    md = cg.format_summary(summary)
    assert f"## Segmentation training: {cg.SEG_RECIPE}" in md and "**102.0 images/s**" in md and "41.5" in md


# ---------------------------------------------------------------------------------------------
# infer_seg.py on exported files: the one loader (deploy.open_model) for every model kind


def test_infer_seg_runs_exported_files_in_both_runtimes_as_its_checkpoint(deployed, tmp_path, capsys):
    infer_seg = load_tool("infer_seg")
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i, size in enumerate([(60, 80), (72, 50)]):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(photos / f"p{i}.png")

    def run(name: str, *flags: str) -> dict:
        out = tmp_path / name
        assert infer_seg.main(["--input", str(photos), "--output", str(out), "--masks", "--device", "cpu", *flags]) == 0, capsys.readouterr().err
        assert "wrote 2 overlays" in capsys.readouterr().out
        assert {p.name for p in out.iterdir()} >= {"p0.png.png", "p1.png.png", "p0.png.mask.png", "p1.png.mask.png", "segmentation.json"}
        maps = {n: np.asarray(Image.open(out / f"{n}.mask.png")) for n in ("p0.png", "p1.png")}
        return {"json": json.loads((out / "segmentation.json").read_text()), "maps": maps}

    reference = run("torch", "--checkpoint", str(deployed["ckpt"]))
    cases = {"onnxruntime": ["--checkpoint", str(deployed["onnx"])], "int8": ["--checkpoint", str(deployed["int8"])]}
    if "openvino" in _runtimes():
        cases["openvino"] = ["--checkpoint", str(deployed["onnx"]), "--runtime", "openvino"]
        cases["openvino bf16"] = ["--checkpoint", str(deployed["onnx"]), "--runtime", "openvino", "--precision", "bf16"]
    assert "openvino" in cases, "openvino is a dependency: both runtimes are tested"
    names = {c["label"]: c["name"] for r in reference["json"].values() for c in r["classes"]}
    assert names and all(SHAPES_SEG_CLASSES[label] == name for label, name in names.items())  # the checkpoint's class map
    for name, flags in cases.items():
        got = run(name.replace(" ", "_"), *flags)
        assert got["json"].keys() == reference["json"].keys()
        for image, summary in got["json"].items():
            assert summary["image_size"] == reference["json"][image]["image_size"]
            assert all(SHAPES_SEG_CLASSES[c["label"]] == c["name"] for c in summary["classes"]), (name, summary)
            agreement = (got["maps"][image] == reference["maps"][image]).mean()
            # fp32 files give the checkpoint's class map; int8 (calibrated on shapes, run on noise here) and bf16 most of it
            assert agreement >= (0.6 if "int8" in name or "bf16" in name else 0.999), (name, image, agreement)


def test_infer_seg_refuses_what_it_cannot_run_in_one_line(deployed, tmp_path, capsys):
    infer_seg = load_tool("infer_seg")
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "a.png")
    detector = str(_detector_onnx(tmp_path / "det.onnx"))
    cases = [
        (["--checkpoint", detector], r"det.onnx is an exported detector \(faster_rcnn\), not a segmenter"),
        (["--checkpoint", str(deployed["ckpt"]), "--precision", "bf16"], r"precision='bf16' is for exported files run with runtime='openvino' \(--precision with --runtime openvino\)"),
        (["--checkpoint", str(deployed["onnx"]), "--runtime", "torch"], "runtime 'torch' does not run"),
        (["--checkpoint", str(deployed["onnx"]), "--device", "cuda"], "exported files run on the CPU"),
    ]
    for flags, message in cases:
        code = infer_seg.main([*flags, "--input", str(tmp_path / "a.png"), "--output", str(tmp_path / "out")])
        line = one_error_line(capsys.readouterr().err)
        assert code == 2 and re.search(message, line), (flags, line)
    assert not (tmp_path / "out").exists()


def test_one_loader_opens_every_model_file_and_names_what_it_is(deployed, tmp_path):
    from deploy.opening import open_model
    from deploy.predictor import Predictor, open_predictor
    from detection import build_detector
    from detection.checkpoint import save_detector
    from engine.files import CheckpointError

    detector = build_detector("faster_rcnn", num_classes=3, min_size=64, max_size=64, out_channels=32, representation_size=64)
    det_file = save_detector(detector, tmp_path / "det.pth", category_mapping={"cat_ids": [1, 2], "names": ["a", "b"]})
    opened = {name: open_model(deployed[name], device="cpu") for name in ("ckpt", "onnx", "int8", "pt")}
    assert {name: (o.task, o.runtime, o.exported) for name, o in opened.items()} == {
        "ckpt": ("segmentation", "torch", False), "onnx": ("segmentation", "onnxruntime", True),
        "int8": ("segmentation", "onnxruntime", True), "pt": ("segmentation", "torchscript", True)}
    assert all(o.model.class_names == list(SHAPES_SEG_CLASSES) for o in opened.values())
    assert open_model(deployed["onnx"], runtime="openvino").runtime == "openvino"
    det = open_model(det_file, device="cpu")
    assert det.task == "detection" and det.runtime == "torch" and det.model.category_mapping["names"] == ["a", "b"]
    assert isinstance(open_predictor(det_file, device="cpu"), Predictor)
    assert isinstance(open_predictor(deployed["int8"]), SegmentationPredictor)
    # Files of no task, and of the other task: named in words, never by an internal constant.
    classifier = tmp_path / "cls.pth"
    torch.save({"model": {}, "arch": "resnet18", "classes": ["a"]}, classifier)
    with pytest.raises(CheckpointError, match=r"cls.pth is a classifier \(model_final.pth from tools/train_cls.py.*\), not a segmenter") as e:
        open_model(classifier, task="segmentation")
    assert "KINDS" not in str(e.value)
    with pytest.raises(CheckpointError, match=r"det.pth is a detector file \(tools/train_det.py\), not a segmenter: score it with tools/eval_coco.py"):
        open_model(det_file, task="segmentation")
    with pytest.raises(ValueError, match="exported files run on the CPU"):
        open_model(deployed["onnx"], device="cuda")
    odd = tmp_path / "odd.pth"
    torch.save({"something": 1}, odd)
    with pytest.raises(FileFormatError, match="not one this project reads") as e:
        identify(odd)
    assert "KINDS" not in str(e.value)
