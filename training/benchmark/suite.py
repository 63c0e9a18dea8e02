"""The benchmark datasets: which classes, which style, which scenes; materialised once to disk.

Every dataset draws from the classes drawn in all three glyph styles (:func:`universe`). Its class
order is a fixed seeded shuffle, so the data layer's base/novel split (first ``ceil(n/2)`` labels
are base) gives each half a random mix of categories. Each image is a pure function of
``(dataset, split, class, index)``; a folder name carries a fingerprint of everything that shapes the
pixels (suite version, dataset definition, class list, font files, Pillow version), so a change never
reuses stale images.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import PIL

from exports.tempdirs import make_owned_dir, remove_stale_dirs
from training.benchmark.glyphs import STYLE_NAMES, load_glyphs, shared_classes
from training.benchmark.scenes import SceneConfig, render_scene, scene_rng

logger = logging.getLogger(__name__)

SUITE_VERSION = 1
SUITE_SEED = 20_261_129
# Random streams: a benchmark split never shares a sequence with another split or with pretraining.
SPLIT_STREAMS = {"train": 1, "val": 2, "test": 3}

# Category subsets by Unicode code point ranges (inclusive); see docs/benchmark.md.
ANIMALS = ((0x1F400, 0x1F43F), (0x1F54A, 0x1F54A), (0x1F577, 0x1F578), (0x1F980, 0x1F9AF), (0x1FAB0, 0x1FABF))
PLANTS = ((0x1F330, 0x1F344), (0x1F490, 0x1F490))
FOOD = ((0x1F32D, 0x1F32F), (0x1F345, 0x1F37F), (0x1F950, 0x1F96F), (0x1F9C0, 0x1F9CB), (0x1FAD0, 0x1FADF))
PEOPLE = (
    (0x2639, 0x263A), (0x1F440, 0x1F450), (0x1F466, 0x1F487), (0x1F590, 0x1F596), (0x1F600, 0x1F64F),
    (0x1F90C, 0x1F92F), (0x1F970, 0x1F97F), (0x1F9B0, 0x1F9BF), (0x1F9D0, 0x1F9DF), (0x1FAE0, 0x1FAFF),
)


@dataclass(frozen=True)
class BenchmarkSpec:
    """One benchmark dataset.

    Attributes:
        name: the dataset spec name (``emoji-lineart``).
        description: one line for ``promptbake datasets``.
        styles: glyph styles; each image picks one uniformly.
        scene: the scene distribution.
        include: code point ranges the classes come from (empty: every class).
        exclude: code point ranges removed afterwards.
        max_classes: keep the first this many classes of the shuffled order (None: all).
        train_per_class, val_per_class, test_per_class: images per class and split.
    """

    name: str
    description: str
    styles: tuple[str, ...]
    scene: SceneConfig
    include: tuple[tuple[int, int], ...] = ()
    exclude: tuple[tuple[int, int], ...] = ()
    max_classes: int | None = None
    train_per_class: int = 16
    val_per_class: int = 4
    test_per_class: int = 10

    def __post_init__(self) -> None:
        unknown = set(self.styles) - set(STYLE_NAMES)
        if not self.styles or unknown:
            raise ValueError(f"benchmark {self.name!r}: styles must be among {STYLE_NAMES}, got {self.styles}")
        if self.train_per_class < 1 or self.test_per_class < 1 or self.val_per_class < 0:
            raise ValueError(f"benchmark {self.name!r}: needs >= 1 train and test image per class")


_CLEAN = SceneConfig()
BENCHMARKS: dict[str, BenchmarkSpec] = {
    spec.name: spec
    for spec in (
        BenchmarkSpec(
            "emoji-nature", "animals, plants, food and drink in OpenMoji's flat style (a category subset)",
            ("openmoji",), _CLEAN, include=ANIMALS + PLANTS + FOOD,
        ),
        BenchmarkSpec(
            "emoji-people", "faces, hands and people in Noto's style: fine-grained expressions and gestures",
            ("noto",), dataclasses.replace(_CLEAN, distractors=(0, 0)), include=PEOPLE,
        ),
        BenchmarkSpec(
            "emoji-clutter", "objects, places, transport and symbols, small among distractors on busy backgrounds",
            ("noto", "openmoji"),
            dataclasses.replace(
                _CLEAN, scale=(0.38, 0.6), background=(0.0, 0.1, 0.4, 0.5), clutter_shapes=(4, 10),
                distractors=(3, 6), distractor_scale=(0.45, 0.8), overflow=0.0,
            ),
            exclude=ANIMALS + PLANTS + FOOD + PEOPLE, max_classes=250,
        ),
        BenchmarkSpec(
            "emoji-corrupt", "any class, heavily corrupted: blur, noise, low contrast, grayscale, JPEG artefacts",
            ("noto", "openmoji"),
            dataclasses.replace(
                _CLEAN, blur_p=0.6, blur_radius=(0.6, 1.4), noise_sigma=(10.0, 28.0), contrast=(0.45, 0.9),
                grayscale_p=0.3, jpeg_p=0.9, jpeg_quality=(8, 25),
            ),
            max_classes=250,
        ),
        BenchmarkSpec(
            "emoji-lineart", "any class as Symbola black-and-white line art; novel classes never seen in this style",
            ("symbola",), _CLEAN, max_classes=250,
        ),
    )
}


def universe() -> tuple[tuple[int, str], ...]:
    """``(codepoint, name)`` of every class drawn in all styles, ascending code point (cached)."""
    return shared_classes(STYLE_NAMES)


@functools.lru_cache(maxsize=None)
def universe_codepoints() -> tuple[int, ...]:
    """The code points of :func:`universe` (the distractor pool)."""
    return tuple(cp for cp, _ in universe())


def _in(cp: int, ranges: tuple[tuple[int, int], ...]) -> bool:
    return any(lo <= cp <= hi for lo, hi in ranges)


def _stable_id(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")


def benchmark_classes(spec: BenchmarkSpec) -> list[tuple[int, str]]:
    """The dataset's classes in label order (a seeded shuffle of the matching classes)."""
    pool = [(cp, n) for cp, n in universe() if (not spec.include or _in(cp, spec.include)) and not _in(cp, spec.exclude)]
    order = np.random.default_rng([SUITE_SEED, _stable_id(spec.name)]).permutation(len(pool))
    picked = [pool[i] for i in order]
    return picked[: spec.max_classes] if spec.max_classes else picked


