"""detection.ops: RoIAlign and the FPN pooler equal torchvision's, forward and backward."""

from collections import OrderedDict

import pytest
import torch
import torchvision
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

from detection import ops
from detection.ops import MultiScaleRoIAlign, roi_align, use_fast_roi_align

TOL = dict(rtol=0.0, atol=1e-5)


def _assert_grad_close(grad, ref):
    # Feature gradients are float32 sums over every bin that read a pixel (hundreds when
    # large boxes cover a small map); 1e-5 is held relative to the gradient's own scale.
    torch.testing.assert_close(grad, ref, rtol=0.0, atol=1e-5 * max(1.0, ref.abs().max().item()))


def _boxes(num, width, height, generator, dtype=torch.float32):
    """Boxes of every kind: inside, partly and fully outside the image, tiny, huge, inverted."""
    size = torch.tensor([width, height], dtype=dtype)
    low = torch.rand(num, 2, generator=generator, dtype=dtype) * size * 1.4 - 0.2 * size
    side = torch.rand(num, 2, generator=generator, dtype=dtype) ** 3 * size * 1.2
    boxes = torch.cat([low, low + side], dim=1)
    special = torch.tensor(
        [
            [-30.0, -30.0, -10.0, -10.0],  # fully outside, above left
            [width + 5.0, 0.0, width + 40.0, 20.0],  # fully outside, right
            [3.0, 3.0, 3.2, 3.1],  # tiny
            [-5.0, -5.0, width + 5.0, height + 5.0],  # larger than the image
            [10.0, 10.0, 9.0, 9.5],  # inverted: negative width and height
            [width - 0.5, height - 0.5, width + 0.5, height + 0.5],  # on the far corner
        ],
        dtype=dtype,
    )
    return torch.cat([special, boxes])[:num]


def _case(num_images=3, channels=4, height=13, width=17, scale=0.25, rois_per_image=12, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(num_images, channels, height, width, generator=g, dtype=dtype)
    image_w, image_h = width / scale, height / scale
    boxes = [_boxes(rois_per_image, image_w, image_h, g, dtype) for _ in range(num_images)]
    return features, boxes


def _forward_backward(fn, features, *args):
    leaf = features.clone().requires_grad_()
    out = fn(leaf, *args)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    (grad,) = torch.autograd.grad(out, leaf, upstream)
    return out, grad


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [2, 0])
@pytest.mark.parametrize("scale, output_size", [(1 / 4, 7), (1 / 32, 14), (1.0, (5, 3))])
def test_roi_align_matches_torchvision(aligned, sampling_ratio, scale, output_size):
    features, boxes = _case(scale=scale, seed=int(aligned) + 2 * sampling_ratio)
    args = (boxes, output_size, scale, sampling_ratio, aligned)
    ref, ref_grad = _forward_backward(torchvision.ops.roi_align, features, *args)
    out, grad = _forward_backward(roi_align, features, *args)
    assert out.shape == ref.shape and out.is_contiguous()
    assert ref.abs().sum() > 0 and ref_grad.abs().sum() > 0
    torch.testing.assert_close(out, ref, **TOL)
    _assert_grad_close(grad, ref_grad)


def test_roi_align_boxes_as_tensor_equal_boxes_as_list():
    features, boxes = _case(num_images=4)
    rois = torch.cat([torch.cat([torch.full((len(b), 1), float(i)), b], dim=1) for i, b in enumerate(boxes)])
    from_list = roi_align(features, boxes, 7, 0.25, 2)
    from_tensor = roi_align(features, rois, 7, 0.25, 2)
    assert torch.equal(from_list, from_tensor)
    torch.testing.assert_close(from_tensor, torchvision.ops.roi_align(features, rois, 7, 0.25, 2), **TOL)


def test_roi_align_rois_in_any_image_order():
    features, boxes = _case(num_images=3)
    rois = torchvision.ops._utils.convert_boxes_to_roi_format(boxes)
    shuffled = rois[torch.randperm(len(rois), generator=torch.Generator().manual_seed(0))]
    args = (shuffled, (7, 7), 0.25, 2, False)
    ref, ref_grad = _forward_backward(torchvision.ops.roi_align, features, *args)
    out, grad = _forward_backward(roi_align, features, *args)
    torch.testing.assert_close(out, ref, **TOL)
    _assert_grad_close(grad, ref_grad)


def test_roi_align_default_arguments_are_torchvision_defaults():
    features, boxes = _case(scale=1.0)
    torch.testing.assert_close(roi_align(features, boxes, 7), torchvision.ops.roi_align(features, boxes, 7), **TOL)


@pytest.mark.parametrize("sampling_ratio", [2, -1])
def test_roi_align_no_boxes(sampling_ratio):
    features = torch.randn(2, 3, 8, 8, requires_grad=True)
    empty = torch.zeros(0, 5)
    out = roi_align(features, empty, 7, 0.5, sampling_ratio)
    assert out.shape == (0, 3, 7, 7)
    (grad,) = torch.autograd.grad(out.sum(), features)
    assert torch.equal(grad, torch.zeros_like(features))
    assert roi_align(features, [torch.zeros(0, 4), torch.zeros(0, 4)], 7).shape == (0, 3, 7, 7)


