"""Detector builders: torchvision parity, every architecture trains and predicts, checkpoints round-trip."""

import pytest
import torch
from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

from detection import build_detector, load_detector, save_detector
from detection.models import anchor_generator_for

SMALL = dict(min_size=128, max_size=192)


def _images(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, 120, 160, generator=g), torch.rand(3, 144, 112, generator=g)]


def _targets(masks=False):
    boxes = [torch.tensor([[10.0, 20.0, 70.0, 90.0], [80.0, 10.0, 150.0, 60.0]]), torch.tensor([[5.0, 5.0, 100.0, 130.0]])]
    labels = [torch.tensor([1, 2]), torch.tensor([3])]
    targets = []
    for b, l, (h, w) in zip(boxes, labels, [(120, 160), (144, 112)]):
        t = {"boxes": b, "labels": l}
        if masks:
            m = torch.zeros(len(b), h, w, dtype=torch.uint8)
            for i, (x0, y0, x1, y1) in enumerate(b.int().tolist()):
                m[i, y0:y1, x0:x1] = 1
            t["masks"] = m
        targets.append(t)
    return targets


# Both heads on ResNet-18, the deeper trunk once: tests/backbones/test_fpn.py checks its trunk and pyramid against torchvision's.
@pytest.mark.parametrize("depth, arch, tv_cls", [(18, "faster_rcnn", FasterRCNN), (18, "mask_rcnn", MaskRCNN), (34, "faster_rcnn", FasterRCNN)])
def test_parity_with_torchvision(arch, tv_cls, depth):
    torch.manual_seed(0)
    ours = build_detector(arch, backbone=f"resnet{depth}", num_classes=91, box_score_thresh=0.0, **SMALL).eval()
    tv_backbone = resnet_fpn_backbone(backbone_name=f"resnet{depth}", weights=None, trainable_layers=5)
    tv = tv_cls(tv_backbone, 91, box_score_thresh=0.0, **SMALL).eval()
    tv.load_state_dict(ours.state_dict(), strict=True)
    ours.load_state_dict(tv.state_dict(), strict=True)
    with torch.no_grad():
        a, b = ours(_images()), tv(_images())
    for da, db in zip(a, b):
        assert len(da["boxes"]) > 0
        assert torch.equal(da["labels"], db["labels"])
        # Pixel coordinates of ~100: float32 summation order gives ~1e-4 px differences.
        torch.testing.assert_close(da["boxes"], db["boxes"], rtol=1e-5, atol=1e-3)
        torch.testing.assert_close(da["scores"], db["scores"], rtol=0, atol=1e-5)
        if arch == "mask_rcnn":
            torch.testing.assert_close(da["masks"], db["masks"], rtol=0, atol=1e-3)


@pytest.mark.parametrize(
    "arch, returned",
    [
        ("faster_rcnn", None),
        ("faster_rcnn", [2, 3, 4]),
        ("faster_rcnn", [3]),
        ("mask_rcnn", [3, 4]),
        ("retinanet", None),
        ("retinanet", [3, 4]),
        ("fcos", None),
        ("fcos", [2, 3]),
    ],
)
def test_each_architecture_trains_and_predicts(arch, returned):
    torch.manual_seed(0)
    model = build_detector(arch, num_classes=4, returned_layers=returned, **SMALL)
    body = model.backbone
    levels = [f.name for f in body.feature_info]
    assert model.anchor_generator.num_anchors_per_location()[0] if arch in ("retinanet", "fcos") else True
    generator = model.rpn.anchor_generator if arch in ("faster_rcnn", "mask_rcnn") else model.anchor_generator
    assert len(generator.sizes) == len(levels)

    model.train()
    losses = model(_images(), _targets(masks=arch == "mask_rcnn"))
    assert losses and all(torch.isfinite(v) for v in losses.values())
    if arch == "mask_rcnn":
        assert "loss_mask" in losses
    sum(losses.values()).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)

    model.eval()
    with torch.no_grad():
        out = model(_images())
    assert len(out) == 2
    for det, (h, w) in zip(out, [(120, 160), (144, 112)]):
        n = len(det["boxes"])
        assert det["boxes"].shape == (n, 4) and det["scores"].shape == (n,) and det["labels"].shape == (n,)
        if n:
            assert (det["boxes"][:, 2:] >= det["boxes"][:, :2]).all()
            assert det["boxes"][:, 2].max() <= w and det["boxes"][:, 3].max() <= h
            assert det["labels"].min() >= 0 and det["labels"].max() < 4


