"""What a file is, how to read it, and how to write one: one place for every model file.

A path is judged by its bytes, never by its name (``identify``):

=============================  ==========================================  =====================  ============================
kind                           what it holds                               written by             runs with
=============================  ==========================================  =====================  ============================
``training_state``             a detector and its optimiser (resume)       ``tools/train_det.py`` ``torch``
``detector``                   a detector (``model_final.pth``)            ``save_detector``      ``torch``
``classifier_training_state``  a ResNet classifier and its optimiser       ``tools/train_cls.py`` (trunk weights)
``classifier``                 a ResNet classifier                         ``save_classifier``    (trunk weights)
``state_dict``                 tensors by name (torchvision's files, ...)  anyone                 (trunk weights)
``onnx``                       an exported detector                        ``tools/export.py``    ``onnxruntime``, ``openvino``
``torchscript``                an exported detector                        ``tools/export.py``    ``torchscript``
=============================  ==========================================  =====================  ============================

The container comes from the first bytes (``container_of``): ``PK\\x03\\x04`` is a zip,
which is a TorchScript archive when it holds ``code/``, else a ``torch.save`` file; a
pickle (``\\x80``) is a legacy ``torch.save`` file; anything else must scan as an ONNX
``ModelProto`` (protobuf with an ``ir_version`` and a ``graph`` that ends where the
file ends). The torch kinds then follow from the keys (``kind_of``).

Every reader here raises ``FileFormatError`` (a ``backbones.weights.WeightsError``)
naming the file for bytes it cannot use, whatever failed inside: reads are wrapped
where the bytes come in, not by the exception types seen so far. Metadata of exported
files is read without loading the graph: the ONNX reader walks only the top level of
the protobuf, seeking past the graph, and TorchScript's is one zip entry.

Writes are atomic: ``atomic_write``, ``atomic_save`` and ``atomic_write_text`` (from
``engine.files``, re-exported here), and for writers that need a path of their own
(``onnx.save``, ``torch.jit.save``) ``temporary_folder`` + ``publish``: a kill at any
moment leaves the previous file or the new one, never a mix.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from backbones.weights import TORCH_LEGACY_MAGIC, TORCH_ZIP_MAGIC, FileFormatError, WeightsError, normalize_state_dict, read_checkpoint
from engine.files import atomic_save, atomic_write, atomic_write_text, file_mode

__all__ = [
    "CLASSIFIER_KEYS",
    "CLASSIFIER_TRAINING_KEYS",
    "CONTAINERS",
    "DETECTOR_KEYS",
    "EXPORTED_RUNTIMES",
    "KINDS",
    "NMS_WITHOUT_BRANCH",
    "RUNTIMES",
    "TRAINING_KEYS",
    "FileFormatError",
    "FileInfo",
    "atomic_save",
    "atomic_write",
    "atomic_write_text",
    "container_of",
    "decode_metadata",
    "identify",
    "is_exported",
    "kind_of",
    "publish",
    "read_exported_metadata",
    "read_onnx_metadata",
    "read_torch_file",
    "resolve_runtime",
    "temporary_folder",
]

# The keys each torch kind must hold (detection.checkpoint writes them).
DETECTOR_KEYS = ("model", "build_args")
TRAINING_KEYS = DETECTOR_KEYS + ("optimizer", "scheduler", "scaler", "epoch", "iteration", "config", "category_mapping")
CLASSIFIER_KEYS = ("model", "arch", "classes")
CLASSIFIER_TRAINING_KEYS = CLASSIFIER_KEYS + ("optimizer", "scheduler", "scaler", "model_ema", "epoch", "iteration", "config")

KINDS = ("training_state", "detector", "classifier_training_state", "classifier", "state_dict", "onnx", "torchscript")
CONTAINERS = ("torch", "torchscript", "onnx")
RUNTIMES = ("torch", "onnxruntime", "openvino", "torchscript")
EXPORTED_RUNTIMES = ("onnxruntime", "openvino", "torchscript")
_RUNTIMES_OF = {"torch": ("torch",), "onnx": ("onnxruntime", "openvino"), "torchscript": ("torchscript",)}
_DESCRIBED = {
    "torch": "a PyTorch checkpoint (model_final.pth / checkpoint.pth from tools/train_det.py)",
    "onnx": "an exported ONNX file (tools/export.py)",
    "torchscript": "a TorchScript file (tools/export.py --format torchscript)",
}
# Most specific first: a training state is also a detector file.
_KEYED_KINDS = (
    ("training_state", TRAINING_KEYS), ("detector", DETECTOR_KEYS),
    ("classifier_training_state", CLASSIFIER_TRAINING_KEYS), ("classifier", CLASSIFIER_KEYS),
)
_KIND_RUNTIMES = {"training_state": ("torch",), "detector": ("torch",), "onnx": _RUNTIMES_OF["onnx"], "torchscript": ("torchscript",)}
_TORCHSCRIPT_METADATA = "extra/resfpn.json"
# resfpn.nms of ONNX files whose NMS has no empty-result If (detection.export); OpenVINO invents a row from that If.
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
        """The runtimes that run it as a detector (first: the default); empty for trunk weights and classifiers."""
        return _KIND_RUNTIMES.get(self.kind, ())


# ---------------------------------------------------------------------------------------------
# What a file is


class _NotOnnx(Exception):
    """The bytes do not scan as an ONNX ModelProto (internal; the reason is the message)."""


def _varint(f: BinaryIO) -> int:
    value = shift = 0
    for _ in range(10):
        byte = f.read(1)
        if not byte:
            raise _NotOnnx("it ends inside a protobuf number")
        value |= (byte[0] & 0x7F) << shift
        if not byte[0] & 0x80:
            return value
        shift += 7
    raise _NotOnnx("a protobuf number runs over 10 bytes")


# ModelProto's top-level fields and their wire types (onnx.proto): 0 varint, 2 length-delimited.
_MODEL_FIELDS = {1: 0, 2: 2, 3: 2, 4: 2, 5: 0, 6: 2, 7: 2, 8: 2, 14: 2, 20: 2, 25: 2, 26: 2}
_IR_VERSION, _GRAPH, _METADATA_PROPS = 1, 7, 14


def _string_pair(data: bytes) -> tuple[str, str]:
    """A ``StringStringEntryProto`` (1: key, 2: value)."""
    import io

    out = {1: "", 2: ""}
    f = io.BytesIO(data)
    while f.tell() < len(data):
        tag = _varint(f)
        number, wire = tag >> 3, tag & 7
        if wire != 2:
            raise _NotOnnx(f"a metadata entry has field {number} of wire type {wire}")
        n = _varint(f)
        value = f.read(n)
        if len(value) != n:
            raise _NotOnnx("a metadata entry runs past its end")
        if number in out:
            try:
                out[number] = value.decode("utf-8")
            except UnicodeDecodeError:
                raise _NotOnnx("a metadata entry is not UTF-8") from None
    return out[1], out[2]


def _scan_onnx(path: Path) -> list[tuple[str, str]]:
    """Walk the top level of an ONNX file (seeking past the graph); return its ``metadata_props``."""
    size = path.stat().st_size
    seen: set[int] = set()
    props: list[tuple[str, str]] = []
    with open(path, "rb") as f:
        while f.tell() < size:
            tag = _varint(f)
            number, wire = tag >> 3, tag & 7
            if number == 0 or wire not in (0, 1, 2, 5) or _MODEL_FIELDS.get(number, wire) != wire:
                raise _NotOnnx(f"byte {f.tell()} holds field {number} of wire type {wire}, which an ONNX model does not have")
            if wire == 0:
                _varint(f)
            elif wire in (1, 5):
                f.seek(8 if wire == 1 else 4, os.SEEK_CUR)
            else:
                n = _varint(f)
                if f.tell() + n > size:
                    raise _NotOnnx(f"field {number} claims {n} bytes at byte {f.tell()}, past the end ({size} bytes): truncated?")
                if number == _METADATA_PROPS:
                    props.append(_string_pair(f.read(n)))
                else:
                    f.seek(n, os.SEEK_CUR)
            if f.tell() > size:
                raise _NotOnnx(f"field {number} runs past the end ({size} bytes): truncated?")
            seen.add(number)
    if _IR_VERSION not in seen or _GRAPH not in seen:
        raise _NotOnnx("it has no " + ("ir_version" if _IR_VERSION not in seen else "graph"))
    return props


def _zip_names(path: Path) -> list[str]:
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.namelist()
    except Exception as e:  # noqa: BLE001  (zipfile raises several types for damaged archives)
        raise FileFormatError(f"could not read {path}: it starts as a zip archive (a torch file) but is truncated or corrupt ({type(e).__name__}: {e})") from None


def _is_torchscript(names: list[str]) -> bool:
    return any("/code/" in n or n.endswith("/constants.pkl") for n in names)


def container_of(path: str | os.PathLike) -> str:
    """``"torch"``, ``"torchscript"`` or ``"onnx"``, from the file's bytes (cheap: no model is loaded).

    Args:
        path: an existing file.

    Raises:
        FileFormatError: the bytes are none of them (the message names the file and why).
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise WeightsError(f"could not open {path}: {e}") from None
    if head.startswith(TORCH_ZIP_MAGIC):
        return "torchscript" if _is_torchscript(_zip_names(path)) else "torch"
    if head.startswith(TORCH_LEGACY_MAGIC):
        return "torch"
    try:
        _scan_onnx(path)
    except _NotOnnx as e:
        # Where the ONNX scan failed helps with a .onnx file; for anything else it is noise.
        detail = f" ({e})" if path.suffix.lower() == ".onnx" else ""
        raise FileFormatError(
            f"could not read {path} as a model file: its {path.stat().st_size} bytes start with {head.hex() or 'nothing'}, "
            f"which is neither a torch file (a zip archive or a pickle) nor an ONNX model{detail}"
        ) from None
    return "onnx"


