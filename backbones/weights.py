"""Loading ImageNet and other checkpoints into the ResNet trunk.

A checkpoint is data, never code: every file goes through
``torch.load(..., weights_only=True)``. Keys are normalised from the layouts people
actually have on disk (torchvision files, training checkpoints that wrap them, DDP and
detector prefixes, tutorial code's ``shortcut`` naming) and the result is reported key
by key, so a silent partial load cannot happen.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import torch
from torch import Tensor, nn

__all__ = [
    "IMAGENET_WEIGHTS",
    "ImageNetWeights",
    "FileFormatError",
    "LoadReport",
    "TORCH_LEGACY_MAGIC",
    "TORCH_ZIP_MAGIC",
    "WeightsError",
    "check_weights",
    "imagenet_cache_path",
    "imagenet_file",
    "load_pretrained",
    "normalize_state_dict",
    "read_checkpoint",
]

log = logging.getLogger(__name__)

Source = Union[str, os.PathLike, Mapping[str, Any]]


class WeightsError(ValueError):
    """A checkpoint could not be found, trusted or matched to the model."""


class FileFormatError(WeightsError):
    """A file whose bytes are not what its loader reads (junk, truncated, another format); the message names the file.

    Every loader of the project raises it (or a subclass) for any bytes it cannot use,
    whatever went wrong inside the reader: the read is wrapped, not its exception types.
    """


# What a torch.save file starts with: a zip archive (torch >= 1.6), or, in the legacy format, a
# pickle (protocol 2 or newer: the PROTO opcode).
TORCH_ZIP_MAGIC = b"PK\x03\x04"
TORCH_LEGACY_MAGIC = b"\x80"


@dataclass(frozen=True)
class ImageNetWeights:
    """torchvision's official ImageNet-1k weights for one depth (``IMAGENET1K_V1``).

    Args:
        depth: ResNet depth.
        file_name: file name in the torch hub cache; its suffix is a sha256 prefix.
        url: where torchvision publishes the file.
        acc_top1: ImageNet-1k top-1 accuracy reported by torchvision.
        acc_top5: ImageNet-1k top-5 accuracy reported by torchvision.
    """

    depth: int
    file_name: str
    url: str
    acc_top1: float
    acc_top5: float


IMAGENET_WEIGHTS: dict[int, ImageNetWeights] = {
    18: ImageNetWeights(18, "resnet18-f37072fd.pth", "https://download.pytorch.org/models/resnet18-f37072fd.pth", 69.758, 89.078),
    34: ImageNetWeights(34, "resnet34-b627a593.pth", "https://download.pytorch.org/models/resnet34-b627a593.pth", 73.314, 91.420),
}

# torch.hub's own convention: "name-<sha256 prefix>.ext".
_HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,64})\.[A-Za-z0-9]+$")
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "net")
_PREFIXES = ("module.", "backbone.body.", "backbone.", "body.", "encoder.")


@dataclass
class LoadReport:
    """What ``load_pretrained`` did, key by key.

    Args:
        source: a human-readable name of what was loaded.
        loaded: model keys that received a tensor.
        missing: model keys the checkpoint did not provide.
        unexpected: checkpoint keys the model does not have.
        mismatched: ``(key, checkpoint_shape, model_shape)`` for keys whose shapes differ.
        skipped: keys deliberately left out (a classifier with another class count).
    """

    source: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when nothing was missing, unexpected or mismatched (skips are fine)."""
        return not (self.missing or self.unexpected or self.mismatched)

    def __str__(self) -> str:
        def sample(keys: list[str]) -> str:
            return ", ".join(keys[:4]) + (f", ... (+{len(keys) - 4})" if len(keys) > 4 else "")

        lines = [f"loaded {len(self.loaded)} tensors from {self.source}"]
        if self.skipped:
            lines.append(f"  skipped {len(self.skipped)} (classifier with another class count): {sample(self.skipped)}")
        if self.missing:
            lines.append(f"  missing {len(self.missing)}: {sample(self.missing)}")
        if self.unexpected:
            lines.append(f"  unexpected {len(self.unexpected)}: {sample(self.unexpected)}")
        if self.mismatched:
            shown = [f"{k} {list(a)} vs model {list(b)}" for k, a, b in self.mismatched[:4]]
            lines.append(f"  shape-mismatched {len(self.mismatched)}: " + "; ".join(shown))
        return "\n".join(lines)


def imagenet_cache_path(depth: int) -> Path:
    """Where torch hub keeps torchvision's ImageNet file for ``depth`` (honours ``TORCH_HOME``)."""
    if depth not in IMAGENET_WEIGHTS:
        raise WeightsError(f"no ImageNet weights for depth {depth}; available: {sorted(IMAGENET_WEIGHTS)}")
    return Path(torch.hub.get_dir()) / "checkpoints" / IMAGENET_WEIGHTS[depth].file_name