def test_roi_align_float64_and_gradcheck():
    features, boxes = _case(num_images=2, channels=2, height=6, width=5, scale=0.5, rois_per_image=4, dtype=torch.float64)
    for sampling_ratio, aligned in [(2, False), (0, True)]:
        args = (boxes, 3, 0.5, sampling_ratio, aligned)
        ref, ref_grad = _forward_backward(torchvision.ops.roi_align, features, *args)
        out, grad = _forward_backward(roi_align, features, *args)
        assert out.dtype == torch.float64
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
        torch.testing.assert_close(grad, ref_grad, rtol=0, atol=1e-12)
        leaf = features.clone().requires_grad_()
        assert torch.autograd.gradcheck(lambda x: roi_align(x, boxes, 3, 0.5, sampling_ratio, aligned), (leaf,), fast_mode=True)


def test_roi_align_chunked_and_grouped_adaptive_grids(monkeypatch):
    # Few entries per chunk forces many chunks and, with adaptive grids, many groups;
    # few bins per slice, many pooling slices per chunk.
    monkeypatch.setattr(ops, "_MAX_ENTRIES_PER_CHUNK", 2000)
    monkeypatch.setattr(ops, "_BINS_PER_SLICE", 100)
    features, boxes = _case(num_images=2, height=40, width=30, scale=1.0, rois_per_image=20)
    rois = torchvision.ops._utils.convert_boxes_to_roi_format(boxes)
    plan = ops._build_plan([features], rois, None, [1.0], (7, 7), 0, False)
    assert len(plan.chunks) > 3
    for sampling_ratio in (0, 3):
        args = (boxes, 7, 1.0, sampling_ratio, False)
        ref, ref_grad = _forward_backward(torchvision.ops.roi_align, features, *args)
        out, grad = _forward_backward(roi_align, features, *args)
        torch.testing.assert_close(out, ref, **TOL)
        _assert_grad_close(grad, ref_grad)


def test_roi_align_uses_own_path_on_cpu_and_delegates_otherwise(monkeypatch):
    features, boxes = _case()
    expected = torchvision.ops.roi_align(features, boxes, 7, 0.25, 2)
    calls = []

    def spy(*args, **kwargs):
        calls.append(args[0].dtype)
        return torch.zeros(())

    monkeypatch.setattr(torchvision.ops, "roi_align", spy)
    torch.testing.assert_close(roi_align(features, boxes, 7, 0.25, 2), expected, **TOL)
    assert calls == []
    roi_align(features.half(), [b.half() for b in boxes], 7, 0.25, 2)
    roi_align(features, [b.double() for b in boxes], 7, 0.25, 2)  # mixed dtypes: torchvision's error
    assert calls == [torch.float16, torch.float32]


def test_cpu_autocast_pools_in_float32_like_torchvision(monkeypatch):
    features, boxes = _case(num_images=2)
    features = features.bfloat16()
    rois = torchvision.ops._utils.convert_boxes_to_roi_format(boxes)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref, ref_grad = _forward_backward(torchvision.ops.roi_align, features, rois, 7, 0.25, 2)
        monkeypatch.setattr(torchvision.ops, "roi_align", None)  # the fast path must not need it
        out, grad = _forward_backward(roi_align, features, rois, 7, 0.25, 2)
    assert out.dtype == ref.dtype == torch.bfloat16 and grad.dtype == torch.bfloat16
    # Same float32 result rounded to bfloat16: equal except where it sits on a rounding tie.
    torch.testing.assert_close(out, ref, rtol=2**-7, atol=1e-5)
    assert (out == ref).float().mean() > 0.99
    torch.testing.assert_close(grad, ref_grad, rtol=2**-7, atol=1e-5)


def test_roi_align_degenerate_coordinates():
    features = torch.randn(1, 2, 6, 6)
    far = torch.tensor([[0.0, 1, 1, 1e9, 3], [0.0, -1e9, 1, 3, 3], [0.0, -1e9, -1e9, 1e9, 1e9]])
    torch.testing.assert_close(roi_align(features, far, 2, 1.0, 2), torchvision.ops.roi_align(features, far, 2, 1.0, 2))
    # torchvision's own kernel may crash on NaN boxes; here they pool to zeros.
    nan = torch.tensor([[0.0, float("nan"), 1, 3, 3]])
    for sampling_ratio in (2, 0):
        assert torch.equal(roi_align(features, nan, 2, 1.0, sampling_ratio), torch.zeros(1, 2, 2, 2))
    with pytest.raises(ValueError, match=r"1x500000000 samples per bin for RoI 0.*sampling_ratio > 0"):
        roi_align(features, torch.tensor([[0.0, 1, 1, 1e9, 3]]), 2, 1.0, 0)


