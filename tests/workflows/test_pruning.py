"""Channel pruning (detection.pruning, engine.channels, workflows.prune, tools/prune.py): coupled channels, pruned files as data, every consumer, bad input.

Two strong checks of correctness carry the file:

* a pruned model equals the unpruned one whose removed channels were cut off at every
  reader (their input weights zeroed): any channel dropped on one side of a coupling but
  not the other, or a wrong index, changes the outputs;
* the session's overfitted detector embedded in a pyramid and box head twice as wide, with
  the extra channels dead: pruning half of them away must give back its very detections,
  which every consumer of the pruned file (checkpoint, Predictor, the fast path, ONNX,
  TorchScript, int8, OpenVINO, eval_coco.py, infer.py) must then reproduce.
"""

import copy
import importlib.util
import json

import pytest
import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from detection import build_detector, load_detector, save_detector
from detection.checkpoint import CheckpointError
from detection.config import apply_overrides, load_config
from detection.models import rebuild_detector
from detection.pruning import count_macs, prune_detector, step_ratios
from engine.channels import apply_channel_plan
from backbones.resnet import resnet
from workflows.prune import finetune_config, iterative_prune
from helpers import load_tool, one_error_line, random_statistics



def test_channel_plans_are_module_widths_of_any_network():
    """engine.channels knows layer widths, not detectors: a plan read against the wide network narrows it back exactly."""
    from engine.channels import plan_against

    def net(c: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(3, c, 3), nn.BatchNorm2d(c), nn.GroupNorm(2, c), nn.Flatten(), nn.Linear(c * 4, 5))

    torch.manual_seed(0)
    narrow = random_statistics(net(4)).eval()
    plan = plan_against(narrow, net(8))
    assert plan == {"0": {"in_channels": 3, "out_channels": 4}, "1": {"num_features": 4}, "2": {"num_channels": 4},
                    "4": {"in_features": 16, "out_features": 5}}
    assert plan_against(narrow, net(4)) == {}
    rebuilt = apply_channel_plan(net(8), plan).eval()
    rebuilt.load_state_dict(narrow.state_dict(), strict=True)
    x = torch.randn(2, 3, 4, 4)
    assert torch.equal(rebuilt(x), narrow(x)) and rebuilt.channel_plan == plan
    with pytest.raises(ValueError, match="only widths may differ"):
        plan_against(nn.Sequential(nn.Conv2d(3, 4, 3)), nn.Sequential(nn.Linear(3, 4)))
    with pytest.raises(ValueError, match="GroupNorm groups"):
        apply_channel_plan(net(8), {"2": {"num_channels": 3}})

# --- coupled channels: the pruned model is the unpruned one with the removed channels cut off ----


def _tiny(arch: str) -> nn.Module:
    torch.manual_seed(0)
    kwargs: dict = dict(num_classes=3, min_size=64, max_size=64, out_channels=32)
    if arch == "retinanet":
        kwargs.update(score_thresh=0.0)
    else:
        kwargs.update(representation_size=64, box_score_thresh=0.0)
    if arch == "faster_rcnn":  # the stem coupled to layer1's residual sums (C2 feeds the pyramid), FrozenBN, frozen stages
        kwargs.update(norm="frozen_bn", trainable_layers=3, returned_layers=[1, 2, 3, 4])
    if arch == "mask_rcnn":
        kwargs.update(mask_head_channels=16, mask_head_layers=2)
    return random_statistics(build_detector(arch, **kwargs), affine=True).eval()


def _cut_off(model: nn.Module, removed: dict) -> nn.Module:
    """A copy of ``model`` whose layers read nothing from the channels pruning removed (their input weights zeroed)."""
    cut = copy.deepcopy(model)
    modules = dict(cut.named_modules())
    with torch.no_grad():
        for name, sides in removed.items():
            if "in" in sides:
                index = torch.tensor(sides["in"])
                weight = modules[name].weight
                if getattr(modules[name], "transposed", False):
                    weight[index] = 0
                else:
                    weight[:, index] = 0
    return cut


