"""The 11 CoOp benchmark datasets, read from CoOp's directory layout (its DATASETS.md).

``ROOT`` is CoOp's ``$DATA`` folder (holding ``oxford_pets/``, ``caltech-101/``, ...) or one
dataset's own folder. Nine datasets are read from CoOp's fixed ``split_zhou_*.json`` (lists of
``[path relative to the image folder, label, class name]``); FGVC-Aircraft from its own
``images_variant_*.txt`` files and ImageNet from ``images/train`` and ``images/val`` folders plus
``classnames.txt``, as CoOp does. Nothing is written into the data folders (CoOp caches pickles).
"""
from __future__ import annotations

import difflib
import json
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

from training.data.core import (
    SPLITS,
    DatasetError,
    ImageDataset,
    Sample,
    clean_classname,
    list_images,
    list_subdirs,
    require_dir,
)

logger = logging.getLogger(__name__)

# CoOp's renames, applied to raw folder names; already-renamed names pass through unchanged.
EUROSAT_NAMES = {
    "AnnualCrop": "Annual Crop Land",
    "Forest": "Forest",
    "HerbaceousVegetation": "Herbaceous Vegetation Land",
    "Highway": "Highway or Road",
    "Industrial": "Industrial Buildings",
    "Pasture": "Pasture Land",
    "PermanentCrop": "Permanent Crop Land",
    "Residential": "Residential Buildings",
    "River": "River",
    "SeaLake": "Sea or Lake",
}
CALTECH_NAMES = {"airplanes": "airplane", "Faces": "face", "Leopards": "leopard", "Motorbikes": "motorbike"}
CALTECH_IGNORED = frozenset({"BACKGROUND_Google", "Faces_easy"})
# CLIP's ImageNet names (CoOp's classnames.txt) call two synset pairs "missile" and "sunglasses";
# class names must be unique here, so one of each pair gets its WordNet name: wnid -> (CLIP, new).
IMAGENET_RENAMES = {"n04008634": ("missile", "projectile"), "n04355933": ("sunglasses", "sunglass")}
_YEAR = re.compile(r"(19|20)\d\d")

Splits = dict[str, list[Sample]]


def _clean_eurosat(name: str) -> str:
    return clean_classname(EUROSAT_NAMES.get(name, name))


def _clean_caltech(name: str) -> str:
    return clean_classname(CALTECH_NAMES.get(name, name))


def _clean_ucf101(name: str) -> str:
    # Raw UCF101 actions are CamelCase ("ApplyEyeMakeup"); CoOp's json has "Apply_Eye_Makeup".
    if "_" not in name and " " not in name and name[:1].isupper():
        name = " ".join(re.findall(r"[A-Z][^A-Z]*", name))
    return clean_classname(name)


def _clean_sun397(name: str) -> str:
    # A SUN397 class path "/a/apartment_building/outdoor" becomes "outdoor apartment building".
    if "/" in name:
        parts = [p for p in name.split("/") if p]
        if len(parts) > 1 and len(parts[0]) == 1:
            parts = parts[1:]
        name = " ".join(reversed(parts))
    return clean_classname(name)


def _clean_stanford_cars(name: str) -> str:
    # The devkit's "AM General Hummer SUV 2000" becomes "2000 AM General Hummer SUV".
    words = name.split()
    if len(words) > 1 and _YEAR.fullmatch(words[-1]) and not _YEAR.fullmatch(words[0]):
        words = [words[-1]] + words[:-1]
    return clean_classname(" ".join(words))


@dataclass(frozen=True)
class CoopLayout:
    """Where one CoOp dataset lives under ROOT and how its class names are cleaned.

    Attributes:
        name: canonical spec name (``oxford_pets``).
        title: human-readable name with its class count.
        dir_name: folder under ROOT (CoOp's ``dataset_dir``).
        image_dir: image folder inside ``dir_name`` that split paths are relative to ("" = itself).
        split_file: CoOp's split json inside ``dir_name``; None for ImageNet and FGVC-Aircraft.
        clean: raw class name -> cleaned class name.
        ignored: raw class names dropped (with their samples) before labels are compacted.
        alias: CoOp's class name for the dataset (``OxfordPets``), accepted in specs.
    """

    name: str
    title: str
    dir_name: str
    image_dir: str
    split_file: str | None
    clean: Callable[[str], str] = clean_classname
    ignored: frozenset[str] = frozenset()
    alias: str = ""