def test_roi_align_rejects_batch_index_out_of_range():
    features = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match=r"batch indices must lie in \[0, 1\].*got 0..2"):
        roi_align(features, torch.tensor([[0.0, 1, 1, 4, 4], [2.0, 1, 1, 4, 4]]), 7)


def _pyramid(num_images=2, channels=8, image_size=(160, 224), seed=0):
    g = torch.Generator().manual_seed(seed)
    h, w = image_size
    features = OrderedDict(
        (name, torch.randn(num_images, channels, h // s, w // s, generator=g))
        for name, s in [("0", 4), ("1", 8), ("2", 16), ("3", 32), ("pool", 64)]
    )
    boxes = []
    for _ in range(num_images):
        centre = torch.rand(40, 2, generator=g) * torch.tensor([w, h])
        side = 4.0 * 2 ** (torch.rand(40, 2, generator=g) * 8)  # 4 to 1024 px: every level
        boxes.append(torch.cat([centre - side / 2, centre + side / 2], dim=1).clamp(min=0))
    return features, boxes, [image_size] * num_images


# ["0", "2"] skips a level: torchvision maps some RoIs past the last map and returns zeros.
@pytest.mark.parametrize("featmap_names", [["0", "1", "2", "3"], ["1"], ["0", "2"]])
def test_multiscale_roi_align_matches_torchvision(featmap_names):
    features, boxes, shapes = _pyramid()
    ref_pool = torchvision.ops.MultiScaleRoIAlign(featmap_names, 7, 2)
    pool = MultiScaleRoIAlign(featmap_names, 7, 2)

    def run(module):
        leaves = OrderedDict((k, v.clone().requires_grad_()) for k, v in features.items())
        out = module(leaves, boxes, shapes)
        upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
        used = [leaves[k] for k in featmap_names]
        return out, torch.autograd.grad(out, used, upstream)

    ref, ref_grads = run(ref_pool)
    out, grads = run(pool)
    torch.testing.assert_close(out, ref, **TOL)
    for grad, ref_grad in zip(grads, ref_grads):
        assert ref_grad.abs().sum() > 0  # every level received RoIs
        _assert_grad_close(grad, ref_grad)
    assert pool.scales == ref_pool.scales
    if featmap_names == ["0", "2"]:
        assert (ref.flatten(1).abs().sum(1) == 0).any()
    assert repr(pool) == repr(ref_pool).replace(type(ref_pool).__name__, type(pool).__name__)


def test_multiscale_roi_align_under_cpu_autocast():
    features, boxes, shapes = _pyramid()
    features = OrderedDict((k, v.bfloat16()) for k, v in features.items())
    names = ["0", "1", "2", "3"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = torchvision.ops.MultiScaleRoIAlign(names, 7, 2)(features, boxes, shapes)
        out = MultiScaleRoIAlign(names, 7, 2)(features, boxes, shapes)
    assert out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref, rtol=2**-7, atol=1e-5)
    assert (out == ref).float().mean() > 0.99


def _detector(cls, seed=0):
    torch.manual_seed(seed)
    backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=5)
    return cls(backbone, num_classes=3, min_size=128, max_size=128, box_score_thresh=0.0).eval()


@pytest.mark.parametrize("cls, expected", [(FasterRCNN, 1), (MaskRCNN, 2)])
def test_use_fast_roi_align_keeps_detections(cls, expected):
    model = _detector(cls)
    image = [torch.rand(3, 120, 128, generator=torch.Generator().manual_seed(0))]
    with torch.no_grad():
        before = model(image)[0]
    old = model.roi_heads.box_roi_pool
    assert use_fast_roi_align(model) == expected
    new = model.roi_heads.box_roi_pool
    assert type(new) is MultiScaleRoIAlign
    assert (new.featmap_names, new.output_size, new.sampling_ratio) == (old.featmap_names, old.output_size, old.sampling_ratio)
    if cls is MaskRCNN:
        assert type(model.roi_heads.mask_roi_pool) is MultiScaleRoIAlign
        assert model.roi_heads.mask_roi_pool.output_size == (14, 14)
    with torch.no_grad():
        after = model(image)[0]
    assert len(before["boxes"]) > 0
    assert torch.equal(after["labels"], before["labels"])
    torch.testing.assert_close(after["boxes"], before["boxes"], rtol=0, atol=1e-4)
    torch.testing.assert_close(after["scores"], before["scores"], rtol=0, atol=1e-5)
    if cls is MaskRCNN:
        torch.testing.assert_close(after["masks"], before["masks"], rtol=0, atol=1e-4)
    assert use_fast_roi_align(model) == 0  # already swapped


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_multiscale_roi_align_scripts_to_torchvisions_forward():
    features, boxes, shapes = _pyramid()
    pool = MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)
    scripted = torch.jit.script(pool)
    torch.testing.assert_close(scripted(features, boxes, shapes), pool(features, boxes, shapes), **TOL)
