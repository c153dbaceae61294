"""tools/benchmark.py --quick runs and reports every row (tiny sizes: this checks the tool, not speed)."""

import json

from deploy import benchmark
from engine.timing import run_in_own_process
from helpers import run_tool


def test_a_candidate_is_timed_in_a_process_of_its_own():
    spec = {"kind": "ours", "arch": "faster_rcnn", "depth": 18, "size": [64, 96], "image": [64, 97], "threads": 1, "reps": 1, "warmup": 0}
    result = run_in_own_process(benchmark.time_candidate, spec)
    assert set(result) == {"seconds", "peak_mb", "detections"}, result
    assert result["seconds"] > 0 and result["peak_mb"] >= 0
    assert result["detections"] == 100  # fixed work: 100 detections whatever the weights


def test_quick_benchmark_writes_every_row(tmp_path):
    # --in-process: every detector candidate is timed in the tool's process, not in one of its own (the test
    # above runs that path once): a new process is ~5 s of imports, for twenty-odd candidates.
    # The segmenter rows have their own test (tests/deploy/test_segmentation_deploy.py).
    proc = run_tool(["tools/benchmark.py", "--quick", "--size", "64", "--depths", "18", "--reps", "1", "--warmup", "0", "--in-process",
                     "--archs", "faster_rcnn",  # Mask R-CNN's rows come from the same code (its export: tests/deploy/test_export.py)
                     "--only", "backbone", "detector", "train", "eval", "--output-dir", str(tmp_path)], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert " failed: " not in proc.stderr, proc.stderr[-3000:]  # a candidate that failed is logged and left out of the rows
    report = json.loads((tmp_path / "benchmark.json").read_text())
    rows = report["rows"]
    groups = {r["group"] for r in rows}
    assert groups == {"trunk+FPN forward", "detector inference", "training iteration", "COCO evaluation"}
    candidates = {(r["group"], r["candidate"]) for r in rows}
    for group in ("trunk+FPN forward", "detector inference"):
        assert {(group, "torchvision"), (group, "ours"), (group, "ours fast fp32"), (group, "ours fast bfloat16")} <= candidates
    assert ("detector inference", "torchvision R50 (fasterrcnn_resnet50_fpn)") in candidates
    assert {("training iteration", "torchvision"), ("training iteration", "ours"), ("training iteration", "ours --amp")} <= candidates
    assert ("COCO evaluation", "pycocotools") in candidates
    cases = {r["case"] for r in rows if r["group"] == "detector inference"}
    assert any(c.startswith("faster_rcnn R18") for c in cases) and not any(c.startswith("mask_rcnn") for c in cases)
    for r in rows:
        assert r["images_per_s"] > 0 and r["seconds"] > 0 and r["ratio"] > 0
        if r["candidate"] in ("torchvision", "pycocotools"):
            assert r["ratio"] == 1.0
    detector_rows = [r for r in rows if r["group"] == "detector inference"]
    assert all(r["peak_mb"] is not None and r["peak_mb"] >= 0 for r in detector_rows)
    # Every detector does the same work, whatever its weights, depth or runtime.
    assert {r["detections"] for r in detector_rows} == {100}
    exported = {r["candidate"] for r in detector_rows if r["case"].startswith("faster_rcnn R18")}
    assert {"onnxruntime fp32", "onnxruntime int8"} <= exported
    try:
        import openvino  # noqa: F401

        assert {"openvino fp32", "openvino bf16", "openvino int8"} <= exported
    except ImportError:
        pass
    assert (tmp_path / "benchmark.png").stat().st_size > 0
    assert "ratio" in proc.stdout


def test_detector_rows_take_any_image_size_and_refuse_a_tiny_one(capsys):
    from argparse import Namespace

    from helpers import load_tool, one_error_line

    assert benchmark.detector_sizes(Namespace(quick=False, size=320)) == ((800, 1333), (800, 1216))
    assert benchmark.detector_sizes(Namespace(quick=True, size=64)) == ((64, 96), (64, 97))
    # A camera's 480x640 stays 480x640 through the models' resize (short side 480, long side within 1333).
    assert benchmark.detector_sizes(Namespace(quick=False, size=320, image=[480, 640])) == ((480, 1333), (480, 640))
    assert benchmark.detector_sizes(Namespace(quick=True, size=64, image=[720, 1280])) == ((720, 1333), (720, 1280))
    assert load_tool("benchmark").main(["--image", "16", "640", "--only", "detector"]) == 2
    assert "--image must be at least 32 x 32 pixels, got 16 x 640" in one_error_line(capsys.readouterr().err)


def test_checkpoints_only_times_the_files_beside_the_torchvision_reference(tmp_path, capsys):
    import torch

    from detection import build_detector, save_detector
    from helpers import load_tool, one_error_line

    torch.manual_seed(0)
    path = tmp_path / "narrow.pth"
    save_detector(build_detector("faster_rcnn", num_classes=3, min_size=64, max_size=96, out_channels=16, representation_size=32).eval(),
                  path)
    tool = load_tool("benchmark")
    out = tmp_path / "bench"
    assert tool.main(["--only", "detector", "--quick", "--size", "64", "--depths", "18", "34", "--archs", "faster_rcnn", "mask_rcnn",
                      "--reps", "1", "--warmup", "0", "--in-process", "--no-export", "--no-memory", "--checkpoints-only",
                      "--checkpoints", str(path), "--output-dir", str(out)]) == 0
    rows = json.loads((out / "benchmark.json").read_text())["rows"]
    # Only the file's own row (Faster R-CNN R18): torchvision's reference and the file, nothing else.
    assert [(r["case"].split(" ")[:2], r["candidate"]) for r in rows] == [(["faster_rcnn", "R18"], "torchvision"),
                                                                           (["faster_rcnn", "R18"], "narrow")]
    assert rows[1]["detections"] == 100  # the row's fixed work
    capsys.readouterr()
    assert tool.main(["--only", "detector", "--checkpoints-only", "--output-dir", str(out)]) == 2
    assert "--checkpoints-only needs --checkpoints" in one_error_line(capsys.readouterr().err)
    assert tool.main(["--only", "detector", "--int8-linear", "--output-dir", str(out)]) == 2
    assert "--int8-linear quantises the --checkpoints files' int8 exports" in one_error_line(capsys.readouterr().err)
    assert tool.main(["--only", "detector", "--int8-linear", "--no-export", "--checkpoints", str(path), "--output-dir", str(out / "x")]) == 2
    assert "without --no-export" in one_error_line(capsys.readouterr().err)
    assert not (out / "x").exists()


def test_int8_linear_times_the_files_int8_exports_with_their_fully_connected_layers(tmp_path):
    import torch

    from deploy.export import read_onnx_metadata
    from detection import build_detector, save_detector
    from helpers import load_tool

    torch.manual_seed(0)
    path = tmp_path / "narrow.pth"
    save_detector(build_detector("faster_rcnn", num_classes=3, min_size=64, max_size=96, out_channels=16, representation_size=32).eval(),
                  path)
    out = tmp_path / "bench"
    assert load_tool("benchmark").main(["--only", "detector", "--quick", "--size", "64", "--depths", "18", "--archs", "faster_rcnn",
                                        "--reps", "1", "--warmup", "0", "--in-process", "--no-memory", "--checkpoints-only", "--int8-linear",
                                        "--checkpoints", str(path), "--output-dir", str(out)]) == 0
    candidates = {r["candidate"] for r in json.loads((out / "benchmark.json").read_text())["rows"]}
    assert {"narrow onnxruntime fp32", "narrow onnxruntime int8+fc"} <= candidates
    assert not {"narrow onnxruntime int8", "narrow openvino int8"} & candidates
    int8 = list(out.rglob("narrow_*_int8fc.onnx"))
    assert len(int8) == 1 and json.loads(read_onnx_metadata(int8[0])["resfpn.int8"])["quantized"] == "Conv,Gemm,MatMul"
