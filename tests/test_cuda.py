"""The CUDA paths: mixed-precision training steps, the pooler's hand-off to torchvision's
CUDA kernel, the fast inference path in fp16/bf16, checkpoints moving from GPU to CPU.

Every test is marked ``cuda`` and skipped without a CUDA device, so ``make test`` stays
CPU-only; ``make check-gpu`` (``tools/check_gpu.py``) runs them with ``pytest -m cuda``.
The bodies are helpers that take the device, so their logic can be tried on the CPU by
hand (``_train_steps(..., torch.device("cpu"), torch.bfloat16)``).
"""

import copy
from collections import OrderedDict

import pytest
import torch
import torchvision
from torch import nn

from detection import build_detector, load_detector, ops, save_detector
from engine.runner import build_optimizer
from deploy.fast import match_detections, optimize_for_inference
from helpers import random_statistics

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (make check-gpu runs these)"),
]

CUDA = torch.device("cuda")
ARCHS = ("faster_rcnn", "mask_rcnn", "retinanet", "fcos")
LOSS_KEYS = {
    "faster_rcnn": {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg"},
    "mask_rcnn": {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask"},
    "retinanet": {"classification", "bbox_regression"},
    "fcos": {"classification", "bbox_regression", "bbox_ctrness"},
}
# Few proposals and sampled RoIs: these tests are about the device path, not the detector.
_RCNN_SMALL = {
    "rpn_pre_nms_top_n_train": 200, "rpn_post_nms_top_n_train": 100, "rpn_pre_nms_top_n_test": 200,
    "rpn_post_nms_top_n_test": 100, "rpn_batch_size_per_image": 64, "box_batch_size_per_image": 32,
}
SMALL = {"faster_rcnn": _RCNN_SMALL, "mask_rcnn": _RCNN_SMALL, "retinanet": {}, "fcos": {}}


def _small_detector(arch: str, depth: int = 18, **kwargs) -> nn.Module:
    return build_detector(arch, backbone=f"resnet{depth}", num_classes=4, min_size=128, max_size=160, **SMALL[arch], **kwargs)


def _amp_step(losses_of, keys, model, optimizer, scaler, device, dtype) -> torch.Tensor:
    """One mixed-precision step as the runner takes it (scaled backward, unscale, clip, step); the unscaled gradient norm."""
    with torch.autocast(device.type, dtype=dtype):
        losses = losses_of()
    assert set(losses) == set(keys), losses
    loss = sum(v.float() for v in losses.values())
    assert torch.isfinite(loss), {k: v.item() for k, v in losses.items()}
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    norm = nn.utils.clip_grad_norm_(model.parameters(), 10.0)
    scaler.step(optimizer)
    scaler.update()
    return norm


def _check_amp_steps(trainable, before, trunk_dtypes, norm, dtype) -> None:
    """The trunk ran in ``dtype``, every trainable parameter got a finite fp32 gradient and moved."""
    assert trunk_dtypes and set(trunk_dtypes) == {dtype}, f"trunk ran in {set(trunk_dtypes)}, expected {dtype} under autocast"
    assert torch.isfinite(norm), f"the last step's unscaled gradient norm is {norm.item()} (step skipped by the scaler)"
    no_grad = [n for n, p in trainable.items() if p.grad is None]
    assert not no_grad, f"parameters without a gradient: {no_grad[:5]}"
    assert all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in trainable.values())
    unchanged = [n for n, p in trainable.items() if torch.equal(p.detach(), before[n])]
    assert not unchanged, f"the optimizer step left {len(unchanged)} parameters unchanged, e.g. {unchanged[:3]}"


def _batch(device: torch.device, *, masks: bool, seed: int = 0) -> tuple[list[torch.Tensor], list[dict]]:
    """Two images (landscape and portrait) with three boxes each, inside the image."""
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for h, w in ((128, 160), (160, 128)):
        images.append(torch.rand(3, h, w, generator=g))
        size = torch.tensor([w, h], dtype=torch.float32)
        xy = torch.rand(3, 2, generator=g) * size * 0.5
        wh = torch.rand(3, 2, generator=g) * size * 0.4 + 12
        boxes = torch.cat([xy, xy + wh], dim=1)
        target = {"boxes": boxes, "labels": torch.randint(1, 4, (3,), generator=g)}
        if masks:
            m = torch.zeros(3, h, w, dtype=torch.uint8)
            for i, (x1, y1, x2, y2) in enumerate(boxes.round().int().tolist()):
                m[i, y1:y2, x1:x2] = 1
            target["masks"] = m
        targets.append(target)
    return [img.to(device) for img in images], [{k: v.to(device) for k, v in t.items()} for t in targets]


def _train_steps(arch: str, depth: int, device: torch.device, dtype: torch.dtype, *, steps: int = 2, channels_last: bool = False) -> None:
    """A few training steps as the engine takes them: autocast, (fp16) GradScaler, unscale, clip, fused optimizer."""
    torch.manual_seed(depth)
    model = _small_detector(arch, depth).to(device).train()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    images, targets = _batch(device, masks=arch == "mask_rcnn")
    fp16 = dtype == torch.float16
    # fp16 runs the shapes recipe's optimiser (AdamW), bf16 the COCO recipes' (SGD); both fused where the build has it.
    optimizer = build_optimizer(model, {"optimizer": "adamw" if fp16 else "sgd", "momentum": 0.9, "weight_decay": 1e-4, "norm_weight_decay": None, "bias_weight_decay": None}, 1e-3)
    # A moderate initial scale: at the default 2**16 the first fp16 steps of a random detector may
    # overflow and be skipped, which is GradScaler working, but would leave nothing to check here.
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0**10, enabled=fp16)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in trainable.items()}
    trunk_dtypes: list[torch.dtype] = []
    hook = model.backbone.body.register_forward_hook(lambda mod, inp, out: trunk_dtypes.extend(v.dtype for v in out.values()))
    norm = torch.tensor(float("nan"))
    for _ in range(steps):
        norm = _amp_step(lambda: model(images, targets), LOSS_KEYS[arch], model, optimizer, scaler, device, dtype)
    hook.remove()
    _check_amp_steps(trainable, before, trunk_dtypes, norm, dtype)
    if channels_last:
        conv = model.backbone.body.conv1.weight
        assert conv.is_contiguous(memory_format=torch.channels_last), "the optimizer step changed the weights' layout"


