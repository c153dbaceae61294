"""Classification data in the ImageFolder / ImageNet layout, and a shapes classification set.

Layout: ``ROOT/<split>/<class>/<image>``, e.g. ``ROOT/train/n01440764/x.JPEG`` and
``ROOT/val/n01440764/y.JPEG`` (torchvision's ``ImageFolder`` on each split). Class
folders are sorted by name and numbered from 0, as torchvision does; the training
split's classes are the label space and the validation split is read through them.

Policy for bad input (each case is tested):

- A missing split folder, or a split with no class folder: an error naming the folder.
- A split that defines the classes (the training split) with fewer than two class
  folders: an error naming the expected layout. A one-class "classifier" learns
  nothing (loss 0, top-1 100 %), and it is what a COCO root or a folder of images
  one level too high gives.
- A class folder that holds no image: an error naming it. Skipping it instead would
  renumber every class after it and change the classifier's size without a word.
- A validation class that the training split lacks: an error naming it (the model
  cannot predict a label it was never given). Training classes absent from the
  validation split are fine and logged.
- Files that are not images by their extension (``.txt``, ``.DS_Store``, ...) and files
  outside class folders: skipped when the folder is scanned, with one warning per
  split that counts them and names a few. Hidden folders (``.ipynb_checkpoints``)
  are not classes.
- An image file that cannot be decoded: skipped when read, as in
  :class:`~detection.data.coco.CocoDetection`: ``__getitem__`` returns the next
  readable sample instead, a warning names the file once, and
  :attr:`ImageFolder.num_skipped` counts the skips (shared by DataLoader workers).
- Grayscale, RGBA, palette and 16-bit images are converted to RGB uint8
  (:func:`~detection.data.coco.read_image_rgb`).

The built-in *shapes* classification set (:func:`generate_shapes_classification`) is
cut from scenes of the detection generator (:func:`engine.shapes.render_image`):
one crop around each object, labelled with its class, plus background patches that
hold no object, so a trunk pretrained on it has seen the detection data's own pixels.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import cv2
import numpy as np
import torch

from engine import shapes
from engine.images import IMAGENET_MEAN, IMAGENET_STD, read_image_rgb
from engine.datasets import DataPathError, cache_root, generate_atomically
from engine.skips import SkippingDataset

__all__ = [
    "BACKGROUND_CLASS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMG_EXTENSIONS",
    "ImageFolder",
    "ImageFolderError",
    "build_cls_transform",
    "generate_shapes_classification",
    "prepare_cls_data_root",
    "shapes_cls_cache_dir",
]

logger = logging.getLogger(__name__)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's
BACKGROUND_CLASS = "background"


class ImageFolderError(DataPathError):
    """A classification folder that cannot be used; the message names the folder or class."""


def _scan(split_dir: Path) -> tuple[list[str], dict[str, list[str]], list[str]]:
    """``(classes, {class: sorted image paths}, ignored files)`` of one split folder."""
    if not split_dir.is_dir():
        raise ImageFolderError(f"image folder {split_dir} not found (expected {split_dir}/<class>/<image>)")
    classes: list[str] = []
    ignored: list[str] = []
    for entry in sorted(os.scandir(split_dir), key=lambda e: e.name):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            classes.append(entry.name)
        else:
            ignored.append(entry.path)
    if not classes:
        raise ImageFolderError(f"{split_dir} holds no class folder (expected {split_dir}/<class>/<image>)")
    files: dict[str, list[str]] = {}
    for name in classes:
        images = []
        for root, dirs, names in os.walk(split_dir / name, followlinks=True):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for fname in sorted(names):
                path = os.path.join(root, fname)
                if fname.lower().endswith(IMG_EXTENSIONS):
                    images.append(path)
                elif not fname.startswith("."):
                    ignored.append(path)
        files[name] = images
    return classes, files, ignored


def _too_few_classes(root: Path, split: str, found: list[str]) -> str:
    what = f"one class folder ({found[0]!r})" if found else "no class folder"
    coco = (root / "annotations").is_dir()
    hint = (f"; {root} looks like a COCO detection root (it has annotations/): train a detector on it with tools/train_det.py"
            if coco else "")
    return (
        f"{root / split} holds {what}; a classifier needs at least two. Expected layout: {root}/{split}/<class>/<image> "
        f"with one folder per class, e.g. {root}/{split}/cat/1.jpg and {root}/{split}/dog/2.jpg (and the same classes "
        f"under {root}/val/){hint}"
    )


class ImageFolder(SkippingDataset):
    """One split of an ImageFolder tree; items are ``(image, label)``.

    Args:
        root: the data folder (``root/<split>/<class>/<image>``).
        split: the split folder name (``"train"``, ``"val"``).
        transform: applied to the CHW uint8 image tensor; ``None`` returns it as is.
        classes: the label order, from the training split; ``None`` uses this
            split's own sorted class folders. A class folder here that is not in
            ``classes`` is an error.
        quiet: do not log the skipped files (a check before the real run).

    Attributes:
        classes: class names in label order.
        class_to_idx: name -> label.
        samples: ``(path, label)`` per image, sorted by class then path.
        num_ignored: files skipped at the scan (not images, or outside class folders).

    Raises:
        ImageFolderError: missing folder, no class folder, fewer than two class
            folders where this split defines the classes, an empty class folder, or a
            class that ``classes`` lacks.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str,
        *,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        classes: Sequence[str] | None = None,
        quiet: bool = False,
    ) -> None:
        self.root, self.split, self.transform = Path(root), split, transform
        self.split_dir = self.root / split
        found, files, ignored = _scan(self.split_dir)
        empty = [name for name in found if not files[name]]
        if empty:
            raise ImageFolderError(
                f"class folder {self.split_dir / empty[0]} holds no image (extensions {', '.join(IMG_EXTENSIONS)})"
                + (f"; also empty: {', '.join(empty[1:6])}" if len(empty) > 1 else "")
                + "; add images or remove the folder"
            )
        if classes is None and len(found) < 2:
            raise ImageFolderError(_too_few_classes(self.root, split, found))
        self.classes = list(classes) if classes is not None else found
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        unknown = [name for name in found if name not in self.class_to_idx]
        if unknown:
            raise ImageFolderError(
                f"class {unknown[0]!r} of {self.split_dir} is not a class of the training data "
                f"({len(self.classes)} classes: {', '.join(self.classes[:8])}{', ...' if len(self.classes) > 8 else ''})"
                + (f"; nor are {', '.join(map(repr, unknown[1:6]))}" if len(unknown) > 1 else "")
            )
        self.samples = [(path, self.class_to_idx[name]) for name in found for path in files[name]]
        self.num_ignored = len(ignored)
        if ignored and not quiet:
            shown = ", ".join(ignored[:3]) + (f", ... (+{len(ignored) - 3})" if len(ignored) > 3 else "")
            logger.warning("%s: skipped %d files that are not images in class folders: %s", self.split_dir, len(ignored), shown)
        self.missing_classes = [name for name in self.classes if name not in files]
        self._init_skips(len(self.samples))

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def targets(self) -> list[int]:
        """The label of every sample, in order."""
        return [label for _, label in self.samples]

    def _read(self, index: int) -> torch.Tensor | None:
        path = self.samples[index][0]
        try:
            image = read_image_rgb(path)
        # PIL raises many exception types for corrupt files; any failure to decode means bad input.
        except Exception as exc:  # noqa: BLE001
            self._record_bad(index, "missing image file" if isinstance(exc, FileNotFoundError) else "unreadable image")
            logger.warning("skipping image %s: %s: %s", path, type(exc).__name__, exc)
            return None
        return torch.from_numpy(np.array(image)).permute(2, 0, 1)  # a writable copy of PIL's read-only buffer

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        i, image = self._first_readable(index)
        return (self.transform(image) if self.transform is not None else image), self.samples[i][1]

    def _nothing_readable(self) -> str:
        return f"no readable image in {self.split_dir}: all {len(self.samples)} files failed to load"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={str(self.root)!r}, split={self.split!r}, images={len(getattr(self, 'samples', []))})"


