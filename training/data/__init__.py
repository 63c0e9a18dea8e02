"""Datasets for promptbake: one spec string -> an :class:`ImageDataset`.

Spec forms:
    ``coop:NAME:ROOT``  one of CoOp's 11 datasets in CoOp's layout (``coop:oxford_pets:/data``).
    ``folder:ROOT``     class folders ``ROOT/{train,test[,val]}/<class>/<image>``.
    ``NAME``            a benchmark from ``training.benchmark`` (``load_benchmark(NAME)``).
"""
from __future__ import annotations

import difflib
from typing import Callable

from training.data.coop import COOP_DATASETS, get_coop_layout, load_coop_dataset
from training.data.core import (
    IMAGE_EXTENSIONS,
    ClassSubset,
    DatasetError,
    ImageDataset,
    Sample,
    sample_few_shot,
    split_base_novel,
    subset_classes,
)
from training.data.descriptions import load_attributes, load_descriptions, match_descriptions
from training.data.folder import load_folder_dataset

__all__ = [
    "COOP_DATASETS",
    "IMAGE_EXTENSIONS",
    "ClassSubset",
    "DatasetError",
    "ImageDataset",
    "Sample",
    "SampleDataset",
    "build_eval_transform",
    "build_train_transform",
    "list_dataset_specs",
    "load_coop_dataset",
    "load_dataset",
    "load_attributes",
    "load_descriptions",
    "load_folder_dataset",
    "match_descriptions",
    "register_named_datasets",
    "sample_few_shot",
    "split_base_novel",
    "subset_classes",
]

# The transforms import torch, torchvision and open_clip; they load on first use, so specs,
# splits and descriptions stay importable without torch (and `promptbake datasets` stays quick).
_TRANSFORMS = ("SampleDataset", "build_eval_transform", "build_train_transform")


def __getattr__(name: str):
    if name in _TRANSFORMS:
        from training.data import transforms

        return getattr(transforms, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_PREFIXES = ("coop", "folder")
SPEC_FORMS = "coop:NAME:ROOT (NAME one of " + ", ".join(COOP_DATASETS) + "), folder:ROOT, or a benchmark name"


# Named datasets come from providers that register themselves (the emoji benchmark, from
# training.benchmark); this package imports none of them.
_NAMED: list[tuple[Callable[[], list[tuple[str, str]]], Callable[[str], ImageDataset]]] = []


def register_named_datasets(lister: Callable[[], list[tuple[str, str]]], loader: Callable[[str], ImageDataset]) -> None:
    """Make bare dataset names resolvable: ``lister()`` gives ``(name, description)`` rows, ``loader(name)`` the dataset."""
    if (lister, loader) not in _NAMED:
        _NAMED.append((lister, loader))


def _named_rows() -> list[tuple[str, str]]:
    return [row for lister, _ in _NAMED for row in lister()]


def load_dataset(spec: str) -> ImageDataset:
    """Resolve a dataset spec (see the module docstring).

    Raises:
        DatasetError: an unknown prefix or dataset name (with close matches), or any missing or
            malformed file, naming it.
    """
    prefix, sep, rest = spec.partition(":")
    prefix = prefix.lower()
    if sep:
        if prefix == "coop":
            name, sep, root = rest.partition(":")
            if not sep or not name or not root:
                raise DatasetError(f"dataset spec {spec!r}: expected coop:NAME:ROOT")
            return load_coop_dataset(name, root)
        if prefix == "folder":
            if not rest:
                raise DatasetError(f"dataset spec {spec!r}: expected folder:ROOT")
            return load_folder_dataset(rest)
        close = difflib.get_close_matches(prefix, _PREFIXES, n=1, cutoff=0.5)
        hint = f"; did you mean '{close[0]}:'?" if close else ""
        raise DatasetError(f"unknown dataset spec prefix {prefix!r} in {spec!r}{hint} (valid: {SPEC_FORMS})")
    return _load_named(spec)


def _load_named(name: str) -> ImageDataset:
    try:
        coop_hint = f"; CoOp datasets need a root: coop:{get_coop_layout(name).name}:ROOT"
    except DatasetError:
        coop_hint = ""
    for lister, loader in _NAMED:
        if name in [n for n, _ in lister()]:
            return loader(name)
    names = [n for n, _ in _named_rows()]
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
    hint = coop_hint + (f"; did you mean {', '.join(close)}?" if close else "")
    raise DatasetError(f"unknown dataset {name!r}{hint} (named datasets: {', '.join(names) or 'none registered'}; "
                       f"valid: {SPEC_FORMS})")


def list_dataset_specs() -> list[tuple[str, str]]:
    """``(spec or spec form, description)`` rows for ``promptbake datasets``."""
    rows = [
        ("folder:ROOT", "class folders ROOT/train/<class>/*, ROOT/test/<class>/*, optional ROOT/val/<class>/*"),
    ]
    for layout in COOP_DATASETS.values():
        source = layout.split_file or ("classnames.txt + images/{train,val}/" if layout.name == "imagenet"
                                      else "variants.txt + images_variant_*.txt")
        rows.append((f"coop:{layout.name}:ROOT", f"{layout.title}; ROOT/{layout.dir_name}/ with {source}"))
    return rows + _named_rows()
