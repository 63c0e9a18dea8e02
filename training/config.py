"""Training options, kept free of torch.

``promptbake`` derives its ``train`` options from :class:`TrainConfig` when it builds its parser,
and the parser is built for every command, the torch-free ones (``verify``, ``predict``, ``serve``)
included; so this module imports only the standard library. :mod:`training.loop` re-exports it.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal, Mapping


@dataclass(frozen=True)
class TrainConfig:
    """Args:
    epochs: passes over the few-shot training set.
    batch_size: images per step (CoOp: 32; CoCoOp: 1).
    optimizer: "sgd" (the reference) or "adamw".
    lr: peak learning rate after warm-up.
    weight_decay, momentum: optimizer settings (Dassl defaults).
    adam_betas: AdamW's betas (Dassl default (0.9, 0.999); ProText (0.9, 0.98)).
    adam_eps: AdamW's epsilon (PyTorch's 1e-8; the TCP family's configs set 1e-3).
    warmup_epochs, warmup_lr: the reference's constant warm-up.
    precision: "auto" = AMP (fp16 autocast + grad scaling) on CUDA, fp32 on CPU.
    device: "auto", "cpu" or "cuda".
    workers: data-loading worker processes.
    feature_cache_views: 0 = off (the reference protocol). N > 0 precomputes the image features of
        N augmented views per training image once, then samples one view per image per epoch;
        only for methods that leave the image encoder untouched.
    min_crop_scale: smallest area fraction of RandomResizedCrop (reference 0.08; on small,
        centred objects such crops often cut the object out).
    select: which epoch's tensors the run keeps: "last" (the protocol's default) or "best_val",
        the epoch with the best accuracy on the few-shot validation split of the base classes
        (min(shots, 4) images per class; Dassl's ``TEST.FINAL_MODEL best_val``).
    """

    epochs: int = 10
    batch_size: int = 32
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.002
    weight_decay: float = 5e-4
    momentum: float = 0.9
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    warmup_epochs: int = 1
    warmup_lr: float = 1e-5
    precision: Literal["auto", "fp32", "amp"] = "auto"
    device: str = "auto"
    workers: int = 0
    feature_cache_views: int = 0
    min_crop_scale: float = 0.08
    select: Literal["last", "best_val"] = "last"

    def __post_init__(self) -> None:
        object.__setattr__(self, "adam_betas", tuple(self.adam_betas))  # a list from the CLI or run.json
        for name in ("lr", "weight_decay", "momentum", "warmup_lr", "min_crop_scale", "adam_betas", "adam_eps"):
            values = getattr(self, name)
            if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in (values if isinstance(values, tuple) else (values,))):
                raise ValueError(f"{name} must be a finite number, got {values!r}")
        if self.epochs < 0:
            raise ValueError("epochs must be >= 0")
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if self.optimizer not in ("sgd", "adamw"):
            raise ValueError(f"optimizer must be sgd or adamw, got {self.optimizer!r}")
        if self.lr <= 0 or self.warmup_lr <= 0 or self.adam_eps <= 0:
            raise ValueError("lr, warmup_lr and adam_eps must be > 0")
        if self.weight_decay < 0 or self.momentum < 0:
            raise ValueError(f"weight_decay and momentum must be >= 0, got {self.weight_decay}, {self.momentum}")
        if self.precision not in ("auto", "fp32", "amp"):
            raise ValueError(f"precision must be auto, fp32 or amp, got {self.precision!r}")
        if self.select not in ("last", "best_val"):
            raise ValueError(f"select must be last or best_val, got {self.select!r}")
        if not 0 < self.min_crop_scale <= 1:
            raise ValueError(f"min_crop_scale must be in (0, 1], got {self.min_crop_scale}")
        if len(self.adam_betas) != 2 or not all(0.0 <= b < 1.0 for b in self.adam_betas):
            raise ValueError(f"adam_betas must be two numbers in [0, 1), got {self.adam_betas}")
        if self.workers < 0 or self.feature_cache_views < 0 or self.warmup_epochs < 0:
            raise ValueError("workers, feature_cache_views and warmup_epochs must be >= 0")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (tuples as lists), as run.json holds it."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TrainConfig":
        return cls(**data)