COOP_DATASETS: dict[str, CoopLayout] = {
    d.name: d
    for d in (
        CoopLayout("imagenet", "ImageNet (1000 classes)", "imagenet", "images", None, alias="ImageNet"),
        CoopLayout(
            "caltech101", "Caltech101 (100 classes)", "caltech-101", "101_ObjectCategories",
            "split_zhou_Caltech101.json", _clean_caltech, CALTECH_IGNORED, "Caltech101",
        ),
        CoopLayout(
            "oxford_pets", "Oxford-IIIT Pets (37 classes)", "oxford_pets", "images",
            "split_zhou_OxfordPets.json", alias="OxfordPets",
        ),
        CoopLayout(
            "stanford_cars", "Stanford Cars (196 classes)", "stanford_cars", "",
            "split_zhou_StanfordCars.json", _clean_stanford_cars, alias="StanfordCars",
        ),
        CoopLayout(
            "oxford_flowers", "Oxford Flowers102 (102 classes)", "oxford_flowers", "jpg",
            "split_zhou_OxfordFlowers.json", alias="OxfordFlowers",
        ),
        CoopLayout("food101", "Food-101 (101 classes)", "food-101", "images", "split_zhou_Food101.json", alias="Food101"),
        CoopLayout("fgvc_aircraft", "FGVC-Aircraft (100 classes)", "fgvc_aircraft", "images", None, alias="FGVCAircraft"),
        CoopLayout("sun397", "SUN397 (397 classes)", "sun397", "SUN397", "split_zhou_SUN397.json", _clean_sun397, alias="SUN397"),
        CoopLayout(
            "dtd", "Describable Textures (47 classes)", "dtd", "images",
            "split_zhou_DescribableTextures.json", alias="DescribableTextures",
        ),
        CoopLayout("eurosat", "EuroSAT (10 classes)", "eurosat", "2750", "split_zhou_EuroSAT.json", _clean_eurosat, alias="EuroSAT"),
        CoopLayout(
            "ucf101", "UCF101 mid-frames (101 classes)", "ucf101", "UCF-101-midframes",
            "split_zhou_UCF101.json", _clean_ucf101, alias="UCF101",
        ),
    )
}


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


_LOOKUP = {_key(k): d for d in COOP_DATASETS.values() for k in (d.name, d.alias)}


def get_coop_layout(name: str) -> CoopLayout:
    """The layout for a CoOp dataset name, case- and underscore-insensitive (``OxfordPets``)."""
    layout = _LOOKUP.get(_key(name))
    if layout is None:
        close = difflib.get_close_matches(_key(name), list(_LOOKUP), n=3, cutoff=0.5)
        names = list(dict.fromkeys(_LOOKUP[c].name for c in close))  # closest first, no repeats
        hint = f"; did you mean {', '.join(names)}?" if names else ""
        raise DatasetError(f"unknown CoOp dataset {name!r}{hint} (known: {', '.join(COOP_DATASETS)})")
    return layout


def _marker(layout: CoopLayout) -> str:
    return layout.split_file or {"imagenet": "classnames.txt", "fgvc_aircraft": "variants.txt"}[layout.name]


def _dataset_dir(layout: CoopLayout, root: str) -> str:
    root = os.path.abspath(os.path.expanduser(root))
    require_dir(root, "data root")
    nested = os.path.join(root, layout.dir_name)
    if os.path.isdir(nested):
        return nested
    if os.path.exists(os.path.join(root, _marker(layout))):
        return root  # ROOT is the dataset's own folder
    raise DatasetError(
        f"{layout.title}: {nested} not found; ROOT must be CoOp's data root holding "
        f"'{layout.dir_name}/' (or that folder itself)"
    )