def test_anchor_sizes_follow_strides():
    model = build_detector("faster_rcnn", num_classes=3, returned_layers=[2, 3, 4])
    assert [f.stride for f in model.backbone.feature_info] == [8, 16, 32, 64]
    assert model.rpn.anchor_generator.sizes == ((64,), (128,), (256,), (512,))
    assert model.roi_heads.box_roi_pool.featmap_names == ["0", "1", "2"]
    retina = build_detector("retinanet", num_classes=3)
    assert anchor_generator_for("retinanet", retina.backbone).sizes[0] == (32, 40, 50)
    assert len(retina.anchor_generator.sizes) == 5


def test_defaults_follow_backbone_weights():
    random = build_detector("faster_rcnn", num_classes=3)
    assert random.build_args["norm"] == "bn" and random.build_args["trainable_layers"] == 5
    assert all(p.requires_grad for p in random.backbone.body.parameters())
    state = random.backbone.body.state_dict()
    tuned = build_detector("faster_rcnn", num_classes=3, weights_backbone=state)
    assert tuned.build_args["norm"] == "frozen_bn" and tuned.build_args["trainable_layers"] == 3
    assert not any(isinstance(m, nn.BatchNorm2d) for m in tuned.backbone.body.modules())
    assert not tuned.backbone.body.layer1[0].conv1.weight.requires_grad


@pytest.mark.parametrize(
    "args, message",
    [
        (dict(arch="yolo", num_classes=3), r"arch must be one of \['faster_rcnn', 'mask_rcnn', 'retinanet', 'fcos'\], got 'yolo'"),
        (dict(arch="faster_rcnn", backbone="resnet50", num_classes=3), r"backbone must be one of \['resnet18', 'resnet34'\]"),
        (dict(arch="faster_rcnn", num_classes=1), r"num_classes for faster_rcnn must be an integer >= 2 .*background.*got 1"),
        (dict(arch="mask_rcnn", num_classes=0), "got 0"),
        (dict(arch="retinanet", num_classes=0), r"retinanet must be an integer >= 1, got 0"),
        (dict(arch="faster_rcnn", num_classes=3, trainable_layers=6), r"range \[0, 5\], got 6"),
        (dict(arch="faster_rcnn", num_classes=3, returned_layers=[0]), r"subset of \[1, 2, 3, 4\], got \[0\]"),
        (dict(arch="fcos", num_classes=3, returned_layers=[]), r"got \[\]"),
        (dict(arch="faster_rcnn", num_classes=3, norm="ln"), "norm must be one of"),
        (dict(arch="faster_rcnn", num_classes=3, head_norm="gn"), "head_norm and box_loss only apply to retinanet, got them for 'faster_rcnn'"),
        (dict(arch="fcos", num_classes=3, box_loss="giou"), "only apply to retinanet"),
        (dict(arch="retinanet", num_classes=3, head_norm="bn"), "head_norm must be None or 'gn', got 'bn'"),
        (dict(arch="retinanet", num_classes=3, box_loss="iou"), r"box_loss must be one of \['l1', 'smooth_l1', 'giou', 'diou', 'ciou'\], got 'iou'"),
        (dict(arch="retinanet", num_classes=3, head_norm="gn", out_channels=48), "divisible by its 32 groups, got 48"),
    ],
)
def test_bad_arguments(args, message):
    with pytest.raises(ValueError, match=message):
        build_detector(args.pop("arch"), **args)


@pytest.mark.parametrize("arch", ["faster_rcnn", "retinanet"])
def test_load_detector_round_trip(arch, tmp_path):
    torch.manual_seed(0)
    model = build_detector(arch, backbone="resnet34", num_classes=5, returned_layers=[2, 3, 4], box_score_thresh=0.0, **SMALL) if arch == "faster_rcnn" else build_detector(arch, num_classes=5, score_thresh=0.0, **SMALL)
    path = tmp_path / "model.pth"
    save_detector(model, path, category_mapping={"cat_ids": [1, 3, 90, 7], "names": ["a", "b", "c", "d"]})
    loaded = load_detector(path)
    assert loaded.build_args == model.build_args
    assert loaded.category_mapping["cat_ids"] == [1, 3, 90, 7]
    model.eval()
    with torch.no_grad():
        a, b = model(_images()), loaded(_images())
    for da, db in zip(a, b):
        assert len(da["boxes"]) > 0
        assert torch.equal(da["boxes"], db["boxes"]) and torch.equal(da["labels"], db["labels"])


def test_load_detector_rejects_other_files(tmp_path):
    path = tmp_path / "weights.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match=r"not a detector checkpoint .*lacks \['model', 'build_args'\]"):
        load_detector(path)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="could not read"):
        load_detector(garbage)


