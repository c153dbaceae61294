"""ONNX / TorchScript export and the runtimes that run it: eager's detections, metadata, int8, bad input."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.ops import box_iou

from detection import ARCHS, save_detector
from deploy.export import (
    ExportError,
    calibration_images,
    export_detector,
    export_onnx,
    export_torchscript,
    quantize_onnx,
    read_metadata,
)
from deploy.fast import match_detections
from deploy.runtime import RuntimeUnavailableError, load_exported
from helpers import run_tool, small_detector

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

MAPPING = {"cat_ids": [3, 7, 9], "names": ["circle", "square", "star"]}


def _small_detector(arch: str, depth: int = 18) -> nn.Module:
    model = small_detector(arch, depth)
    if arch in ("retinanet", "fcos"):
        # Their heads start at a 0.01 prior for every class, so random scores tie; spread them out.
        g = torch.Generator().manual_seed(1)
        cls = model.head.classification_head.cls_logits
        cls.weight.data.copy_(torch.randn(cls.weight.shape, generator=g) * 0.5)
        cls.bias.data.copy_(torch.randn(cls.bias.shape, generator=g) - 2)
    model.category_mapping = MAPPING
    return model


def _images(*sizes: tuple[int, int], seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, h, w, generator=g) for h, w in sizes]


def _assert_same_detections(ref: dict, out: dict, *, masks: bool = False, min_count: int = 1) -> None:
    assert len(ref["boxes"]) >= min_count
    assert torch.equal(out["labels"], ref["labels"])
    assert out["boxes"].dtype == torch.float32 and out["labels"].dtype == torch.int64
    iou = box_iou(ref["boxes"], out["boxes"]).diagonal()
    real = (ref["boxes"][:, 2:] > ref["boxes"][:, :2]).all(1)  # random heads give some zero-width boxes
    assert bool((iou[real] >= 0.99).all()), iou[real].min()
    torch.testing.assert_close(out["boxes"], ref["boxes"], rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(out["scores"], ref["scores"], rtol=0, atol=1e-3)
    if masks:
        assert out["masks"].shape == ref["masks"].shape
        # Boxes agree to ~1e-4 px; pasting a 28x28 mask through a box that moved that much shifts a
        # steep edge pixel by ~1e-3, so: almost everywhere equal, nowhere far off.
        diff = (out["masks"] - ref["masks"]).abs()
        assert float(diff.max()) <= 5e-3 and float(diff.mean()) <= 1e-5


# Portrait and landscape sizes other than the traced 96x128, one of them resized down, one up.
SIZES = [(128, 100), (70, 90)]


# Every architecture once; ResNet-34 adds no layer type to the graph, so one case of it suffices.
@pytest.mark.parametrize("arch, depth", [(arch, 18) for arch in ARCHS] + [("faster_rcnn", 34)])
def test_onnx_export_gives_eager_detections(arch, depth, tmp_path):
    model = _small_detector(arch, depth)
    path = export_onnx(model, tmp_path / "model.onnx")
    exported = load_exported(path)
    assert exported.runtime == "onnxruntime fp32" and exported.precision == "fp32"
    assert exported.has_masks == (arch == "mask_rcnn")
    assert exported.category_mapping == MAPPING
    images = _images(*SIZES)
    with torch.no_grad():
        refs = [model([image])[0] for image in images]  # one at a time: batching pads, which changes detections
    for ref, out in zip(refs, exported(images)):
        _assert_same_detections(ref, out, masks=arch == "mask_rcnn", min_count=5)


def test_metadata_and_roi_align_mode(tmp_path):
    model = _small_detector("mask_rcnn")
    path = export_onnx(model, tmp_path / "model.onnx", opset=16)
    meta = read_metadata(path)
    assert meta["arch"] == "mask_rcnn" and meta["backbone"] == "resnet18"
    assert meta["category_mapping"] == MAPPING
    assert meta["class_names"] == MAPPING["names"] and meta["category_ids"] == MAPPING["cat_ids"]
    assert meta["input"] == {"name": "image", "layout": "CHW", "batch": 1, "color": "RGB", "dtype": "float32", "range": [0.0, 1.0]}
    assert meta["outputs"] == ["boxes", "labels", "scores", "mask_probs"]  # pasted by load_exported
    assert meta["export_size"] == [96, 128] and meta["opset"] == 16 and meta["precision"] == "fp32"
    assert meta["resize"]["min_size"] == 96 and meta["resize"]["max_size"] == 128
    proto = onnx.load(str(path))
    assert any(o.domain in ("", "ai.onnx") and o.version == 16 for o in proto.opset_import)
    roi_aligns = [n for n in proto.graph.node if n.op_type == "RoiAlign"]
    assert len(roi_aligns) == 8  # box and mask poolers, one op per pyramid level (P2-P5)
    for node in roi_aligns:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        # torchvision's poolers are not aligned: output_half_pixel is what eager computes.
        assert attrs["coordinate_transformation_mode"] == b"output_half_pixel"
        assert attrs["sampling_ratio"] == 2
    dims = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [3, "height", "width"]


def test_torchscript_file_runs_behind_the_same_call(tmp_path):
    model = _small_detector("faster_rcnn")
    path = export_torchscript(model, tmp_path / "model.pt")
    exported = load_exported(path)
    assert exported.runtime == "torchscript fp32" and exported.category_mapping == MAPPING
    images = _images((96, 128), (128, 96))
    with torch.no_grad():
        refs = [model([image])[0] for image in images]
    for ref, out in zip(refs, exported(images)):
        _assert_same_detections(ref, out, min_count=5)


def test_exported_object_contract(tmp_path):
    exported = load_exported(export_onnx(_small_detector("fcos"), tmp_path / "m.onnx"))
    assert exported.eval() is exported and exported.to("cpu") is exported and exported.train(False) is exported
    with pytest.raises(ValueError, match="runs on the CPU"):
        exported.to("cuda")
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        exported([torch.rand(1, 3, 64, 64)])
    with pytest.raises(ValueError, match="onnxruntime runs .* as written"):
        load_exported(tmp_path / "m.onnx", precision="bf16")
    out = exported([torch.rand(3, 50, 60)])[0]
    assert set(out) == {"boxes", "labels", "scores"} and out["boxes"].shape[1] == 4


@pytest.fixture(scope="module")
def trained(overfit_detector, tmp_path_factory):
    """conftest's overfitted Faster R-CNN (confident detections), saved as a checkpoint and exported."""
    from detection.data import CocoDetection

    model, images, root = copy.deepcopy(overfit_detector.model), overfit_detector.images, overfit_detector.root
    mapping = CocoDetection(root, "train").category_mapping()
    model.category_mapping = mapping
    ckpt = tmp_path_factory.mktemp("ckpt") / "model_final.pth"
    save_detector(model, ckpt, category_mapping=mapping, config={"data_path": str(root), "train_split": "train"})
    onnx_path = export_onnx(model, ckpt.parent / "model.onnx")
    return model, images, root, ckpt, onnx_path