def _entry(path: str, split: str, i: int, entry: Any) -> tuple[str, int, str]:
    where = f"{path}: {split}[{i}]"
    if not isinstance(entry, list) or len(entry) != 3:
        raise DatasetError(f"{where} must be [relative_path, label, classname], got {json.dumps(entry)[:120]}")
    rel, label, cname = entry
    if not isinstance(rel, str) or not rel or os.path.isabs(rel):
        raise DatasetError(f"{where}: path must be a non-empty relative path, got {rel!r}")
    if not isinstance(label, int) or isinstance(label, bool) or label < 0:
        raise DatasetError(f"{where}: label must be a non-negative integer, got {label!r}")
    if not isinstance(cname, str) or not cname.strip():
        raise DatasetError(f"{where}: class name must be a non-empty string, got {cname!r}")
    return rel, label, cname


def _raw_classnames(path: str, entries: dict[str, list[tuple[str, int, str]]]) -> list[str]:
    """Raw class name per label, checking each label has one name and each name one label."""
    by_label: dict[int, tuple[str, str]] = {}
    by_name: dict[str, int] = {}
    for split, items in entries.items():
        for i, (_, label, cname) in enumerate(items):
            where = f"{split}[{i}]"
            known = by_label.setdefault(label, (cname, where))
            if known[0] != cname:
                raise DatasetError(f"{path}: label {label} is {cname!r} at {where} but {known[0]!r} at {known[1]}")
            if by_name.setdefault(cname, label) != label:
                raise DatasetError(f"{path}: class {cname!r} has label {label} at {where} but {by_name[cname]} elsewhere")
    n = len(by_label)
    for label in sorted(by_label):
        if label >= n:
            raise DatasetError(
                f"{path}: label {label} (at {by_label[label][1]}) is out of range: "
                f"the file names {n} classes, so labels must be 0..{n - 1}"
            )
    return [by_label[i][0] for i in range(n)]


def _read_split_json(layout: CoopLayout, dataset_dir: str) -> tuple[list[str], Splits]:
    assert layout.split_file is not None
    path = os.path.join(dataset_dir, layout.split_file)
    if not os.path.isfile(path):
        raise DatasetError(f"{layout.title}: split file not found: {path} (download it as CoOp's DATASETS.md describes)")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(f"{path}: not a readable JSON file: {exc}") from exc
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected an object with 'train', 'val' and 'test' lists, got {type(data).__name__}")
    entries: dict[str, list[tuple[str, int, str]]] = {}
    for split in SPLITS:
        items = data.get(split, [] if split == "val" else None)
        if not isinstance(items, list):
            raise DatasetError(f"{path}: {split!r} must be a list of [relative_path, label, classname], got {items!r:.80}")
        entries[split] = [_entry(path, split, i, e) for i, e in enumerate(items)]
    raw = _raw_classnames(path, entries)

    image_dir = os.path.join(dataset_dir, layout.image_dir) if layout.image_dir else dataset_dir
    require_dir(image_dir, f"{layout.title} image directory")
    keep = [label for label, name in enumerate(raw) if name not in layout.ignored]
    relabel = {old: new for new, old in enumerate(keep)}
    splits = {
        split: [Sample(os.path.normpath(os.path.join(image_dir, rel)), relabel[label])
                for rel, label, _ in items if label in relabel]
        for split, items in entries.items()
    }
    for split, samples in splits.items():
        if samples and not os.path.isfile(samples[0].path):
            raise DatasetError(f"{path}: the first {split} image {samples[0].path} does not exist; is {image_dir} complete?")
    return [layout.clean(raw[i]) for i in keep], splits


def _read_lines(path: str) -> list[str]:
    if not os.path.isfile(path):
        raise DatasetError(f"file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            return [line.strip() for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: not a readable UTF-8 text file: {exc}") from exc


