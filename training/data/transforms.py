"""Image transforms and a torch ``Dataset`` over :class:`Sample` lists.

The train transform is CoOp's (``random_resized_crop``, ``random_flip``, ``normalize`` with Dassl's
default crop scale ``(0.08, 1.0)``). The eval transform *is* open_clip's eval transform, so
evaluation here sees the same tensors as ``exports.preprocess`` and the service.
"""
from __future__ import annotations

import logging
from typing import Callable, Protocol, Sequence

import open_clip
import torch
from PIL import Image
from torchvision import transforms as T

from training.data.core import DatasetError, Sample

logger = logging.getLogger(__name__)

TRAIN_CROP_SCALE = (0.08, 1.0)
#: decoded training images kept in memory at most (:meth:`SampleDataset.keep_decoded`): 16 shots of
#: 1,000 ImageNet classes at ~500x375 RGB are ~9 GB, the emoji benchmarks' 1,632 images 11 MB
MAX_IN_MEMORY_BYTES = 2 * 2**30
#: decoded bytes per pixel of Pillow's modes (anything else counts 4)
_BYTES_PER_PIXEL = {"1": 1, "L": 1, "P": 1, "LA": 2, "PA": 2, "La": 2, "I;16": 2, "I;16B": 2, "I;16L": 2,
                    "RGB": 3, "YCbCr": 3, "LAB": 3, "HSV": 3, "RGBA": 4, "RGBa": 4, "RGBX": 4, "CMYK": 4,
                    "I": 4, "F": 4}
_INTERPOLATION = {
    "bicubic": T.InterpolationMode.BICUBIC,
    "bilinear": T.InterpolationMode.BILINEAR,
    "random": T.InterpolationMode.BICUBIC,  # open_clip evaluates 'random' as bicubic too
}


class PreprocessLike(Protocol):
    """What the transforms read from ``exports.preprocess.PreprocessConfig`` (duck-typed)."""

    image_size: int | tuple[int, int]
    mean: Sequence[float]
    std: Sequence[float]
    interpolation: str
    resize_mode: str


class ToRGB:
    """``PIL.Image.convert("RGB")``; a class rather than a lambda so DataLoader workers can pickle it."""

    def __call__(self, image: Image.Image) -> Image.Image:
        return image.convert("RGB")

    def __repr__(self) -> str:
        return "ToRGB()"


def _interpolation(pre: PreprocessLike) -> T.InterpolationMode:
    name = pre.interpolation or "bicubic"
    if name not in _INTERPOLATION:
        raise ValueError(f"unknown interpolation {name!r}; expected one of {sorted(_INTERPOLATION)}")
    return _INTERPOLATION[name]


def build_train_transform(pre: PreprocessLike, min_crop_scale: float = TRAIN_CROP_SCALE[0]) -> Callable[[Image.Image], torch.Tensor]:
    """CoOp's training augmentation: RGB -> RandomResizedCrop -> flip -> tensor -> normalise.

    Args:
        pre: the backbone's preprocessing.
        min_crop_scale: smallest crop area fraction (the reference's 0.08 by default).

    Returns:
        PIL image -> float32 tensor ``[3, S, S]``.
    """
    if not 0 < min_crop_scale <= 1:
        raise ValueError(f"min_crop_scale must be in (0, 1], got {min_crop_scale}")
    return T.Compose([
        ToRGB(),
        T.RandomResizedCrop(pre.image_size, scale=(min_crop_scale, TRAIN_CROP_SCALE[1]), interpolation=_interpolation(pre)),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(mean=tuple(pre.mean), std=tuple(pre.std)),
    ])


def build_resize_transform(pre: PreprocessLike) -> Callable[[Image.Image], torch.Tensor]:
    """Dassl's un-augmented training image (``img0``): RGB -> resize straight to the input size (the
    aspect ratio is not kept, nothing is cropped) -> tensor -> normalise."""
    size = pre.image_size if isinstance(pre.image_size, (tuple, list)) else (pre.image_size, pre.image_size)
    return T.Compose([
        ToRGB(),
        T.Resize(tuple(size), interpolation=_interpolation(pre)),
        T.ToTensor(),
        T.Normalize(mean=tuple(pre.mean), std=tuple(pre.std)),
    ])


class MultiView:
    """``views`` independent draws of ``augment`` of one image, then ``extra`` transforms of it (TAC's
    K augmented views and the un-augmented image), stacked: PIL image -> ``[views + len(extra), 3, S, S]``.
    A class so that DataLoader workers can pickle it."""

    def __init__(self, augment: Callable[[Image.Image], torch.Tensor], views: int,
                 extra: Sequence[Callable[[Image.Image], torch.Tensor]] = ()) -> None:
        if views < 1:
            raise ValueError(f"views must be >= 1, got {views}")
        self.augment, self.views, self.extra = augment, views, tuple(extra)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return torch.stack([self.augment(image) for _ in range(self.views)] + [t(image) for t in self.extra])

    def __repr__(self) -> str:
        return f"MultiView({self.augment!r}, views={self.views}, extra={self.extra!r})"


def build_eval_transform(pre: PreprocessLike) -> Callable[[Image.Image], torch.Tensor]:
    """open_clip's eval transform for this preprocessing (resize, centre crop, RGB, tensor, normalise).

    Returns:
        PIL image -> float32 tensor ``[3, S, S]``.
    """
    _interpolation(pre)  # same error as the train transform for an unknown name
    return open_clip.image_transform(
        pre.image_size,
        is_train=False,
        mean=tuple(pre.mean),
        std=tuple(pre.std),
        interpolation=pre.interpolation,
        resize_mode=pre.resize_mode,
    )


def load_image(path: str) -> Image.Image:
    """Read an image fully into memory, in its file's mode; failures are DatasetErrors naming the path.

    The mode is kept because open_clip (and ``exports.preprocess``) convert to RGB *after* resizing.
    """
    try:
        with Image.open(path) as image:
            image.load()
            return image
    # PIL signals corrupt files with OSError, ValueError, SyntaxError (some PNG chunks) and its own
    # DecompressionBombError.
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DatasetError(f"cannot read image {path}: {exc}") from exc


class SampleDataset(torch.utils.data.Dataset):
    """``samples[i]`` -> ``(transform(image), label)``.

    Args:
        samples: the images and labels to serve.
        transform: PIL image -> tensor, e.g. :func:`build_train_transform`.
    """

    def __init__(self, samples: Sequence[Sample], transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.samples = tuple(samples)
        self.transform = transform
        self._decoded: list[Image.Image] | None = None

    def keep_decoded(self, max_bytes: int = MAX_IN_MEMORY_BYTES) -> bool:
        """Decode every image once and serve it from memory from now on, if the decoded pixels fit in
        ``max_bytes``; returns whether they did. The transform sees the same images either way (it
        never changes its input), so the samples are identical to reading the files each time."""
        need = 0
        for sample in self.samples:
            try:
                with Image.open(sample.path) as image:  # the header only
                    need += image.width * image.height * _BYTES_PER_PIXEL.get(image.mode, 4)
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
                raise DatasetError(f"cannot read image {sample.path}: {exc}") from exc
        if need > max_bytes:
            logger.info("%d training images would take %.1f GB decoded (more than %.1f GB): read from disk each time",
                        len(self.samples), need / 1e9, max_bytes / 1e9)
            return False
        self._decoded = [load_image(s.path) for s in self.samples]
        return True

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        sample = self.samples[index]
        image = self._decoded[index] if self._decoded is not None else load_image(sample.path)
        return self.transform(image), sample.label
