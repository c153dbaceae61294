"""The R-CNN box post-processing cap (box_topk_candidates) and test-time proposal counts (detection.postprocess)."""

import argparse
import copy
import warnings
from pathlib import Path
from unittest import mock

import pytest
import torch
import torchvision.ops.boxes as box_ops
from torchvision.models.detection.roi_heads import RoIHeads

from detection import build_detector, load_detector, save_detector
from detection.models import check_detector_options
from detection.postprocess import (
    DEFAULT_TOPK_CANDIDATES,
    CappedRoIHeads,
    parse_test_options,
    read_test_options,
    set_test_options,
)
from helpers import load_tool

TINY = dict(num_classes=4, min_size=64, max_size=128, out_channels=32, representation_size=64)


class _CountingNMS:
    """Stands in for torchvision's batched_nms and records the candidates of every call."""

    def __init__(self) -> None:
        self.seen: list[torch.Tensor] = []
        self.real = box_ops.batched_nms

    def __call__(self, boxes, scores, idxs, iou_threshold):
        self.seen.append(scores.clone())
        return self.real(boxes, scores, idxs, iou_threshold)

    def __enter__(self) -> "_CountingNMS":
        self.patch = mock.patch.object(box_ops, "batched_nms", self)
        self.patch.start()
        return self

    def __exit__(self, *exc) -> None:
        self.patch.stop()


def _torchvision_twin(model):
    """The same model, weights and all, with torchvision's own RoIHeads class."""
    twin = copy.deepcopy(model)
    twin.roi_heads.__class__ = RoIHeads
    return twin