@pytest.mark.parametrize("arch", ["faster_rcnn", "mask_rcnn", "retinanet"])
def test_pruned_model_equals_the_unpruned_one_cut_off_at_the_removed_channels(arch):
    model = _tiny(arch)
    result = prune_detector(model, ratio=0.5, scope="all")
    pruned, cut = result.model, _cut_off(model, result.removed)
    assert all(g.kept == round(g.channels / 2) for g in result.groups) and len(result.groups) >= 17
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        if arch == "retinanet":  # random RetinaNet scores tie, so NMS order is fragile: compare the head itself
            got = pruned.head(list(pruned.backbone(x).values()))
            want = cut.head(list(cut.backbone(x).values()))
            for key in want:
                torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-5)
        else:
            got, want = pruned(list(x))[0], cut(list(x))[0]
            assert len(want["boxes"]) > 10
            for key in want:
                torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-5)
    # The cut-off copy really differs from the model: channels were removed that mattered.
    with torch.no_grad():
        assert not torch.allclose(model.backbone(x)["0"], cut.backbone(x)["0"])

    modules = dict(pruned.named_modules())
    assert modules["backbone.body.conv1"].in_channels == 3  # the image's channels
    widths = {m.out_channels for n, m in modules.items() if n.startswith("backbone.fpn.layer_blocks") and isinstance(m, nn.Conv2d)}
    assert widths == {16} and pruned.backbone.out_channels == 16 and {f.channels for f in pruned.backbone.feature_info} == {16}
    if arch == "retinanet":
        head = pruned.head
        assert head.classification_head.cls_logits.out_channels == 9 * 3 and head.regression_head.bbox_reg.out_channels == 9 * 4
        assert head.classification_head.conv[0][0].in_channels == 16
        return
    assert pruned.rpn.head.cls_logits.out_channels == 3 and pruned.rpn.head.bbox_pred.out_channels == 12
    assert pruned.rpn.head.conv[0][0].in_channels == 16
    box = pruned.roi_heads
    assert box.box_head.fc6.in_features == 16 * 7 * 7 and box.box_head.fc6.out_features == 32
    assert box.box_predictor.cls_score.out_features == 3 and box.box_predictor.bbox_pred.out_features == 12
    if arch == "mask_rcnn":
        assert box.mask_head[0][0].in_channels == 16 and box.mask_predictor.conv5_mask.out_channels == 8
        assert box.mask_predictor.mask_fcn_logits.out_channels == 3
    if arch == "faster_rcnn":
        frozen = {n for n, m in model.named_modules() if isinstance(m, FrozenBatchNorm2d)}
        assert frozen and frozen == {n for n, m in pruned.named_modules() if isinstance(m, FrozenBatchNorm2d)}
        assert not any(isinstance(m, nn.BatchNorm2d) for m in pruned.modules())
        flags = {n: p.requires_grad for n, p in model.named_parameters()}
        assert {n: p.requires_grad for n, p in pruned.named_parameters()} == flags and not flags["backbone.body.conv1.weight"]
        assert modules["backbone.body.conv1"].out_channels == modules["backbone.body.layer1.1.conv2"].out_channels == 32


def test_bn_scale_ranks_by_the_batchnorm_scale():
    model = _tiny("faster_rcnn")
    # layer1.0's inner channels: the BatchNorm scale says which matter, the convolution weights say otherwise.
    with torch.no_grad():
        order = torch.randperm(64, generator=torch.Generator().manual_seed(3))
        model.backbone.body.layer1[0].bn1.weight.copy_(order.float() + 1)
        model.backbone.body.layer1[0].conv1.weight.mul_((64 - order.float()).view(-1, 1, 1, 1))
    by_scale = prune_detector(model, ratio=0.5, scope="trunk", importance="bn_scale").removed
    assert by_scale["backbone.body.layer1.0.conv1"]["out"] == sorted(order.argsort()[:32].tolist())
    assert "roi_heads.box_head.fc6" not in by_scale  # scope trunk: the heads keep their widths


# --- a pruned file as data, and every consumer of it --------------------------------------------