def _resized(images: list[torch.Tensor], size: tuple[int, int]) -> list[torch.Tensor]:
    return [torch.nn.functional.interpolate(i[None], size=size, mode="bilinear", align_corners=False)[0].clamp(0, 1) for i in images]


@pytest.mark.parametrize("size", [(120, 120), (72, 96)])
def test_trained_model_onnxruntime_equals_eager_at_other_sizes(trained, size):
    model, images, _, _, path = trained
    exported = load_exported(path)
    confident = 0
    for image in _resized(images, size):
        with torch.no_grad():
            ref = model([image])[0]
        out = exported([image])[0]
        confident += int((ref["scores"] >= 0.5).sum())
        _assert_same_detections(ref, out)
    assert confident >= 2, "the overfitted model should have confident detections"


def test_trained_model_openvino_fp32_equals_eager(trained):
    pytest.importorskip("openvino")
    model, images, _, _, path = trained
    exported = load_exported(path, runtime="openvino", num_threads=1)
    assert exported.runtime == "openvino fp32"
    for image in _resized(images, (120, 120)):
        with torch.no_grad():
            ref = model([image])[0]
        _assert_same_detections(ref, exported([image])[0])


def test_evaluate_scores_the_exported_file_as_the_model(trained):
    from detection.data import CocoDetection
    from detection.evaluation import evaluate

    model, _, root, _, path = trained
    val = CocoDetection(root, "val")
    eager = evaluate(model, val, progress=False)["metrics"]
    exported = evaluate(load_exported(path), val, progress=False)["metrics"]
    assert eager["bbox/AP"] is not None
    assert abs(exported["bbox/AP"] - eager["bbox/AP"]) <= 0.1