def _head_inputs(proposals: int, classes: int, seed: int = 0, ties: bool = True):
    """Box-head outputs for ``proposals`` overlapping boxes in a 200x300 image (with ``ties``, every score twice)."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(proposals, 2, generator=g) * 120
    wh = torch.rand(proposals, 2, generator=g) * 60 + 20
    logits = torch.randn(proposals // 2, classes, generator=g).repeat(2, 1) if ties else torch.randn(proposals, classes, generator=g)
    deltas = torch.randn(proposals, 4 * classes, generator=g) * 0.1
    return logits, deltas, [torch.cat([xy, xy + wh], 1)], [(200, 300)]


@pytest.mark.parametrize("arch", ["faster_rcnn", "mask_rcnn"])
def test_equals_torchvision_when_the_cap_is_not_reached(arch):
    # Catches a cap that reorders, drops or alters candidates below the cap (the eager path and Mask R-CNN's masks).
    torch.manual_seed(0)
    extra = {"mask_head_channels": 16, "mask_head_layers": 1} if arch == "mask_rcnn" else {}
    model = build_detector(arch, **TINY, **extra, box_score_thresh=0.0, rpn_post_nms_top_n_test=60).eval()
    assert isinstance(model.roi_heads, CappedRoIHeads) and model.roi_heads.topk_candidates == DEFAULT_TOPK_CANDIDATES
    twin = _torchvision_twin(model)
    assert type(twin.roi_heads) is RoIHeads
    images = [torch.rand(3, 64, 96, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    with torch.no_grad():
        ours, theirs = model(images), twin(images)
    for a, b in zip(ours, theirs):
        assert len(a["boxes"]) > 10  # from 60 proposals x 3 classes = 180 candidates, fewer than the cap
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key

    # Ties and a real NMS (0.5), called directly: still torchvision's answer exactly.
    model.roi_heads.nms_thresh = twin.roi_heads.nms_thresh = 0.5
    inputs = _head_inputs(400, 4)
    for a, b in zip(model.roi_heads.postprocess_detections(*inputs), twin.roi_heads.postprocess_detections(*inputs)):
        assert torch.equal(a[0], b[0])


def test_the_cap_limits_the_candidates_entering_nms():
    # Catches a cap that is not applied (torchvision's 1200 candidates) or keeps the wrong ones (not the best scores).
    model = build_detector("faster_rcnn", **TINY, box_score_thresh=0.0, box_nms_thresh=0.5, box_topk_candidates=150,
                           box_detections_per_img=150).eval()
    twin = _torchvision_twin(model)
    inputs = _head_inputs(400, 4)  # 400 proposals x 3 classes = 1200 candidates above the threshold 0
    with _CountingNMS() as nms:
        ours = model.roi_heads.postprocess_detections(*inputs)
        theirs = twin.roi_heads.postprocess_detections(*inputs)
    capped, full = nms.seen
    assert len(full) == 1200 and len(capped) == 150
    assert torch.equal(capped.sort(descending=True).values, full.sort(descending=True).values[:150])
    # NMS over the best 150 keeps exactly the full NMS's survivors that are among them, in the same order.
    top_scores = set(full.sort(descending=True).values[:150].tolist())
    expected = [s for s in theirs[1][0].tolist() if s in top_scores]
    assert ours[1][0].tolist() == expected[: model.roi_heads.detections_per_img]
    assert len(ours[1][0]) < len(theirs[1][0]) == 150  # here the cap changes the answer: fewer survivors

    # NMS at 1.0 suppresses nothing: any cap >= detections_per_img gives torchvision's detections exactly
    # (the order of exactly equal scores aside, so none here).
    model.roi_heads.nms_thresh = twin.roi_heads.nms_thresh = 1.0
    inputs = _head_inputs(400, 4, ties=False)
    for a, b in zip(model.roi_heads.postprocess_detections(*inputs), twin.roi_heads.postprocess_detections(*inputs)):
        assert torch.equal(a[0], b[0])


@pytest.fixture(scope="module")
def capped_export(tmp_path_factory):
    """A tiny Faster R-CNN exported (ONNX and TorchScript) with the cap between two images' candidate counts.

    The small image has fewer candidates than the cap and the large one more (neither exactly
    as many), so the files must compute the count from the image, not keep one traced once:
    a count frozen at the cap fails the small image, one frozen below it the large one.
    """
    tmp = tmp_path_factory.mktemp("capped")
    torch.manual_seed(0)
    model = build_detector("faster_rcnn", **TINY, box_score_thresh=0.0, box_detections_per_img=300).eval()
    options = {"rpn_pre_nms_top_n_test": 300}
    set_test_options(model, options)
    small, large = (torch.rand(3, *size, generator=torch.Generator().manual_seed(1)) for size in ((64, 64), (64, 128)))
    counts = []
    for image in (small, large):
        with _CountingNMS() as nms, torch.no_grad():
            model([image])
        counts.append(len(nms.seen[-1]))  # the box head's NMS comes last
    assert 300 <= counts[0] < counts[1] - 1, counts
    options["box_topk_candidates"] = (counts[0] + counts[1]) // 2
    set_test_options(model, options)
    save_detector(model, tmp / "model.pth")  # build args: the default cap, 1000 proposals before the RPN's NMS
    from deploy.export import export_checkpoint

    onnx_path = export_checkpoint(tmp / "model.pth", tmp / "model.onnx", test_options=options)
    script_path = export_checkpoint(tmp / "model.pth", tmp / "model.pt", format="torchscript", test_options=options)
    return {"model": model, "images": (small, large), "counts": counts, "onnx": onnx_path, "torchscript": script_path, "options": options}


def test_exported_files_cap_as_eager_does(capped_export):
    # Catches a file without the cap (it would return the uncapped answer) or with a count frozen at the traced size.
    pytest.importorskip("onnxruntime")
    from deploy.export import read_metadata
    from deploy.runtime import load_exported

    model = capped_export["model"]
    cap = capped_export["options"]["box_topk_candidates"]
    assert capped_export["counts"][0] < cap < capped_export["counts"][1]  # one image under the cap, one over it
    baked = read_metadata(capped_export["onnx"])["test_options"]
    assert {k: baked[k] for k in capped_export["options"]} == capped_export["options"]
    onnx_model = load_exported(capped_export["onnx"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notices
        scripted = torch.jit.load(str(capped_export["torchscript"]))
    uncapped = set_test_options(copy.deepcopy(model), {"box_topk_candidates": 10**6})
    for image in capped_export["images"]:
        with torch.no_grad():
            eager = model([image])[0]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "RCNN always returns a (Losses, Detections) tuple in scripting"
                script = scripted([image])[1][0]
        exported = onnx_model([image])[0]
        for runtime, other in (("onnxruntime", exported), ("torchscript", script)):
            assert torch.equal(other["labels"], eager["labels"]), f"{runtime}: labels differ from eager's on a {tuple(image.shape[-2:])} image"
            torch.testing.assert_close(other["boxes"], eager["boxes"], atol=1e-3, rtol=0)
            torch.testing.assert_close(other["scores"], eager["scores"], atol=1e-5, rtol=0)
    with torch.no_grad():
        assert len(uncapped([capped_export["images"][1]])[0]["boxes"]) > len(eager["boxes"])  # the cap was at work


def test_the_option_rebuilds_from_a_checkpoint(tmp_path):
    # Catches an option left out of build_args (a rebuilt model would lose it) and old checkpoints that stop loading.
    model = build_detector("mask_rcnn", **TINY, mask_head_channels=16, mask_head_layers=1, box_topk_candidates=300)
    assert model.build_args["box_topk_candidates"] == 300
    save_detector(model, tmp_path / "m.pth")
    loaded = load_detector(tmp_path / "m.pth")
    assert loaded.roi_heads.topk_candidates == 300 and loaded.build_args == model.build_args

    ckpt = torch.load(tmp_path / "m.pth", weights_only=True)
    del ckpt["build_args"]["box_topk_candidates"]  # a checkpoint written before the option existed
    old = load_detector(ckpt)
    assert isinstance(old.roi_heads, CappedRoIHeads) and old.roi_heads.topk_candidates == DEFAULT_TOPK_CANDIDATES


@pytest.mark.parametrize("bad", [0, -5, 2.5, "100", True])
def test_a_bad_cap_is_refused_naming_it(bad):
    with pytest.raises(ValueError, match=rf"box_topk_candidates must be a positive integer, got {bad!r}"):
        build_detector("faster_rcnn", **TINY, box_topk_candidates=bad)


def test_a_cap_below_the_detections_or_on_a_one_stage_detector_is_refused():
    with pytest.raises(ValueError, match=r"box_topk_candidates must be >= box_detections_per_img \(100\), got 50"):
        build_detector("faster_rcnn", **TINY, box_topk_candidates=50)
    with pytest.raises(ValueError, match="box_topk_candidates only applies to faster_rcnn and mask_rcnn.*topk_candidates"):
        build_detector("retinanet", num_classes=4, box_topk_candidates=500)
    with pytest.raises(ValueError, match="did you mean box_topk_candidates"):
        check_detector_options("faster_rcnn", {"box_topk_candidate": 500})


def test_proposal_counts_change_at_test_time_only():
    # Catches an override that does not reach the RPN (or reaches its training counts).
    model = build_detector("faster_rcnn", **TINY).eval()
    set_test_options(model, {"rpn_post_nms_top_n_test": 7, "rpn_pre_nms_top_n_test": 11})
    assert (model.rpn.pre_nms_top_n(), model.rpn.post_nms_top_n()) == (11, 7)
    assert model.rpn._pre_nms_top_n["training"] == 2000 and model.rpn._post_nms_top_n["training"] == 2000
    assert read_test_options(model)["rpn_post_nms_top_n_test"] == 7
    rois = []
    model.roi_heads.box_head.register_forward_hook(lambda module, args, out: rois.append(len(out)))
    with torch.no_grad():
        model([torch.rand(3, 64, 96)])
    assert rois == [7]
    assert "rpn_post_nms_top_n_test" not in model.build_args["kwargs"]  # a test-time setting, not a rebuild argument


@pytest.mark.parametrize("options, message", [
    ({"rpn_post_nms_top_n_test": 0}, "rpn_post_nms_top_n_test must be a positive integer, got 0"),
    ({"rpn_pre_nms_top_n_test": -3}, "rpn_pre_nms_top_n_test must be a positive integer, got -3"),
    ({"rpn_post_nms_top_n_test": 1.5}, "rpn_post_nms_top_n_test must be a positive integer, got 1.5"),
    ({"box_topk_candidates": 20}, r"box_topk_candidates must be >= box_detections_per_img \(100\), got 20"),
    ({"proposals": 300}, r"unknown test-time option\(s\) \['proposals'\]"),
])
def test_bad_test_options_are_refused(options, message):
    model = build_detector("faster_rcnn", **TINY).eval()
    with pytest.raises(ValueError, match=message):
        set_test_options(model, options)
    assert model.rpn.post_nms_top_n() == 1000 and model.rpn.pre_nms_top_n() == 1000  # nothing half-set


def test_proposals_are_refused_where_there_is_no_rpn():
    with pytest.raises(ValueError, match="applies to Faster R-CNN and Mask R-CNN.*not to fcos"):
        set_test_options(build_detector("fcos", num_classes=4), {"rpn_post_nms_top_n_test": 100})
    args = argparse.Namespace(proposals=0, pre_nms_proposals=None, box_topk_candidates=None)
    with pytest.raises(ValueError, match="--proposals must be a positive integer, got 0"):
        parse_test_options(args)


def test_the_benchmark_heavy_load_sends_the_cap_to_nms():
    # The benchmark's heavy rows (tools/benchmark.py --only heavy): 1000 proposals x 90 classes all pass the threshold,
    # and ours lets 5000 of them into NMS. Catches a load that is not heavy, or a benchmark model without the cap.
    from detection.postprocess import set_heavy_load

    torch.manual_seed(0)
    model = set_heavy_load(build_detector("faster_rcnn", num_classes=91, min_size=64, max_size=96, out_channels=32, representation_size=64).eval())
    rois = []
    model.roi_heads.box_head.register_forward_hook(lambda module, args, out: rois.append(len(out)))
    with _CountingNMS() as nms, torch.no_grad():
        out = model([torch.rand(3, 64, 96, generator=torch.Generator().manual_seed(0))])[0]
    assert rois == [1000] and len(nms.seen[-1]) == DEFAULT_TOPK_CANDIDATES and len(out["boxes"]) == 100
    assert nms.seen[-1].min() > 0  # score threshold 0: the 5000 best of 90,000


def test_eval_and_infer_take_proposals_for_a_checkpoint_and_refuse_them_for_an_exported_file(capped_export, tmp_path, capsys):
    # The flags reach the model a .pth builds; an exported file's counts are baked in, so there the flags are
    # one error line before any work (catches a flag parsed but never applied, or silently ignored).
    from PIL import Image

    infer = load_tool("infer")
    pth = Path(capped_export["onnx"]).with_name("model.pth")
    args = infer.parse_args(["--checkpoint", str(pth), "--input", "x.jpg", "--output", str(tmp_path / "vis"),
                             "--proposals", "7", "--box-topk-candidates", "300"])
    assert infer._predictor(args).model.rpn._post_nms_top_n["testing"] == 7
    Image.new("RGB", (64, 64)).save(tmp_path / "x.png")
    for tool, extra in (("eval_coco", []), ("infer", ["--input", str(tmp_path / "x.png"), "--output", str(tmp_path / "out")])):
        capsys.readouterr()
        assert load_tool(tool).main(["--checkpoint", str(capped_export["onnx"]), "--proposals", "300", *extra]) == 2, tool
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(err) == 1 and err[0].startswith("error: ") and "baked in at export" in err[0], (tool, err)
    assert not (tmp_path / "out").exists()
