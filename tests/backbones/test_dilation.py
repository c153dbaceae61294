"""Dilated ResNet-18/34 (replace_stride_with_dilation): real strides, unchanged parameters, the plain features densely."""

import itertools
import warnings

import pytest
import torch
import torchvision
from torch import nn

from backbones import freeze_trunk, resnet, resnet18, resnet18_fpn, resnet34

COMBINATIONS = list(itertools.product([False, True], repeat=3))


def _random_statistics(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model


def _expected_strides(dilate) -> list[int]:
    strides, stride = [4], 4
    for d in dilate:
        stride *= 1 if d else 2
        strides.append(stride)
    return strides


@pytest.mark.parametrize("dilate", COMBINATIONS)
def test_feature_info_and_outputs_follow_each_combination(dilate, one_thread):
    model = resnet18(replace_stride_with_dilation=list(dilate)).eval()
    expected = _expected_strides(dilate)
    assert [f.stride for f in model.feature_info] == expected
    assert model.replace_stride_with_dilation == dilate
    h, w = 64, 80
    with torch.no_grad():
        feats = model.forward_features(torch.randn(1, 3, h, w))
    for info in model.feature_info:
        assert feats[info.name].shape[-2:] == (-(-h // info.stride), -(-w // info.stride)), info
    # Parameters are the plain network's, name for name and shape for shape.
    plain = resnet18()
    assert [(k, v.shape) for k, v in model.state_dict().items()] == [(k, v.shape) for k, v in plain.state_dict().items()]


@pytest.mark.parametrize("dilate", COMBINATIONS[1:])
def test_dilated_stages_compute_the_plain_features_densely(dilate, one_thread):
    # The placement chosen (first block's conv1 keeps the previous dilation, timm's and
    # torchvision's Bottleneck rule) makes every stage the plain stage sampled densely,
    # borders included; dilating conv1 only (MMSegmentation) or both convs of the first
    # block would break this.
    torch.manual_seed(1)
    plain = _random_statistics(resnet18()).eval()
    dilated = resnet18(replace_stride_with_dilation=list(dilate)).eval()
    dilated.load_state_dict(plain.state_dict(), strict=True)
    x = torch.randn(1, 3, 67, 61)  # odd sizes: ceil(n / 2) at every stride
    with torch.no_grad():
        ref, out = plain.forward_features(x), dilated.forward_features(x)
    for p, d in zip(plain.feature_info, dilated.feature_info):
        step = p.stride // d.stride
        torch.testing.assert_close(out[d.name][..., ::step, ::step], ref[p.name], rtol=0, atol=1e-4)


@pytest.mark.parametrize("depth", [18, 34])
def test_torchvision_state_dict_loads_strictly_into_a_dilated_trunk(depth, one_thread):
    tv = getattr(torchvision.models, f"resnet{depth}")(weights=None)
    ours = resnet(depth, replace_stride_with_dilation=[False, True, True])
    ours.load_state_dict(tv.state_dict(), strict=True)
    assert torch.equal(ours.layer4[1].conv2.weight, tv.layer4[1].conv2.weight)
    assert [f.stride for f in ours.feature_info] == [4, 8, 8, 8]
    # Which 3x3 convolutions dilate, block by block (stage 3 by 2, stage 4 by 4).
    assert (ours.layer3[0].conv1.dilation, ours.layer3[0].conv2.dilation) == ((1, 1), (2, 2))
    assert (ours.layer4[0].conv1.dilation, ours.layer4[0].conv2.dilation) == ((2, 2), (4, 4))
    assert all(b.conv1.dilation == b.conv2.dilation == (4, 4) for b in ours.layer4[1:])
    assert all(c.padding == c.dilation for c in ours.modules() if isinstance(c, nn.Conv2d) and c.kernel_size == (3, 3))


@pytest.mark.parametrize("dilate", [None, [False, False, False]])
def test_without_dilation_the_trunk_is_torchvision(dilate, one_thread):
    torch.manual_seed(0)
    tv = _random_statistics(torchvision.models.resnet34(weights=None)).eval()
    ours = resnet34(replace_stride_with_dilation=dilate).eval()
    ours.load_state_dict(tv.state_dict(), strict=True)
    assert list(ours.state_dict()) == list(tv.state_dict())
    assert all(m.dilation == (1, 1) for m in ours.modules() if isinstance(m, nn.Conv2d))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), tv(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("bad", [[True, False], "yes", [1, 0, 0], (False, True, None), 3])
def test_bad_dilation_argument_is_refused(bad):
    with pytest.raises(ValueError, match="replace_stride_with_dilation must be None or three booleans"):
        resnet18(replace_stride_with_dilation=bad)


def test_dilated_trunk_scripts(one_thread):
    model = _random_statistics(resnet18(num_classes=5, replace_stride_with_dilation=[False, True, True])).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(model)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dilate, strides", [([False, True, True], [4, 8, 8, 8]), ([False, False, True], [4, 8, 16, 16])])
def test_dilated_pyramid_reports_the_shared_strides(dilate, strides, one_thread):
    model = resnet18_fpn(extra_blocks=None, out_channels=32, replace_stride_with_dilation=dilate).eval()
    assert [f.stride for f in model.feature_info] == strides
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 96))
    for info in model.feature_info:
        assert out[info.name].shape[-2:] == (64 // info.stride, 96 // info.stride)
    pooled = resnet18_fpn(extra_blocks="pool", out_channels=32, replace_stride_with_dilation=dilate)
    assert [f.stride for f in pooled.feature_info] == strides + [strides[-1] * 2]


@pytest.mark.parametrize(
    "trainable, frozen",
    [
        (0, {"conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc"}),
        (3, {"conv1", "bn1", "layer1", "fc"}),
        (4, {"conv1", "bn1", "fc"}),
        (5, {"fc"}),
    ],
)
def test_freeze_trunk_counts_from_the_top_like_torchvision(trainable, frozen):
    # torchvision's rule (resnet_fpn_backbone): only the named stages train; fc never does.
    model = resnet18()
    freeze_trunk(model, trainable)
    assert {n.split(".")[0] for n, p in model.named_parameters() if not p.requires_grad} == frozen
    with pytest.raises(ValueError, match=r"range \[0, 5\], got 6"):
        freeze_trunk(model, 6)
