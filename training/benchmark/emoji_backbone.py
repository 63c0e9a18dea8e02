"""``emoji-vit-s``: a small ViT CLIP in open_clip's architecture, pretrained on emoji scenes.

The architecture is an ordinary open_clip ``CLIP`` (built with :func:`training.backbones.build_clip`),
so every prompt method, deep vision prompts included, applies unchanged. Its weights are produced by
``promptbake pretrain`` (:mod:`training.benchmark.pretrain`) and ship as fp16 safetensors in
``training/weights/``, one file per version (``emoji-vit-s-v1``, ``emoji-vit-s-v2``, ...; the bare
name ``emoji-vit-s`` is an alias of the latest), loaded as float32. The file's metadata records the architecture it was
trained with (``arch``, JSON), so weights and code cannot silently disagree.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import open_clip
import torch
from open_clip.model import CLIP

from exports.preprocess import PreprocessConfig
from training.constants import EMOJI_VIT_S_VERSIONS
from training.backbones import (
    OPENAI_MEAN, OPENAI_STD, Backbone, BackboneError, build_clip, register_backbone, register_backbone_alias,
)

logger = logging.getLogger(__name__)

NAME = "emoji-vit-s"
WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
# Shipped weight versions, oldest first (defined in training.constants); ``emoji-vit-s`` names the
# last. A version, once shipped, never changes (benchmark tables name the version they ran on); better
# weights ship as a new version.
VERSIONS = EMOJI_VIT_S_VERSIONS
LATEST = VERSIONS[-1]
TOKENIZER = "ViT-B-16"  # open_clip's CLIP BPE tokenizer (bundled with open_clip, works offline)


@dataclass(frozen=True)
class EmojiArch:
    """The ViT CLIP shape. Defaults are ``emoji-vit-s``: 7.8M parameters, 6.3M of them the token table."""

    image_size: int = 48
    patch_size: int = 8
    vision_width: int = 128
    vision_layers: int = 4
    vision_head_width: int = 32
    text_width: int = 128
    text_heads: int = 4
    text_layers: int = 3
    embed_dim: int = 256
    context_length: int = 77  # kept at CLIP's 77 so every prompt method's token budget applies

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.vision_width % self.vision_head_width or self.text_width % self.text_heads:
            raise ValueError("widths must be multiples of the head width / head count")


def create_emoji_clip(arch: EmojiArch = EmojiArch(), seed: int = 0) -> CLIP:
    """The architecture with a deterministic random initialisation (float32, train mode)."""
    return build_clip(
        embed_dim=arch.embed_dim,
        vision=dict(
            image_size=arch.image_size, patch_size=arch.patch_size, width=arch.vision_width,
            layers=arch.vision_layers, head_width=arch.vision_head_width,
        ),
        text=dict(
            context_length=arch.context_length, vocab_size=49408, width=arch.text_width,
            heads=arch.text_heads, layers=arch.text_layers,
        ),
        seed=seed,
    )


def emoji_preprocess(image_size: int = EmojiArch.image_size) -> PreprocessConfig:
    """Eval preprocessing; benchmark images are already ``image_size`` squares, so the resize is a no-op."""
    return PreprocessConfig(image_size=image_size, mean=OPENAI_MEAN, std=OPENAI_STD)


def arch_metadata(arch: EmojiArch) -> dict[str, str]:
    """safetensors metadata recording ``arch``."""
    return {"arch": json.dumps(asdict(arch), sort_keys=True), "backbone": NAME}


def versioned_name(version: str) -> str:
    """``emoji-vit-s-v2`` for ``v2``."""
    return f"{NAME}-{version}"


def weights_path(version: str = LATEST) -> Path:
    """Where the shipped weights of ``version`` live (``training/weights/emoji-vit-s-vN.safetensors``)."""
    return WEIGHTS_DIR / f"{versioned_name(version)}.safetensors"


WEIGHTS = weights_path(LATEST)


def load_emoji_weights(path: Path = WEIGHTS) -> tuple[EmojiArch, dict[str, torch.Tensor]]:
    """The architecture and float32 state dict stored in ``path``; a clear error if it is missing."""
    if not path.is_file():
        raise BackboneError(
            f"{NAME} weights not found at {path}. Produce them with "
            f"`promptbake pretrain --out runs/pretrain-{NAME} --install VERSION` "
            f"(or `python -m training.benchmark.pretrain --out runs/pretrain-{NAME} --install VERSION`); "
            "see docs/benchmark.md"
        )
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    try:
        arch = EmojiArch(**json.loads(meta["arch"])) if "arch" in meta else EmojiArch()
    except (TypeError, ValueError) as e:
        raise BackboneError(f"{path}: unreadable 'arch' metadata ({e})") from e
    return arch, {k: v.float() for k, v in load_file(str(path)).items()}


def create_emoji_backbone(path: Path = WEIGHTS, spec: str = versioned_name(LATEST)) -> Backbone:
    """A frozen pretrained emoji CLIP from ``path`` (default: the latest shipped version)."""
    arch, state = load_emoji_weights(path)
    model = create_emoji_clip(arch)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise BackboneError(
            f"{path} does not match its recorded architecture: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return Backbone(spec, model, open_clip.get_tokenizer(TOKENIZER), emoji_preprocess(arch.image_size))


def _register_versions() -> None:
    for version in VERSIONS:
        name = versioned_name(version)
        register_backbone(name, f"ViT CLIP (48 px, patch 8, 4+3 layers) pretrained offline on emoji scenes, weights {version}")(
            lambda name=name, version=version: create_emoji_backbone(weights_path(version), spec=name)
        )
    # Runs that recorded the bare name were trained before versioning, on v1.
    register_backbone_alias(NAME, versioned_name(LATEST), recorded_as=versioned_name("v1"))


_register_versions()
