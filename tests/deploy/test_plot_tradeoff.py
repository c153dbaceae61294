"""tools/plot_tradeoff.py: AP against speed-up from benchmark.json and metrics.json files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deploy.benchmark import tradeoff

from helpers import load_tool, one_error_line

tool = load_tool("plot_tradeoff")


def _bench(path: Path, rows: dict[str, float]) -> Path:
    data = {"rows": [{"group": "detector inference", "case": "faster_rcnn R18 800x1216", "candidate": name, "ratio": ratio,
                      "seconds": 1.0 / ratio} for name, ratio in rows.items()]
            + [{"group": "trunk", "case": "r18", "candidate": "big", "ratio": 99.0}]}
    path.write_text(json.dumps(data))
    return path


def _metrics(path: Path, ap: float) -> str:
    path.write_text(json.dumps({"bbox/AP": ap, "bbox/AP50": ap + 10}))
    return str(path)


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    old = _bench(tmp_path / "old.json", {"torchvision": 1.0, "full": 3.0, "full onnxruntime int8": 6.0, "full openvino int8": 10.0})
    new = _bench(tmp_path / "new.json", {"torchvision": 1.0, "half": 9.0, "half onnxruntime int8": 15.0, "half openvino int8": 14.0,
                                          "full": 3.5})
    return {"old": str(old), "new": str(new), "full": _metrics(tmp_path / "full.json", 32.0),
            "full8": _metrics(tmp_path / "full8.json", 31.5), "half": _metrics(tmp_path / "half.json", 44.5)}


def test_points_take_each_rows_ratio_and_the_int8_ap_only_where_measured(files):
    speedups = tradeoff.read_speedups([files["old"], files["new"]])
    assert speedups["full"] == 3.5  # the later file wins
    assert "big" not in speedups  # only detector rows
    lines = tradeoff.tradeoff_points(speedups, [["unpruned", "full", files["full"], files["full8"]], ["0.5", "half", files["half"]]],
                                 ["eager", "ONNX Runtime int8", "OpenVINO int8"])
    assert lines["eager"] == [("unpruned", 3.5, 32.0), ("0.5", 9.0, 44.5)]
    # the pruned file has no int8 AP: no int8 point for it rather than its fp32 AP
    assert lines["ONNX Runtime int8"] == [("unpruned", 6.0, 31.5)]
    assert lines["OpenVINO int8"] == [("unpruned", 10.0, 31.5)]


def test_onnx_runtime_lines_take_the_int8_files_own_ap_there_and_lines_run_by_speed(files, tmp_path):
    speedups = tradeoff.read_speedups([files["old"], files["new"]])
    ort8 = _metrics(tmp_path / "full8_ort.json", 31.9)
    half8 = _metrics(tmp_path / "half8.json", 44.0)
    # the faster point first on the command line: each line still runs from slow to fast
    lines = tradeoff.tradeoff_points(speedups, [["0.5", "half", files["half"], half8], ["unpruned", "full", files["full"], files["full8"], ort8]],
                                 ["eager", "ONNX Runtime int8", "OpenVINO int8"])
    assert lines["eager"] == [("unpruned", 3.5, 32.0), ("0.5", 9.0, 44.5)]
    assert lines["OpenVINO int8"] == [("unpruned", 10.0, 31.5), ("0.5", 14.0, 44.0)]
    assert lines["ONNX Runtime int8"] == [("unpruned", 6.0, 31.9), ("0.5", 15.0, 44.0)]  # no ORT metrics for 0.5: its int8 file's


def test_tool_writes_the_picture(files, tmp_path, capsys):
    out = tmp_path / "pics" / "tradeoff.png"
    code = tool.main(["--benchmark", files["old"], files["new"], "--point", "unpruned", "full", files["full"], files["full8"],
                      "--point", "0.5", "half", files["half"], "--reference-ap", "49.3", "--target-speedup", "12",
                      "--output", str(out)])
    assert code == 0, capsys.readouterr().err
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in out.parent.iterdir() if p != out]  # no temporary file left beside it


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing_row", "no benchmark has a detector row named 'quarter'"),
        ("missing_metrics", "does not exist"),
        ("bad_metrics", "has no bbox/AP"),
        ("bad_benchmark", "is not a benchmark.json"),
        ("short_point", "--point takes LABEL STEM METRICS"),
        ("output_folder", "is a folder"),
    ],
)
def test_bad_input_is_one_error_line_and_nothing_written(case, expected, files, tmp_path, capsys):
    out = tmp_path / "out.png"
    point = ["x", "half", files["half"]]
    bench = [files["new"]]
    if case == "missing_row":
        point = ["x", "quarter", files["half"]]
    elif case == "missing_metrics":
        point = ["x", "half", str(tmp_path / "nope.json")]
    elif case == "bad_metrics":
        (tmp_path / "seg.json").write_text(json.dumps({"mIoU": 60.0}))
        point = ["x", "half", str(tmp_path / "seg.json")]
    elif case == "bad_benchmark":
        (tmp_path / "junk.json").write_bytes(b"\xff\x00junk")
        bench = [str(tmp_path / "junk.json")]
    elif case == "short_point":
        point = ["x", "half"]
    elif case == "output_folder":
        out = tmp_path
    assert tool.main(["--benchmark", *bench, "--point", *point, "--output", str(out)]) == 2
    assert expected in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "out.png").exists()
