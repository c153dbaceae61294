"""tools/check_gpu.py on the CPU: its no-GPU error, the step runner and the summary (steps replaced by tiny commands)."""

import importlib.util
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from devtools import gpu_check as cg

from helpers import REPO, run_tool


def _load_tool():
    spec = importlib.util.spec_from_file_location("check_gpu", REPO / "tools" / "check_gpu.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["check_gpu"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


tool = _load_tool()
ENV = {"gpu": "Test GPU", "compute_capability": "9.0", "gpu_memory_gib": 80.0, "gpu_count": 1, "driver": None,
       "torch": "2.x", "torchvision": "0.x", "cuda": "13.0", "cudnn": 91000, "python": "3.11", "cpu_count": 2,
       "tf32_cudnn": True, "tf32_matmul": False}


def _py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the tool runs the real check")
def test_without_cuda_it_stops_at_once_with_one_error_line(tmp_path):
    out = tmp_path / "out"
    proc = run_tool(["tools/check_gpu.py", "--output-dir", str(out)], timeout=120, env=dict(os.environ))
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no CUDA device"), proc.stderr
    assert not out.exists()


def test_steps_run_in_order_and_a_failure_does_not_stop_the_rest(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    result = out / "ok.json"
    result.write_text('{"value": "stale, from an earlier run"}')

    def lying_collect():
        raise cg.CheckFailed("no CUDA test passed (3 collected, 3 skipped)")

    steps = [
        cg.Step("ok", "writes a result", _py(f"import json; json.dump({{'value': 1}}, open({str(result)!r}, 'w'))"), 30,
                collect=lambda: json.loads(result.read_text()), outputs=[result]),
        cg.Step("bad", "exits 3", _py("import sys; print('boom: the step failed'); sys.exit(3)"), 30),
        cg.Step("slow", "outlives its timeout", _py("import time; time.sleep(60)"), 1),
        cg.Step("needs", "needs a file nobody wrote", _py("pass"), 30, requires=[out / "missing.pth"]),
        cg.Step("lies", "exits 0 with results that fail", _py("pass"), 30, collect=lying_collect),
    ]
    stream = io.StringIO()
    t0 = time.monotonic()
    summary = cg.run_checks(steps, out, budget_s=120, environment=ENV, stream=stream)
    assert time.monotonic() - t0 < 30, "the timed-out step was not stopped"

    status = {s["name"]: s["status"] for s in summary["steps"]}
    assert status == {"ok": "pass", "bad": "fail", "slow": "timeout", "needs": "not run", "lies": "fail"}
    by_name = {s["name"]: s for s in summary["steps"]}
    assert by_name["ok"]["figures"] == {"value": 1}  # the stale file was removed before the run
    assert by_name["bad"]["returncode"] == 3 and "boom: the step failed" in by_name["bad"]["log_tail"]
    assert by_name["slow"]["seconds"] < 10
    assert "missing.pth" in by_name["needs"]["notes"][0]
    assert by_name["lies"]["notes"] == ["no CUDA test passed (3 collected, 3 skipped)"]
    assert summary["complete"] and not summary["passed"]

    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    markdown = (out / "summary.md").read_text()
    assert "result: **FAIL** (1 of 5 steps passed" in markdown and "Test GPU" in markdown
    for row in ("| ok | pass |", "| bad | fail |", "| slow | timeout |", "| needs | not run |", "| lies | fail |"):
        assert row in markdown
    assert "boom: the step failed" in markdown
    assert (out / "logs" / "bad.log").read_text().startswith("$ ")
    printed = stream.getvalue()
    assert "[1/5] ok: pass" in printed and "[3/5] slow: timeout" in printed and str(out / "summary.md") in printed


def test_no_step_starts_once_the_budget_is_spent(tmp_path):
    steps = [cg.Step("first", "would run", _py("pass"), 30), cg.Step("second", "would run", _py("pass"), 30)]
    summary = cg.run_checks(steps, tmp_path, budget_s=cg.MIN_STEP_S - 1, environment=ENV, stream=io.StringIO())
    assert [s["status"] for s in summary["steps"]] == ["not run", "not run"]
    assert "budget" in summary["steps"][0]["notes"][0]
    assert not summary["passed"]


def test_every_step_passing_passes(tmp_path):
    summary = cg.run_checks([cg.Step("a", "ok", _py("pass"), 30)], tmp_path, budget_s=60, environment=ENV, stream=io.StringIO())
    assert summary["passed"] and "result: **PASS**" in (tmp_path / "summary.md").read_text()


def test_the_real_steps_are_the_ones_the_issue_names(tmp_path):
    steps = {s.name: s for s in cg.build_steps(tmp_path, "python")}
    assert list(steps) == list(cg.STEP_NAMES)
    assert steps["tests"].cmd[:6] == ["python", "-m", "pytest", "-m", "cuda", "tests/test_cuda.py"]
    train = steps["train"].cmd
    assert train[1] == "tools/train_det.py" and "--amp" in train and train[train.index("--device") + 1] == "cuda"
    assert train[train.index("--max-iters") + 1] == "300" and "eval_period=0" in train
    assert steps["eval"].requires == [tmp_path / "train" / "model_final.pth"]
    assert steps["benchmark"].cmd[1:5] == ["tools/benchmark.py", "--device", "cuda", "--quick"]
    assert tool.parse_args([]).budget + cg.MIN_STEP_S < 8 * 60, "the default budget keeps the whole check under 8 minutes"


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the CUDA tests run instead of skipping")
def test_pytest_results_fail_when_every_cuda_test_skipped(tmp_path):
    junit = tmp_path / "junit.xml"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "tests/test_cuda.py", f"--junitxml={junit}", "-p", "no:cacheprovider"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:]
    with pytest.raises(cg.CheckFailed, match=r"no CUDA test passed \(\d+ collected, \d+ skipped\)"):
        cg.pytest_results(junit)


def test_pytest_results_count_passes_and_name_failures(tmp_path):
    junit = tmp_path / "junit.xml"
    junit.write_text(
        '<?xml version="1.0"?><testsuites><testsuite name="pytest" tests="3" failures="1" errors="0" skipped="0">'
        '<testcase classname="tests.test_cuda" name="test_a"/><testcase classname="tests.test_cuda" name="test_b"/>'
        '<testcase classname="tests.test_cuda" name="test_c"><failure message="x"/></testcase></testsuite></testsuites>'
    )
    counts = cg.pytest_results(junit)
    assert (counts["passed"], counts["failures"], counts["skipped"]) == (2, 1, 0)
    assert counts["failed_tests"] == ["tests.test_cuda::test_c"]


def _fake_run(run_dir: Path, speeds: list[float], ap: float, last_iter: int = 300) -> None:
    run_dir.mkdir(parents=True)
    records = [{"iter": 20 * (i + 1), "epoch": 0, "loss": 1.0 - i / 100, "images_per_s": s, "seconds_per_iter": 8 / s,
                "data_seconds_per_iter": 0.001} for i, s in enumerate(speeds)]
    records[-1]["iter"] = last_iter
    records.append({"iter": last_iter, "epoch": 1, "bbox/AP": ap, "bbox/AP50": 2 * ap})
    (run_dir / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    (run_dir / "model_final.pth").write_bytes(b"weights")


def test_training_figures_skip_the_start_up_window(tmp_path):
    _fake_run(tmp_path / "run", [10.0, 200.0, 300.0, 250.0], ap=6.5)
    figures = cg.training_figures(tmp_path / "run")
    assert figures["images_per_s"] == 250.0 and figures["images_per_s_first_window"] == 10.0
    assert figures["iterations"] == 300 and figures["bbox_AP"] == 6.5
    assert figures["seconds_per_iter"] == pytest.approx(8 / 250)


def test_training_figures_fail_on_short_runs_and_untrained_models(tmp_path):
    _fake_run(tmp_path / "short", [10.0, 200.0], ap=6.5, last_iter=120)
    with pytest.raises(cg.CheckFailed, match="trained 120 iterations, expected 300"):
        cg.training_figures(tmp_path / "short")
    _fake_run(tmp_path / "flat", [10.0, 200.0], ap=0.2)
    with pytest.raises(cg.CheckFailed, match="bbox AP 0.20 after 300 iterations"):
        cg.training_figures(tmp_path / "flat")


def test_eval_figures_must_agree_with_the_training_evaluation(tmp_path):
    _fake_run(tmp_path / "run", [10.0, 200.0], ap=6.5)
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "metrics.json").write_text(json.dumps({"bbox/AP": 6.4, "bbox/AP50": 13.0}))
    assert cg.eval_figures(tmp_path / "eval", tmp_path / "run")["training_bbox_AP"] == 6.5
    (tmp_path / "eval" / "metrics.json").write_text(json.dumps({"bbox/AP": 2.0}))
    with pytest.raises(cg.CheckFailed, match="eval_coco.py gives bbox AP 2.00"):
        cg.eval_figures(tmp_path / "eval", tmp_path / "run")


def test_latency_figures_require_the_fixed_work(tmp_path):
    row = {"model": "Faster R-CNN R34-FPN", "candidate": "eager fp32", "median_ms": 30.0, "proposals": 1000, "detections": 100}
    path = tmp_path / "latency.json"
    path.write_text(json.dumps({"image": [800, 1333], "reps": 10, "warmup": 3, "rows": [row]}))
    assert cg.latency_figures(path)["rows"] == [row]
    path.write_text(json.dumps({"image": [800, 1333], "reps": 10, "warmup": 3, "rows": [dict(row, proposals=424)]}))
    with pytest.raises(cg.CheckFailed, match="R34-FPN eager fp32: 424 proposals, 100 detections"):
        cg.latency_figures(path)


def test_summary_tables_show_the_figures():
    step = {"status": "pass", "seconds": 1.0, "notes": [], "returncode": 0, "command": "x", "what": "w"}
    summary = {
        "passed": True, "complete": True, "started": "2026-01-01T00:00:00+00:00", "seconds": 300.0, "budget_s": 450.0,
        "output_dir": "outputs/check_gpu", "environment": ENV,
        "steps": [
            {**step, "name": "train", "figures": {"images_per_s": 512.3, "images_per_s_first_window": 40.0, "iterations": 300,
                                                  "bbox_AP": 7.4, "seconds_per_iter": 0.0156, "data_seconds_per_iter": 0.001, "last_loss": 0.8}},
            {**step, "name": "latency", "figures": {"image": [800, 1333], "reps": 10, "warmup": 3, "rows": [
                {"model": "Faster R-CNN R18-FPN", "candidate": "eager fp32", "median_ms": 21.04, "images_per_s": 47.5,
                 "peak_mib": 1234.4, "activations_mib": 1100.0, "proposals": 1000, "detections": 100}]}},
            {**step, "name": "benchmark", "figures": {"rows": [
                {"group": "detector inference", "case": "faster_rcnn R18 320x480", "candidate": "ours", "images_per_s": 60.0,
                 "seconds": 0.0166, "ratio": 1.02, "peak_mb": 300.0}]}},
        ],
    }
    md = cg.format_summary(summary)
    assert "**512.3 images/s**" in md and "(the run's own evaluation): 7.4" in md
    assert "| Faster R-CNN R18-FPN | eager fp32 | 21.0 | 47.5 | 1234 | 1100 | 1000 | 100 |" in md
    assert "| detector inference | faster_rcnn R18 320x480 | ours | 60.00 | 16.6 | 1.02 | 300 |" in md