def _matched_detections(model, exported, images) -> tuple[int, int]:
    """Eager's confident detections (score >= 0.5) that the exported file finds too (IoU >= 0.7), and their count."""
    matched = considered = 0
    for image in images:
        with torch.no_grad():
            ref = model([image])[0]
        m, c = match_detections(ref, exported([image])[0], score_thresh=0.5, iou_thresh=0.7)
        matched, considered = matched + m, considered + c
    return matched, considered


def test_int8_keeps_the_confident_detections(trained, tmp_path):
    model, images, root, _, path = trained
    calib = calibration_images(data_path=root, count=2)
    assert len(calib) == 2 and calib[0].shape[0] == 3
    int8 = quantize_onnx(path, tmp_path / "int8.onnx", calib)
    meta = read_metadata(int8)
    assert meta["precision"] == "int8" and meta["int8"]["method"] == "onnxruntime" and meta["int8"]["calibration_images"] == 2
    assert meta["category_mapping"] == model.category_mapping
    proto = onnx.load(str(int8))
    assert sum(n.op_type == "QuantizeLinear" for n in proto.graph.node) > 10
    exported = load_exported(int8)
    assert exported.runtime == "onnxruntime int8"
    matched, considered = _matched_detections(model, exported, images)
    # A model overfitted in 80 steps and calibrated on 2 images is a hard case for int8; the trained
    # shapes model's numbers are in the README.
    assert considered >= 2 and matched >= 0.75 * considered


def test_int8_linear_quantises_the_box_head_too(trained, tmp_path):
    """``linear=True``: the box head's fully connected layers read int8 weights; the file shrinks and still detects."""
    model, images, root, _, path = trained
    calib = calibration_images(data_path=root, count=2)
    convs_only = quantize_onnx(path, tmp_path / "int8.onnx", calib)
    with_fc = quantize_onnx(path, tmp_path / "int8fc.onnx", calib, linear=True)
    assert read_metadata(convs_only)["int8"]["quantized"] == "Conv"
    assert read_metadata(with_fc)["int8"]["quantized"] == "Conv,Gemm,MatMul"

    def int8_fed_gemms(file):
        proto = onnx.load(str(file))
        dequantized = {n.output[0] for n in proto.graph.node if n.op_type == "DequantizeLinear"}
        gemms = [n for n in proto.graph.node if n.op_type == "Gemm"]
        return len(gemms), sum(n.input[1] in dequantized for n in gemms)

    gemms, fed = int8_fed_gemms(with_fc)
    assert gemms >= 3 and fed == gemms  # fc6, fc7, the predictor's two layers
    assert int8_fed_gemms(convs_only)[1] == 0
    fp32 = onnx.load(str(path))
    weights = {t.name: t for t in fp32.graph.initializer}
    fc_bytes = sum(4 * int(np.prod(weights[n.input[1]].dims)) for n in fp32.graph.node if n.op_type == "Gemm" and n.input[1] in weights)
    assert fc_bytes > 0
    assert convs_only.stat().st_size - with_fc.stat().st_size > 0.7 * fc_bytes  # int8 weights: a quarter of their float32 bytes
    exported = load_exported(with_fc)
    matched, considered = _matched_detections(model, exported, images)
    assert considered >= 2 and matched >= 0.75 * considered