def build_cls_transform(
    train: bool,
    *,
    crop_size: int,
    resize_size: int | None = None,
    crop_scale: Sequence[float] = (0.08, 1.0),
    hflip: bool = True,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """torchvision's classification presets, on CHW uint8 tensors (``transforms.v2``).

    Training: ``RandomResizedCrop(crop_size, scale=crop_scale)`` and a horizontal flip.
    Evaluation: resize the shorter side to ``resize_size``, centre-crop ``crop_size``
    (256 / 224 for ImageNet, what torchvision's published accuracies use). Both end
    in float32 normalised with ``mean`` / ``std``.

    Args:
        train: the training or the evaluation transform.
        crop_size: output side in pixels.
        resize_size: evaluation only: the shorter side before the crop (default
            ``crop_size * 256 / 224``).
        crop_scale: training only: the area fraction range of the random crop.
        hflip: training only: random horizontal flips.
        mean: per-channel mean of [0, 1] pixels.
        std: per-channel standard deviation.
    """
    from torchvision.transforms import v2

    if train:
        steps: list[Any] = [v2.RandomResizedCrop(crop_size, scale=tuple(crop_scale), antialias=True)]
        if hflip:
            steps.append(v2.RandomHorizontalFlip())
    else:
        resize = resize_size if resize_size is not None else int(round(crop_size * 256 / 224))
        steps = [v2.Resize(resize, antialias=True), v2.CenterCrop(crop_size)]
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    return v2.Compose(steps)


# ---------------------------------------------------------------------------------------------
# The shapes classification set

_SPLIT_CODES = {"train": 0, "val": 1}
_MIN_OBJECT_SIDE = 10  # px; smaller objects would be upscaled into blur
_BACKGROUND_TRIES = 30


def _square_crop(image: np.ndarray, cx: float, cy: float, side: float, out: int) -> np.ndarray:
    height, width = image.shape[:2]
    side = int(round(min(max(side, 8.0), height, width)))
    x0 = int(round(min(max(cx - side / 2, 0), width - side)))
    y0 = int(round(min(max(cy - side / 2, 0), height - side)))
    crop = image[y0 : y0 + side, x0 : x0 + side]
    interpolation = cv2.INTER_AREA if side > out else cv2.INTER_LINEAR
    return cv2.resize(crop, (out, out), interpolation=interpolation)


def _background_window(rng: np.random.Generator, height: int, width: int, boxes: list[list[float]]) -> tuple[float, float, float] | None:
    """A square window ``(cx, cy, side)`` that holds no object's pixels to speak of, or ``None``."""
    for _ in range(_BACKGROUND_TRIES):
        side = float(rng.uniform(16, 0.6 * min(height, width)))
        x0, y0 = rng.uniform(0, width - side), rng.uniform(0, height - side)
        clear = True
        for bx, by, bw, bh in boxes:
            iw = max(0.0, min(x0 + side, bx + bw) - max(x0, bx))
            ih = max(0.0, min(y0 + side, by + bh) - max(y0, by))
            if iw * ih > 0.1 * bw * bh or iw * ih > 0.1 * side * side:
                clear = False
                break
        if clear:
            return x0 + side / 2, y0 + side / 2, side
    return None


def _write_cls_split(root: Path, split: str, scenes: int, image_size: int, crop_size: int, seed: int) -> dict[str, int]:
    counts = dict.fromkeys([BACKGROUND_CLASS, *shapes.SHAPES_CLASSES], 0)
    short = int(round(0.75 * image_size))
    for index in range(scenes):
        rng = np.random.default_rng([seed, _SPLIT_CODES[split], index])
        height, width = [(image_size, image_size), (short, image_size), (image_size, short)][int(rng.integers(3))]
        image, objects = shapes.render_image(rng, height, width)
        crops: list[tuple[str, np.ndarray]] = []
        boxes = [obj["bbox"] for obj in objects]
        for obj in objects:
            x, y, w, h = obj["bbox"]
            if max(w, h) < _MIN_OBJECT_SIDE:
                continue
            side = max(w, h) * float(rng.uniform(1.15, 1.5))
            crops.append((shapes.SHAPES_CLASSES[obj["category_id"] - 1], _square_crop(image, x + w / 2, y + h / 2, side, crop_size)))
        window = _background_window(rng, height, width, boxes)
        if window is not None:
            crops.append((BACKGROUND_CLASS, _square_crop(image, *window, crop_size)))
        for k, (name, crop) in enumerate(crops):
            ok, encoded = cv2.imencode(".jpg", crop[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, shapes.JPEG_QUALITY])
            if not ok:
                raise RuntimeError(f"JPEG encoding failed for scene {index} of {split}")
            # Folders appear with their first crop: a tiny split may lack a class, never hold an empty folder.
            (root / split / name).mkdir(parents=True, exist_ok=True)
            (root / split / name / f"{index:06d}_{k}.jpg").write_bytes(encoded.tobytes())
            counts[name] += 1
    return counts


def generate_shapes_classification(
    out_dir: str | os.PathLike,
    *,
    num_train: int = 2000,
    num_val: int = 300,
    image_size: int = 128,
    crop_size: int = 64,
    seed: int = 1,
) -> dict[str, dict[str, int]]:
    """Write a shapes classification set in the ImageFolder layout.

    Scenes come from the detection generator (``shapes.render_image``, the same
    textures, colours, noise and occlusion); each object at least 10 px across gives
    one square crop around it (1.15-1.5 x its longer side) labelled with its class,
    and each scene one ``background`` crop that overlaps no object by more than
    10 %. Crops are resized to ``crop_size`` and written as JPEG to
    ``out_dir/{train,val}/<class>/``. Deterministic: one seed gives identical files.

    Args:
        out_dir: folder to write into.
        num_train: training scenes (each gives about 4 crops).
        num_val: validation scenes.
        image_size: the scenes' long side (128: the shapes detection recipe's size).
        crop_size: side of the written crops.
        seed: scene seed; the detection set uses 0, so the default 1 shares no scene with it.

    Returns:
        ``{split: {class: count}}``.
    """
    if image_size < 64:
        raise ValueError(f"image_size must be at least 64 pixels, got {image_size}")
    if crop_size < 16:
        raise ValueError(f"crop_size must be at least 16 pixels, got {crop_size}")
    root = Path(out_dir)
    return {split: _write_cls_split(root, split, n, image_size, crop_size, seed) for split, n in (("train", num_train), ("val", num_val))}


def shapes_cls_cache_dir(cfg: dict[str, Any]) -> Path:
    """Where the built-in shapes classification set for ``cfg`` is generated (``$RESFPN_CACHE`` or ~/.cache/resfpn).

    Args:
        cfg: a config with the ``shapes_*`` keys of the classification schema.
    """
    base = cache_root()
    name = f"shapes-cls-{cfg['shapes_size']}px-{cfg['shapes_crop_size']}-{cfg['shapes_train']}-{cfg['shapes_val']}-seed{cfg['shapes_seed']}"
    return base / name


def prepare_cls_data_root(cfg: dict[str, Any], *, is_main: bool = True, barrier: Callable[[], None] = lambda: None) -> Path:
    """The data folder of a run: ``cfg["data_path"]``, or the shapes classification set, generated once.

    Args:
        cfg: the run's config (``data_path`` and the ``shapes_*`` keys).
        is_main: this process generates the data set (rank 0 under ``torchrun``).
        barrier: waits for every process (so other ranks read a finished data set).

    Raises:
        ImageFolderError: ``data_path`` does not exist.
    """
    if cfg["data_path"] is not None:
        root = Path(cfg["data_path"])
        if not root.is_dir():
            raise ImageFolderError(f"data path {root} does not exist (expected ROOT/train/<class>/<image> and ROOT/val/<class>/<image>)")
        return root
    root = shapes_cls_cache_dir(cfg)
    if is_main and not (root / "val").is_dir():
        logger.info("generating the shapes classification set in %s", root)
        generate_atomically(root, lambda tmp: generate_shapes_classification(
            tmp, num_train=cfg["shapes_train"], num_val=cfg["shapes_val"], image_size=cfg["shapes_size"],
            crop_size=cfg["shapes_crop_size"], seed=cfg["shapes_seed"]))
    barrier()
    return root
