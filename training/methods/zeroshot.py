"""Zero-shot CLIP: hand-written templates, nothing learned.

Follows CLIP (Radford et al., 2021) as run by CoOp's ``trainers/zsclip.py`` (KaiyangZhou/CoOp at
ff61507): one template, or an ensemble whose per-template normalised embeddings are averaged and
re-normalised (``ZeroshotCLIP2`` with ``IMAGENET_TEMPLATES_SELECT``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from training.protocol import Capabilities, MethodConfig, PromptMethod, register_method
from training.prompts.text import encode_text_embeddings, eot_positions

DEFAULT_TEMPLATE = "a photo of a {}."
# The 7 templates of CoOp's IMAGENET_TEMPLATES_SELECT (facts, reproduced for the ensemble option).
ENSEMBLE_TEMPLATES = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)


@dataclass(frozen=True)
class ZeroShotConfig(MethodConfig):
    """Args:
    templates: prompt templates, each with one ``{}``; more than one means an ensemble.
    ensemble: use the 7-template ensemble instead of ``templates``.
    """

    templates: tuple[str, ...] = (DEFAULT_TEMPLATE,)
    ensemble: bool = False

    def __post_init__(self) -> None:
        if not self.templates:
            raise ValueError("templates must not be empty")
        for t in self.templates:
            if t.count("{}") != 1:
                raise ValueError(f"template {t!r} must contain exactly one '{{}}'")


@register_method("zeroshot", "zero-shot CLIP with one template or a template ensemble")
class ZeroShotCLIP(PromptMethod):
    config_cls = ZeroShotConfig
    train_defaults = {"epochs": 0}
    published_b2n = (69.34, 74.22, 71.70)
    published_source = "CoCoOp paper (Zhou et al., CVPR 2022), Table 1"

    @classmethod
    def capabilities_for(cls, config: ZeroShotConfig) -> Capabilities:
        return Capabilities(trainable=False)

    def prompt_templates(self) -> list[str]:
        return list(ENSEMBLE_TEMPLATES if self.config.ensemble else self.config.templates)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        emb = self.clip.token_embedding(tokens)
        return encode_text_embeddings(self.clip, emb, eot_positions(tokens, self.backbone.eot_token_id))