def _widened(model: nn.Module, out_channels: int, representation_size: int) -> nn.Module:
    """``model`` inside a pyramid and box head this wide; the extra channels are dead (zero weights in and out)."""
    narrow = model.backbone.out_channels
    wide = rebuild_detector({**model.build_args, "out_channels": out_channels, "representation_size": representation_size}).eval()
    source = model.state_dict()
    with torch.no_grad():
        for name, tensor in wide.state_dict().items():
            src = source[name]
            if tensor.shape == src.shape:
                tensor.copy_(src)
                continue
            tensor.zero_()
            if name == "roi_heads.box_head.fc6.weight":  # its inputs are (channel, 7 x 7) flattened
                tensor.view(tensor.shape[0], out_channels, -1)[: src.shape[0], :narrow] = src.view(src.shape[0], narrow, -1)
            else:
                tensor[tuple(slice(0, s) for s in src.shape)] = src
    return wide


@pytest.fixture(scope="module")
def pruned_file(overfit_detector, tmp_path_factory):
    """The overfitted detector widened (pyramid 64 -> 128, box head 256 -> 512), pruned back by half, saved with its recipe."""
    from detection.data import CocoDetection

    model, root = overfit_detector.model, overfit_detector.root
    wide = _widened(model, 128, 512)
    result = prune_detector(wide, ratio=0.5, scope="pyramid")
    mapping = CocoDetection(root, "train").category_mapping()
    cfg = apply_overrides(load_config(None), [
        "optimizer=adamw", "lr=0.001", "lr_reference_batch=2", "warmup_iters=0", "checkpoint_period=1000", "log_period=1",
    ], data_path=str(root), min_size=96, max_size=96, batch_size=2, workers=0, epochs=1, eval_period=0, device="cpu", seed=0,
       returned_layers=[2, 3, 4], augment="none", num_vis=0)
    path = tmp_path_factory.mktemp("pruned") / "pruned.pth"
    save_detector(result.model, path, category_mapping=mapping, config=cfg)
    wide_path = path.with_name("wide.pth")
    save_detector(wide, wide_path, category_mapping=mapping, config=cfg)
    return path, wide_path, result


def _same(a: dict, b: dict) -> None:
    assert torch.equal(a["labels"], b["labels"])
    torch.testing.assert_close(a["boxes"], b["boxes"], rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(a["scores"], b["scores"], rtol=0, atol=1e-3)


def test_pruning_dead_channels_gives_back_the_trained_detections(overfit_detector, pruned_file):
    path, _, result = pruned_file
    assert result.plan["roi_heads.box_head.fc6"] == {"in_features": 64 * 49, "out_features": 256}
    assert result.plan["backbone.fpn.layer_blocks.0.0"] == {"in_channels": 64, "out_channels": 64}
    assert not any(name.startswith("backbone.body") for name in result.plan)  # scope pyramid
    with torch.no_grad():
        for image in overfit_detector.images:
            want = overfit_detector.model([image])[0]
            assert int((want["scores"] >= 0.5).sum()) >= 2
            _same(result.model([image])[0], want)


def test_taylor_scores_training_batches_and_finds_the_dead_channels(overfit_detector, pruned_file):
    from workflows.prune import calibration_batches

    _, wide_path, _ = pruned_file
    wide = load_detector(wide_path)
    with pytest.raises(ValueError, match="needs a few training batches"):
        prune_detector(wide, ratio=0.5, scope="pyramid", importance="taylor")
    batches = calibration_batches(wide.train_config, images=2)
    assert [len(images) for images, _ in batches] == [2] and "boxes" in batches[0][1][0]
    result = prune_detector(wide, ratio=0.5, scope="pyramid", importance="taylor", batches=batches)
    assert all(p.grad is None for p in result.model.parameters()) and all(p.grad is None for p in wide.parameters())
    with torch.no_grad():
        for image in overfit_detector.images:
            _same(result.model([image])[0], overfit_detector.model([image])[0])


def test_pruned_checkpoint_is_data_and_loads_strictly(overfit_detector, pruned_file, tmp_path):
    path, wide_path, result = pruned_file
    raw = torch.load(path, weights_only=True)  # tensors and plain containers only
    assert raw["channel_plan"] == result.plan and raw["build_args"]["out_channels"] == 128
    assert "channel_plan" not in torch.load(wide_path, weights_only=True)  # an unpruned file is as it always was
    assert load_detector(wide_path).backbone.out_channels == 128
    loaded = load_detector(path)
    assert loaded.channel_plan == result.plan and loaded.train_config["data_path"] == str(overfit_detector.root)
    with torch.no_grad():
        image = overfit_detector.images[0]
        _same(loaded([image])[0], overfit_detector.model([image])[0])
    # A plan that does not fit the architecture: the loader's one error, naming the file.
    bad = dict(raw, channel_plan={**raw["channel_plan"], "roi_heads.box_head.fc9": {"in_features": 3, "out_features": 3}})
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=r"bad\.pth does not rebuild a detector.*fc9"):
        load_detector(tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="must set"):
        apply_channel_plan(rebuild_detector(raw["build_args"]), {"backbone.body.conv1": {"out_channels": 8}})


