"""What every exported file shares, whatever model it holds: its ``resfpn.*`` metadata, the opsets, the export error.

An exported ONNX file carries its metadata in ``metadata_props`` (``set_metadata``,
``read_metadata``), a TorchScript file in its ``resfpn.json`` entry (``write_torchscript``);
``deploy.files.decode_metadata`` decodes either. The keys each model kind records are its
exporter's (``deploy.detector``, ``deploy.segmenter``); ``deploy.export`` picks the exporter
by the model's kind. This module imports neither, so both build on it alone.

Export uses torch's TorchScript-based exporter (``dynamo=False``): the dynamo exporter
does not handle torchvision's detectors. Opset 16 or newer is required: its
``RoiAlign`` states its coordinate mode (``output_half_pixel`` for torchvision's
poolers, ``half_pixel`` for aligned ones), which older opsets leave implicit.
"""

import importlib
import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .files import decode_metadata, publish, read_onnx_metadata, temporary_folder

__all__ = [
    "DEFAULT_OPSET",
    "MAX_OPSET",
    "METADATA_VERSION",
    "MIN_OPSET",
    "ExportError",
    "check_opset",
    "max_opset",
    "read_metadata",
    "require",
    "set_metadata",
    "write_torchscript",
]

MIN_OPSET = 16
MAX_OPSET = 20
DEFAULT_OPSET = 17
METADATA_VERSION = "1"


class ExportError(ValueError):
    """An export that cannot be done as asked; the message says what to pass or install."""


def require(module: str, extra: str = "deploy") -> Any:
    """Import an optional dependency of export, or raise ``ExportError`` saying what to install.

    Args:
        module: the module to import (``"onnx"``, ``"onnxruntime.quantization"``, ``"nncf"``).
        extra: the project's optional-dependency group that brings it.
    """
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ExportError(f"{module} is not installed: pip install {module.split('.')[0]} (or pip install -e '.[{extra}]')") from None


def max_opset() -> int:
    """The newest opset torch's TorchScript-based exporter writes (``MAX_OPSET`` where torch does not say)."""
    try:
        from torch.onnx._constants import ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET

        return int(ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET)
    except ImportError:  # pragma: no cover - older torch
        return MAX_OPSET


def check_opset(opset: int) -> int:
    """Return ``opset`` if the exporter can write it and it carries RoIAlign's coordinate mode.

    Args:
        opset: ONNX opset version.

    Raises:
        ExportError: not an integer in ``[MIN_OPSET, max_opset()]``.
    """
    top = max_opset()
    if not isinstance(opset, int) or isinstance(opset, bool) or not MIN_OPSET <= opset <= top:
        raise ExportError(
            f"opset must be an integer in [{MIN_OPSET}, {top}], got {opset!r}: opset {MIN_OPSET} is the first whose "
            f"RoiAlign states its coordinate mode (aligned or not), which the R-CNN poolers need; pass --opset {DEFAULT_OPSET}"
        )
    return opset


def set_metadata(proto: Any, metadata: Mapping[str, str]) -> None:
    """Write ``metadata`` into an ONNX ``ModelProto``'s ``metadata_props``, replacing entries of the same keys.

    Args:
        proto: an ``onnx.ModelProto``.
        metadata: ``{"resfpn.<key>": string value}``.
    """
    kept = [p for p in proto.metadata_props if p.key not in metadata]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value


def read_metadata(path: "str | os.PathLike[str]") -> dict[str, Any]:
    """The ``resfpn.*`` metadata of an exported ONNX file, JSON values decoded (the graph is not loaded).

    Args:
        path: an ``.onnx`` file written by ``export_onnx`` or ``quantize_onnx``.

    Returns:
        ``{key without the "resfpn." prefix: value}``; empty when the file has none.

    Raises:
        FileFormatError: the file is not an ONNX model.
    """
    return decode_metadata(read_onnx_metadata(path))


def write_torchscript(module: torch.nn.Module, output: "str | os.PathLike[str]", metadata: Mapping[str, str]) -> Path:
    """Script ``module`` with ``torch.jit.script`` and save it atomically, ``metadata`` in its ``resfpn.json`` entry.

    Args:
        module: what the file computes (a copy the caller may give away: scripting keeps it).
        output: destination ``.pt`` file.
        metadata: ``{"resfpn.<key>": string value}``.

    Returns:
        The output path.
    """
    output = Path(output)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.script's deprecation notice
        scripted = torch.jit.script(module)
    with temporary_folder(output) as tmp:
        final = tmp / "model.pt"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit.save's deprecation notice
            torch.jit.save(scripted, str(final), _extra_files={"resfpn.json": json.dumps(dict(metadata))})
        publish(final, output)
    return output