def _verify_hash(path: Path) -> None:
    match = _HASH_IN_NAME.search(path.name)
    if match is None:
        return
    prefix = match.group(1)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    if not digest.hexdigest().startswith(prefix):
        raise WeightsError(
            f"{path} is corrupt: its name promises sha256 prefix {prefix} but the file hashes to "
            f"{digest.hexdigest()[:len(prefix)]}; delete it and fetch it again"
        )


def read_checkpoint(path: str | os.PathLike) -> Any:
    """Read a checkpoint file as data (never code), verifying a hash in its name.

    Args:
        path: a ``.pth``/``.pt`` file; a name like ``resnet18-f37072fd.pth`` is checked
            against that sha256 prefix.

    Returns:
        Whatever tensors/containers the file holds.

    Raises:
        WeightsError: the file is missing or its name's hash does not match.
        FileFormatError: its bytes are not a torch checkpoint of plain data (junk,
            truncated, another format, or pickled code that ``weights_only`` refused).
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"checkpoint file not found: {path}")
    _verify_hash(path)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise WeightsError(f"could not open {path}: {e}") from None
    if not head.startswith((TORCH_ZIP_MAGIC, TORCH_LEGACY_MAGIC)):
        size = path.stat().st_size
        raise FileFormatError(
            f"could not read {path} as a torch checkpoint: its {size} bytes start with {head.hex() or 'nothing'}, "
            "neither a torch.save zip archive (504b0304) nor a legacy torch file"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch words this differently across versions: "Unsupported global: GLOBAL x.y" (2.4-2.5),
        # "Trying to load unsupported GLOBAL x.y whose module x is blocked" (later).
        found = re.search(r"(?i)unsupported(?: global:)? (GLOBAL \S+)", str(e))
        if found:
            raise FileFormatError(
                f"refused to load {path}: it is not plain tensor data ({found.group(1)} "
                "would run code when unpickled; weights_only=True stopped it). Re-save it as a state dict."
            ) from None
        raise FileFormatError(f"could not read {path} as a torch checkpoint (corrupt or another format)") from None
    except Exception as e:  # noqa: BLE001  (whatever the reader raises, these bytes are not a checkpoint)
        raise FileFormatError(f"could not read {path} as a torch checkpoint (truncated or corrupt: {type(e).__name__}: {str(e)[:200]})") from None


def imagenet_file(depth: int, *, download: bool = True) -> Path:
    """torchvision's ImageNet file for ``depth``, from the hub cache or fetched into it.

    Tools call this before a run starts, so a missing file is an error before any work.

    Args:
        depth: 18 or 34.
        download: fetch the file when it is not cached.

    Raises:
        WeightsError: not cached and not fetched; the message names the file, its URL and the folder.
    """
    spec = IMAGENET_WEIGHTS[depth]
    path = imagenet_cache_path(depth)
    if path.is_file():
        return path
    how = (
        f"torchvision's ImageNet weights for ResNet-{depth} are not cached. Put {spec.file_name} "
        f"(from {spec.url}) in {path.parent} (or point TORCH_HOME at a folder whose "
        f"hub/checkpoints holds it)"
    )
    if not download:
        raise WeightsError(how + "; download=False, so nothing was fetched.")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(spec.url, str(path), hash_prefix=spec.file_name.split("-")[1][:8], progress=True)
    except Exception as e:  # network errors come as many types (URLError, OSError, ...)
        raise WeightsError(f"{how}; downloading failed: {e}") from None
    return path


def _unwrap(obj: Any) -> Mapping[str, Any]:
    for _ in range(3):
        if not isinstance(obj, Mapping):
            break
        if obj and all(isinstance(v, Tensor) for v in obj.values()):
            return obj
        inner = next((obj[k] for k in _WRAPPER_KEYS if k in obj and isinstance(obj[k], Mapping)), None)
        if inner is None:
            break
        obj = inner
    raise WeightsError(
        "checkpoint holds no state dict: expected a mapping of tensors, or one under "
        f"{list(_WRAPPER_KEYS)}; top-level keys: {list(obj)[:8] if isinstance(obj, Mapping) else type(obj).__name__}"
    )


def normalize_state_dict(state: Mapping[str, Any], model_keys: set[str] | None = None) -> dict[str, Tensor]:
    """Map a checkpoint's keys to torchvision's ResNet names.

    Unwraps ``state_dict``/``model`` containers, strips ``module.``, ``backbone.body.``
    and ``backbone.`` prefixes and renames tutorial code's ``shortcut.*`` to
    ``downsample.*``. A prefix is only stripped when doing so makes keys match
    ``model_keys`` (when given), so a checkpoint that is already right is untouched.

    Args:
        state: a state dict or a checkpoint wrapping one.
        model_keys: the target model's keys, used to choose among prefixes.

    Returns:
        A new dict with normalised keys.
    """
    sd = dict(_unwrap(state))

    def strip(d: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
        return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in d.items()}

    def score(d: dict[str, Tensor]) -> int:
        return len(model_keys & d.keys()) if model_keys is not None else 0

    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if any(k.startswith(prefix) for k in sd):
                candidate = strip(sd, prefix)
                if model_keys is None or score(candidate) > score(sd):
                    sd, changed = candidate, True
    renamed = {re.sub(r"\.shortcut\.", ".downsample.", k): v for k, v in sd.items()}
    return renamed


def _describe(source: Source) -> str:
    if isinstance(source, Mapping):
        return "an in-memory state dict"
    return str(source)


def _model_depth(model: nn.Module) -> int:
    layer3 = getattr(model, "layer3", None)
    blocks = len(layer3) if isinstance(layer3, nn.Sequential) else None
    for depth, layers in {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}.items():
        if blocks == layers[2]:
            return depth
    raise WeightsError(f"cannot tell the ResNet depth of {type(model).__name__}; pass a file or state dict instead of 'imagenet'")


def check_weights(weights: str | None, depth: int) -> None:
    """Before any work: the initial trunk weights a run names exist and are a trunk's (every task's preflight).

    Args:
        weights: ``None`` (random), ``"imagenet"`` (torchvision's file, found or fetched
            now) or a checkpoint path (read and its layout recognised now).
        depth: 18 or 34.

    Raises:
        WeightsError: the file is missing, unreadable, of an unknown layout, or a pruned
            detector (its narrowed trunk fits no standard ResNet).
    """
    if weights is None:
        return
    if weights == "imagenet":
        imagenet_file(depth)
        return
    ckpt = read_checkpoint(weights)
    if isinstance(ckpt, Mapping) and ckpt.get("channel_plan"):
        raise WeightsError(f"{weights} is a pruned detector: its trunk does not fit a standard resnet{depth}; "
                           f"fine-tune it with --init-checkpoint {weights} (tools/train_det.py) instead of using it as trunk weights")
    normalize_state_dict(ckpt)


def load_pretrained(model: nn.Module, source: Source, *, strict: bool = False, download: bool = True) -> LoadReport:
    """Load weights into a ResNet trunk and report what matched.

    Args:
        model: a ``backbones.ResNet`` (any module with torchvision's ResNet key names).
        source: ``"imagenet"`` (torchvision's official file for the model's depth, from
            the torch hub cache under ``TORCH_HOME``), a file path, or a state dict.
            Files may be torchvision state dicts, checkpoints wrapping one under
            ``state_dict``/``model``, with ``module.``/``backbone.body.``/``backbone.``
            prefixes, or tutorial code's ``shortcut.*`` naming.
        strict: raise unless every model key is loaded and nothing is left over (a
            classifier skipped for another class count is still allowed).
        download: for ``"imagenet"``, fetch the file into the cache when it is missing.

    Returns:
        A ``LoadReport``; ``str(report)`` summarises it in a few lines.
    """
    if isinstance(source, str) and source == "imagenet":
        depth = _model_depth(model)
        path = imagenet_file(depth, download=download)
        raw: Any = read_checkpoint(path)
        name = str(path)
    elif isinstance(source, Mapping):
        raw, name = source, _describe(source)
    elif isinstance(source, (str, os.PathLike)):
        raw, name = read_checkpoint(source), str(source)
    else:
        raise WeightsError(f"weights source must be 'imagenet', a file path or a state dict, got {type(source).__name__}")

    model_sd = model.state_dict()
    sd = normalize_state_dict(raw, set(model_sd))
    report = LoadReport(source=name)
    to_load: dict[str, Tensor] = {}
    fc_differs = any(k.startswith("fc.") and k in model_sd and v.shape != model_sd[k].shape for k, v in sd.items())
    for key, value in sd.items():
        if key not in model_sd:
            # FrozenBatchNorm2d has no counter; torchvision's file has one per BN.
            if not key.endswith("num_batches_tracked"):
                report.unexpected.append(key)
        elif fc_differs and key.startswith("fc."):
            report.skipped.append(key)
        elif tuple(value.shape) != tuple(model_sd[key].shape):
            report.mismatched.append((key, tuple(value.shape), tuple(model_sd[key].shape)))
        else:
            to_load[key] = value
            report.loaded.append(key)
    loaded_or_skipped = set(report.loaded) | set(report.skipped) | {k for k, *_ in report.mismatched}
    report.missing = [k for k in model_sd if k not in loaded_or_skipped and not k.endswith("num_batches_tracked")]

    trunk_keys = [k for k in model_sd if not k.startswith("fc.") and not k.endswith("num_batches_tracked")]
    if not any(k in to_load for k in trunk_keys):
        raise WeightsError(
            f"unrecognised checkpoint layout in {name}: none of its keys match the model. "
            f"Checkpoint keys: {sorted(sd)[:6]}; model keys: {trunk_keys[:6]}"
        )
    if strict and not report.ok:
        raise WeightsError(f"strict loading failed:\n{report}")
    model.load_state_dict(to_load, strict=False)
    log.info("%s", report)
    return report
