"""An offline base-to-novel benchmark drawn from emoji art, and the backbone pretrained on it.

Public API:
    :func:`list_benchmarks`  ``(name, description)`` of every benchmark dataset.
    :func:`load_benchmark`   a benchmark as :class:`training.data.ImageDataset` (materialised on first use).

The embedded backbone ``emoji-vit-s`` lives in :mod:`training.benchmark.emoji_backbone` (it imports
torch, so this package does not import it); pretraining in :mod:`training.benchmark.pretrain`.
See docs/benchmark.md for the design.
"""
from __future__ import annotations

import difflib
import json
import logging
import os
from pathlib import Path

from training.benchmark.suite import BENCHMARKS, BenchmarkSpec, benchmark_classes, materialise

__all__ = ["BENCHMARKS", "BenchmarkSpec", "benchmark_classes", "default_root", "list_benchmarks", "load_benchmark"]

logger = logging.getLogger(__name__)


def default_root() -> Path:
    """``$PROMPTBAKE_DATA`` if set, else ``~/.cache/promptbake/benchmarks``."""
    env = os.environ.get("PROMPTBAKE_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "promptbake" / "benchmarks"


def list_benchmarks() -> list[tuple[str, str]]:
    """``(name, one-line description)`` of every benchmark dataset, in a fixed order."""
    return [(spec.name, spec.description) for spec in BENCHMARKS.values()]


def load_benchmark(
    name: str,
    root: str | os.PathLike | None = None,
    test_per_class: int | None = None,
    max_classes: int | None = None,
):
    """A benchmark dataset with absolute image paths, generating its images on first use.

    Args:
        name: a name from :func:`list_benchmarks`.
        root: where datasets are stored (default :func:`default_root`); each gets a versioned folder.
        test_per_class: test images per class; fewer than the default reuses the default folder's
            first images, more generates a separate folder.
        max_classes: only the first this many classes (a quick check; labels keep their order, so
            the base/novel split of the subset differs from the full dataset's).

    Returns:
        ``training.data.ImageDataset`` with train (16 per class), val (4 per class) and test splits.

    Raises:
        training.data.DatasetError: unknown name (with close matches) or invalid counts.
    """
    from training.data import DatasetError, ImageDataset, Sample

    spec = BENCHMARKS.get(name)
    if spec is None:
        close = difflib.get_close_matches(name, list(BENCHMARKS), n=3, cutoff=0.4)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise DatasetError(f"unknown benchmark {name!r}.{hint} Benchmarks: {', '.join(BENCHMARKS)}")
    if test_per_class is not None and test_per_class < 1:
        raise DatasetError(f"test_per_class must be >= 1, got {test_per_class}")
    if max_classes is not None and max_classes < 2:
        raise DatasetError(f"max_classes must be >= 2 (a base/novel split needs two classes), got {max_classes}")
    n_test = spec.test_per_class if test_per_class is None else test_per_class
    folder = materialise(
        spec, Path(root).expanduser() if root is not None else default_root(),
        max(n_test, spec.test_per_class), max_classes,
    ).resolve()
    meta = json.loads((folder / "dataset.json").read_text())
    per_class = {"train": spec.train_per_class, "val": spec.val_per_class, "test": n_test}

    def samples(split: str) -> tuple:
        return tuple(
            Sample(str(folder / split / f"{label:04d}" / f"{i:03d}.png"), label)
            for label in range(len(meta["classnames"]))
            for i in range(per_class[split])
        )

    return ImageDataset(spec.name, tuple(meta["classnames"]), samples("train"), samples("val"), samples("test"))


def _register() -> None:
    from training.data import register_named_datasets

    register_named_datasets(list_benchmarks, load_benchmark)  # bare dataset names resolve to these


_register()
