"""torch.jit.script works for the trunks, the pyramids and every detector, with eager's numbers."""

import warnings

import pytest
import torch
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor

from backbones import resnet, resnet_fpn
from detection import ARCHS
from helpers import random_statistics, small_detector

pytestmark = pytest.mark.filterwarnings("ignore:RCNN always returns a \\(Losses, Detections\\) tuple in scripting")


def _script(module: nn.Module) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.script's deprecation notice
        return torch.jit.script(module)


@pytest.mark.parametrize("depth", [18, 34])
def test_trunk_scripts(depth):
    torch.manual_seed(0)
    model = random_statistics(resnet(depth, num_classes=10)).eval()
    scripted = _script(model)
    x = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x), rtol=1e-4, atol=1e-5)
    # Python-side descriptions stay on the eager module and are not compiled.
    assert [f.stride for f in model.feature_info] == [4, 8, 16, 32]


def test_trunk_feature_extractor_scripts():
    model = random_statistics(resnet(18)).eval()
    extractor = create_feature_extractor(model, {"layer2": "c3", "layer4": "c5"})
    scripted = _script(extractor)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        ref, out = extractor(x), scripted(x)
    assert list(out) == ["c3", "c5"]
    for k in ref:
        torch.testing.assert_close(out[k], ref[k], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("depth", [18, 34])
@pytest.mark.parametrize("extra_blocks", ["pool", "p6p7", None])
def test_pyramid_scripts(depth, extra_blocks):
    torch.manual_seed(0)
    model = random_statistics(resnet_fpn(depth, extra_blocks=extra_blocks, out_channels=64)).eval()
    scripted = _script(model)
    x = torch.rand(1, 3, 96, 128)
    with torch.no_grad():
        ref, out = model(x), scripted(x)
    assert list(out) == [f.name for f in model.feature_info]
    for k in ref:
        torch.testing.assert_close(out[k], ref[k], rtol=1e-4, atol=1e-4)
    assert model.strides == {f.name: f.stride for f in model.feature_info}


_small_detector = small_detector


# Every architecture once; ResNet-34 is the same classes as ResNet-18 to the compiler, so one case of it suffices.
@pytest.mark.parametrize("arch, depth", [(arch, 18) for arch in ARCHS] + [("faster_rcnn", 34)])
def test_detector_scripts_with_eager_outputs(arch, depth):
    model = _small_detector(arch, depth)
    scripted = _script(model)
    # Sizes whose resize factor is exact in float32: scripted torchvision computes it in float32 and eager in
    # float64, so a size like 128x100 (factor 0.96) resizes to 95 pixels scripted and 96 eager.
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 90, 120, generator=g), torch.rand(3, 128, 96, generator=g)]
    with torch.no_grad():
        ref = model(images)
        losses, out = scripted(images)  # scripted torchvision detectors return (losses, detections)
    assert losses == {}
    for a, b in zip(ref, out):
        assert len(a["boxes"]) > 0
        assert set(b) == set(a)
        assert torch.equal(b["labels"], a["labels"])
        torch.testing.assert_close(b["boxes"], a["boxes"], rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(b["scores"], a["scores"], rtol=1e-4, atol=1e-5)
        if arch == "mask_rcnn":
            assert b["masks"].shape == a["masks"].shape
            torch.testing.assert_close(b["masks"], a["masks"], rtol=0, atol=1e-3)
