"""What a file is, how to read it, and how to write one: one place for every model file.

A path is judged by its bytes, never by its name (``identify``):

=============================  ==========================================  =====================  ============================
kind                           what it holds                               written by             runs with
=============================  ==========================================  =====================  ============================
``training_state``             a detector and its optimiser (resume)       ``tools/train_det.py`` ``torch``
``detector``                   a detector (``model_final.pth``)            ``save_detector``      ``torch``
``classifier_training_state``  a ResNet classifier and its optimiser       ``tools/train_cls.py`` (trunk weights)
``classifier``                 a ResNet classifier                         ``save_classifier``    (trunk weights)
``segmenter_training_state``   a segmenter and its optimiser (resume)      ``tools/train_seg.py`` ``torch``
``segmenter``                  a semantic segmenter (``model_final.pth``)  ``save_segmenter``     ``torch``
``state_dict``                 tensors by name (torchvision's files, ...)  anyone                 (trunk weights)
``onnx``                       an exported detector or segmenter           ``tools/export.py``    ``onnxruntime``, ``openvino``
``torchscript``                an exported detector or segmenter           ``tools/export.py``    ``torchscript``
=============================  ==========================================  =====================  ============================

The container comes from the first bytes (``container_of``): ``PK\\x03\\x04`` is a zip,
which is a TorchScript archive when it holds ``code/``, else a ``torch.save`` file; a
pickle (``\\x80``) is a legacy ``torch.save`` file; anything else must scan as an ONNX
``ModelProto`` (protobuf with an ``ir_version`` and a ``graph`` that ends where the
file ends). The torch kinds then follow from the keys (``kind_of``); an exported file's
metadata says its task (``task``: ``"detection"`` or ``"segmentation"``).

Every reader here raises ``FileFormatError`` (a ``backbones.weights.WeightsError``)
naming the file for bytes it cannot use, whatever failed inside: reads are wrapped
where the bytes come in, not by the exception types seen so far. Metadata of exported
files is read without loading the graph: the ONNX reader walks only the top level of
the protobuf, seeking past the graph, and TorchScript's is one zip entry.

Writes are atomic: ``engine.files``'s ``atomic_write``, ``atomic_save`` and ``atomic_write_text``, and for writers that need a path of their own
(``onnx.save``, ``torch.jit.save``) ``temporary_folder`` + ``publish``: a kill at any
moment leaves the previous file or the new one, never a mix.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from backbones.weights import FileFormatError, WeightsError, normalize_state_dict, read_checkpoint
from classification.checkpoint import CLASSIFIER_KEYS, CLASSIFIER_TRAINING_KEYS
from detection.checkpoint import DETECTOR_KEYS, TRAINING_KEYS
from engine.files import NotOnnx, container_of, file_mode, scan_onnx

__all__ = [
    "CLASSIFIER_KEYS",
    "CLASSIFIER_TRAINING_KEYS",
    "DETECTOR_KEYS",
    "EXPORTED_RUNTIMES",
    "KINDS",
    "KIND_DESCRIPTIONS",
    "KIND_TASKS",
    "NMS_WITHOUT_BRANCH",
    "OPENVINO_PRECISIONS",
    "RUNTIMES",
    "TRAINING_KEYS",
    "FileFormatError",
    "FileInfo",
    "add_runtime_args",
    "decode_metadata",
    "identify",
    "is_exported",
    "kind_of",
    "publish",
    "read_exported_metadata",
    "read_onnx_metadata",
    "resolve_runtime",
    "temporary_folder",
]

KINDS = ("training_state", "detector", "classifier_training_state", "classifier", "segmenter_training_state", "segmenter",
         "state_dict", "onnx", "torchscript")
TASKS = ("detection", "segmentation")
RUNTIMES = ("torch", "onnxruntime", "openvino", "torchscript")
EXPORTED_RUNTIMES = ("onnxruntime", "openvino", "torchscript")
OPENVINO_PRECISIONS = ("fp32", "bf16")
_RUNTIMES_OF = {"torch": ("torch",), "onnx": ("onnxruntime", "openvino"), "torchscript": ("torchscript",)}
_DESCRIBED = {
    "torch": "a PyTorch checkpoint (model_final.pth / checkpoint.pth from tools/train_det.py or tools/train_seg.py)",
    "onnx": "an exported ONNX file (tools/export.py)",
    "torchscript": "a TorchScript file (tools/export.py --format torchscript)",
}
# Most specific first: a training state is also a detector file. Segmenter files (checked before these, see
# _keyed_kinds) hold a detector file's keys plus class_names, which a detector file never has.
_KEYED_KINDS = (
    ("training_state", TRAINING_KEYS), ("detector", DETECTOR_KEYS),
    ("classifier_training_state", CLASSIFIER_TRAINING_KEYS), ("classifier", CLASSIFIER_KEYS),
)
# What each kind is, in a user's words (messages name these, never the constant).
KIND_DESCRIPTIONS = {
    "training_state": "a detector's training state (checkpoint.pth from tools/train_det.py)",
    "detector": "a detector (model_final.pth from tools/train_det.py, or tools/prune.py's file)",
    "classifier_training_state": "a classifier's training state (checkpoint.pth from tools/train_cls.py)",
    "classifier": "a classifier (model_final.pth from tools/train_cls.py; a trunk for --weights-backbone)",
    "segmenter_training_state": "a segmenter's training state (checkpoint.pth from tools/train_seg.py)",
    "segmenter": "a segmenter (model_final.pth from tools/train_seg.py)",
    "state_dict": "bare weights (a state dict, such as torchvision's ImageNet files; a trunk for --weights-backbone)",
    "onnx": "an exported ONNX file (tools/export.py)",
    "torchscript": "an exported TorchScript file (tools/export.py --format torchscript)",
}
# The task a model file runs as (trunk weights and classifiers run as neither).
KIND_TASKS = {"training_state": "detection", "detector": "detection", "segmenter_training_state": "segmentation", "segmenter": "segmentation"}
_KIND_RUNTIMES = {"training_state": ("torch",), "detector": ("torch",), "segmenter_training_state": ("torch",), "segmenter": ("torch",),
                  "onnx": _RUNTIMES_OF["onnx"], "torchscript": ("torchscript",)}
_TORCHSCRIPT_METADATA = "extra/resfpn.json"
# resfpn.nms of ONNX files whose NMS has no empty-result If (deploy.export); OpenVINO invents a row from that If.
NMS_WITHOUT_BRANCH = "batched coordinate trick, no empty-result branch"


@dataclass(frozen=True)
class FileInfo:
    """What ``identify`` found.

    Attributes:
        path: the file.
        kind: one of ``KINDS``.
        container: ``"torch"``, ``"torchscript"`` or ``"onnx"``.
        metadata: an exported file's ``resfpn.*`` metadata (decoded); empty for torch files.
    """

    path: Path
    kind: str
    container: str
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def runtimes(self) -> tuple[str, ...]:
        """The runtimes that run it as a detector or segmenter (first: the default); empty for trunk weights and classifiers."""
        return _KIND_RUNTIMES.get(self.kind, ())


def _keyed_kinds() -> tuple[tuple[str, tuple[str, ...]], ...]:
    # Imported here: segmentation's package imports albumentations, which tools that never see a segmenter need not pay for.
    from segmentation.checkpoint import SEGMENTER_KEYS, SEGMENTER_TRAINING_KEYS

    return (("segmenter_training_state", SEGMENTER_TRAINING_KEYS), ("segmenter", SEGMENTER_KEYS), *_KEYED_KINDS)


# ---------------------------------------------------------------------------------------------
# What a file is


def kind_of(obj: Any) -> str | None:
    """The kind of a loaded torch file's content (``KINDS``), or ``None`` when it is none of them.

    Args:
        obj: what ``torch.load`` returned.
    """
    if not isinstance(obj, Mapping):
        return None
    keys = set(obj)
    for kind, required in _keyed_kinds():
        if keys.issuperset(required):
            return kind
    try:
        normalize_state_dict(obj)
    except WeightsError:
        return None
    return "state_dict"


def _torchscript_metadata(path: Path) -> dict[str, Any]:
    try:
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.endswith("/" + _TORCHSCRIPT_METADATA)]
            if not names:
                return {}
            return decode_metadata(json.loads(archive.read(names[0]).decode("utf-8")))
    except Exception as e:  # noqa: BLE001  (a damaged archive or entry: these bytes are not an export)
        raise FileFormatError(f"could not read the metadata of TorchScript file {path} ({type(e).__name__}: {e})") from None


def read_onnx_metadata(path: str | os.PathLike) -> dict[str, str]:
    """An ONNX file's ``metadata_props``, read without loading its graph.

    Args:
        path: an ``.onnx`` file.

    Raises:
        FileFormatError: the bytes are not an ONNX model.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX file {path} not found")
    try:
        return dict(scan_onnx(path))
    except NotOnnx as e:
        raise FileFormatError(f"{path} is not a readable ONNX file: {e}") from None