def test_int8_calibration_feeds_the_runtimes_input(tmp_path, monkeypatch):
    """The quantizer sees exactly what the runtime feeds the graph: float32 [3, H, W] pixels / 255.

    The graph normalises inside, so calibration images normalised beforehand would be
    normalised twice and calibrate the int8 ranges on the wrong activations.
    """
    import numpy as np
    from onnxruntime import quantization

    from engine.images import read_image_rgb

    from engine import shapes
    from deploy.runtime import ExportedDetector

    root = shapes.generate(tmp_path / "data", num_train=4, num_val=0, image_size=64, seed=2)
    calib = calibration_images(data_path=root, count=2)
    files = sorted((root / "train").glob("*.jpg"))
    assert len(calib) == 2 and len(files) == 4
    # Spread over the split: images 0 and 2; each the file's own pixels in [0, 1].
    for image, file in zip(calib, files[::2]):
        pixels = read_image_rgb(file)
        assert image.dtype == torch.float32 and image.shape == (3, *pixels.shape[:2])
        np.testing.assert_array_equal(image.numpy(), pixels.transpose(2, 0, 1).astype(np.float32) / np.float32(255))

    fed_to_graph = []

    def run(x: np.ndarray) -> list[np.ndarray]:
        fed_to_graph.append(x)
        return [np.zeros((0, 4), np.float32), np.zeros(0, np.int64), np.zeros(0, np.float32)]

    runtime = ExportedDetector(run, ["boxes", "labels", "scores"], metadata={}, runtime="test", precision="fp32", path=tmp_path / "m.onnx")
    runtime(calib)

    fed_to_quantizer = []

    def quantize_static(model_input, model_output, reader, **kwargs):
        while (feed := reader.get_next()) is not None:
            fed_to_quantizer.append(feed)
        Path(model_output).write_bytes(Path(model_input).read_bytes())

    monkeypatch.setattr(quantization, "quantize_static", quantize_static)
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["image"], ["boxes"])], "g",
        [onnx.helper.make_tensor_value_info("image", onnx.TensorProto.FLOAT, [3, "height", "width"])],
        [onnx.helper.make_tensor_value_info("boxes", onnx.TensorProto.FLOAT, [3, "height", "width"])],
    )
    onnx.save(onnx.helper.make_model(graph), str(tmp_path / "fp32.onnx"))
    quantize_onnx(tmp_path / "fp32.onnx", tmp_path / "int8.onnx", calib)
    assert [set(feed) for feed in fed_to_quantizer] == [{"image"}] * 2  # the graph's input name
    for feed, x in zip(fed_to_quantizer, fed_to_graph, strict=True):
        assert feed["image"].dtype == x.dtype == np.float32
        np.testing.assert_array_equal(feed["image"], x)


def test_export_detector_int8_from_checkpoint_config(trained, tmp_path):
    _, _, root, ckpt, _ = trained
    out = export_detector(ckpt, tmp_path / "m8.onnx", int8=True, calib_images=2)
    assert read_metadata(out)["precision"] == "int8"
    assert load_exported(out).train_config["data_path"] == str(root)  # evaluation finds the data by it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m8.onnx"]  # no temporary files left


# --- bad input: clear errors, nothing half-written ----------------------------------------------


def _run_tool(*args: str, fresh: bool = False) -> subprocess.CompletedProcess:
    return run_tool(["tools/export.py", *args], fresh=fresh)


def _assert_tool_error(proc: subprocess.CompletedProcess, pattern: str) -> None:
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    import re

    assert re.search(pattern, lines[0]), lines[0]