def kind_of(obj: Any) -> str | None:
    """The kind of a loaded torch file's content (``KINDS``), or ``None`` when it is none of them.

    Args:
        obj: what ``torch.load`` returned.
    """
    if not isinstance(obj, Mapping):
        return None
    keys = set(obj)
    for kind, required in _KEYED_KINDS:
        if keys.issuperset(required):
            return kind
    try:
        normalize_state_dict(obj)
    except WeightsError:
        return None
    return "state_dict"


def read_torch_file(path: str | os.PathLike) -> Any:
    """Read a ``torch.save`` file as data (``weights_only=True``); an exported file is refused, saying what it is.

    Args:
        path: the file.

    Raises:
        WeightsError: the file is missing.
        FileFormatError: its bytes are not a torch checkpoint (an exported file, junk,
            truncated, pickled code).
    """
    path = Path(path)
    if path.is_file():
        try:
            container: str | None = container_of(path)
        except FileFormatError:
            container = None  # not a model file at all: read_checkpoint says why in a checkpoint's terms
        if container not in (None, "torch"):
            raise FileFormatError(f"{path} is {_DESCRIBED[container]}, not a PyTorch checkpoint; run it with detection.load_exported (--runtime)")
    return read_checkpoint(path)


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
        return dict(_scan_onnx(path))
    except _NotOnnx as e:
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
    """The ``resfpn.*`` metadata of an exported detector (ONNX or TorchScript), checked to be one.

    Args:
        path: a file from ``tools/export.py``.

    Returns:
        ``{key without "resfpn.": decoded value}``, with at least ``outputs``.

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
    if not isinstance(outputs, list) or not {"boxes", "labels", "scores"} <= set(outputs):
        how = "tools/export.py --format torchscript" if container == "torchscript" else "tools/export.py"
        raise FileFormatError(f"{path} is not a detector exported by resfpn (no resfpn.* metadata naming its outputs): export one with {how}")
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
        raise FileFormatError(f"{path} is a torch file but not one this project reads (found {found}): see detection.files.KINDS")
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