def test_every_consumer_takes_the_pruned_file(overfit_detector, pruned_file, tmp_path, capsys):
    from deploy.export import calibration_images, export_checkpoint, quantize_onnx, read_metadata
    from deploy.fast import match_detections
    from deploy.predictor import Predictor

    path, _, _ = pruned_file
    images = overfit_detector.images
    with torch.no_grad():
        want = [overfit_detector.model([image])[0] for image in images]
    onnx_path = export_checkpoint(path, tmp_path / "pruned.onnx")
    script_path = export_checkpoint(path, tmp_path / "pruned.pt", format="torchscript")
    # What export_checkpoint(int8=True) does after the fp32 export above, minus a second export.
    int8_path = quantize_onnx(onnx_path, tmp_path / "pruned_int8.onnx", calibration_images(config=load_detector(path).train_config, count=2))
    assert read_metadata(int8_path)["precision"] == "int8" and int8_path.stat().st_size < onnx_path.stat().st_size
    runs = [(path, {}), (path, {"fast": True}), (onnx_path, {}), (script_path, {"runtime": "torchscript"})]
    if importlib.util.find_spec("openvino") is not None:
        runs.append((onnx_path, {"runtime": "openvino"}))
    for file, options in runs:
        predictor = Predictor(file, device="cpu", score_thresh=0.0, **options)
        matched = [match_detections(ref, predictor.predict_tensors([image])[0], iou_thresh=0.95) for image, ref in zip(images, want)]
        assert all(m == c >= 2 for m, c in matched), (file.name, options, matched)
    int8 = Predictor(int8_path, device="cpu", score_thresh=0.0)
    matched = [match_detections(ref, int8.predict_tensors([image])[0], iou_thresh=0.7) for image, ref in zip(images, want)]
    assert sum(m for m, _ in matched) >= 0.75 * sum(c for _, c in matched) > 0

    from detection.data import CocoDetection
    from detection.evaluation import evaluate

    val = CocoDetection(overfit_detector.root, "val")
    expected = evaluate(overfit_detector.model, val, progress=False)["metrics"]["bbox/AP"]
    assert load_tool("eval_coco").main(["--checkpoint", str(path), "--output-dir", str(tmp_path / "eval"), "--workers", "0",
                                    "--device", "cpu", "--no-progress"]) == 0
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["bbox/AP"] == pytest.approx(expected, abs=1e-3)
    assert load_tool("infer").main(["--checkpoint", str(path), "--input", str(overfit_detector.root / "train"),
                                "--output", str(tmp_path / "vis"), "--device", "cpu"]) == 0
    found = json.loads((tmp_path / "vis" / "detections.json").read_text())
    assert sorted(len(v) for v in found.values()) == sorted(int((w["scores"] >= 0.5).sum()) for w in want)
    capsys.readouterr()


def test_counts_the_costs_the_issue_quotes(pruned_file):
    # Faster R-CNN R18-FPN at 800x1216 (torchvision's defaults): trunk ~35, pyramid ~48, RPN head ~48, box head ~14 GMACs.
    macs = {k: v / 1e9 for k, v in count_macs(build_detector("faster_rcnn", num_classes=91)).items()}
    assert 34 < macs["trunk"] < 36 and 47 < macs["pyramid"] < 51 and 46 < macs["rpn_head"] < 50 and 13 < macs["box_head"] < 15.5
    assert macs["total"] == pytest.approx(macs["trunk"] + macs["pyramid"] + macs["rpn_head"] + macs["box_head"])
    _, wide_path, result = pruned_file
    before, after = count_macs(load_detector(wide_path)), count_macs(result.model)
    assert after["trunk"] == before["trunk"]
    assert after["rpn_head"] / before["rpn_head"] == pytest.approx(0.25, rel=0.02)  # half the inputs, half the outputs


