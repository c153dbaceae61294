"""COCO evaluation helpers: result conversion, empty results, and the faster evaluator's equality."""

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from pycocotools.coco import COCO

from detection.evaluation import coco_evaluate, to_coco_results


@pytest.fixture(scope="module")
def ground_truth(tmp_path_factory):
    from engine import shapes

    root = shapes.generate(tmp_path_factory.mktemp("shapes"), num_train=0, num_val=12, image_size=96, seed=5)
    return COCO(str(root / "annotations" / "instances_val.json"))


def _detections(gt: COCO, seed: int = 0, segm: bool = False) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for ann in gt.loadAnns(gt.getAnnIds()):
        for _ in range(2):
            x, y, w, h = ann["bbox"]
            jitter = rng.normal(0, 2, 4)
            det = {"image_id": ann["image_id"], "category_id": int(rng.choice(gt.getCatIds())) if rng.random() < 0.2 else ann["category_id"],
                   "bbox": [x + jitter[0], y + jitter[1], max(w + jitter[2], 1), max(h + jitter[3], 1)], "score": float(rng.random())}
            if segm:
                mask = gt.annToMask(ann)
                mask = np.roll(mask, int(rng.integers(-2, 3)), axis=1)
                rle = mask_util.encode(np.asfortranarray(mask))
                det["segmentation"] = {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}
            out.append(det)
    return out


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_faster_evaluator_equals_pycocotools(ground_truth, iou_type):
    pytest.importorskip("faster_coco_eval")
    dets = _detections(ground_truth, segm=iou_type == "segm")
    ref = coco_evaluate(ground_truth, dets, iou_type, evaluator="pycocotools")
    fast = coco_evaluate(ground_truth, dets, iou_type, evaluator="faster")
    assert 5 < ref["metrics"][f"{iou_type}/AP"] < 95
    np.testing.assert_allclose(fast["stats"], ref["stats"], rtol=0, atol=1e-6)
    for name, ap in ref["per_category"].items():
        assert fast["per_category"][name] == pytest.approx(ap, abs=1e-4)


def test_results_use_original_ids_and_xywh(ground_truth):
    output = {"boxes": torch.tensor([[10.0, 20.0, 30.0, 60.0]]), "scores": torch.tensor([0.9]), "labels": torch.tensor([2]),
              "masks": torch.zeros(1, 1, 96, 96)}
    output["masks"][0, 0, 20:60, 10:30] = 0.9
    bbox, segm = to_coco_results(output, 7, {1: 3, 2: 90})
    assert bbox == [{"image_id": 7, "category_id": 90, "bbox": [10.0, 20.0, 20.0, 40.0], "score": 0.9}]
    assert segm[0]["category_id"] == 90 and mask_util.area(segm[0]["segmentation"]) == 800
    with pytest.raises(ValueError, match=r"labels \[5\] that the category mapping lacks"):
        to_coco_results(dict(output, labels=torch.tensor([5])), 7, {1: 3, 2: 90})


def test_no_detections_scores_zero(ground_truth):
    result = coco_evaluate(ground_truth, [], "bbox")
    assert result["metrics"]["bbox/AP"] == 0.0 and "no bbox detections" in result["summary"]
    with pytest.raises(ValueError, match="evaluator must be one of"):
        coco_evaluate(ground_truth, [], "bbox", evaluator="fastest")
