"""build_segmenter: torchvision's DeepLabV3 / FCN on the dilated trunk, the semantic FPN, options, files, TorchScript."""

import warnings

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.segmentation.deeplabv3 import DeepLabHead, DeepLabV3
from torchvision.models.segmentation.fcn import FCN, FCNHead

from backbones.weights import WeightsError
from engine.files import CheckpointError
from segmentation import build_segmenter, check_segmenter_options, load_segmenter, rebuild_segmenter, save_segmenter
from segmentation.models import SemanticFPNHead

K = 4


def _random_statistics(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) * 0.2 - 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 0.4 + 0.8)
    return model


def _torchvision_twin(arch: str, aux: bool) -> nn.Module:
    return_layers = {"layer4": "out", **({"layer3": "aux"} if aux else {})}
    body = IntermediateLayerGetter(torchvision.models.resnet18(weights=None), return_layers=return_layers)
    aux_head = FCNHead(256, K) if aux else None
    if arch == "deeplabv3":
        return DeepLabV3(body, DeepLabHead(512, K), aux_head)
    return FCN(body, FCNHead(512, K), aux_head)


@pytest.mark.parametrize("aux", [False, True])
@pytest.mark.parametrize("arch", ["deeplabv3", "fcn"])
def test_parity_with_torchvision_at_output_stride_32(arch, aux, one_thread):
    torch.manual_seed(0)
    tv = _random_statistics(_torchvision_twin(arch, aux)).eval()
    ours = build_segmenter(arch, num_classes=K, output_stride=32, aux_loss=aux).eval()
    assert type(ours) is type(tv)
    assert list(ours.state_dict()) == list(tv.state_dict())
    ours.load_state_dict(tv.state_dict(), strict=True)
    tv.load_state_dict(ours.state_dict(), strict=True)  # and back
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a, b = ours(x), tv(x)
    assert list(a) == list(b) == (["out", "aux"] if aux else ["out"])
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ["deeplabv3", "fcn", "semantic_fpn"])
@pytest.mark.parametrize("output_stride", [8, 16, 32])
def test_every_arch_and_output_stride_gives_input_sized_logits(arch, output_stride, one_thread):
    torch.manual_seed(0)
    model = build_segmenter(arch, num_classes=K, output_stride=output_stride, aux_loss=True, head_channels=32).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 70, 90))
    assert list(out) == ["out", "aux"]
    assert all(v.shape == (1, K, 70, 90) for v in out.values())
    assert model.build_args["output_stride"] == output_stride


def test_defaults_follow_torchvision_and_panoptic_fpn():
    deeplab = build_segmenter("deeplabv3", num_classes=K)
    assert deeplab.build_args["output_stride"] == 8
    assert [m.dilation for m in deeplab.backbone.layer4[1].modules() if isinstance(m, nn.Conv2d)] == [(4, 4), (4, 4)]
    assert [c[0].dilation for c in deeplab.classifier[0].convs[1:4]] == [(12, 12), (24, 24), (36, 36)]
    assert deeplab.classifier[4].in_channels == 256 and deeplab.aux_classifier is None
    assert all(p.requires_grad for p in deeplab.parameters())
    assert "fc" not in dict(deeplab.backbone.named_children())
    fcn = build_segmenter("fcn", num_classes=K, aux_loss=True)
    assert fcn.classifier[0].out_channels == 128 and fcn.aux_classifier[0].in_channels == 256
    fpn = build_segmenter("semantic_fpn", num_classes=K)
    assert fpn.build_args["output_stride"] == 32
    assert [f.stride for f in fpn.backbone.feature_info] == [4, 8, 16, 32]
    assert fpn.backbone.out_channels == 256


def test_semantic_fpn_head_is_detectron2s_on_divisible_inputs(one_thread):
    # detectron2's SemSegFPNHead: per level max(1, log2(stride / 4)) conv-GN-ReLU stages, each
    # followed by nn.Upsample(2x) when the level is coarser than 4; sum; 1x1; upsample 4x.
    torch.manual_seed(0)
    model = build_segmenter("semantic_fpn", num_classes=K, head_channels=32, fpn_channels=64).eval()
    head = model.classifier
    assert [len(stages) for stages in head.scale_heads] == [1, 1, 2, 3]
    assert all(isinstance(stage[1], nn.GroupNorm) and stage[1].num_groups == 32 for stages in head.scale_heads for stage in stages)
    assert all(stage[0].bias is None for stages in head.scale_heads for stage in stages)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        pyramid = model.backbone(x)
        total = 0
        for name, stages, stride in zip(head.in_features, head.scale_heads, (4, 8, 16, 32)):
            y = pyramid[name]
            for stage in stages:
                y = stage(y)
                if stride > 4:
                    y = nn.functional.interpolate(y, scale_factor=2, mode="bilinear", align_corners=False)
            total = total + y
        expected = nn.functional.interpolate(head.predictor(total), scale_factor=4, mode="bilinear", align_corners=False)
        torch.testing.assert_close(model(x)["out"], expected, rtol=0, atol=1e-5)


