"""The trunk is torchvision's ResNet-18/34, parameter for parameter."""

import pytest
import torch
import torchvision
from torchvision.ops import FrozenBatchNorm2d

from backbones import resnet18, resnet34
from backbones.resnet import BasicBlock, resnet

BUILDERS = {18: (resnet18, torchvision.models.resnet18), 34: (resnet34, torchvision.models.resnet34)}


@pytest.mark.parametrize("depth", [18, 34])
def test_logits_and_stages_match_torchvision(depth, tmp_path):
    ours_fn, tv_fn = BUILDERS[depth]
    torch.manual_seed(depth)
    tv = tv_fn(weights=None).eval()
    # Non-trivial BN statistics so eval-mode BN is exercised, not the identity.
    for m in tv.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    path = tmp_path / f"resnet{depth}.pth"
    torch.save(tv.state_dict(), path)

    ours = ours_fn().eval()
    ours.load_state_dict(torch.load(path, weights_only=True), strict=True)
    assert list(ours.state_dict()) == list(tv.state_dict())

    x = torch.randn(2, 3, 128, 160)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), tv(x), rtol=0, atol=1e-5)
        feats = ours.forward_features(x)
        y = tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))
        for name in ("layer1", "layer2", "layer3", "layer4"):
            y = getattr(tv, name)(y)
            torch.testing.assert_close(feats[name], y, rtol=0, atol=1e-5)


@pytest.mark.parametrize("depth, expected", [(18, 11_689_512), (34, 21_797_672)])
def test_parameter_counts(depth, expected):
    assert sum(p.numel() for p in resnet(depth).parameters()) == expected


@pytest.mark.parametrize("size", [(225, 301), (97, 97), (64, 64)])
def test_stage_shapes_follow_feature_info(size):
    model = resnet18().eval()
    h, w = size
    feats = model.forward_features(torch.randn(1, 3, h, w))
    assert [f.name for f in model.feature_info] == list(feats)
    assert [f.stride for f in model.feature_info] == [4, 8, 16, 32]
    assert [f.channels for f in model.feature_info] == [64, 128, 256, 512]
    for info in model.feature_info:
        out = feats[info.name]
        assert out.shape[1] == info.channels
        # Each stride-2 op with padding maps n -> ceil(n / 2).
        expected_h, expected_w = h, w
        s = 1
        while s < info.stride:
            expected_h, expected_w, s = -(-expected_h // 2), -(-expected_w // 2), s * 2
        assert out.shape[-2:] == (expected_h, expected_w)


def test_stem_keeps_the_max_pool():
    model = resnet34()
    assert isinstance(model.maxpool, torch.nn.MaxPool2d)
    assert model.maxpool.kernel_size == 3 and model.maxpool.stride == 2
    assert model.stem(torch.randn(1, 3, 64, 64)).shape[-1] == 16


def test_forward_features_subset_stops_early():
    model = resnet18()
    out = model.forward_features(torch.randn(1, 3, 64, 64), stages=(2, 3))
    assert list(out) == ["layer2", "layer3"]
    with pytest.raises(ValueError, match=r"subset of \(1, 2, 3, 4\)"):
        model.forward_features(torch.randn(1, 3, 64, 64), stages=(0,))


def test_projection_shortcuts_only_where_shape_changes():
    model = resnet34()
    blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
    with_proj = [b for b in blocks if b.downsample is not None]
    assert len(blocks) == 16
    assert len(with_proj) == 3  # first block of layer2, layer3, layer4
    assert all(b.stride == 2 for b in with_proj)


def test_zero_init_residual_and_kaiming():
    model = resnet18(zero_init_residual=True)
    assert all(torch.count_nonzero(b.bn2.weight) == 0 for b in model.modules() if isinstance(b, BasicBlock))
    # fan_out Kaiming: std = sqrt(2 / (out_channels * k * k)).
    w = model.layer4[0].conv2.weight
    assert abs(w.std().item() - (2 / (512 * 9)) ** 0.5) < 0.1 * (2 / (512 * 9)) ** 0.5


def test_norm_layer_and_bad_depth():
    model = resnet18(norm_layer=FrozenBatchNorm2d)
    assert isinstance(model.bn1, FrozenBatchNorm2d)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    with pytest.raises(ValueError, match=r"depth must be one of \[18, 34\], got 50"):
        resnet(50)
