"""A dataset from class folders: ``ROOT/{train,val,test}/<class>/<image>``.

Class names are the sorted ``train`` folder names with underscores turned into spaces; ``val`` is
optional; ``val`` and ``test`` may only use classes that ``train`` has.
"""
from __future__ import annotations

import logging
import os

from training.data.core import (
    IMAGE_EXTENSIONS,
    DatasetError,
    ImageDataset,
    Sample,
    clean_classname,
    list_images,
    list_subdirs,
    require_dir,
)

logger = logging.getLogger(__name__)


def load_folder_dataset(root: str) -> ImageDataset:
    """Load ``ROOT/train/<class>/*``, ``ROOT/test/<class>/*`` and optionally ``ROOT/val/<class>/*``.

    Only files directly inside a class folder with one of :data:`IMAGE_EXTENSIONS` (any case) count.

    Raises:
        DatasetError: a missing ``train``/``test`` folder, a train class without images, a val/test
            class missing from train, or class names that collide after clean-up.
    """
    root = os.path.abspath(os.path.expanduser(root))
    require_dir(root, "folder dataset root")
    train_dir = os.path.join(root, "train")
    require_dir(train_dir, "train folder (expected ROOT/train/<class>/<image>)")
    require_dir(os.path.join(root, "test"), "test folder (expected ROOT/test/<class>/<image>)")
    folders = list_subdirs(train_dir)
    if not folders:
        raise DatasetError(f"{train_dir} has no class folders")
    label_of = {f: i for i, f in enumerate(folders)}

    splits: dict[str, tuple[Sample, ...]] = {"val": ()}
    for split in ("train", "val", "test"):
        split_dir = os.path.join(root, split)
        if split == "val" and not os.path.isdir(split_dir):
            continue
        samples: list[Sample] = []
        for folder in list_subdirs(split_dir):
            if folder not in label_of:
                raise DatasetError(f"{os.path.join(split_dir, folder)}: class {folder!r} has no folder in {train_dir}")
            images = list_images(os.path.join(split_dir, folder))
            if split == "train" and not images:
                raise DatasetError(f"{os.path.join(split_dir, folder)} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
            samples.extend(Sample(p, label_of[folder]) for p in images)
        splits[split] = tuple(samples)

    name = os.path.basename(root.rstrip(os.sep)) or "folder"
    try:
        ds = ImageDataset(name, tuple(clean_classname(f) for f in folders), **splits)
    except DatasetError as exc:
        raise DatasetError(f"{train_dir}: {exc}") from exc
    logger.info(
        "loaded folder dataset %s: %d classes, %d/%d/%d train/val/test images",
        root, ds.num_classes, len(ds.train), len(ds.val), len(ds.test),
    )
    return ds