def test_cli_exports_and_bad_invocations(trained, tmp_path):
    _, _, _, ckpt, _ = trained
    out = tmp_path / "model.onnx"
    proc = _run_tool("--checkpoint", str(ckpt), "--output", str(out), "--opset", "17", fresh=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "wrote" in proc.stdout and read_metadata(out)["opset"] == 17

    not_ckpt = tmp_path / "notes.pth"
    torch.save({"weights": torch.zeros(2)}, not_ckpt)
    _assert_tool_error(_run_tool("--checkpoint", str(not_ckpt), "--output", str(tmp_path / "a.onnx")), "not a detector checkpoint.*model_final.pth")
    text = tmp_path / "text.pth"
    text.write_text("hello")
    _assert_tool_error(_run_tool("--checkpoint", str(text), "--output", str(tmp_path / "a.onnx")), "not a detector checkpoint|text.pth")
    _assert_tool_error(_run_tool("--checkpoint", str(ckpt), "--output", str(tmp_path / "a.onnx"), "--opset", "11"), r"opset .*\[16, \d+\].*--opset 17")
    _assert_tool_error(_run_tool("--checkpoint", str(ckpt), "--output", str(tmp_path / "a.onnx"), "--int8", "--calib-images", "0"),
                       "calibration images.*--calib-images")
    _assert_tool_error(_run_tool("--checkpoint", str(ckpt), "--output", str(tmp_path / "a.onnx"), "--int8-linear"), "--int8-linear.*--int8")
    empty = tmp_path / "empty"
    (empty / "annotations").mkdir(parents=True)
    (empty / "train").mkdir()
    (empty / "annotations" / "instances_train.json").write_text(json.dumps({"images": [], "annotations": [], "categories": [{"id": 1, "name": "a"}]}))
    _assert_tool_error(_run_tool("--checkpoint", str(ckpt), "--output", str(tmp_path / "a.onnx"), "--int8", "--data-path", str(empty)),
                       "calibration images.*--data-path")
    assert not (tmp_path / "a.onnx").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_missing_runtime_names_the_package(trained, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino now raises ImportError
    with pytest.raises(RuntimeUnavailableError, match="pip install openvino"):
        load_exported(trained[4], runtime="openvino")
    with pytest.raises(ValueError, match="runtime must be one of"):
        load_exported(trained[4], runtime="tensorrt")


def test_missing_quantizer_names_the_package(trained, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "nncf", None)
    with pytest.raises(ExportError, match="pip install nncf"):
        export_detector(trained[3], tmp_path / "x.onnx", int8=True, calib_images=2, int8_method="nncf")
    assert not list(tmp_path.iterdir())


def test_failed_export_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    model = _small_detector("faster_rcnn")
    out = tmp_path / "model.onnx"
    out.write_bytes(b"previous")

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(onnx, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        export_onnx(model, out)
    assert out.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


def test_not_exported_files_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="tools/export.py"):
        load_exported(tmp_path / "none.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a protobuf")
    with pytest.raises(ValueError, match="bad.onnx"):
        load_exported(bad)
    with pytest.raises(ExportError, match="expected a torchvision detector"):
        export_onnx(nn.Linear(2, 2), tmp_path / "x.onnx")


def test_one_place_picks_the_exporter_by_the_models_kind(tmp_path):
    """deploy.export.model_export decides detector or segmenter once; every entry point goes through it."""
    from deploy.export import model_export
    from segmentation import build_segmenter

    detector = _small_detector("retinanet")
    segmenter = build_segmenter("semantic_fpn", num_classes=3, head_channels=32).eval()
    assert model_export(detector).kind == "detector"
    assert model_export(detector, category_mapping=MAPPING).kind == "detector"
    assert model_export(segmenter).kind == "segmenter"
    with pytest.raises(ExportError, match="category_mapping is a detector's"):
        model_export(segmenter, category_mapping=MAPPING)
    for other in (nn.Linear(2, 2), object()):
        with pytest.raises(ExportError, match=r"expected a torchvision detector .* \(or a segmenter .*\), got"):
            model_export(other)
    with pytest.raises(ExportError, match="expected a torchvision detector"):
        export_torchscript(nn.Linear(2, 2), tmp_path / "x.pt")
    assert not any(tmp_path.iterdir())