def test_the_benchmark_times_a_pruned_file_at_the_rows_fixed_work(pruned_file):
    from deploy.benchmark import checkpoint_candidate

    path, _, _ = pruned_file
    model = checkpoint_candidate(path, (96, 144))
    assert model.channel_plan and model.transform.min_size == (96,) and model.rpn.post_nms_top_n() == 1000
    with torch.no_grad():
        out = model([torch.rand(3, 96, 144)])[0]
    assert len(out["boxes"]) == 100 and set(out["labels"].tolist()) == {1}  # fix_detector_work's 100 class-1 detections


# --- fine-tuning with the trainer: iterative steps, resumable ------------------------------------


def test_step_ratios_and_the_finetune_recipe(pruned_file):
    ratios = step_ratios(0.75, 2)
    assert (1 - ratios[0]) * (1 - ratios[1]) == pytest.approx(0.25)
    path, _, _ = pruned_file
    train_config = load_detector(path).train_config
    cfg = finetune_config(train_config, init_checkpoint=path, output_dir="out", epochs=3, lr_scale=0.1, overrides=["seed=7"])
    assert (cfg["init_checkpoint"], cfg["epochs"], cfg["seed"]) == (str(path), 3, 7)
    assert cfg["lr"] == pytest.approx(train_config["lr"] * 0.1)
    with pytest.raises(ValueError, match="no training config"):
        finetune_config(None, init_checkpoint=path, output_dir="out", epochs=1)


def test_iterative_prune_finetunes_with_the_trainer_and_resumes(pruned_file, tmp_path):
    from detection.training import preflight

    path, _, _ = pruned_file
    work, out = tmp_path / "steps", tmp_path / "final.pth"
    iterative_prune(path, out, ratio=0.5, steps=2, finetune_epochs=1, work_dir=work, scope="pyramid", progress=False)
    final = load_detector(out)
    assert final.roi_heads.box_head.fc6.out_features == 128 and final.backbone.out_channels == 32  # 256 -> 181 -> 128, 64 -> 45 -> 32
    step2 = torch.load(work / "step2" / "checkpoint.pth", weights_only=True)
    assert step2["config"]["init_checkpoint"] == str(work / "step2_pruned.pth") and step2["iteration"] >= 1
    assert step2["channel_plan"] == torch.load(work / "step2_pruned.pth", weights_only=True)["channel_plan"]
    # Interrupted before its end: the same call resumes step 2 from its checkpoint and prunes nothing again.
    pruned_at = (work / "step1_pruned.pth").stat().st_mtime_ns
    (work / "step2" / "model_final.pth").unlink()
    out.unlink()
    assert iterative_prune(path, out, ratio=0.5, steps=2, finetune_epochs=1, work_dir=work, scope="pyramid", progress=False) == []
    assert out.is_file() and (work / "step1_pruned.pth").stat().st_mtime_ns == pruned_at
    assert "resumed from" in (work / "step2" / "log.txt").read_text()
    # Resuming a pruned run as if it were not pruned is refused before any work.
    cfg = dict(step2["config"], init_checkpoint=None)
    with pytest.raises(CheckpointError, match="pruned model whose widths differ"):
        preflight(cfg, resume=True)


# --- bad input: one error line, exit 2, nothing written ------------------------------------------


