"""Pyramid backbones: outputs match feature_info, keys and numbers match torchvision."""

import pytest
import torch
from torch import nn
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from backbones import resnet18_fpn, resnet34_fpn, resnet_fpn

# Frozen trunk parameters for trainable_layers = 0..5 (same rule as torchvision).
FROZEN = {
    18: [11_176_512, 2_782_784, 683_072, 157_504, 9_536, 0],
    34: [21_284_672, 8_170_304, 1_347_904, 231_488, 9_536, 0],
}


@pytest.mark.parametrize("depth", [18, 34])
@pytest.mark.parametrize("trainable", range(6))
def test_frozen_parameter_counts(depth, trainable):
    model = resnet_fpn(depth, trainable_layers=trainable)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert frozen == FROZEN[depth][trainable]
    tv = resnet_fpn_backbone(backbone_name=f"resnet{depth}", weights=None, trainable_layers=trainable, norm_layer=nn.BatchNorm2d)
    assert frozen == sum(p.numel() for p in tv.parameters() if not p.requires_grad)


CASES = [
    ((1, 2, 3, 4), "pool", (225, 301)),
    ((2, 3, 4), "p6p7", (97, 97)),
    ((1, 3), "pool", (128, 200)),
    ((4,), None, (64, 96)),
    ((2, 3), "p6p7", (160, 120)),
]


@pytest.mark.parametrize("returned, extra, size", CASES)
def test_outputs_follow_feature_info(returned, extra, size):
    model = resnet18_fpn(returned_layers=returned, extra_blocks=extra, out_channels=64).eval()
    h, w = size
    with torch.no_grad():
        out = model(torch.randn(1, 3, h, w))
    assert list(out) == [f.name for f in model.feature_info]
    expected_extra = {"pool": ["pool"], "p6p7": ["p6", "p7"], None: []}[extra]
    assert list(out) == [str(i) for i in range(len(returned))] + expected_extra
    assert model.out_channels == 64
    for info in model.feature_info:
        t = out[info.name]
        assert t.shape[1] == info.channels == 64
        # Padded stride-2 ops give ceil(n / 2) each time.
        assert t.shape[-2:] == (-(-h // info.stride), -(-w // info.stride)), info
    strides = [f.stride for f in model.feature_info]
    assert strides[: len(returned)] == [2 ** (i + 1) for i in returned]
    assert all(b == 2 * a for a, b in zip(strides[len(returned) - 1 :], strides[len(returned) :]))


@pytest.mark.parametrize("depth", [18, 34])
def test_same_keys_and_numbers_as_torchvision(depth):
    torch.manual_seed(depth)
    ours = resnet_fpn(depth).eval()
    tv = resnet_fpn_backbone(backbone_name=f"resnet{depth}", weights=None, trainable_layers=5, norm_layer=nn.BatchNorm2d).eval()
    assert list(ours.state_dict()) == list(tv.state_dict())
    tv.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 3, 160, 224)
    with torch.no_grad():
        a, b = ours(x), tv(x)
    assert list(a) == list(b) == ["0", "1", "2", "3", "pool"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5)


def test_p6p7_matches_torchvision_retinanet_layout():
    ours = resnet18_fpn(extra_blocks="p6p7")
    tv = resnet_fpn_backbone(
        backbone_name="resnet18", weights=None, trainable_layers=5, norm_layer=nn.BatchNorm2d,
        returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256),
    )
    assert list(ours.state_dict()) == list(tv.state_dict())
    assert [f.stride for f in ours.feature_info] == [8, 16, 32, 64, 128]


def test_defaults_follow_the_weights():
    random = resnet34_fpn()
    assert any(isinstance(m, nn.BatchNorm2d) for m in random.modules())
    assert all(p.requires_grad for p in random.parameters())
    assert random.load_report is None

    state = resnet34_fpn().body.state_dict()
    pretrained = resnet34_fpn(weights=state)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in pretrained.modules())
    assert any(isinstance(m, FrozenBatchNorm2d) for m in pretrained.modules())
    # FrozenBatchNorm2d holds buffers, so only the stem and layer1 convolutions are frozen parameters.
    frozen = [n for n, p in pretrained.named_parameters() if not p.requires_grad]
    assert sum(p.numel() for p in pretrained.parameters() if not p.requires_grad) == 9_408 + 6 * 36_864
    assert frozen and all(n.startswith(("body.conv1", "body.layer1.")) for n in frozen)
    trainable = [n for n, p in pretrained.named_parameters() if p.requires_grad]
    assert {n.split(".")[1] for n in trainable if n.startswith("body.")} == {"layer2", "layer3", "layer4"}
    assert pretrained.load_report is not None and not pretrained.load_report.unexpected
    assert torch.equal(pretrained.body.layer1[0].conv1.weight, state["layer1.0.conv1.weight"])
    # Overrides win over the defaults.
    custom = resnet18_fpn(weights=resnet18_fpn().body.state_dict(), trainable_layers=5, norm_layer=nn.BatchNorm2d)
    assert all(p.requires_grad for p in custom.parameters())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(depth=50), r"depth must be one of \[18, 34\], got 50"),
        (dict(depth=18, trainable_layers=6), r"range \[0, 5\], got 6"),
        (dict(depth=18, returned_layers=[0]), r"non-empty subset of \[1, 2, 3, 4\], got \[0\]"),
        (dict(depth=18, returned_layers=[]), r"non-empty subset of \[1, 2, 3, 4\], got \[\]"),
        (dict(depth=18, returned_layers=[5]), r"got \[5\]"),
        (dict(depth=18, extra_blocks="p5"), r"extra_blocks must be one of \['pool', 'p6p7', None\], got 'p5'"),
        (dict(depth=18, out_channels=0), "out_channels must be a positive integer"),
    ],
)
def test_bad_arguments(kwargs, message):
    depth = kwargs.pop("depth")
    with pytest.raises(ValueError, match=message):
        resnet_fpn(depth, **kwargs)
