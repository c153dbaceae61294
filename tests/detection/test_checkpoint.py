"""One module owns every on-disk key: detector files, training states, refusals with reasons."""

from __future__ import annotations

import os

import pytest
import torch

from backbones.weights import WeightsError
from detection import build_detector, load_detector, save_detector
from detection.checkpoint import (
    DETECTOR_KEYS,
    TRAINING_KEYS,
    CheckpointError,
    atomic_save,
    detector_record,
    read_checkpoint,
    read_training_state,
)
from engine.runner import TrainState, save_training_state

SMALL = dict(min_size=64, max_size=64, rpn_post_nms_top_n_test=20, box_detections_per_img=10)


def _model():
    torch.manual_seed(0)
    return build_detector("faster_rcnn", num_classes=3, box_score_thresh=0.0, **SMALL)


def test_detector_file_round_trips_with_its_mapping_and_config(tmp_path):
    model = _model()
    mapping = {"cat_ids": [7, 3], "names": ["dog", "cat"]}
    save_detector(model, tmp_path / "m.pth", category_mapping=mapping, config={"lr": 0.1}, iteration=5)
    ckpt = read_checkpoint(tmp_path / "m.pth")
    assert set(DETECTOR_KEYS) <= set(ckpt) and ckpt["iteration"] == 5 and ckpt["format_version"] == 1
    loaded = load_detector(tmp_path / "m.pth")
    assert loaded.category_mapping == mapping and loaded.train_config == {"lr": 0.1}
    image = [torch.rand(3, 64, 80, generator=torch.Generator().manual_seed(1))]
    with torch.no_grad():
        a, b = model.eval()(image)[0], loaded(image)[0]
    assert len(a["boxes"]) > 0 and torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["labels"], b["labels"])


def test_training_state_holds_every_training_key_and_is_a_detector_file_too(tmp_path):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: 1.0)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    train_state = TrainState(model, model, opt, sched, scaler, False, torch.bfloat16, 0.1, iteration=9)
    record = detector_record(model, {"category_mapping": {"cat_ids": [1, 2], "names": ["a", "b"]}})
    save_training_state(tmp_path / "c.pth", train_state, record, epoch=1, config={"lr": 0.1})
    state = read_training_state(tmp_path / "c.pth")
    assert set(TRAINING_KEYS) <= set(state) and state["iteration"] == 9 and state["epoch"] == 1 and state["config"] == {"lr": 0.1}
    assert "model_ema" not in state  # only a run with EMA writes it
    assert load_detector(tmp_path / "c.pth").build_args["arch"] == "faster_rcnn"


def test_a_model_file_is_not_a_training_state_and_junk_is_not_a_detector(tmp_path):
    save_detector(_model(), tmp_path / "model_final.pth")
    with pytest.raises(CheckpointError, match=r"not a training checkpoint.*lacks \[.*'optimizer', 'scheduler'"):
        read_training_state(tmp_path / "model_final.pth")
    torch.save({"state_dict": {"w": torch.zeros(1)}}, tmp_path / "trunk.pth")
    with pytest.raises(CheckpointError, match=r"not a detector checkpoint.*lacks \['model', 'build_args'\]"):
        load_detector(tmp_path / "trunk.pth")
    plain = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="no build_args"):
        save_detector(plain, tmp_path / "plain.pth")
    assert not (tmp_path / "plain.pth").exists()


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo never",))


def test_a_checkpoint_that_would_run_code_is_refused_for_that_reason(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": _Payload(), "build_args": {}}, path)
    with pytest.raises(WeightsError, match=r"refused to load .*would run code when unpickled"):
        load_detector(path)


def test_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_save({"w": torch.zeros(1)}, tmp_path / "a.pth")
        save_detector(_model(), tmp_path / "m.pth")
    finally:
        os.umask(old)
    assert (tmp_path / "a.pth").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "m.pth").stat().st_mode & 0o777 == 0o644