@pytest.mark.parametrize("arch", ["faster_rcnn", "mask_rcnn"])
def test_small_head_options_build_and_rebuild(arch, tmp_path):
    model = build_detector(arch, num_classes=4, out_channels=64, representation_size=128, anchor_scale=2, **SMALL)
    assert model.backbone.out_channels == 64
    assert model.roi_heads.box_head.fc6.in_features == 64 * 7 * 7 and model.roi_heads.box_head.fc7.out_features == 128
    assert model.roi_heads.box_predictor.cls_score.out_features == 4
    assert model.rpn.anchor_generator.sizes[0] == (8,)
    if arch == "mask_rcnn":
        assert model.roi_heads.mask_predictor.mask_fcn_logits.out_channels == 4
    save_detector(model, tmp_path / "m.pth")
    assert load_detector(tmp_path / "m.pth").build_args == model.build_args


@pytest.mark.parametrize("arch", ["faster_rcnn", "mask_rcnn"])
def test_rcnn_pyramid_with_a_gap_is_refused_naming_the_valid_choices(arch):
    with pytest.raises(ValueError, match=r"returned_layers for .* must be consecutive stages, got \[2, 4\].*\[2, 3, 4\]"):
        build_detector(arch, num_classes=3, returned_layers=[2, 4])
    # Single-stage heads have no RoI pooler: their anchors follow the real strides.
    model = build_detector("retinanet", num_classes=3, returned_layers=[2, 4], **SMALL)
    assert [f.stride for f in model.backbone.feature_info] == [8, 32, 64, 128]


@pytest.mark.parametrize("box, level, stride", [([8.0, 8.0, 40.0, 40.0], "0", 8), ([0.0, 0.0, 448.0, 448.0], "2", 32)])
def test_rois_pool_the_pyramid_level_their_size_maps_to(box, level, stride):
    from torchvision.ops import roi_align

    torch.manual_seed(0)
    model = build_detector("faster_rcnn", num_classes=3, returned_layers=[2, 3, 4], min_size=448, max_size=448).eval()
    image = torch.rand(1, 3, 448, 448)
    with torch.no_grad():
        feats = model.backbone(image)
        pooled = model.roi_heads.box_roi_pool(feats, [torch.tensor([box])], [(448, 448)])
    expected = roi_align(feats[level], [torch.tensor([box])], output_size=7, spatial_scale=1 / stride, sampling_ratio=2)
    assert pooled.abs().sum() > 0
    torch.testing.assert_close(pooled, expected, rtol=1e-5, atol=1e-5)


def test_unknown_detector_options_are_named_with_the_closest_valid_ones():
    with pytest.raises(ValueError, match=r"unknown option 'box_score_thres' for faster_rcnn; did you mean box_score_thresh"):
        build_detector("faster_rcnn", num_classes=3, box_score_thres=0.5)
    with pytest.raises(ValueError, match=r"unknown option 'box_score_thresh' for retinanet; did you mean .*score_thresh"):
        build_detector("retinanet", num_classes=3, box_score_thresh=0.5)
    model = build_detector("retinanet", num_classes=3, score_thresh=0.3, size_divisible=64, **SMALL)
    assert model.score_thresh == 0.3 and model.transform.size_divisible == 64


def test_retinanet_v2_head_is_torchvisions_and_survives_a_checkpoint(tmp_path):
    """head_norm="gn", box_loss="giou": the head retinanet_resnet50_fpn_v2 builds, rebuilt from the file."""
    from functools import partial

    from torchvision.models.detection.retinanet import RetinaNetHead

    torch.manual_seed(0)
    model = build_detector("retinanet", num_classes=4, out_channels=64, head_norm="gn", box_loss="giou", **SMALL)
    theirs = RetinaNetHead(64, model.anchor_generator.num_anchors_per_location()[0], 4, norm_layer=partial(nn.GroupNorm, 32))
    assert model.head.state_dict().keys() == theirs.state_dict().keys()
    assert [type(m) for m in model.head.modules()] == [type(m) for m in theirs.modules()]
    assert model.head.regression_head._loss_type == "giou"
    model.train()
    losses = model(_images(), _targets())
    assert set(losses) == {"classification", "bbox_regression"} and all(torch.isfinite(v) for v in losses.values())

    save_detector(model, tmp_path / "retina.pth")
    loaded = load_detector(tmp_path / "retina.pth")
    assert loaded.build_args["head_norm"] == "gn" and loaded.head.regression_head._loss_type == "giou"
    model.eval()
    loaded.eval()
    with torch.no_grad():
        ours, again = model(_images(1)), loaded(_images(1))
    for a, b in zip(ours, again):
        torch.testing.assert_close(a["scores"], b["scores"])
    # the default stays torchvision's original head: no normalisation, L1 box loss
    plain = build_detector("retinanet", num_classes=4, **SMALL)
    assert not any(isinstance(m, nn.GroupNorm) for m in plain.head.modules())
    assert plain.head.regression_head._loss_type == "l1"
