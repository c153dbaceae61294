"""Any bytes, to every loader: the project's own FileFormatError naming the file, never a reader's internal error.

Random files (lengths 0 to 5,000, one seed each), truncations of a real checkpoint and of a
real exported ONNX file at many offsets, and a few crafted near-misses (a zip or a pickle
header followed by junk, an ONNX file whose graph is corrupt, a TorchScript-looking zip
without code) go to: trunk weights (``load_pretrained``), resume (``read_training_state``,
``read_classifier_training_state``), detector and classifier files (``load_detector``,
``load_classifier``), exported files with each runtime (``load_exported``), the one entry
for any model file (``load_model``) and ``identify``.

Before deploy.files, these reached users as struct.error, IndexError, KeyError,
BadZipFile and google.protobuf's DecodeError (issue 18 item 5).
"""

import io
import json
import os
import random
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from backbones import resnet18
from backbones.weights import FileFormatError, load_pretrained
from detection import build_detector
from classification.checkpoint import load_classifier, read_classifier_training_state
from detection.checkpoint import load_detector, read_training_state
from deploy.files import TRAINING_KEYS, identify, kind_of
from engine.files import atomic_save, container_of
from deploy.opening import load_model

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


def _exported(runtime: str) -> Callable[[Path], Any]:
    def load(path: Path) -> Any:
        from deploy.runtime import load_exported

        if runtime == "openvino":
            pytest.importorskip("openvino")
        return load_exported(path, runtime=runtime)

    return load


_TRUNK = resnet18()

LOADERS: dict[str, Callable[[Path], Any]] = {
    "trunk weights": lambda p: load_pretrained(_TRUNK, p),
    "resume": read_training_state,
    "classifier resume": read_classifier_training_state,
    "detector file": load_detector,
    "classifier file": load_classifier,
    "onnxruntime": _exported("onnxruntime"),
    "openvino": _exported("openvino"),
    "torchscript": _exported("torchscript"),
    "any model file": load_model,
    "identify": identify,
}


def _refused(load: Callable[[Path], Any], path: Path) -> None:
    """``load(path)`` raises FileFormatError whose message names the file; anything else fails the test."""
    with pytest.raises(FileFormatError) as err:
        load(path)
    assert str(path) in str(err.value), err.value


def _refused_or_loaded(load: Callable[[Path], Any], path: Path) -> None:
    """For bytes that may still be a whole file (a cut at a field boundary): a result, or FileFormatError naming it."""
    try:
        load(path)
    except FileFormatError as e:
        assert str(path) in str(e), e


# 40 lengths from 0 to 5,000, each file with its own seed.
LENGTHS = sorted({0, 1, 2, 3, 4, 5, 8, 13, 64, 100, 255, 256, 257, 1000, 4096, 5000} | set(random.Random(18).sample(range(6, 5001), 24)))


@pytest.mark.parametrize("name", list(LOADERS))
def test_random_bytes_are_refused_by_every_loader(name, tmp_path):
    load = LOADERS[name]
    for seed, length in enumerate(LENGTHS):
        data = random.Random(seed).randbytes(length)
        for suffix in (".pth", ".onnx"):
            path = tmp_path / f"random_{length}{suffix}"
            path.write_bytes(data)
            _refused(load, path)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"junk")  # printf junk > junk.pth: struct.error before
    _refused(load, junk)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("name", list(LOADERS))
def test_near_misses_are_refused(name, tmp_path):
    """Headers that pass a first glance: each must still end in FileFormatError naming the file."""
    load = LOADERS[name]
    rng = random.Random(1)
    cases = {
        "zip_header.pth": b"PK\x03\x04" + rng.randbytes(300),  # looks like torch.save's zip
        "pickle_header.pth": b"\x80\x02" + rng.randbytes(300),  # looks like a legacy torch file
        "pickle_proto4.pth": b"\x80\x04\x95" + rng.randbytes(50),
        "onnx_header.onnx": b"\x08\x07" + rng.randbytes(300),  # ONNX files start with ir_version (field 1)
        "onnx_no_graph.onnx": b"\x08\x07\x12\x06resfpn",  # a valid protobuf: ir_version and a producer, no graph
        "text.pth": "état, 检测, 🙂\n".encode() * 20,
    }
    for file_name, data in cases.items():
        path = tmp_path / file_name
        path.write_bytes(data)
        _refused(load, path)
    # A zip that claims to be TorchScript (code/ and resfpn metadata) but holds no program.
    fake = tmp_path / "fake_script.pt"
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("model/code/__torch__.py", "garbage(")
        archive.writestr("model/extra/resfpn.json", json.dumps({"resfpn.outputs": json.dumps(["boxes", "labels", "scores"])}))
    fake.write_bytes(buffer.getvalue())
    if name in ("onnxruntime", "openvino"):  # it looks like TorchScript: the wrong runtime, a ValueError that says so
        with pytest.raises(ValueError, match="runs with 'torchscript'"):
            load(fake)
    elif name == "identify":  # says what the bytes look like; only loading the program finds it broken
        assert identify(fake).kind == "torchscript"
    else:
        _refused(load, fake)


