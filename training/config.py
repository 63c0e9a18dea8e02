"""Training options, kept free of torch.

``promptbake`` derives its ``train`` options from :class:`TrainConfig` when it builds its parser,
and the parser is built for every command, the torch-free ones (``verify``, ``predict``, ``serve``)
included; so this module imports only the standard library. :mod:`training.loop` re-exports it.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, Mapping, get_args, get_origin, get_type_hints


def _matches(value: Any, tp: Any) -> bool:
    """Whether ``value`` fits the annotation ``tp`` (the forms configs use; others are not checked)."""
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if tp is type(None):
        return value is None
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if origin is tuple:
        if isinstance(value, str) and args == (str, Ellipsis):
            return True  # a comma-separated list the config splits ("--attributes color,shape")
        if not isinstance(value, (tuple, list)):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_matches(v, args[0]) for v in value)
        return len(value) == len(args) and all(_matches(v, a) for v, a in zip(value, args))
    return True


def _describe(tp: Any) -> str:
    origin, args = get_origin(tp), get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if tp is type(None):
        return "None"
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_describe(args[0])}"
        return f"a list of {len(args)} {' and '.join(sorted({_describe(a) for a in args}))}"
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def check_types(cls: type, values: Mapping[str, Any]) -> None:
    """Raise a ValueError naming the option when a value does not fit its field's annotation in the
    dataclass ``cls`` (a string epochs from a notebook would otherwise fail later as a TypeError)."""
    hints = get_type_hints(cls)
    for name, value in values.items():
        if name in hints and not _matches(value, hints[name]):
            raise ValueError(f"{cls.__name__}: {name} must be {_describe(hints[name])}, got {value!r} ({type(value).__name__})")


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
    images_in_memory: decode the training images once and keep them in memory (the augmentations
        see the same images, so the tensors are identical to reading them every epoch); beyond
        ``MAX_IN_MEMORY_BYTES`` of decoded pixels they are read from disk each time, as the reference does.
    full_context: run the text tower as the reference implementations do: every prompt padded to
        the full context length (77 tokens) and every class's prompt through the whole tower, instead
        of trimming the padding after the longest prompt and running the prefix all prompts share
        once (both exact for the causal tower, and several times cheaper). For ``bench train``'s
        reference-style loop.
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
    images_in_memory: bool = True
    full_context: bool = False
    min_crop_scale: float = 0.08
    select: Literal["last", "best_val"] = "last"

    def __post_init__(self) -> None:
        check_types(type(self), {f.name: getattr(self, f.name) for f in dataclasses.fields(self)})
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
