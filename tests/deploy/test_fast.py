"""The fast inference path gives the eager model's numbers."""

import copy

import pytest
import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from backbones import resnet_fpn
from detection import build_detector
from deploy.fast import fold_batch_norms, match_detections, optimize_for_inference
from helpers import random_statistics


def _eps_sized_statistics(model: nn.Module, seed: int = 0) -> nn.Module:
    """BatchNorm statistics whose running variance (0.75e-5 to 1.25e-5) is the size of ``eps`` (1e-5).

    ``eps`` then makes up about half of every denominator ``var + eps``, so a fold that drops
    it scales each layer's output by about 1.4; the gains are set so that, with ``eps``, each
    layer scales by 0.6-1.0 as with ``helpers.random_statistics``.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)):
                var = (torch.rand(m.running_var.shape, generator=g) * 0.5 + 0.75) * m.eps
                m.running_var.copy_(var)
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) * 0.2 - 0.1)
                m.weight.copy_(torch.sqrt(var + m.eps) * (torch.rand(m.weight.shape, generator=g) * 0.4 + 0.6))
                m.bias.copy_(torch.rand(m.bias.shape, generator=g) * 0.2 - 0.1)
    return model


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("depth", [18, 34])
@pytest.mark.parametrize("norm", [nn.BatchNorm2d, FrozenBatchNorm2d])
def test_bn_folding_preserves_outputs(depth, norm):
    torch.manual_seed(depth)
    model = _eps_sized_statistics(resnet_fpn(depth, norm_layer=norm)).eval()
    folded = copy.deepcopy(model)
    expected_bns = sum(isinstance(m, norm) for m in model.modules())
    assert fold_batch_norms(folded) == expected_bns
    assert not any(isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)) for m in folded.modules())
    x = torch.randn(2, 3, 97, 131)
    with torch.no_grad():
        ref = model(x)
        out = folded(x)
        folded_cl = folded.to(memory_format=torch.channels_last)
        out_cl = folded_cl(x.contiguous(memory_format=torch.channels_last))
    for k in ref:
        # Relative to each level's largest value: float32 rounding leaves at most 3e-6 here, a fold
        # without eps is off by 10 (ResNet-18) to 400 (ResNet-34).
        assert _relative_error(out[k], ref[k]) <= 1e-4, k
        assert _relative_error(out_cl[k], ref[k]) <= 1e-4, k


@pytest.fixture(scope="module")
def detector():
    torch.manual_seed(0)
    model = build_detector("mask_rcnn", num_classes=4, min_size=160, max_size=224, box_score_thresh=0.0)
    return random_statistics(model, affine=True).eval()


def test_fp32_fast_path_gives_the_same_detections(detector):
    fast = optimize_for_inference(detector)
    assert fast is not detector and any(isinstance(m, nn.BatchNorm2d) for m in detector.modules())
    images = [torch.rand(3, 150, 200), torch.rand(3, 180, 140)]
    with torch.no_grad():
        ref, out = detector(images), fast(images)
    for a, b in zip(ref, out):
        assert len(a["boxes"]) > 10
        assert torch.equal(a["labels"], b["labels"])
        torch.testing.assert_close(b["boxes"], a["boxes"], rtol=0, atol=1e-3)
        torch.testing.assert_close(b["scores"], a["scores"], rtol=0, atol=1e-4)
        torch.testing.assert_close(b["masks"], a["masks"], rtol=0, atol=1e-3)


@pytest.fixture(scope="module")
def overfit(overfit_detector):
    """conftest's session model: a small Faster R-CNN overfitted on two shapes images (confident detections)."""
    return overfit_detector.model, overfit_detector.images


def test_bf16_fast_path_keeps_the_confident_detections(overfit):
    model, images = overfit
    fast = optimize_for_inference(model, dtype=torch.bfloat16)
    with torch.no_grad():
        ref, out = model(images), fast(images)
    matched = considered = 0
    for a, b in zip(ref, out):
        m, c = match_detections(a, b, score_thresh=0.5, iou_thresh=0.95)
        matched, considered = matched + m, considered + c
    assert considered >= 2, "the overfitted model should have confident detections"
    assert matched == considered


@pytest.mark.parametrize("autocast_pyramid", [False])
def test_other_pyramid_precisions_keep_the_confident_detections(overfit, autocast_pyramid):
    model, images = overfit
    fast = optimize_for_inference(model, dtype=torch.bfloat16, autocast_pyramid=autocast_pyramid)
    with torch.no_grad():
        ref, out = model(images), fast(images)
    counts = [match_detections(a, b, score_thresh=0.5, iou_thresh=0.95) for a, b in zip(ref, out)]
    assert sum(c for _, c in counts) >= 2 and all(m == c for m, c in counts)


def test_default_runs_the_pyramid_output_convolutions_in_bf16(detector):
    fast = optimize_for_inference(detector, dtype=torch.bfloat16)
    assert fast.backbone.autocast_pyramid == "outputs"
    seen = []
    hooks = [m.register_forward_hook(lambda mod, inp, out, name=name: seen.append((name, out.dtype)))
             for name, m in fast.backbone.inner.fpn.named_modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        fast([torch.rand(3, 96, 128)])
    for h in hooks:
        h.remove()
    assert seen and all((dtype == torch.bfloat16) == name.startswith("layer_blocks") for name, dtype in seen)
    with pytest.raises(ValueError, match="autocast_pyramid must be one of"):
        optimize_for_inference(detector, dtype=torch.bfloat16, autocast_pyramid="some")


def test_fp32_fast_path_on_trained_model(overfit):
    model, images = overfit
    with torch.no_grad():
        ref, out = model(images), optimize_for_inference(model)(images)
    for a, b in zip(ref, out):
        assert torch.equal(a["labels"], b["labels"])
        torch.testing.assert_close(b["boxes"], a["boxes"], rtol=0, atol=1e-3)


def test_match_detections_counts_label_and_overlap():
    ref = {"boxes": torch.tensor([[0.0, 0, 10, 10], [20, 20, 40, 40]]), "scores": torch.tensor([0.9, 0.8]), "labels": torch.tensor([1, 2])}
    same = {k: v.clone() for k, v in ref.items()}
    assert match_detections(ref, same) == (2, 2)
    wrong_label = dict(same, labels=torch.tensor([1, 3]))
    assert match_detections(ref, wrong_label) == (1, 2)
    shifted = dict(same, boxes=same["boxes"] + torch.tensor([2.0, 0, 2, 0]))
    assert match_detections(ref, shifted) == (0, 2)


def test_optimize_rejects_non_detectors():
    with pytest.raises(ValueError, match="expected a torchvision detector with a .backbone"):
        optimize_for_inference(nn.Linear(2, 2))