def test_semantic_fpn_head_refuses_a_pyramid_with_a_gap():
    from backbones.resnet import FeatureInfo

    with pytest.raises(ValueError, match=r"every stride from 4 up.*missing \[8\]"):
        SemanticFPNHead([FeatureInfo("0", 64, 4), FeatureInfo("1", 64, 16)], K)


@pytest.mark.parametrize("arch", ["deeplabv3", "fcn", "semantic_fpn"])
def test_every_segmenter_scripts_with_eager_outputs(arch, one_thread):
    torch.manual_seed(1)
    model = _random_statistics(build_segmenter(arch, num_classes=K, output_stride=16, aux_loss=True, head_channels=32)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(model)
    x = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        ref, out = model(x), scripted(x)
    assert list(out) == list(ref)
    for key in ref:
        torch.testing.assert_close(out[key], ref[key], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ["deeplabv3", "fcn", "semantic_fpn"])
def test_a_training_step_reaches_every_head(arch, one_thread):
    torch.manual_seed(0)
    model = build_segmenter(arch, num_classes=K, output_stride=16, aux_loss=True, head_channels=32).train()
    out = model(torch.randn(2, 3, 64, 64))
    target = torch.randint(0, K, (2, 64, 64))
    target[:, :4] = 255
    loss = sum(nn.functional.cross_entropy(v, target, ignore_index=255) for v in out.values())
    loss.backward()
    for name in ("classifier", "aux_classifier"):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in getattr(model, name).parameters() if p.dim() > 1), name


def test_imagenet_layout_weights_load_into_the_dilated_trunk():
    tv = torchvision.models.resnet18(weights=None)
    model = build_segmenter("deeplabv3", num_classes=K, weights_backbone=tv.state_dict(), output_stride=8)
    assert model.load_report.ok and not model.load_report.missing
    assert torch.equal(model.backbone.layer4[1].conv2.weight, tv.layer4[1].conv2.weight)
    fpn = build_segmenter("semantic_fpn", num_classes=K, weights_backbone=tv.state_dict())
    assert fpn.load_report.ok and torch.equal(fpn.backbone.body.layer1[0].conv1.weight, tv.layer1[0].conv1.weight)


def test_trainable_layers_and_norm():
    model = build_segmenter("fcn", num_classes=K, trainable_layers=2, norm="frozen_bn")
    frozen = {n.split(".")[1] for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"conv1", "layer1", "layer2"}
    assert all(p.requires_grad for p in model.classifier.parameters())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.backbone.modules())


@pytest.mark.parametrize(
    "arch, kwargs, message",
    [
        ("deeplab", {}, r"arch must be one of \['deeplabv3', 'fcn', 'semantic_fpn'\], got 'deeplab'"),
        ("fcn", {"backbone": "resnet50"}, r"backbone must be one of \['resnet18', 'resnet34'\], got 'resnet50'"),
        ("fcn", {"output_stride": 4}, r"output_stride must be one of \[8, 16, 32\] \(or None for the default\), got 4"),
        ("fcn", {"num_classes": 1}, r"num_classes must be an integer >= 2"),
        ("fcn", {"aux_loss": 1}, "aux_loss must be True or False"),
        ("fcn", {"output_strid": 16}, r"unknown option 'output_strid' for fcn; did you mean output_stride\?"),
        ("deeplabv3", {"atrous_rate": (6, 12)}, r"unknown option 'atrous_rate' for deeplabv3; did you mean atrous_rates\?"),
        ("fcn", {"atrous_rates": (6, 12, 18)}, "option 'atrous_rates' only applies to deeplabv3, got it for 'fcn'"),
        ("deeplabv3", {"fpn_channels": 128}, "option 'fpn_channels' only applies to semantic_fpn"),
        ("semantic_fpn", {"head_channels": 48}, "head_channels for semantic_fpn must be a multiple of 32"),
        ("deeplabv3", {"atrous_rates": ()}, "atrous_rates must be a non-empty sequence of positive integers"),
        ("fcn", {"trainable_layers": 6}, r"range \[0, 5\], got 6"),
        ("fcn", {"norm": "sync_bn"}, r"norm must be one of \['bn', 'frozen_bn', 'gn'\], got 'sync_bn'"),
    ],
)
def test_bad_options_are_named(arch, kwargs, message):
    kwargs = {"num_classes": K, **kwargs}
    with pytest.raises(ValueError, match=message):
        build_segmenter(arch, **kwargs)


