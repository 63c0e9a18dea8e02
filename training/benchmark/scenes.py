"""Deterministic scenes around one emoji glyph: background, distractors, geometry, corruptions.

A scene is a pure function of ``(config, target glyph, style, rng)``; callers derive the rng from
``(seed, stream, index)`` with :func:`scene_rng`, so the same key always gives the same pixels and
different streams (train / test / pretraining) never share a random sequence.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageOps

from training.benchmark.glyphs import load_glyphs

# Styles whose glyphs are a single ink (alpha mask); scenes colour them to contrast with the background.
MONO_STYLES = frozenset({"symbola"})
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


@dataclass(frozen=True)
class SceneConfig:
    """The distribution a scene is drawn from. Ranges are ``(low, high)``, probabilities in [0, 1].

    Attributes:
        size: output side in pixels (square RGB).
        scale: longer side of the target glyph as a fraction of ``size``.
        max_rotation: rotation of the target, uniform in +-degrees.
        overflow: fraction of the glyph that may leave the canvas.
        background: weights of (flat colour, two-colour gradient, noise texture, clutter shapes).
        clutter_shapes: number of random shapes for a clutter background.
        distractors: number of smaller glyphs of other classes drawn behind the target.
        distractor_scale: their size relative to the target's.
        outline_p: draw the target as its outline only (an edge image).
        grayscale_p, invert_p: whole-image grayscale / negative.
        blur_p, blur_radius: Gaussian blur.
        contrast: blend factor towards mid-grey (1 = unchanged).
        noise_sigma: additive Gaussian pixel noise (0-255 scale); a lower bound above 0 keeps any two
            scenes from being pixel-identical.
        jpeg_p, jpeg_quality: JPEG round trip.
    """

    size: int = 48
    scale: tuple[float, float] = (0.6, 0.95)
    max_rotation: float = 15.0
    overflow: float = 0.1
    background: tuple[float, float, float, float] = (0.4, 0.3, 0.2, 0.1)
    clutter_shapes: tuple[int, int] = (2, 6)
    distractors: tuple[int, int] = (0, 1)
    distractor_scale: tuple[float, float] = (0.3, 0.5)
    outline_p: float = 0.0
    grayscale_p: float = 0.0
    invert_p: float = 0.0
    blur_p: float = 0.1
    blur_radius: tuple[float, float] = (0.3, 0.8)
    contrast: tuple[float, float] = (1.0, 1.0)
    noise_sigma: tuple[float, float] = (1.0, 4.0)
    jpeg_p: float = 0.2
    jpeg_quality: tuple[int, int] = (50, 95)

    def __post_init__(self) -> None:
        if self.size < 8:
            raise ValueError(f"size must be >= 8, got {self.size}")
        for name in ("scale", "blur_radius", "contrast", "noise_sigma", "distractor_scale"):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi:
                raise ValueError(f"{name} must be a (low, high) range with 0 <= low <= high, got {(lo, hi)}")
        for name in ("outline_p", "grayscale_p", "invert_p", "blur_p", "jpeg_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be a probability, got {getattr(self, name)}")
        if len(self.background) != 4 or sum(self.background) <= 0 or min(self.background) < 0:
            raise ValueError(f"background needs 4 non-negative weights, got {self.background}")
        if not 1 <= self.jpeg_quality[0] <= self.jpeg_quality[1] <= 100:
            raise ValueError(f"jpeg_quality must be within 1..100, got {self.jpeg_quality}")


@dataclass(frozen=True)
class SceneInfo:
    """What a scene ended up showing (pretraining turns it into caption words)."""

    style: str
    outline: bool = False
    grayscale: bool = False
    inverted: bool = False
    blurred: bool = False
    distractors: int = 0
    background: str = "flat"
    extra: dict = field(default_factory=dict)


def scene_rng(*key: int) -> np.random.Generator:
    """A generator determined by an integer key such as ``(seed, stream, class, index)``."""
    return np.random.default_rng([int(k) for k in key])


def _uniform(rng: np.random.Generator, lo_hi: Sequence[float]) -> float:
    return float(rng.uniform(lo_hi[0], lo_hi[1])) if lo_hi[1] > lo_hi[0] else float(lo_hi[0])


def _colour(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, size=3).astype(np.float32)


def _background(cfg: SceneConfig, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """``[size, size, 3]`` float32 in 0..255, and the kind drawn."""
    s = cfg.size
    w = np.asarray(cfg.background, dtype=np.float64)
    kind = ("flat", "gradient", "texture", "clutter")[int(rng.choice(4, p=w / w.sum()))]
    if kind == "texture":
        cells = int(rng.integers(3, 13))
        low = rng.integers(0, 256, size=(cells, cells, 3)).astype(np.uint8)
        tex = Image.fromarray(low).resize((s, s), Image.Resampling.BILINEAR)
        # narrow the texture's range around a random mean so the glyph stays readable
        base = _colour(rng)
        bg = base + (np.asarray(tex, dtype=np.float32) - 128.0) * _uniform(rng, (0.2, 0.7))
        return np.clip(bg, 0, 255), kind
    c0 = _colour(rng)
    if kind == "flat":
        return np.broadcast_to(c0, (s, s, 3)).copy(), kind
    c1 = _colour(rng)
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / (s - 1)
    t = (np.cos(angle) * (xx - 0.5) + np.sin(angle) * (yy - 0.5)) / 0.71 * 0.5 + 0.5  # [s, s] in ~0..1
    bg = c0 * (1 - t[..., None]) + c1 * t[..., None]
    if kind == "gradient":
        return bg, kind
    im = Image.fromarray(bg.astype(np.uint8))
    draw = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(cfg.clutter_shapes[0], cfg.clutter_shapes[1] + 1))):
        x0, y0, x1, y1 = (rng.uniform(-0.2, 1.2, size=4) * s).tolist()
        box = (min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))
        col = tuple(int(v) for v in rng.integers(0, 256, size=3))
        shape = int(rng.integers(3))
        if shape == 0:
            draw.ellipse(box, fill=col)
        elif shape == 1:
            draw.rectangle(box, fill=col)
        else:
            draw.line((x0, y0, x1, y1), fill=col, width=int(rng.integers(1, 4)))
    return np.asarray(im, dtype=np.float32), kind


def _ink_for(bg_patch: np.ndarray, rng: np.random.Generator) -> tuple[int, int, int]:
    """A random ink colour that contrasts with the mean luminance of ``bg_patch``."""
    luma = float(bg_patch.reshape(-1, 3).mean(0) @ _LUMA)
    base = rng.integers(0, 90, size=3)
    ink = base if luma > 110 else 255 - base
    return tuple(int(v) for v in ink)


def _prepare_glyph(
    master: Image.Image, side: int, angle: float, mono_ink: tuple[int, int, int] | None, outline: bool
) -> Image.Image:
    """Resize and rotate an ``RGBa`` master; returns an ``RGBA`` image ready to paste."""
    scale = side / max(master.size)
    size = (max(1, round(master.width * scale)), max(1, round(master.height * scale)))
    g = master.resize(size, Image.Resampling.BILINEAR)
    if angle:
        g = g.rotate(angle, resample=Image.Resampling.BILINEAR, expand=True)
    g = g.convert("RGBA")
    if outline or mono_ink is not None:
        alpha = g.getchannel("A")
        if outline:
            # the band between the dilated and the eroded silhouette: an edge drawing of the glyph
            wide = alpha.filter(ImageFilter.MaxFilter(3))
            alpha = Image.fromarray(
                np.clip(np.asarray(wide, dtype=np.int16) - np.asarray(alpha.filter(ImageFilter.MinFilter(3)), dtype=np.int16), 0, 255).astype(np.uint8)
            )
        g = Image.new("RGBA", g.size, (*(mono_ink or (0, 0, 0)), 0))
        g.putalpha(alpha)
    return g


def _paste(canvas: Image.Image, glyph: Image.Image, cx: float, cy: float) -> None:
    canvas.paste(glyph, (round(cx - glyph.width / 2), round(cy - glyph.height / 2)), glyph)


def render_scene(
    cfg: SceneConfig,
    target: int,
    style: str,
    rng: np.random.Generator,
    distractor_pool: Sequence[int] = (),
    outline: bool | None = None,
) -> tuple[Image.Image, SceneInfo]:
    """Draw one scene.

    Args:
        cfg: the scene distribution.
        target: codepoint of the labelled glyph (must be drawn in ``style``).
        style: glyph style of the target and its distractors (``noto``, ``openmoji``, ``symbola``).
        rng: source of all randomness (see :func:`scene_rng`).
        distractor_pool: codepoints distractors are drawn from (the target is skipped).
        outline: force the outline transform on/off; None draws it with ``cfg.outline_p``.

    Returns:
        ``(RGB image of cfg.size, SceneInfo)``.
    """
    s = cfg.size
    masters = load_glyphs(style).masters
    bg, bg_kind = _background(cfg, rng)
    canvas = Image.fromarray(bg.astype(np.uint8)).convert("RGBA")
    mono = style in MONO_STYLES

    side = _uniform(rng, cfg.scale) * s
    n_distract = int(rng.integers(cfg.distractors[0], cfg.distractors[1] + 1)) if distractor_pool else 0
    drawn = 0
    for _ in range(n_distract):
        cp = int(distractor_pool[int(rng.integers(len(distractor_pool)))])
        if cp == target or cp not in masters:
            continue
        dside = max(4.0, side * _uniform(rng, cfg.distractor_scale))
        cx, cy = rng.uniform(0, s, size=2)
        ink = _ink_for(bg, rng) if mono else None
        _paste(canvas, _prepare_glyph(masters[cp], round(dside), float(rng.uniform(-30, 30)), ink, False), cx, cy)
        drawn += 1

    angle = float(rng.uniform(-cfg.max_rotation, cfg.max_rotation))
    do_outline = bool(rng.random() < cfg.outline_p) if outline is None else outline
    ink = _ink_for(bg, rng) if (mono or do_outline) else None
    glyph = _prepare_glyph(masters[target], max(4, round(side)), angle, ink, do_outline)
    # keep at least (1 - overflow) of each extent inside the canvas
    mx = glyph.width * (0.5 - cfg.overflow)
    my = glyph.height * (0.5 - cfg.overflow)
    cx = rng.uniform(min(mx, s / 2), max(s - mx, s / 2))
    cy = rng.uniform(min(my, s / 2), max(s - my, s / 2))
    _paste(canvas, glyph, cx, cy)
    im = canvas.convert("RGB")

    gray = bool(rng.random() < cfg.grayscale_p)
    if gray:
        im = im.convert("L").convert("RGB")
    inverted = bool(rng.random() < cfg.invert_p)
    if inverted:
        im = ImageOps.invert(im)
    blurred = bool(rng.random() < cfg.blur_p)
    if blurred:
        im = im.filter(ImageFilter.GaussianBlur(_uniform(rng, cfg.blur_radius)))
    arr = np.asarray(im, dtype=np.float32)
    c = _uniform(rng, cfg.contrast)
    if c != 1.0:
        arr = 128.0 + (arr - 128.0) * c
    sigma = _uniform(rng, cfg.noise_sigma)
    if sigma > 0:
        arr = arr + rng.normal(0.0, sigma, size=arr.shape).astype(np.float32)
    im = Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8))
    if rng.random() < cfg.jpeg_p:
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=int(rng.integers(cfg.jpeg_quality[0], cfg.jpeg_quality[1] + 1)))
        buf.seek(0)
        im = Image.open(buf).convert("RGB")
    info = SceneInfo(style, do_outline, gray, inverted, blurred, drawn, bg_kind)
    return im, info