def test_prune_tool_refuses_bad_input(pruned_file, tmp_path, capsys):
    prune = load_tool("prune")
    path, _, _ = pruned_file
    out = tmp_path / "out.pth"
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint at all")
    weights = tmp_path / "weights.pth"
    torch.save(resnet(18).state_dict(), weights)
    cases = [
        (["--ratio", "0"], r"ratio must be a number in \(0, 1\).*got 0"),
        (["--ratio", "1"], r"ratio must be a number in \(0, 1\).*got 1"),
        (["--ratio", "-0.5"], r"ratio must be a number in \(0, 1\)"),
        (["--ratio", "0.5", "--scope", "heads"], r"scope must be one of \['trunk', 'pyramid', 'all'\], got 'heads'"),
        (["--ratio", "0.5", "--importance", "fisher"], r"importance must be one of"),
        (["--ratio", "0.5", "--steps", "2"], r"--steps 2 .*pass --finetune-epochs"),
        (["--ratio", "0.999"], r"ratio 0.999 would remove every channel of .*keep none"),
        (["--ratio", "0.5", "--checkpoint", str(junk)], r"junk\.pth"),
        (["--ratio", "0.5", "--checkpoint", str(weights)], r"weights\.pth is not a detector checkpoint \(it is bare weights \(a state dict"),
        (["--ratio", "0.5", "--checkpoint", str(tmp_path / "missing.pth")], r"missing\.pth not found"),
        (["--ratio", "0.5", "--output", str(tmp_path)], r"is a folder"),
    ]
    for flags, pattern in cases:
        argv = ["--checkpoint", str(path), "--output", str(out), *flags]
        assert prune.main(argv) == 2, flags
        import re

        line = one_error_line(capsys.readouterr().err)
        assert re.search(pattern, line), (flags, line)
        assert "KINDS" not in line  # what a file is, in words: never an internal constant
        assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.pth", "weights.pth"]  # nothing written, no temporary


def test_a_pruned_file_where_it_cannot_go(pruned_file, tmp_path, capsys):
    path, _, _ = pruned_file
    train = load_tool("train_det")
    # As trunk weights its narrowed ResNet fits no standard one: pointed at --init-checkpoint instead.
    assert train.main(["--weights-backbone", str(path), "--output-dir", str(tmp_path / "run")]) == 2
    assert "fine-tune it with --init-checkpoint" in one_error_line(capsys.readouterr().err)
    # Another architecture than the file's: refused, the architecture comes from the file.
    argv = ["--model", "retinanet", "--init-checkpoint", str(path), "--output-dir", str(tmp_path / "run"), "--set", "model_kwargs={}"]
    assert train.main(argv) == 2
    assert "holds a faster_rcnn/resnet18 detector but the run trains retinanet/resnet18" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "run").exists()


def test_round_to_rounds_each_kept_width_to_the_nearest_multiple():
    # ratio 0.3 keeps round(0.7 C) channels: 45 of 64 and 358 of 512 round up to 48 and 360 (down would be 40 and 352),
    # 90 of 128 and 179 of 256 round down to 88 and 176.
    result = prune_detector(_tiny("faster_rcnn"), ratio=0.3, scope="trunk", round_to=8)
    kept = {g.channels: g.kept for g in result.groups if g.scope == "trunk"}
    assert kept == {64: 48, 128: 88, 256: 176, 512: 360}, f"kept widths by group width: {kept}"
    modules = dict(result.model.named_modules())
    assert (modules["backbone.body.layer1.0.conv1"].out_channels, modules["backbone.body.layer4.0.conv1"].out_channels) == (48, 360)
    exact = {g.channels: g.kept for g in prune_detector(_tiny("faster_rcnn"), ratio=0.3, scope="trunk").groups if g.scope == "trunk"}
    assert exact == {64: 45, 128: 90, 256: 179, 512: 358}  # round_to=1: round(0.7 C) itself


def test_l1_sums_the_magnitude_over_every_layer_of_a_group():
    # layer1.0's inner channels are written by conv1 and read by conv2. Even channels weigh 6 in each (sum 12, max 6),
    # odd ones 10 in conv1 and almost nothing in conv2 (sum 10, max 10): summed over the group, the odd ones go;
    # ranked by the largest layer alone, the even ones would.
    model = _tiny("faster_rcnn")
    block = model.backbone.body.layer1[0]
    odd = torch.arange(64) % 2 == 1
    with torch.no_grad():
        block.conv1.weight.copy_(torch.where(odd, 10.0, 6.0).view(-1, 1, 1, 1).expand_as(block.conv1.weight) / (64 * 9))
        block.conv2.weight.copy_(torch.where(odd, 0.01, 6.0).view(1, -1, 1, 1).expand_as(block.conv2.weight) / (64 * 9))
        block.bn1.weight.fill_(1.0)
        block.bn1.bias.zero_()
    removed = prune_detector(model, ratio=0.5, scope="trunk", importance="l1").removed
    assert removed["backbone.body.layer1.0.conv1"]["out"] == list(range(1, 64, 2)), "l1 must rank by the sum over the group's layers"
    assert removed["backbone.body.layer1.0.conv2"]["in"] == list(range(1, 64, 2))
