"""ProText: deep text prompts learned from class descriptions alone, no images.

Follows "Learning to Prompt with Text Only Supervision for Vision-Language Models" (Khattak et
al., AAAI 2025) and its official code, muzairkhattak/ProText at
f63d96bc971f6fde5d55e8e24bc5d93bb463453f (``trainers/protext.py``; the text-only data in
``Dassl.pytorch/dassl/data/data_manager.py``, ``DatasetWrapper_TextOnly``; deep prompts in
``clip/model.py``, ``ResidualAttentionBlock_IVLP``; ``configs/trainers/ProText/``).

Learned: the text context ``ctx`` (n_ctx = 4, initialised from the first tokens of "a photo of a"
when n_ctx is at most its length, else N(0, 0.02) behind "X" placeholders, as the reference) and
deep text prompts replacing positions 1..n_ctx before text blocks 1..depth-1 (depth 9). The image
tower is frozen CLIP.

Training data: one pair per (base class, description sentence): the input is the class prompt
("a photo of a {class}."), the target the description through the frozen CLIP text tower. Loss:
``1000 * MSE(normalised prompted embedding, normalised description embedding)`` (``L_TWO_NORM``
with ``L_TWO_WEIGHT`` 1000; ``loss="l1"`` is the reference's alternative). Classes without a
description are left out of training (the reference drops them silently; here a warning counts
them). At test time class names go through the prompted text tower; images through frozen CLIP.

Defaults: the ImageNet config (``base2novel/imagenet.yaml``): n_ctx 4, depth 9, AdamW lr 0.03,
weight decay 0.1, betas (0.9, 0.98), batch 256 text pairs, 30 epochs, 5 constant warm-up epochs
at 1e-5, cosine, last-epoch checkpoint (``train_defaults``). Other datasets use other lr /
epochs / n_ctx (the reference's table: lr 0.0025-0.03, 30-200 epochs, n_ctx 4-16).

Descriptions: the reference reads LLM (CuPL) files per dataset; promptbake takes any CuPL-format
file (``--descriptions``) and, on the emoji benchmarks, ships descriptions built from Unicode CLDR
annotations and emoji groups (docs/benchmark.md).

Reference quirks:
- The deep prompts are cast to fp16 on every forward before they join the fp32 stream, so their
  values are rounded to fp16 (``fp16_deep_prompts=True`` reproduces it; default off: fp32).
- With n_ctx > 4 the reference's X-placeholder targets use the raw dataset key (underscores kept);
  here every prompt is built from the class name.

Deliberate deviations: fp32 training (the config's PREC "fp16" flag only reaches those casts);
the frozen zero-shot CLIP that embeds the targets is the backbone itself (same weights).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from training.backbones import Backbone
from training.protocol import Capabilities, MethodConfig, register_method
from training.prompts.context import init_context
from training.prompts.deep import DeepPromptMethod, validate_prompt_options
from training.prompts.knowledge import frozen_text_features
from training.prompts.text import trim_tokens


@dataclass(frozen=True)
class ProTextConfig(MethodConfig):
    """Args:
    n_ctx: learned context tokens (and tokens per deep prompt).
    ctx_init: phrase initialising the context when n_ctx fits in it ("" = random N(0, init_std)).
    prompt_depth: text blocks with prompts (1 = the input context only).
    init_std: std of the random initialisations.
    loss: "l2" (MSE, the reference default) or "l1".
    loss_weight: the MSE's weight (reference 1000).
    fp16_deep_prompts: round the deep prompts to fp16 on every forward, as the reference does.
    """

    n_ctx: int = 4
    ctx_init: str = "a photo of a"
    prompt_depth: int = 9
    init_std: float = 0.02
    loss: Literal["l2", "l1"] = "l2"
    loss_weight: float = 1000.0
    fp16_deep_prompts: bool = False

    def __post_init__(self) -> None:
        validate_prompt_options(self, n_ctx=("n_ctx",), depth=("prompt_depth",), min_depth=1)
        if self.loss not in ("l2", "l1"):
            raise ValueError(f"loss must be l2 or l1, got {self.loss!r}")
        if self.loss_weight <= 0:
            raise ValueError(f"loss_weight must be > 0, got {self.loss_weight}")


@register_method("protext", "ProText: deep text prompts trained on class descriptions alone (Khattak et al. 2025)")
class ProText(DeepPromptMethod):
    config_cls = ProTextConfig
    train_defaults = {"epochs": 30, "batch_size": 256, "lr": 0.03, "optimizer": "adamw", "weight_decay": 0.1,
                      "adam_betas": (0.9, 0.98), "warmup_epochs": 5}
    published_b2n = (72.95, 76.98, 74.91)
    published_source = "its README (muzairkhattak/ProText @ f63d96b), trained on CuPL descriptions"
    training_data = "texts"
    needs_train_descriptions = True

    def __init__(self, backbone: Backbone, config: ProTextConfig, train_classnames: Sequence[str]):
        super().__init__(backbone, config, train_classnames)
        phrase = config.ctx_init.replace("_", " ").strip()
        fits = bool(phrase) and config.n_ctx <= init_context(backbone, None, phrase, config.init_std).shape[0]
        # the reference: "if ctx_init and n_ctx <= 4" (the length of "a photo of a"), else random + X
        self._init_text_prompts(config.n_ctx, phrase if fits else "", config.prompt_depth, config.init_std)

    @classmethod
    def capabilities_for(cls, config: ProTextConfig) -> Capabilities:
        return Capabilities()

    def text_prompts(self) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        ctx, deep = super().text_prompts()
        if self.config.fp16_deep_prompts:  # the reference's .half() on every forward (autograd passes through)
            deep = [p.half().to(p.dtype) for p in deep]
        return ctx, deep

    def training_texts(self) -> TensorDataset:
        """(class prompt tokens, description tokens) for every description sentence of every training class."""
        if not self.descriptions:
            raise ValueError(f"{self.name} trains on class descriptions: none were given (use_descriptions)")
        names = [n for n in self.train_classnames if self.descriptions.get(n)]
        prompts = self.tokenize(names)[0]  # [C, L]
        rows, sentences = [], []
        for i, n in enumerate(names):
            rows += [i] * len(self.descriptions[n])
            sentences += self.descriptions[n]
        targets = trim_tokens(self.backbone.tokenizer(sentences), self.backbone.eot_token_id)
        return TensorDataset(prompts[torch.tensor(rows)], targets)

    def compute_loss(
        self, inputs: torch.Tensor, labels: torch.Tensor, tokens: torch.Tensor, *, are_features: bool = False
    ) -> tuple[torch.Tensor, None]:
        """``inputs`` [B, L] class-prompt tokens, ``labels`` [B, L'] description tokens -> (loss, no logits)."""
        prompted = F.normalize(self.encode_text(inputs).float(), dim=-1)
        target = frozen_text_features(self, labels)
        if self.config.loss == "l2":
            return self.config.loss_weight * F.mse_loss(prompted, target), None
        return F.l1_loss(prompted, target), None
