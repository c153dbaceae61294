"""What inference reads and where it writes: image files, whole folders of them, and the output folder.

Shared by the inference tools of every task (``tools/infer.py``, ``tools/infer_seg.py``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from engine.plots import save_image

__all__ = ["check_output_folder", "image_files", "left_out_note", "predict_files"]


def check_output_folder(out: Path, *, what: str = "output") -> None:
    """``out`` must be a folder or able to become one: no file at it or at any folder above it.

    Args:
        out: the folder a tool will write into.
        what: how messages name it (a tool passes its flag, e.g. ``"--output"``).

    Raises:
        ValueError: a file stands at ``out`` or above it (the message names it).
    """
    for path in (out, *out.parents):
        if path.exists():
            if not path.is_dir():
                where = "" if path == out else f" ({path} is a file)"
                raise ValueError(f"{what} {out} cannot be a folder{where}: pass a folder for the PNGs and detections.json")
            return


def image_files(src: Path, out_dir: Path, *, what: str = "input") -> tuple[list[tuple[Path, str]], list[str]]:
    """``(file, name)`` for every image under ``src`` by extension, subfolders included, and what was left out.

    ``name`` is the path relative to ``src`` (the file name for a single file). Hidden files and
    folders and the output folder (when it lies inside ``src``) are not walked.

    Args:
        src: an image file or a folder.
        out_dir: the tool's output folder (skipped when inside ``src``).
        what: how messages name ``src`` (a tool passes its flag, e.g. ``"--input"``).

    Raises:
        ValueError: ``src`` is a file PIL cannot open.
        FileNotFoundError: ``src`` does not exist, or holds no image.
    """
    from PIL import Image

    if src.is_file():
        try:
            with Image.open(src):
                pass
        except Exception as e:  # noqa: BLE001  (PIL raises several types for files that are not images)
            raise ValueError(f"{what} {src} is not an image PIL can read ({type(e).__name__}: {e})") from None
        return [(src, src.name)], []
    if not src.is_dir():
        raise FileNotFoundError(f"{what} {src} does not exist")
    readable = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}
    out_resolved = out_dir.resolve()
    found: list[tuple[Path, str]] = []
    left_out: list[str] = []
    for folder, dirs, files in os.walk(src):
        here = Path(folder)
        kept = []
        for d in sorted(dirs):
            if d.startswith(".") or (here / d).resolve() == out_resolved:
                left_out.append((here / d).relative_to(src).as_posix() + "/")
            else:
                kept.append(d)
        dirs[:] = kept  # os.walk descends only into these, in this order
        for name in sorted(files):
            rel = (here / name).relative_to(src).as_posix()
            if name.startswith(".") or Path(name).suffix.lower() not in readable:
                left_out.append(rel)
            else:
                found.append((here / name, rel))
    if not found:
        raise FileNotFoundError(f"no images PIL can read in {src} or its subfolders")
    return found, left_out


def left_out_note(src: str | os.PathLike, images: int, left_out: Sequence[str]) -> str | None:
    """What ``image_files`` left out of a folder, for the user (``None`` when nothing was).

    Args:
        src: the folder given.
        images: how many images were found.
        left_out: ``image_files``'s second result.
    """
    if not left_out:
        return None
    shown = ", ".join(left_out[:5]) + (", ..." if len(left_out) > 5 else "")
    return (f"{src}: {images} images; left out {len(left_out)} entries that are not images by their extension, "
            f"hidden, or the output folder: {shown}")


def predict_files(
    paths: Sequence[tuple[Path, str]],
    out_dir: Path,
    *,
    read: Callable[[Path], Any],
    predict: Callable[[Any, str], tuple[Any, Any, str]],
    say: Callable[[str], None],
    warn: Callable[[str], None],
) -> dict[str, Any]:
    """Every task's picture loop: read each file, run the model, write ``OUT/<name>.png``; a file that will not read is skipped.

    Args:
        paths: ``(path, name)`` pairs from ``image_files``.
        out_dir: where the pictures go (``<name>.png``; folders made as needed).
        read: a path to the image the model takes (raises for a file that is no image).
        predict: ``(image, name) -> (picture CHW uint8, JSON record, one line for the user)``.
        say: where the per-image lines go (a tool passes ``print``).
        warn: where the skipped files are named.

    Returns:
        ``{name: record}`` of the images that were read.
    """
    results = {}
    for path, name in paths:
        try:
            image = read(path)
        except Exception as e:  # noqa: BLE001  (PIL raises several types for corrupt files)
            warn(f"skipping unreadable {path}: {type(e).__name__}: {e}")
            continue
        picture, record, line = predict(image, name)
        save_image(picture, out_dir / f"{name}.png")  # whole or not at all; makes the folders it needs
        results[name] = record
        say(line)
    return results