@pytest.fixture(scope="module")
def small_training_state(tmp_path_factory) -> Path:
    """A file in the training-state format (every key, nested optimiser state), small enough to cut at many offsets."""
    state = {k: None for k in TRAINING_KEYS}
    state.update(
        model={"w": torch.arange(300, dtype=torch.float32), "b": torch.ones(7)}, build_args={"arch": "faster_rcnn"},
        optimizer={"state": {0: {"momentum_buffer": torch.zeros(300)}}, "param_groups": [{"lr": 0.02, "params": [0, 1]}]},
        scheduler={"last_epoch": 3}, scaler={}, epoch=1, iteration=3, config={"lr": 0.02}, category_mapping={"cat_ids": [1], "names": ["a"]},
    )
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint.pth"
    atomic_save(state, path)
    return path


def _offsets(size: int, count: int, seed: int) -> list[int]:
    """0, 1, a few small ones, ``count`` spread at random, and the last byte."""
    rng = random.Random(seed)
    return sorted({0, 1, 4, 30, size - 1} | {rng.randrange(1, size) for _ in range(count)})


def test_truncated_checkpoint_is_refused_by_every_loader(small_training_state, tmp_path):
    data = small_training_state.read_bytes()
    assert kind_of(torch.load(small_training_state, weights_only=True)) == "training_state"
    path = tmp_path / "checkpoint.pth"
    for offset in _offsets(len(data), 40, seed=2):
        path.write_bytes(data[:offset])
        for load in LOADERS.values():
            _refused(load, path)


@pytest.fixture(scope="module")
def small_onnx(tmp_path_factory) -> Path:
    """A real export of the smallest detector this project builds."""
    from deploy.export import export_onnx

    torch.manual_seed(0)
    model = build_detector("faster_rcnn", backbone="resnet18", num_classes=2, min_size=64, max_size=64, out_channels=16,
                           representation_size=32, rpn_pre_nms_top_n_test=20, rpn_post_nms_top_n_test=10).eval()
    return export_onnx(model, tmp_path_factory.mktemp("onnx") / "model.onnx")


def _top_level_fields(path: Path) -> list[tuple[int, int, int]]:
    """``(field number, start, end)`` of each top-level field of an ONNX file (the layout the cuts aim at)."""
    fields = []
    with open(path, "rb") as f:
        size = os.path.getsize(path)
        while f.tell() < size:
            start = f.tell()
            tag = _varint(f)
            if tag & 7 == 0:
                _varint(f)
            else:
                f.seek(_varint(f), os.SEEK_CUR)
            fields.append((tag >> 3, start, f.tell()))
    return fields


def _varint(f: Any) -> int:
    value = shift = 0
    while True:
        byte = f.read(1)[0]
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value


def test_truncated_onnx_is_refused_by_every_loader(small_onnx, tmp_path):
    data = small_onnx.read_bytes()
    fields = _top_level_fields(small_onnx)
    graph = next((start, end) for number, start, end in fields if number == 7)
    # Cuts inside fields (the graph, the metadata, ...) and just past the graph (no opset, no metadata).
    offsets = _offsets(len(data), 30, seed=3) + [graph[0] + 1, graph[0] + 3, graph[1] - 1, graph[1]]
    offsets += [start + 1 for number, start, end in fields if number == 14][:10]  # inside metadata entries
    path = tmp_path / "model.onnx"
    for offset in offsets:
        path.write_bytes(data[:offset])
        for load in LOADERS.values():
            _refused(load, path)
    # Cut exactly after a metadata entry: what remains may be a whole file (some metadata dropped), which
    # the ONNX loaders may run ("torchscript" is left out: a whole ONNX file is a ValueError for it, wrong runtime).
    for number, start, end in fields[-3:]:
        path.write_bytes(data[:end])
        for name, load in LOADERS.items():
            if name != "torchscript":
                _refused_or_loaded(load, path)


def test_onnx_with_a_corrupt_graph_is_refused_by_the_runtimes(small_onnx, tmp_path):
    """Top level and metadata intact, so only the runtime's own reader sees the damage: its error is wrapped too."""
    data = bytearray(small_onnx.read_bytes())
    number, start, end = next(f for f in _top_level_fields(small_onnx) if f[0] == 7)
    inner = start + 1
    while data[inner] & 0x80:  # past the graph's length varint
        inner += 1
    inner += 1
    data[inner] = 0x0F  # a field tag of wire type 7, which no protobuf has
    path = tmp_path / "corrupt.onnx"
    path.write_bytes(bytes(data))
    assert container_of(path) == "onnx"
    for name in ("onnxruntime", "openvino", "any model file"):
        _refused(LOADERS[name], path)


def test_what_each_real_file_is(small_onnx, small_training_state, tmp_path):
    assert container_of(small_onnx) == "onnx"
    info = identify(small_onnx)
    assert info.kind == "onnx" and info.runtimes == ("onnxruntime", "openvino") and info.metadata["arch"] == "faster_rcnn"
    assert identify(small_training_state).kind == "training_state" and identify(small_training_state).runtimes == ("torch",)
    trunk = tmp_path / "trunk.pth"
    torch.save(resnet18().state_dict(), trunk)
    assert identify(trunk).kind == "state_dict" and identify(trunk).runtimes == ()
    # An exported file handed to a checkpoint loader says what it is.
    with pytest.raises(FileFormatError, match=r"model\.onnx is an exported ONNX file .*not a PyTorch checkpoint"):
        load_detector(small_onnx)
    with pytest.raises(FileFormatError, match=r"checkpoint\.pth is a PyTorch checkpoint .*not an exported file"):
        LOADERS["onnxruntime"](small_training_state)
