"""Dataset types, few-shot sampling and the CoCoOp base/novel class split.

A dataset here is only a list of (absolute image path, label) per split plus its class names;
images are read later by :class:`training.data.transforms.SampleDataset`.
"""
from __future__ import annotations

import logging
import math
import os
import random
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable, Literal, Sequence

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
SPLITS = ("train", "val", "test")


class DatasetError(ValueError):
    """A dataset spec, file or directory that cannot be used; the message names it and what is wrong."""


@dataclass(frozen=True)
class Sample:
    """One image: its absolute path and its label (an index into the dataset's class names)."""

    path: str
    label: int


def _validate(owner: str, classnames: tuple[str, ...], splits: dict[str, tuple[Sample, ...]]) -> None:
    if not classnames:
        raise DatasetError(f"{owner}: no classes")
    for i, name in enumerate(classnames):
        if not isinstance(name, str) or not name.strip():
            raise DatasetError(f"{owner}: class name {i} is empty or not a string: {name!r}")
    seen: dict[str, int] = {}
    for i, name in enumerate(classnames):
        if name in seen:
            raise DatasetError(f"{owner}: class name {name!r} is used by labels {seen[name]} and {i}")
        seen[name] = i
    n = len(classnames)
    for split, samples in splits.items():
        for s in samples:
            # bool is an int subclass; a True label is a bug upstream, not class 1.
            if not isinstance(s.label, int) or isinstance(s.label, bool) or not 0 <= s.label < n:
                raise DatasetError(f"{owner}: {split} sample {s.path} has label {s.label!r}, outside 0..{n - 1}")


@dataclass(frozen=True)
class ImageDataset:
    """Class names and train/val/test samples of one dataset.

    Attributes:
        name: short name (``oxford_pets``, a folder name, a benchmark name).
        classnames: cleaned class names; ``classnames[label]`` names a sample's class.
        train, val, test: the samples of each split (``val`` may be empty).
    """

    name: str
    classnames: tuple[str, ...]
    train: tuple[Sample, ...]
    val: tuple[Sample, ...]
    test: tuple[Sample, ...]

    def __post_init__(self) -> None:
        for field in ("classnames",) + SPLITS:
            object.__setattr__(self, field, tuple(getattr(self, field)))
        _validate(f"dataset {self.name!r}", self.classnames, {s: getattr(self, s) for s in SPLITS})

    @property
    def num_classes(self) -> int:
        return len(self.classnames)


@dataclass(frozen=True)
class ClassSubset:
    """Some classes of a dataset with labels remapped to ``0..n-1``.

    Attributes:
        name: ``"base"``, ``"novel"`` or ``"all"``.
        classnames: the subset's class names, in remapped-label order.
        train, val, test: samples of the subset's classes, labels remapped.
        original_labels: ``original_labels[new_label]`` is that class's label in the full dataset.
    """

    name: str
    classnames: tuple[str, ...]
    train: tuple[Sample, ...]
    val: tuple[Sample, ...]
    test: tuple[Sample, ...]
    original_labels: tuple[int, ...]

    def __post_init__(self) -> None:
        for field in ("classnames", "original_labels") + SPLITS:
            object.__setattr__(self, field, tuple(getattr(self, field)))
        if len(self.original_labels) != len(self.classnames):
            raise DatasetError(
                f"subset {self.name!r}: {len(self.classnames)} class names but "
                f"{len(self.original_labels)} original labels"
            )
        _validate(f"subset {self.name!r}", self.classnames, {s: getattr(self, s) for s in SPLITS})

    @property
    def num_classes(self) -> int:
        return len(self.classnames)


def sample_few_shot(samples: Sequence[Sample], shots: int | None, seed: int) -> tuple[Sample, ...]:
    """Keep ``shots`` samples per class, chosen with a private RNG seeded by ``seed``.

    Mirrors Dassl's ``generate_fewshot_dataset`` (``random.sample`` per class, no repeats; a class
    with fewer than ``shots`` samples keeps them all) but never touches the global RNGs, so the
    same (samples, shots, seed) always yields the same subset.

    The CoOp recipe samples the full training set *before* the base/novel split
    (``dataclasses.replace(ds, train=sample_few_shot(ds.train, k, seed))``), and the val set
    with ``min(k, 4)`` shots.

    Args:
        samples: samples of any number of classes; their order within a class matters.
        shots: samples per class; ``None`` or ``<= 0`` keeps everything (returned unchanged).
        seed: the RNG seed.

    Returns:
        The kept samples, ordered by label, then in selection order.
    """
    if shots is None or shots <= 0:
        return tuple(samples)
    by_label: dict[int, list[Sample]] = defaultdict(list)
    for s in samples:
        by_label[s.label].append(s)
    rng = random.Random(seed)
    out: list[Sample] = []
    for label in sorted(by_label):
        items = by_label[label]
        out.extend(rng.sample(items, shots) if len(items) >= shots else items)
    return tuple(out)


def _remap(samples: Iterable[Sample], relabel: dict[int, int]) -> tuple[Sample, ...]:
    return tuple(Sample(s.path, relabel[s.label]) for s in samples if s.label in relabel)


def _subset(dataset: ImageDataset, name: str, labels: Sequence[int]) -> ClassSubset:
    relabel = {old: new for new, old in enumerate(labels)}
    return ClassSubset(
        name=name,
        classnames=tuple(dataset.classnames[i] for i in labels),
        train=_remap(dataset.train, relabel),
        val=_remap(dataset.val, relabel),
        test=_remap(dataset.test, relabel),
        original_labels=tuple(labels),
    )


def split_base_novel(dataset: ImageDataset) -> tuple[ClassSubset, ClassSubset]:
    """The CoCoOp base-to-novel split: the first ``ceil(n/2)`` labels are base, the rest novel.

    Returns:
        ``(base, novel)``, each with labels remapped to ``0..len-1`` in original label order.
    """
    n = dataset.num_classes
    if n < 2:
        raise DatasetError(f"dataset {dataset.name!r} has {n} class; a base/novel split needs at least 2")
    m = math.ceil(n / 2)
    return _subset(dataset, "base", range(m)), _subset(dataset, "novel", range(m, n))


def subset_classes(dataset: ImageDataset, which: Literal["base", "novel", "all"]) -> ClassSubset:
    """One side of :func:`split_base_novel`, or ``"all"`` classes with labels unchanged."""
    if which == "all":
        return _subset(dataset, "all", range(dataset.num_classes))
    if which == "base":
        return split_base_novel(dataset)[0]
    if which == "novel":
        return split_base_novel(dataset)[1]
    raise DatasetError(f"unknown class subset {which!r}; expected 'base', 'novel' or 'all'")


def clean_classname(name: str) -> str:
    """The clean-up CoOp applies to every class name: underscores to spaces, whitespace collapsed."""
    return " ".join(name.replace("_", " ").split())


def is_image_file(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def list_subdirs(path: str) -> list[str]:
    """Sorted names of the visible subdirectories of ``path``."""
    with os.scandir(path) as it:
        return sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))


def list_images(path: str) -> list[str]:
    """Sorted absolute paths of the image files directly inside ``path``."""
    with os.scandir(path) as it:
        return sorted(e.path for e in it if e.is_file() and is_image_file(e.name))


def require_dir(path: str, what: str) -> None:
    if not os.path.isdir(path):
        raise DatasetError(f"{what} not found: {path}")