@pytest.mark.parametrize("depth", [18, 34])
@pytest.mark.parametrize("arch", ARCHS)
def test_fp16_autocast_with_grad_scaler_trains(arch, depth):
    _train_steps(arch, depth, CUDA, torch.float16)


@pytest.mark.parametrize("depth", [18, 34])
@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_autocast_trains(arch, depth):
    _train_steps(arch, depth, CUDA, torch.bfloat16)


def test_channels_last_fp16_trains_with_fused_adamw():
    # The engine's `--set channels_last=true --amp`: NHWC weights through the fused optimizer and the scaler.
    _train_steps("faster_rcnn", 18, CUDA, torch.float16, channels_last=True)


def _pyramid(device: torch.device, channels: int = 32, seed: int = 0) -> tuple[OrderedDict, list[torch.Tensor], list[tuple[int, int]]]:
    """Features of a 2-image batch at strides 4-32 of a 256 x 256 input, boxes spanning every level."""
    g = torch.Generator().manual_seed(seed)
    feats = OrderedDict(
        (name, torch.rand(2, channels, 256 // s, 256 // s, generator=g)) for name, s in (("0", 4), ("1", 8), ("2", 16), ("3", 32))
    )
    boxes = []
    for _ in range(2):
        side = 8 + torch.rand(60, 2, generator=g) ** 2 * 180
        low = torch.rand(60, 2, generator=g) * (250 - side)
        boxes.append(torch.cat([low, low + side], dim=1))
    return OrderedDict((k, v.to(device)) for k, v in feats.items()), [b.to(device) for b in boxes], [(256, 256), (256, 256)]


def _pool(pooler: nn.Module, feats: OrderedDict, boxes: list[torch.Tensor], shapes: list, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    leaves = OrderedDict((k, v.clone().requires_grad_(True)) for k, v in feats.items())
    inputs = OrderedDict((k, v.to(dtype)) for k, v in leaves.items()) if dtype is not None else leaves
    if dtype is not None and inputs["0"].device.type == "cuda":
        with torch.autocast("cuda", dtype=dtype):
            out = pooler(inputs, boxes, shapes)
    else:
        out = pooler(inputs, boxes, shapes)
    g = torch.Generator().manual_seed(1)
    out.float().backward(torch.rand(out.shape, generator=g).to(out.device))
    return out.detach(), [v.grad for v in leaves.values()]


def test_pooler_hands_cuda_tensors_to_torchvisions_kernel(monkeypatch):
    feats, boxes, shapes = _pyramid(CUDA)
    names = list(feats)

    def cpu_path(*args, **kwargs):
        raise AssertionError("the CPU embedding_bag path ran on CUDA tensors")

    monkeypatch.setattr(ops, "_pool_levels", cpu_path)
    for dtype in (None, torch.float16, torch.bfloat16):
        out, grads = _pool(ops.MultiScaleRoIAlign(names, 7, 2), feats, boxes, shapes, dtype)
        ref, ref_grads = _pool(torchvision.ops.MultiScaleRoIAlign(names, 7, 2), feats, boxes, shapes, dtype)
        assert out.device.type == "cuda" and out.dtype == ref.dtype == (dtype or torch.float32)
        assert out.shape == (120, 32, 7, 7)
        assert torch.equal(out, ref), f"{dtype}: max |diff| {(out.float() - ref.float()).abs().max().item()}"
        for grad, ref_grad in zip(grads, ref_grads):
            # torchvision's CUDA backward adds with atomics, so two runs may differ in the last bits.
            torch.testing.assert_close(grad, ref_grad, rtol=0, atol=1e-5 * max(1.0, ref_grad.abs().max().item()))


def test_cpu_fast_pooler_agrees_with_torchvisions_cuda_kernel():
    feats, boxes, shapes = _pyramid(torch.device("cpu"))
    names = list(feats)
    out, grads = _pool(ops.MultiScaleRoIAlign(names, 7, 2), feats, boxes, shapes)
    cuda_feats = OrderedDict((k, v.to(CUDA)) for k, v in feats.items())
    ref, ref_grads = _pool(torchvision.ops.MultiScaleRoIAlign(names, 7, 2), cuda_feats, [b.to(CUDA) for b in boxes], shapes)
    torch.testing.assert_close(out, ref.cpu(), rtol=0, atol=1e-5)
    for grad, ref_grad in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref_grad.cpu(), rtol=0, atol=1e-5 * max(1.0, ref_grad.abs().max().item()))


@pytest.fixture(scope="module")
def overfit(overfit_detector):
    """conftest's session model, as in tests/deploy/test_fast.py: a small Faster R-CNN overfitted on two shapes images
    (on the CPU, so it is the same model every run), so it has confident detections."""
    return overfit_detector.model, overfit_detector.images


def _count_matches(reference: list[dict], candidate: list[dict]) -> tuple[int, int]:
    matched = considered = 0
    for a, b in zip(reference, candidate):
        m, c = match_detections({k: v.cpu() for k, v in a.items()}, {k: v.cpu() for k, v in b.items()}, score_thresh=0.5, iou_thresh=0.95)
        matched, considered = matched + m, considered + c
    return matched, considered


def _check_fast_path(model: nn.Module, images: list[torch.Tensor], device: torch.device, dtype: torch.dtype | None) -> None:
    """tests/deploy/test_fast.py's rule on ``device``: every eager detection with score >= 0.5 is matched by one of
    the same label with IoU >= 0.95. (On Ampere and later both sides run fp32 convolutions in TF32.)"""
    model = copy.deepcopy(model).to(device).eval()
    images = [img.to(device) for img in images]
    fast = optimize_for_inference(model, dtype=dtype)
    trunk_dtypes: list[torch.dtype] = []
    fast.backbone.inner.body.register_forward_hook(lambda mod, inp, out: trunk_dtypes.extend(v.dtype for v in out.values()))
    with torch.no_grad():
        ref, out = model(images), fast(images)
    assert set(trunk_dtypes) == {dtype or torch.float32}
    assert all(d["boxes"].device.type == device.type and d["boxes"].dtype == torch.float32 for d in out)
    matched, considered = _count_matches(ref, out)
    assert considered >= 2, "the overfitted model should have confident detections"
    assert matched == considered, f"{dtype}: {matched} of {considered} confident detections kept"


@pytest.mark.parametrize("dtype", [None, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_fast_path_on_cuda_keeps_the_confident_detections(overfit, dtype):
    model, images = overfit
    _check_fast_path(model, images, CUDA, dtype)


def _check_checkpoint_to_cpu(model: nn.Module, device: torch.device, path, images: list[torch.Tensor]) -> tuple[list[dict], list[dict]]:
    """Save ``model`` from ``device``, load it with ``load_detector(device="cpu")``; return both detections."""
    model = copy.deepcopy(model).to(device).eval()
    mapping = {"names": ["a", "b", "c"], "cat_ids": [1, 2, 5]}
    save_detector(model, path, category_mapping=mapping)
    raw = torch.load(path, weights_only=True)  # no map_location: the tensors come back where they were saved
    assert {v.device.type for v in raw["model"].values()} == {device.type}
    loaded = load_detector(path, device="cpu")
    assert {v.device.type for v in loaded.state_dict().values()} == {"cpu"}
    assert not loaded.training and loaded.category_mapping == mapping
    state, saved = loaded.state_dict(), model.state_dict()
    assert list(state) == list(saved)
    assert all(torch.equal(state[k], saved[k].cpu()) for k in saved)
    with torch.no_grad():
        on_device = model([img.to(device) for img in images])
        on_cpu = loaded([img.cpu() for img in images])
    return on_device, on_cpu


@pytest.mark.parametrize("arch", ARCHS)
def test_checkpoint_saved_on_cuda_loads_on_cpu(arch, tmp_path):
    torch.manual_seed(0)
    # Threshold 0: random heads score below the defaults (RetinaNet's prior is 0.01), and a full set compares more.
    thresh = {"box_score_thresh": 0.0} if arch in ("faster_rcnn", "mask_rcnn") else {"score_thresh": 0.0}
    model = random_statistics(_small_detector(arch, **thresh)).eval()
    images, _ = _batch(torch.device("cpu"), masks=False)
    _check_checkpoint_to_cpu(model, CUDA, tmp_path / "model.pth", images)
    # Same weights on the same device give the same numbers: the CPU copy of the CUDA model.
    reference = copy.deepcopy(model).cpu().eval()
    loaded = load_detector(tmp_path / "model.pth", device="cpu")
    with torch.no_grad():
        expected, got = reference(images), loaded(images)
    for a, b in zip(expected, got):
        assert set(a) == set(b) and len(a["boxes"]) > 0
        for k in a:
            assert torch.equal(a[k], b[k]), k


def test_trained_checkpoint_from_cuda_detects_the_same_on_cpu(overfit, tmp_path):
    model, images = overfit
    on_cuda, on_cpu = _check_checkpoint_to_cpu(model, CUDA, tmp_path / "model.pth", images)
    matched, considered = _count_matches(on_cuda, on_cpu)
    assert considered >= 2 and matched == considered, f"{matched} of {considered} confident CUDA detections found on the CPU"
    matched, considered = _count_matches(on_cpu, on_cuda)
    assert considered >= 2 and matched == considered, f"{matched} of {considered} confident CPU detections found on CUDA"


# ---------------------------------------------------------------------------------------------
# Segmenters (tests/segmentation/test_segmentation_training.py has more, and make check-gpu runs it too)

# (arch, depth, output stride): every head, both dilations of DeepLabV3, and ResNet-34 once.
SEG_CASES = [("deeplabv3", 18, 8), ("deeplabv3", 18, 16), ("fcn", 18, 8), ("semantic_fpn", 18, 32), ("deeplabv3", 34, 16)]


def _small_segmenter(arch: str, depth: int = 18, output_stride: int | None = None, **kwargs) -> nn.Module:
    from segmentation import build_segmenter

    return build_segmenter(arch, backbone=f"resnet{depth}", num_classes=5, output_stride=output_stride, head_channels=64, **kwargs)


def _seg_train_steps(arch: str, depth: int, output_stride: int, device: torch.device, dtype: torch.dtype, *, steps: int = 2,
                     channels_last: bool = False) -> None:
    """Segmentation steps as the engine takes them: autocast, (fp16) GradScaler, unscale, clip, fused optimizer; aux loss on."""
    from segmentation.training import SegmentationLoss

    torch.manual_seed(depth)
    model = _small_segmenter(arch, depth, output_stride, aux_loss=True).to(device).train()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    loss_model = SegmentationLoss(model).train()
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 96, 128, generator=g).to(device)
    masks = torch.randint(0, 5, (2, 96, 128), generator=g)
    masks[:, :6] = 255  # ignored rows, as VOC's borders
    masks = masks.to(device)
    fp16 = dtype == torch.float16
    optimizer = build_optimizer(model, {"optimizer": "adamw" if fp16 else "sgd", "momentum": 0.9, "weight_decay": 1e-4, "norm_weight_decay": None, "bias_weight_decay": None}, 1e-3)
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0**10, enabled=fp16)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in trainable.items()}
    layer4 = next(m for n, m in model.named_modules() if n.endswith("layer4"))
    trunk_dtypes: list[torch.dtype] = []
    hook = layer4.register_forward_hook(lambda mod, inp, out: trunk_dtypes.append(out.dtype))
    norm = torch.tensor(float("nan"))
    for _ in range(steps):
        norm = _amp_step(lambda: loss_model(images, masks), {"loss_seg", "loss_aux"}, model, optimizer, scaler, device, dtype)
    hook.remove()
    _check_amp_steps(trainable, before, trunk_dtypes, norm, dtype)


@pytest.mark.parametrize("arch, depth, output_stride", SEG_CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_segmenter_trains_under_autocast(arch, depth, output_stride, dtype):
    _seg_train_steps(arch, depth, output_stride, CUDA, dtype)


def test_segmenter_channels_last_fp16_trains_with_fused_adamw():
    # The shapes segmentation recipe's settings (channels_last, amp) on CUDA.
    _seg_train_steps("semantic_fpn", 18, 32, CUDA, torch.float16, channels_last=True)


# Relative to the largest logit: pixels whose two best logits are further apart than this keep their label.
# Measured with bf16 autocast on the CPU: logits move by at most 2 % of the largest; fp16 has 8x finer steps.
_CLEAR_MARGIN = {torch.float16: 0.05, torch.bfloat16: 0.1}


@pytest.mark.parametrize("arch", ["deeplabv3", "fcn", "semantic_fpn"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_segmenter_inference_under_autocast_keeps_the_clear_pixels(arch, dtype):
    torch.manual_seed(0)
    model = random_statistics(_small_segmenter(arch)).eval()
    x = torch.randn(2, 3, 96, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x)["out"]  # fp32 on the CPU
        on_cuda = copy.deepcopy(model).to(CUDA)
        with torch.autocast("cuda", dtype=dtype):
            out = on_cuda(x.to(CUDA))["out"]
    assert out.device.type == "cuda" and out.shape == ref.shape
    out = out.float().cpu()
    top2 = ref.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > _CLEAR_MARGIN[dtype] * ref.abs().amax()
    assert clear.float().mean() > 0.5, "the random model should have clear pixels"
    assert torch.equal(out.argmax(1)[clear], ref.argmax(1)[clear]), f"{int((out.argmax(1) != ref.argmax(1))[clear].sum())} clear pixels changed label"


def test_segmenter_on_cuda_exports_the_model_it_is(tmp_path):
    """A segmenter trained on the GPU is exported as it is: the ONNX file (run on the CPU) gives the CPU model's logits."""
    pytest.importorskip("onnxruntime")
    from deploy.export import export_onnx
    from deploy.runtime import load_exported

    torch.manual_seed(0)
    model = random_statistics(_small_segmenter("deeplabv3", output_stride=16, aux_loss=True)).eval().to(CUDA)
    path = export_onnx(model, tmp_path / "seg.onnx", export_size=(64, 64))
    assert all(p.device.type == "cuda" for p in model.parameters()), "export moved the model"
    exported = load_exported(path)
    x = torch.randn(1, 3, 72, 88, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = copy.deepcopy(model).cpu()(x)["out"]
    torch.testing.assert_close(exported(x)["out"], ref, rtol=1e-4, atol=1e-4 * float(ref.abs().amax()))