def test_check_segmenter_options_lists_valid_ones():
    check_segmenter_options("semantic_fpn", {"fpn_channels": 64, "head_channels": 32})
    with pytest.raises(ValueError, match=r"valid: aux_loss, backbone, fpn_channels, head_channels, norm, num_classes"):
        check_segmenter_options("semantic_fpn", {"dropout": 0.1})


@pytest.mark.parametrize("arch, extra", [("deeplabv3", {"atrous_rates": [6, 12, 18]}), ("fcn", {}), ("semantic_fpn", {"fpn_channels": 64})])
def test_segmenter_files_rebuild_their_model(arch, extra, tmp_path, one_thread):
    torch.manual_seed(0)
    model = _random_statistics(build_segmenter(arch, num_classes=3, output_stride=16, aux_loss=True, head_channels=32, **extra)).eval()
    names = ["__background__", "cat", "dog"]
    path = save_segmenter(model, tmp_path / "model.pth", class_names=names, config={"lr": 0.1}, iteration=7)
    assert not list(tmp_path.glob(".*.tmp"))  # the temporary file was renamed
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"model", "build_args", "class_names", "format_version", "config", "iteration"}
    loaded = load_segmenter(path)
    assert loaded.class_names == names and loaded.train_config == {"lr": 0.1}
    assert loaded.build_args == model.build_args
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)["out"], model(x)["out"], rtol=0, atol=0)
    assert rebuild_segmenter(model.build_args).build_args == model.build_args


def test_segmenter_files_refuse_other_files(tmp_path):
    model = build_segmenter("fcn", num_classes=3, output_stride=32)
    with pytest.raises(ValueError, match="class_names has 2 names for a model with num_classes=3"):
        save_segmenter(model, tmp_path / "x.pth", class_names=["a", "b"])
    with pytest.raises(ValueError, match="has no build_args"):
        save_segmenter(nn.Conv2d(1, 1, 1), tmp_path / "x.pth", class_names=["a"])
    torch.save({"model": {}, "build_args": {"arch": "faster_rcnn", "num_classes": 3}, "class_names": ["a", "b", "c"]}, tmp_path / "det.pth")
    with pytest.raises(CheckpointError, match=r"not a segmenter file: its arch is 'faster_rcnn'"):
        load_segmenter(tmp_path / "det.pth")
    torch.save(model.state_dict(), tmp_path / "state.pth")
    with pytest.raises(CheckpointError, match=r"not a segmenter file \(from save_segmenter\): it lacks \['model', 'build_args', 'class_names'\]"):
        load_segmenter(tmp_path / "state.pth")
    record = {"model": {"x": torch.zeros(1)}, "build_args": dict(model.build_args), "class_names": ["a", "b", "c"]}
    torch.save(record, tmp_path / "wrong.pth")
    with pytest.raises(CheckpointError, match="does not rebuild a segmenter"):
        load_segmenter(tmp_path / "wrong.pth")
    with pytest.raises(WeightsError, match="not found"):
        load_segmenter(tmp_path / "missing.pth")


@pytest.mark.parametrize("output_stride, strides, dilations", [
    (32, [4, 8, 16, 32], [1, 1, 1]),
    (16, [4, 8, 16, 16], [1, 1, 2]),  # only layer4 trades its stride for dilation
    (8, [4, 8, 8, 8], [1, 2, 4]),
])
def test_each_output_stride_dilates_the_last_stages_only(output_stride, strides, dilations, one_thread):
    h, w = 64, 96
    model = build_segmenter("fcn", num_classes=K, output_stride=output_stride, aux_loss=True, head_channels=16).eval()
    with torch.no_grad():
        features = model.backbone(torch.randn(1, 3, h, w))
    # layer3 feeds the auxiliary head, layer4 the main one: each at its own stride.
    assert {k: tuple(v.shape[-2:]) for k, v in features.items()} == {
        "aux": (h // strides[2], w // strides[2]), "out": (h // strides[3], w // strides[3])}, f"output stride {output_stride}: layer3 (aux) / layer4 (out) feature sizes"
    got = [model.backbone[f"layer{i}"][-1].conv2.dilation[0] for i in (2, 3, 4)]
    assert got == dilations, f"output stride {output_stride}: layer2-4 dilations {got}, expected {dilations}"
    fpn = build_segmenter("semantic_fpn", num_classes=K, output_stride=output_stride, head_channels=32, fpn_channels=32).eval()
    assert [f.stride for f in fpn.backbone.feature_info] == strides