def _read_fgvc_aircraft(layout: CoopLayout, dataset_dir: str) -> tuple[list[str], Splits]:
    variants = _read_lines(os.path.join(dataset_dir, "variants.txt"))
    label_of = {v: i for i, v in enumerate(variants)}
    image_dir = os.path.join(dataset_dir, layout.image_dir)
    require_dir(image_dir, f"{layout.title} image directory")
    splits: Splits = {}
    for split in SPLITS:
        path = os.path.join(dataset_dir, f"images_variant_{split}.txt")
        samples = []
        for n, line in enumerate(_read_lines(path), 1):
            image_id, _, variant = line.partition(" ")
            if variant not in label_of:
                raise DatasetError(f"{path}:{n}: variant {variant!r} is not listed in variants.txt")
            samples.append(Sample(os.path.join(image_dir, image_id + ".jpg"), label_of[variant]))
        splits[split] = samples
    return [layout.clean(v) for v in variants], splits


def _read_imagenet(layout: CoopLayout, dataset_dir: str) -> tuple[list[str], Splits]:
    names_path = os.path.join(dataset_dir, "classnames.txt")
    names: dict[str, str] = {}
    for n, line in enumerate(_read_lines(names_path), 1):
        wnid, _, name = line.partition(" ")
        if not name.strip():
            raise DatasetError(f"{names_path}:{n}: expected '<wnid> <class name>', got {line!r}")
        names[wnid] = name.strip()
    train_dir = os.path.join(dataset_dir, layout.image_dir, "train")
    val_dir = os.path.join(dataset_dir, layout.image_dir, "val")
    require_dir(train_dir, "ImageNet train folder")
    require_dir(val_dir, "ImageNet val folder (CoOp's test set)")
    wnids = list_subdirs(train_dir)
    missing = [w for w in wnids if w not in names]
    if missing:
        raise DatasetError(f"{names_path}: no class name for {len(missing)} train folders, e.g. {missing[:5]}")
    val_wnids = list_subdirs(val_dir)
    if not val_wnids:
        raise DatasetError(f"{val_dir} has no class folders; CoOp expects val images sorted into <wnid>/ folders like train/")
    extra = sorted(set(val_wnids) - set(wnids))
    if extra:
        raise DatasetError(f"{val_dir}: class folders not in {train_dir}: {extra[:5]}")
    label_of = {w: i for i, w in enumerate(wnids)}
    counts = Counter(names[w] for w in wnids)
    for wnid, (old, new) in IMAGENET_RENAMES.items():
        if wnid in label_of and names[wnid] == old and counts[old] > 1:
            logger.info("imagenet: renaming duplicate class %r (%s) to %r", names[wnid], wnid, new)
            names[wnid] = new

    def read(split_dir: str, folders: list[str]) -> list[Sample]:
        return [Sample(p, label_of[w]) for w in folders for p in list_images(os.path.join(split_dir, w))]

    # CoOp tests on ImageNet's val set; there is no separate validation split.
    return [layout.clean(names[w]) for w in wnids], {"train": read(train_dir, wnids), "val": [], "test": read(val_dir, val_wnids)}


def load_coop_dataset(name: str, root: str) -> ImageDataset:
    """Load one of the 11 CoOp datasets from CoOp's layout under ``root``.

    Args:
        name: dataset name, e.g. ``oxford_pets`` or ``OxfordPets``.
        root: CoOp's data root (holding the dataset's folder) or the dataset's folder itself.
    """
    layout = get_coop_layout(name)
    dataset_dir = _dataset_dir(layout, root)
    if layout.name == "imagenet":
        classnames, splits = _read_imagenet(layout, dataset_dir)
    elif layout.name == "fgvc_aircraft":
        classnames, splits = _read_fgvc_aircraft(layout, dataset_dir)
    else:
        classnames, splits = _read_split_json(layout, dataset_dir)
    try:
        ds = ImageDataset(layout.name, tuple(classnames), **{k: tuple(v) for k, v in splits.items()})
    except DatasetError as exc:
        raise DatasetError(f"{dataset_dir}: {exc}") from exc
    logger.info(
        "loaded %s from %s: %d classes, %d/%d/%d train/val/test images",
        layout.name, dataset_dir, ds.num_classes, len(ds.train), len(ds.val), len(ds.test),
    )
    return ds
