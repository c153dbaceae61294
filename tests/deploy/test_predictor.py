"""detection.Predictor and tools/infer.py: every way a picture comes in gives the same detections, named."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deploy import Prediction, Predictor

from detection import build_detector, save_detector
from engine.images import image_to_tensor
from helpers import run_tool

# Label 1 is category id 7 ("cat"), label 2 is id 3 ("dog"): not the sorted order, so a
# mapping taken from anywhere but the checkpoint shows up.
MAPPING = {"cat_ids": [7, 3], "names": ["cat", "dog"]}


def _tiny_detector() -> torch.nn.Module:
    torch.manual_seed(0)
    # box_score_thresh=0: an untrained model then returns candidates for every class.
    return build_detector(
        "faster_rcnn", num_classes=3, min_size=64, max_size=64, out_channels=32, representation_size=64,
        rpn_pre_nms_top_n_test=50, rpn_post_nms_top_n_test=20, box_detections_per_img=100, box_score_thresh=0.0,
    )


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model") / "model_final.pth"
    save_detector(_tiny_detector(), path, category_mapping=MAPPING)
    return path


@pytest.fixture(scope="module")
def picture(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    rgb = np.random.default_rng(0).integers(0, 256, (64, 80, 3), dtype=np.uint8)
    path = tmp_path_factory.mktemp("img") / "pic.png"  # lossless: the file holds exactly these pixels
    Image.fromarray(rgb).save(path)
    return path, rgb


@pytest.fixture(scope="module")
def predictor(checkpoint: Path) -> Predictor:
    return Predictor(checkpoint, device="cpu", score_thresh=0.0)


def _same(a: Prediction, b: Prediction) -> None:
    assert a.image_size == b.image_size
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_allclose(a.boxes, b.boxes, atol=1e-4)
    np.testing.assert_allclose(a.scores, b.scores, atol=1e-6)
    assert a.names == b.names and a.category_ids == b.category_ids


def test_path_pil_numpy_and_tensor_give_the_same_detections(predictor: Predictor, picture) -> None:
    path, rgb = picture
    from_path = predictor(path)
    assert isinstance(from_path, Prediction)
    assert len(from_path) > 0 and from_path.image_size == (64, 80)
    assert from_path.boxes.shape == (len(from_path), 4) and from_path.boxes.dtype == np.float32
    # Boxes are in the picture's own pixels, not the model's 64-px resize.
    assert from_path.boxes[:, [0, 2]].max() <= 80 and from_path.boxes[:, [1, 3]].max() <= 64
    assert from_path.masks is None
    with Image.open(path) as pil:
        from_pil = predictor(pil)
    for other in (predictor(str(path)), from_pil, predictor(rgb), predictor(image_to_tensor(rgb))):
        _same(from_path, other)


def test_list_in_list_out(predictor: Predictor, picture) -> None:
    path, rgb = picture
    flipped = np.ascontiguousarray(rgb[:, ::-1])
    out = predictor([path, flipped])
    assert isinstance(out, list) and len(out) == 2 and all(isinstance(p, Prediction) for p in out)
    _same(out[0], predictor(path))
    _same(out[1], predictor(flipped))
    assert predictor([]) == []


def test_names_and_category_ids_come_from_the_checkpoint(predictor: Predictor, picture) -> None:
    pred = predictor(picture[0])
    assert set(pred.labels.tolist()) == {1, 2}, "the untrained model at score 0 should return both classes"
    assert pred.names == [{1: "cat", 2: "dog"}[int(label)] for label in pred.labels]
    assert pred.category_ids == [{1: 7, 2: 3}[int(label)] for label in pred.labels]
    assert predictor.label_to_cat_id == {1: 7, 2: 3}
    items = pred.to_list()
    assert len(items) == len(pred)
    assert all(item["category_id"] == {"cat": 7, "dog": 3}[item["name"]] for item in items)
    assert json.loads(json.dumps(items)) == items


def test_score_thresh_filters(checkpoint: Path, picture) -> None:
    everything = Predictor(checkpoint, device="cpu", score_thresh=0.0)(picture[0])
    cut = float(np.median(everything.scores))
    some = Predictor(checkpoint, device="cpu", score_thresh=cut)(picture[0])
    assert 0 < len(some) < len(everything)
    assert (some.scores >= cut).all()
    # raw keeps the model's full output (what infer.py reports the best score from).
    assert len(some.raw["scores"]) == len(everything)


def test_mask_rcnn_gives_one_mask_per_kept_detection(picture) -> None:
    torch.manual_seed(0)
    model = build_detector(
        "mask_rcnn", num_classes=3, min_size=64, max_size=64, out_channels=32, representation_size=64,
        rpn_pre_nms_top_n_test=50, rpn_post_nms_top_n_test=20, box_detections_per_img=100, box_score_thresh=0.0,
    )
    everything = Predictor(model, device="cpu", score_thresh=0.0)(picture[1])
    cut = float(np.median(everything.scores))
    some = Predictor(model, device="cpu", score_thresh=cut)(picture[1])
    assert 0 < len(some) < len(everything)
    assert some.masks is not None and some.masks.dtype == bool
    assert some.masks.shape == (len(some), 64, 80)  # one mask per kept box, in the picture's pixels
    # ... and they are the kept detections' masks, in the same order.
    np.testing.assert_array_equal(some.masks, everything.masks[everything.scores >= cut])


class _FixedDetections(torch.nn.Module):
    """Returns the same detections for every image: scores chosen to sit exactly on a threshold."""

    def __init__(self, out: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.out = out

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        return [dict(self.out) for _ in images]


def test_a_detection_scoring_exactly_the_threshold_is_kept() -> None:
    below = float(np.nextafter(np.float32(0.5), np.float32(0)))  # the largest float32 under 0.5
    scores = torch.tensor([0.9, 0.5, below, 0.25], dtype=torch.float32)
    boxes = torch.tensor([[0.0, 0, 10, 10], [5, 5, 20, 20], [1, 1, 8, 8], [2, 2, 30, 30]])
    masks = torch.arange(4, dtype=torch.float32).view(4, 1, 1, 1).expand(4, 1, 32, 32) / 4 + 0.1  # 0.1, 0.35, 0.6, 0.85
    model = _FixedDetections({"boxes": boxes, "scores": scores, "labels": torch.tensor([1, 2, 1, 2]), "masks": masks})
    pred = Predictor(model, device="cpu", score_thresh=0.5, mask_threshold=0.3)(torch.rand(3, 32, 32))
    np.testing.assert_array_equal(pred.scores, np.array([0.9, 0.5], dtype=np.float32))
    np.testing.assert_array_equal(pred.boxes, boxes[:2].numpy())
    assert pred.labels.tolist() == [1, 2]
    assert pred.masks.shape == (2, 32, 32) and not pred.masks[0].any() and pred.masks[1].all()


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((32, 32, 3), dtype=np.float32),  # float, not uint8
        np.zeros((32, 32, 4), dtype=np.uint8),  # RGBA
        np.zeros((32, 32), dtype=np.uint8),  # grayscale H x W
    ],
    ids=["float", "rgba", "gray"],
)
def test_bad_arrays_name_the_expected_shape(predictor: Predictor, bad: np.ndarray) -> None:
    with pytest.raises(ValueError, match=r"H x W x 3 uint8"):
        predictor(bad)


def test_bad_tensor_is_a_value_error(predictor: Predictor) -> None:
    with pytest.raises(ValueError, match="CHW"):
        predictor(torch.zeros(32, 32, 3))  # HWC, not CHW


def test_runtime_that_does_not_match_the_file(checkpoint: Path) -> None:
    with pytest.raises(ValueError, match="onnxruntime"):
        Predictor(checkpoint, runtime="onnxruntime", device="cpu")
    with pytest.raises(ValueError, match="runtime must be one of"):
        Predictor(checkpoint, runtime="tensorrt", device="cpu")


def test_bad_score_thresh(checkpoint: Path) -> None:
    with pytest.raises(ValueError, match="score_thresh"):
        Predictor(checkpoint, device="cpu", score_thresh=1.5)


def test_a_built_model_works_without_a_mapping(picture) -> None:
    pred = Predictor(_tiny_detector(), device="cpu", score_thresh=0.0)(picture[1])
    assert len(pred) > 0 and pred.category_ids is None
    assert pred.names == [str(int(label)) for label in pred.labels]
    assert all("category_id" not in item for item in pred.to_list())


# ---------------------------------------------------------------------------------------------
# tools/infer.py


def _infer(checkpoint: Path, src: Path, out: Path, thresh: float, fresh: bool = False) -> subprocess.CompletedProcess:
    return run_tool(["tools/infer.py", "--checkpoint", str(checkpoint), "--input", str(src), "--output", str(out),
                     "--device", "cpu", "--score-thresh", str(thresh)], timeout=120, fresh=fresh)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("pics")
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(src / "x.jpg")
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(src / "x.png")
    Image.fromarray(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)).save(src / "y.gif")
    (src / "notes.txt").write_text("not a picture")
    return src


def test_infer_folder_one_output_per_input_every_format(checkpoint: Path, folder: Path, tmp_path: Path) -> None:
    proc = _infer(checkpoint, folder, tmp_path, 0.0, fresh=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["x.jpg.png", "x.png.png", "y.gif.png"]
    dets = json.loads((tmp_path / "detections.json").read_text())
    assert sorted(dets) == ["x.jpg", "x.png", "y.gif"]
    assert all(len(v) > 0 for v in dets.values())
    assert {d["name"] for v in dets.values() for d in v} <= {"cat", "dog"}
    assert all(d["category_id"] == {"cat": 7, "dog": 3}[d["name"]] for v in dets.values() for d in v)
    # 64-px pictures are drawn upscaled so the labels can be read.
    for name in ("x.jpg.png", "x.png.png", "y.gif.png"):
        with Image.open(tmp_path / name) as im:
            assert min(im.size) >= 512, (name, im.size)
    with Image.open(tmp_path / "y.gif.png") as im:
        assert im.size[0] / im.size[1] == pytest.approx(96 / 64, rel=0.01)  # aspect ratio kept


def test_infer_says_why_nothing_was_found(checkpoint: Path, folder: Path, tmp_path: Path) -> None:
    proc = _infer(checkpoint, folder / "x.png", tmp_path, 1.0)
    assert proc.returncode == 0, proc.stderr[-3000:]
    match = re.search(r"x\.png: 0 detections at --score-thresh 1\.0 \(highest score (\d\.\d+)\)", proc.stdout)
    assert match, proc.stdout
    assert 0.0 < float(match.group(1)) < 1.0
    assert json.loads((tmp_path / "detections.json").read_text()) == {"x.png": []}
    assert (tmp_path / "x.png.png").is_file()
