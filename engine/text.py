"""Text on pictures in any script: one font choice for every picture the project draws.

A label is set in the first font that has all of its characters: DejaVu Sans (Latin, Greek,
Cyrillic, ...) first, then Noto Sans CJK (Chinese, Japanese, Korean; the ``noto-cjk-sans-otc``
package, a dependency), then every other font matplotlib finds on the system. When none has
them all, a warning says so once. Detection boxes, segmentation keys and any later task's
pictures call :func:`label_font`, so a fix made here reaches all of them.
"""

from __future__ import annotations

import functools
import logging
import unicodedata
from typing import Any

__all__ = ["face_for", "font_faces", "label_font", "reset_font_choice", "text_color"]

logger = logging.getLogger(__name__)

_LATIN_FONT = "DejaVu Sans"
_CJK_FACE = 2  # Noto Sans CJK SC in the collection (0 JP, 1 KR, 2 SC, 3 TC, 4 HK); every face covers all three scripts
_warned_uncovered = False


@functools.lru_cache(maxsize=None)
def font_faces() -> tuple[tuple[str, int], ...]:
    """``(font file, face index)`` that labels may be set in, in order of preference."""
    from matplotlib import font_manager

    faces: list[tuple[str, int]] = []
    try:
        faces.append((font_manager.findfont(_LATIN_FONT, fallback_to_default=False), 0))
    except ValueError:
        pass
    try:
        from noto_cjk_sans_otc import FONT_PATH

        faces.append((str(FONT_PATH), _CJK_FACE))
    except ImportError:
        pass

    def plainness(entry: Any) -> tuple:  # regular upright faces before italics and bolds
        weight = entry.weight if isinstance(entry.weight, int) else 1000
        return entry.style != "normal", abs(weight - 400), entry.name

    for entry in sorted(font_manager.fontManager.ttflist, key=plainness):
        face = (entry.fname, int(getattr(entry, "index", 0)))
        if face not in faces:
            faces.append(face)
    return tuple(faces)


@functools.lru_cache(maxsize=None)
def _coverage(fname: str, index: int) -> frozenset[int]:
    """Code points the font face has glyphs for (empty when it cannot be read)."""
    from fontTools.ttLib import TTFont

    try:
        with TTFont(fname, fontNumber=index, lazy=True) as font:
            return frozenset(font.getBestCmap() or ())
    except Exception:  # noqa: BLE001  (a broken system font is one we cannot use, nothing more)
        return frozenset()


@functools.lru_cache(maxsize=1024)
def face_for(text: str) -> tuple[str, int] | None:
    """The first face with a glyph for every visible character of ``text`` (else the one with most).

    Args:
        text: the label to set.

    Returns:
        ``(font file, face index)``, or None when no TrueType font is installed at all.
    """
    global _warned_uncovered
    needed = {ord(c) for c in text if not c.isspace() and unicodedata.category(c) not in ("Cc", "Cf")}
    best, best_covered = None, -1
    for face in font_faces():
        covered = len(needed & _coverage(*face))
        if covered == len(needed):
            return face
        if covered > best_covered:
            best, best_covered = face, covered
    if not _warned_uncovered:
        _warned_uncovered = True
        missing = "".join(sorted({chr(c) for c in needed} - {chr(c) for c in _coverage(*best)})) if best else text
        logger.warning(
            "no font found has every character of the label %r (missing %r): they are drawn as empty boxes. "
            "Install a font that has them (pip install noto-cjk-sans-otc for Chinese, Japanese and Korean, or a "
            "system font package), then rebuild matplotlib's font cache (rm -r ~/.cache/matplotlib)",
            text, missing,
        )
    return best


def reset_font_choice() -> None:
    """Forget the fonts chosen so far and the warning given (for tests, and after installing a font)."""
    global _warned_uncovered
    for cached in (face_for, font_faces):
        getattr(cached, "cache_clear", lambda: None)()  # a test may have replaced one
    _warned_uncovered = False


@functools.lru_cache(maxsize=64)
def _truetype(fname: str, index: int, size: int) -> Any:
    from PIL import ImageFont

    return ImageFont.truetype(fname, size, index=index)


def label_font(text: str, size: int) -> Any:
    """A PIL font of ``size`` pixels that has a glyph for every character of ``text``.

    Choose per text: a Chinese name needs another font than a Latin one.

    Args:
        text: the label to set.
        size: font size in pixels.

    Returns:
        A ``PIL.ImageFont`` (PIL's own default font when no TrueType font is installed).
    """
    from PIL import ImageFont

    face = face_for(text)
    if face is not None:
        try:
            return _truetype(*face, size)
        except OSError:
            pass
    return ImageFont.load_default(size)  # no TrueType font at all: PIL's own, still with a background box


def text_color(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black on light backgrounds, white on dark ones (ITU-R BT.601 luma).

    Args:
        rgb: the background colour.
    """
    return (0, 0, 0) if 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2] > 150 else (255, 255, 255)
