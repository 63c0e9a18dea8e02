"""Torch-free image preprocessing, numerically equal to open_clip's eval transform.

open_clip 3.3.0 evaluates images with torchvision on PIL: ``Resize`` (shortest side, or both sides
for 'squash') -> ``CenterCrop`` -> ``convert("RGB")`` -> ``ToTensor`` -> ``Normalize``. The mode
conversion comes *after* the resize, so RGBA/LA images are resized with PIL's premultiplied alpha
and palette images with nearest neighbour; calling the same PIL operations in the same order keeps
that. ``tests/test_tokenizer_preprocess.py`` checks equality against open_clip.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, field_validator

# open_clip's defaults (OPENAI_DATASET_MEAN / STD), used when its cfg omits mean or std.
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

_PIL_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
_OPEN_CLIP_KEYS = {"size", "mode", "mean", "std", "interpolation", "resize_mode", "fill_color"}

_Finite = Annotated[float, Field(allow_inf_nan=False)]


class PreprocessConfig(BaseModel):
    """How an image becomes a normalised ``[3, S, S]`` float32 array.

    Attributes:
        image_size: Side S of the square model input.
        mean: Per-channel mean, RGB, on the [0, 1] scale.
        std: Per-channel standard deviation, RGB, all > 0.
        interpolation: PIL resampling filter for the resize.
        resize_mode: 'shortest' resizes the shorter side to S and centre-crops; 'squash' resizes
            straight to S x S, ignoring the aspect ratio.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    image_size: Annotated[int, Field(gt=0, strict=True)]
    mean: tuple[_Finite, _Finite, _Finite]
    std: tuple[_Finite, _Finite, _Finite]
    interpolation: Literal["bicubic", "bilinear"] = "bicubic"
    resize_mode: Literal["shortest", "squash"] = "shortest"

    @field_validator("std")
    @classmethod
    def _std_positive(cls, std: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(s <= 0 for s in std):
            raise ValueError(f"std must be > 0 in every channel, got {std}")
        return std

    @classmethod
    def from_open_clip(cls, cfg: Mapping[str, Any]) -> PreprocessConfig:
        """Convert ``open_clip.get_model_preprocess_cfg(model)`` output.

        Args:
            cfg: open_clip's preprocess dict (``size``, ``mean``, ``std``, ``interpolation``,
                ``resize_mode``, ``mode``, ``fill_color``); ``size`` may be an int or ``(H, W)``.

        Raises:
            ValueError: Non-square size, a resize mode or image mode this module does not
                implement, or an unknown key.
        """
        unknown = set(cfg) - _OPEN_CLIP_KEYS
        if unknown:
            raise ValueError(f"unknown open_clip preprocess keys {sorted(unknown)}")
        if "size" not in cfg:
            raise ValueError("open_clip preprocess cfg has no 'size'")
        size = cfg["size"]
        if isinstance(size, Sequence):
            if len(size) != 2 or size[0] != size[1]:
                raise ValueError(f"only square image sizes are supported, got size={tuple(size)}")
            size = size[0]
        if cfg.get("mode", "RGB") != "RGB":
            raise ValueError(f"only mode 'RGB' is supported, got {cfg['mode']!r}")
        # open_clip treats None as "default" and evaluates 'random' interpolation as bicubic.
        interpolation = cfg.get("interpolation") or "bicubic"
        if interpolation == "random":
            interpolation = "bicubic"
        resize_mode = cfg.get("resize_mode") or "shortest"
        if resize_mode not in ("shortest", "squash"):
            raise ValueError(f"resize_mode {resize_mode!r} is not supported (use 'shortest' or 'squash')")
        return cls(
            image_size=size,
            mean=_three(cfg.get("mean"), OPENAI_MEAN),
            std=_three(cfg.get("std"), OPENAI_STD),
            interpolation=interpolation,
            resize_mode=resize_mode,
        )


def _three(value: float | Sequence[float] | None, default: tuple[float, float, float]) -> tuple[float, ...]:
    # open_clip uses its default for a missing value and broadcasts a scalar to three channels;
    # a sequence of the wrong length is left for validation to reject.
    if value is None:
        return default
    return (value,) * 3 if isinstance(value, (int, float)) else tuple(value)


def _resized_size(width: int, height: int, cfg: PreprocessConfig) -> tuple[int, int]:
    """Output (width, height) of torchvision's ``Resize`` for this config."""
    s = cfg.image_size
    if cfg.resize_mode == "squash":
        return s, s
    # torchvision: the shorter side becomes S, the longer int(S * long / short) (floor).
    if width <= height:
        return s, int(s * height / width)
    return int(s * width / height), s


def preprocess_image(image: Image.Image, cfg: PreprocessConfig) -> np.ndarray:
    """Resize, centre-crop, convert to RGB and normalise one image like open_clip's eval transform.

    Returns:
        float32 array ``[3, S, S]``.
    """
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image, got {type(image).__name__}")
    width, height = image.size
    if width == 0 or height == 0:
        raise ValueError(f"image has an empty side: {image.size}")
    size = _resized_size(width, height, cfg)
    if size != image.size:  # torchvision skips the resize when nothing changes
        image = image.resize(size, _PIL_RESAMPLE[cfg.interpolation])
    if cfg.resize_mode == "shortest":
        # Both sides are >= S after the resize, so torchvision's CenterCrop never pads here;
        # its offsets use Python's round (half to even).
        s = cfg.image_size
        top = int(round((size[1] - s) / 2.0))
        left = int(round((size[0] - s) / 2.0))
        image = image.crop((left, top, left + s, top + s))
    pixels = np.asarray(image.convert("RGB"), dtype=np.uint8)  # [S, S, 3]
    # Same float32 operations as ToTensor (/255) and Normalize ((x - mean) / std).
    x = pixels.transpose(2, 0, 1).astype(np.float32) / np.float32(255)
    mean = np.asarray(cfg.mean, dtype=np.float32).reshape(3, 1, 1)
    std = np.asarray(cfg.std, dtype=np.float32).reshape(3, 1, 1)
    return np.ascontiguousarray((x - mean) / std)


def preprocess_batch(images: Sequence[Image.Image], cfg: PreprocessConfig) -> np.ndarray:
    """Preprocess images into one float32 array ``[B, 3, S, S]`` (``B`` may be 0)."""
    if not images:
        return np.zeros((0, 3, cfg.image_size, cfg.image_size), dtype=np.float32)
    return np.stack([preprocess_image(image, cfg) for image in images])