def decode_metadata(props: Mapping[str, Any]) -> dict[str, Any]:
    """Decode ``resfpn.*`` metadata properties (JSON where they are JSON), without the prefix."""
    out: dict[str, Any] = {}
    for key, value in props.items():
        if not isinstance(key, str) or not key.startswith("resfpn."):
            continue
        try:
            out[key[len("resfpn."):]] = json.loads(value)
        except (ValueError, TypeError):
            out[key[len("resfpn."):]] = value
    return out


def read_exported_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The ``resfpn.*`` metadata of an exported detector or segmenter (ONNX or TorchScript), checked to be one.

    Args:
        path: a file from ``tools/export.py``.

    Returns:
        ``{key without "resfpn.": decoded value}``, with at least ``outputs`` and ``task``
        (``"detection"`` for detector files written before files said their task).

    Raises:
        FileFormatError: not an exported file, or one without resfpn's metadata.
    """
    path = Path(path)
    container = container_of(path)
    if container == "torch":
        raise FileFormatError(f"{path} is {_DESCRIBED['torch']}, not an exported file: load it with load_detector (--runtime torch) or export it with tools/export.py")
    meta = read_onnx_metadata(path) if container == "onnx" else None
    decoded = decode_metadata(meta) if meta is not None else _torchscript_metadata(path)
    outputs = decoded.get("outputs")
    task = decoded.get("task", "detection")
    expected = {"detection": {"boxes", "labels", "scores"}, "segmentation": {"out"}}.get(task)
    if not isinstance(outputs, list) or expected is None or not expected <= set(outputs):
        how = "tools/export.py --format torchscript" if container == "torchscript" else "tools/export.py"
        raise FileFormatError(f"{path} is not a detector or segmenter exported by resfpn (no resfpn.* metadata naming its outputs): "
                              f"export one with {how}")
    decoded["task"] = task
    return decoded


def identify(path: str | os.PathLike) -> FileInfo:
    """Say what a file is (see the module's table); torch files are read (as data) to tell their kind.

    Args:
        path: any file.

    Raises:
        FileNotFoundError: there is no such file.
        FileFormatError: the bytes are none of the kinds (the message names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    container = container_of(path)
    if container != "torch":
        return FileInfo(path, container, container, read_exported_metadata(path))
    obj = read_checkpoint(path)
    kind = kind_of(obj)
    if kind is None:
        found = sorted(map(str, obj))[:8] if isinstance(obj, Mapping) else type(obj).__name__
        raise FileFormatError(f"{path} is a torch file but not one this project reads (found keys {found}); it reads "
                              "detectors, segmenters and classifiers written by tools/train_*.py, and state dicts of a ResNet trunk")
    return FileInfo(path, kind, container)


def resolve_runtime(path: str | os.PathLike, runtime: str | None = None) -> str:
    """The runtime that runs ``path``: ``runtime`` checked against the file's bytes, or the file's default.

    Args:
        path: an existing file.
        runtime: one of ``RUNTIMES`` or ``None`` (``torch`` for checkpoints, ``onnxruntime``
            for ONNX, ``torchscript`` for TorchScript).

    Raises:
        ValueError: an unknown runtime, or one that does not run this kind of file.
        FileFormatError: the bytes are no model file.
    """
    if runtime is not None and runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {list(RUNTIMES)}, got {runtime!r}")
    container = container_of(path)
    allowed = _RUNTIMES_OF[container]
    if runtime is None:
        return allowed[0]
    if runtime not in allowed:
        raise ValueError(
            f"runtime {runtime!r} does not run {path}: it is {_DESCRIBED[container]}, which runs with "
            f"{' or '.join(repr(r) for r in allowed)}; export with tools/export.py, or pick --runtime to match"
        )
    return runtime


def is_exported(path: str | os.PathLike, runtime: str | None = None) -> bool:
    """Whether ``path`` (with ``runtime``) runs as an exported file, on the CPU only.

    ``runtime`` decides when given; else the file's bytes (a missing file: ``False``,
    so its loader reports it).
    """
    if runtime is not None:
        return runtime != "torch"
    return Path(path).is_file() and container_of(path) != "torch"


def check_exported_flags(path: str | os.PathLike, *, device: str | None, test_options: dict, use: str = "run") -> None:
    """Refuse the flags an exported file cannot honour, each with the way out (``ValueError``).

    Args:
        path: the exported file (for the message).
        device: the ``--device`` asked for; exported files run on the CPU.
        test_options: the proposal counts and candidate cap asked for (``parse_test_options``);
            an exported file has its own baked in.
        use: what the tool does with a ``.pth`` instead (``"run"``, ``"evaluate"``).
    """
    if device == "cuda":
        raise ValueError("exported models run on the CPU (ONNX Runtime / OpenVINO); drop --device cuda or use the .pth checkpoint")
    if test_options:
        raise ValueError(f"{path} is an exported file, whose proposal counts and candidate cap were baked in at export: "
                         f"export it again with these flags (tools/export.py --proposals N ...), or {use} the .pth checkpoint")


def add_runtime_args(parser: argparse.ArgumentParser) -> None:
    """Add ``--runtime`` and ``--precision``, the flags every tool that runs a model file shares (infer, eval).

    Args:
        parser: the tool's parser.
    """
    parser.add_argument("--runtime", choices=list(RUNTIMES),
                        help="default from the file's bytes: torch for checkpoints, onnxruntime for ONNX, torchscript for TorchScript")
    parser.add_argument("--precision", choices=list(OPENVINO_PRECISIONS),
                        help="--runtime openvino: what is not int8 runs in this precision (default fp32)")


# ---------------------------------------------------------------------------------------------
# Writing


@contextlib.contextmanager
def temporary_folder(beside: str | os.PathLike) -> Iterator[Path]:
    """A hidden temporary folder in ``beside``'s folder (same file system), removed on exit whatever happens.

    For writers that need a path (``onnx.save``, ``torch.jit.save``): write into it,
    then ``publish`` the finished file.

    Args:
        beside: the final output file.
    """
    output = Path(beside)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish(finished: str | os.PathLike, output: str | os.PathLike) -> Path:
    """Rename a finished file (from ``temporary_folder``) over ``output``, with the umask's permissions.

    Args:
        finished: the complete file, on ``output``'s file system.
        output: destination.
    """
    os.chmod(finished, file_mode())
    os.replace(finished, output)
    return Path(output)
