"""Model files at the level of bytes: writing them so a kill loses nothing, and telling what container one is.

Writes: every file this project writes for a model or a run (checkpoints, exported
models, ``metrics.jsonl`` rewrites) goes through ``atomic_write``: a temporary file in the
same folder, then ``os.replace``, atomic within one file system, so a reader sees the
previous file or the new one, never a mix.

Reads: ``container_of`` tells from the first bytes whether a file is a ``torch.save``
file (a zip, or a legacy pickle), a TorchScript archive (a zip holding ``code/``) or an
ONNX ``ModelProto`` (a protobuf with an ``ir_version`` and a ``graph`` that ends where
the file ends, scanned at the top level only); ``read_torch_file`` reads a checkpoint as
data and refuses an exported file by name. Every reader raises
``backbones.weights.FileFormatError`` naming the file for bytes it cannot use. What a
file holds beyond its container (a detector, a classifier) is ``deploy.files``'s.
"""

from __future__ import annotations

import io
import os
import tempfile
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import torch

from backbones.weights import TORCH_LEGACY_MAGIC, TORCH_ZIP_MAGIC, FileFormatError, WeightsError, read_checkpoint

__all__ = [
    "CONTAINERS",
    "FORMAT_VERSION",
    "CheckpointError",
    "NotOnnx",
    "atomic_save",
    "atomic_write",
    "atomic_write_text",
    "check_keys",
    "container_of",
    "file_mode",
    "is_torchscript_archive",
    "read_torch_file",
    "scan_onnx",
    "source_name",
    "unwrap",
    "zip_names",
]

FORMAT_VERSION = 1  # of every training-state and model file the tasks write

CONTAINERS = ("torch", "torchscript", "onnx")
_DESCRIBED = {
    "torch": "a PyTorch checkpoint (model_final.pth / checkpoint.pth from a training tool)",
    "onnx": "an exported ONNX file (tools/export.py)",
    "torchscript": "a TorchScript file (tools/export.py --format torchscript)",
}