def novel_codepoints(spec: BenchmarkSpec) -> set[int]:
    """Code points of the novel half (labels ``ceil(n/2)..n-1``) under the standard split."""
    classes = benchmark_classes(spec)
    return {cp for cp, _ in classes[math.ceil(len(classes) / 2):]}


def fingerprint(spec: BenchmarkSpec, classes: list[tuple[int, str]]) -> str:
    """A hash of everything that determines the dataset's pixels."""
    payload = {
        "suite_version": SUITE_VERSION,
        "suite_seed": SUITE_SEED,
        "spec": dataclasses.asdict(spec),
        "classes": classes,
        "fonts": {s: load_glyphs(s).font_sha256 for s in spec.styles},
        "pillow": PIL.__version__,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def render_sample(spec: BenchmarkSpec, split: str, label: int, index: int, classes: list[tuple[int, str]],
                  attempt: int = 0) -> np.ndarray:
    """One image of the dataset as ``[size, size, 3]`` uint8; pure in its arguments."""
    rng = scene_rng(SUITE_SEED, _stable_id(spec.name), SPLIT_STREAMS[split], label, index, attempt)
    style = spec.styles[int(rng.integers(len(spec.styles)))]
    im, _ = render_scene(spec.scene, classes[label][0], style, rng, universe_codepoints())
    return np.asarray(im)


def _write_split(spec: BenchmarkSpec, split: str, per_class: int, classes: list[tuple[int, str]], out: Path,
                 forbidden: list[set[bytes]]) -> list[set[bytes]]:
    """Render a split into ``out/split/LLLL/III.png``; redraw any image whose pixels are in ``forbidden``."""
    from PIL import Image

    digests: list[set[bytes]] = []
    for label in range(len(classes)):
        folder = out / split / f"{label:04d}"
        folder.mkdir(parents=True)
        seen: set[bytes] = set()
        for index in range(per_class):
            for attempt in range(100):
                arr = render_sample(spec, split, label, index, classes, attempt)
                digest = hashlib.blake2b(arr.tobytes(), digest_size=16).digest()
                if digest not in seen and not (forbidden and digest in forbidden[label]):
                    break
            else:  # pragma: no cover - would need 100 identical noisy renders
                raise RuntimeError(f"{spec.name}: cannot draw a unique {split} image for class {label}")
            seen.add(digest)
            Image.fromarray(arr).save(folder / f"{index:03d}.png", compress_level=1)
        digests.append(seen)
    return digests


def materialise(spec: BenchmarkSpec, root: Path, test_per_class: int, max_classes: int | None = None,
                on_split: Callable[[str], None] | None = None) -> Path:
    """Write the dataset under ``root`` unless already there; returns its folder.

    The images are generated into a temporary sibling folder that is renamed into place only when
    complete, so an interrupted run leaves no partial dataset (only a ``.tmp-*`` folder that the
    next run removes).

    Args:
        spec: the dataset.
        root: parent folder of all benchmark folders.
        test_per_class: test images per class to generate.
        max_classes: generate only the first this many classes (quick checks, tests).
        on_split: called with each split name before it is written (progress; tests use it to fail).
    """
    classes = benchmark_classes(spec)
    if max_classes is not None:
        classes = classes[:max_classes]
    fp = fingerprint(spec, classes)
    suffix = (f"-t{test_per_class}" if test_per_class != spec.test_per_class else "") + (
        f"-c{max_classes}" if max_classes is not None else ""
    )
    final = root / f"{spec.name}-v{SUITE_VERSION}-{fp[:10]}{suffix}"
    if root.is_dir():
        remove_stale_dirs(root, f".tmp-{final.name}-")  # folders left by killed runs whose owner is gone
    if (final / "dataset.json").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = make_owned_dir(root, f".tmp-{final.name}-")
    try:
        t0 = time.perf_counter()
        logger.info("materialising benchmark %s (%d classes) into %s", spec.name, len(classes), final)
        forbidden: list[set[bytes]] = []
        counts = {}
        for split, n in (("train", spec.train_per_class), ("val", spec.val_per_class), ("test", test_per_class)):
            if on_split is not None:
                on_split(split)
            if n:
                digests = _write_split(spec, split, n, classes, tmp, forbidden)
                # val and test must differ from train (and test from val) pixel for pixel
                forbidden = [a | b for a, b in zip(forbidden, digests)] if forbidden else digests
            counts[split] = n
        meta = {
            "name": spec.name,
            "fingerprint": fp,
            "suite_version": SUITE_VERSION,
            "classnames": [n for _, n in classes],
            "codepoints": [cp for cp, _ in classes],
            "per_class": counts,
            "styles": list(spec.styles),
            "image_size": spec.scene.size,
        }
        (tmp / "dataset.json").write_text(json.dumps(meta, indent=1))
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "dataset.json").is_file():  # another process won the race; else a real error
                raise
            shutil.rmtree(tmp, ignore_errors=True)
        logger.info("benchmark %s ready in %.1fs", spec.name, time.perf_counter() - t0)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final