def file_mode() -> int:
    """The mode ``open()`` would give a new file: 0666 less the umask (``mkstemp`` makes 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> Path:
    """Call ``write`` on a temporary file beside ``path``, then rename it over ``path``.

    Args:
        path: destination file (its folder is created).
        write: writes the whole content to the binary file it is given.

    Returns:
        The destination path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` ``obj`` (tensors and plain containers, so it loads with ``weights_only=True``) atomically.

    Args:
        obj: what to save.
        path: destination file.
    """
    return atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically.

    Args:
        path: destination file.
        text: its whole new content.
    """
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


# ---------------------------------------------------------------------------------------------
# What container a file is


class NotOnnx(Exception):
    """The bytes do not scan as an ONNX ModelProto; the reason is the message."""


def _varint(f: BinaryIO) -> int:
    value = shift = 0
    for _ in range(10):
        byte = f.read(1)
        if not byte:
            raise NotOnnx("it ends inside a protobuf number")
        value |= (byte[0] & 0x7F) << shift
        if not byte[0] & 0x80:
            return value
        shift += 7
    raise NotOnnx("a protobuf number runs over 10 bytes")


# ModelProto's top-level fields and their wire types (onnx.proto): 0 varint, 2 length-delimited.
_MODEL_FIELDS = {1: 0, 2: 2, 3: 2, 4: 2, 5: 0, 6: 2, 7: 2, 8: 2, 14: 2, 20: 2, 25: 2, 26: 2}
_IR_VERSION, _GRAPH, _METADATA_PROPS = 1, 7, 14


def _string_pair(data: bytes) -> tuple[str, str]:
    """A ``StringStringEntryProto`` (1: key, 2: value)."""
    out = {1: "", 2: ""}
    f = io.BytesIO(data)
    while f.tell() < len(data):
        tag = _varint(f)
        number, wire = tag >> 3, tag & 7
        if wire != 2:
            raise NotOnnx(f"a metadata entry has field {number} of wire type {wire}")
        n = _varint(f)
        value = f.read(n)
        if len(value) != n:
            raise NotOnnx("a metadata entry runs past its end")
        if number in out:
            try:
                out[number] = value.decode("utf-8")
            except UnicodeDecodeError:
                raise NotOnnx("a metadata entry is not UTF-8") from None
    return out[1], out[2]


def scan_onnx(path: Path) -> list[tuple[str, str]]:
    """Walk the top level of an ONNX file (seeking past the graph); return its ``metadata_props``.

    Args:
        path: the file.

    Raises:
        NotOnnx: the bytes are not an ONNX ``ModelProto`` (the message says where and why).
    """
    size = path.stat().st_size
    seen: set[int] = set()
    props: list[tuple[str, str]] = []
    with open(path, "rb") as f:
        while f.tell() < size:
            tag = _varint(f)
            number, wire = tag >> 3, tag & 7
            if number == 0 or wire not in (0, 1, 2, 5) or _MODEL_FIELDS.get(number, wire) != wire:
                raise NotOnnx(f"byte {f.tell()} holds field {number} of wire type {wire}, which an ONNX model does not have")
            if wire == 0:
                _varint(f)
            elif wire in (1, 5):
                f.seek(8 if wire == 1 else 4, os.SEEK_CUR)
            else:
                n = _varint(f)
                if f.tell() + n > size:
                    raise NotOnnx(f"field {number} claims {n} bytes at byte {f.tell()}, past the end ({size} bytes): truncated?")
                if number == _METADATA_PROPS:
                    props.append(_string_pair(f.read(n)))
                else:
                    f.seek(n, os.SEEK_CUR)
            if f.tell() > size:
                raise NotOnnx(f"field {number} runs past the end ({size} bytes): truncated?")
            seen.add(number)
    if _IR_VERSION not in seen or _GRAPH not in seen:
        raise NotOnnx("it has no " + ("ir_version" if _IR_VERSION not in seen else "graph"))
    return props


def zip_names(path: Path) -> list[str]:
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.namelist()
    except Exception as e:  # noqa: BLE001  (zipfile raises several types for damaged archives)
        raise FileFormatError(f"could not read {path}: it starts as a zip archive (a torch file) but is truncated or corrupt ({type(e).__name__}: {e})") from None


def is_torchscript_archive(names: list[str]) -> bool:
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
        return "torchscript" if is_torchscript_archive(zip_names(path)) else "torch"
    if head.startswith(TORCH_LEGACY_MAGIC):
        return "torch"
    try:
        scan_onnx(path)
    except NotOnnx as e:
        # Where the ONNX scan failed helps with a .onnx file; for anything else it is noise.
        detail = f" ({e})" if path.suffix.lower() == ".onnx" else ""
        raise FileFormatError(
            f"could not read {path} as a model file: its {path.stat().st_size} bytes start with {head.hex() or 'nothing'}, "
            f"which is neither a torch file (a zip archive or a pickle) nor an ONNX model{detail}"
        ) from None
    return "onnx"


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
            raise FileFormatError(f"{path} is {_DESCRIBED[container]}, not a PyTorch checkpoint; run it with deploy.load_exported (--runtime)")
    return read_checkpoint(path)


# ---------------------------------------------------------------------------------------------
# What every task's checkpoint reader shares


class CheckpointError(FileFormatError):
    """A checkpoint file that is readable but is not what was asked for (or does not rebuild its model)."""


def unwrap(model: Any) -> Any:
    """The model inside a DDP (or ``AveragedModel``) wrapper, or the model itself."""
    return getattr(model, "module", model)


def source_name(source: Any) -> str:
    """A checkpoint's name for messages: its path, or "an in-memory checkpoint"."""
    return "an in-memory checkpoint" if isinstance(source, Mapping) else str(source)


def check_keys(ckpt: Any, keys: tuple[str, ...], what: str, source: Any) -> Mapping[str, Any]:
    """``ckpt`` if it is a mapping holding every key in ``keys``, else ``CheckpointError`` naming what lacks.

    Args:
        ckpt: what ``torch.load`` returned.
        keys: the keys a ``what`` must hold.
        what: the kind of file wanted, for the message (e.g. "training checkpoint (...)").
        source: its path or the mapping, for the message.
    """
    if not isinstance(ckpt, Mapping) or any(k not in ckpt for k in keys):
        found = sorted(map(str, ckpt))[:10] if isinstance(ckpt, Mapping) else type(ckpt).__name__
        missing = [k for k in keys if not isinstance(ckpt, Mapping) or k not in ckpt]
        raise CheckpointError(f"{source_name(source)} is not a {what}: it lacks {missing} (found {found})")
    return ckpt
