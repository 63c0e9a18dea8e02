"""CoOp: learnable context vectors in front of (or around) the class name.

Follows "Learning to Prompt for Vision-Language Models" (Zhou et al., IJCV 2022) and its official
code, KaiyangZhou/CoOp at ff61507 (``trainers/coop.py``). Defaults are the base-to-novel config
``vit_b16_ctxv1``: 4 context tokens initialised from "a photo of a", class token at the end,
unified context; 16 shots, batch 32, SGD lr 0.002 (see ``train_defaults``).

Deliberate deviations:
- With ``ctx_init`` the number of context tokens is the number of BPE tokens of the phrase; the
  reference counts words (``len(ctx_init.split(" "))``), which misaligns for multi-token words.
- Class-specific context with ``ctx_init`` copies the initial phrase to every class; the reference
  silently falls back to one shared context in that case.
- Context slots are placed by index arithmetic from the end-of-text position instead of a
  per-class Python loop, so "middle"/"front" export to a single ONNX graph. The token sequence is
  the reference's: [SOT] ctx name . [EOT] (end), [SOT] name ctx . [EOT] (front),
  [SOT] ctx[:n/2] name ctx[n/2:] . [EOT] (middle).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch
from torch import nn

from training.backbones import Backbone
from training.methods.base import Capabilities, MethodConfig, PromptMethod, register_method
from training.methods.text import encode_text_embeddings, eot_positions

PLACEHOLDER = "X"


@dataclass(frozen=True)
class CoOpConfig(MethodConfig):
    """Args:
    n_ctx: number of context tokens; None takes it from ``ctx_init`` (or 16 for random init).
    ctx_init: phrase whose token embeddings initialise the context; "" for random N(0, 0.02).
    class_token_position: where the class name goes relative to the context.
    class_specific: one context per training class (CSC); not usable for unseen class names.
    init_std: std of the random initialisation.
    """

    n_ctx: int | None = None
    ctx_init: str = "a photo of a"
    class_token_position: Literal["end", "middle", "front"] = "end"
    class_specific: bool = False
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.n_ctx is not None and self.n_ctx < 1:
            raise ValueError(f"n_ctx must be >= 1, got {self.n_ctx}")
        if self.class_token_position not in ("end", "middle", "front"):
            raise ValueError(f"class_token_position must be end, middle or front, got {self.class_token_position!r}")
        if self.init_std <= 0:
            raise ValueError("init_std must be > 0")


def init_context(backbone: Backbone, n_ctx: int | None, ctx_init: str, std: float, n_copies: int = 0) -> torch.Tensor:
    """Context vectors [n_ctx, W] (or [n_copies, n_ctx, W]) from a phrase or N(0, std)."""
    width = backbone.model.token_embedding.weight.shape[1]
    phrase = ctx_init.replace("_", " ").strip()
    if phrase:
        ids = backbone.tokenizer([phrase])[0]
        n_tok = int(eot_positions(ids[None], backbone.eot_token_id)[0]) - 1
        if n_ctx is not None and n_ctx != n_tok:
            raise ValueError(f"ctx_init {phrase!r} is {n_tok} tokens but n_ctx={n_ctx}; drop n_ctx or change the phrase")
        with torch.no_grad():
            ctx = backbone.model.token_embedding(ids[1 : 1 + n_tok]).clone()
        if n_copies:
            ctx = ctx.unsqueeze(0).repeat(n_copies, 1, 1)
    else:
        shape = (n_copies, n_ctx or 16, width) if n_copies else (n_ctx or 16, width)
        ctx = torch.empty(shape)
        nn.init.normal_(ctx, std=std)
    return ctx


def context_gather_index(tokens: torch.Tensor, eot_idx: torch.Tensor, n_ctx: int, position: str) -> torch.Tensor:
    """[C, L] index into cat([token_embeddings, ctx], dim=1) that lays out the prompt.

    The tokens are those of "X X ... X {name}." (n_ctx placeholders); index values >= L pick a
    context vector (L + j is context slot j).
    """
    C, L = tokens.shape
    pos = torch.arange(L, device=tokens.device).unsqueeze(0).expand(C, L)  # [C, L]
    name_len = (eot_idx - n_ctx - 2).unsqueeze(1)  # SOT, ctx, name, ".", EOT
    if position == "end":
        is_ctx = (pos >= 1) & (pos <= n_ctx)
        return torch.where(is_ctx, L + pos - 1, pos)
    if position == "front":
        is_name = (pos >= 1) & (pos < 1 + name_len)
        is_ctx = (pos >= 1 + name_len) & (pos < 1 + name_len + n_ctx)
        return torch.where(is_name, pos + n_ctx, torch.where(is_ctx, L + pos - 1 - name_len, pos))
    half = n_ctx // 2
    is_ctx1 = (pos >= 1) & (pos < 1 + half)
    is_name = (pos >= 1 + half) & (pos < 1 + half + name_len)
    is_ctx2 = (pos >= 1 + half + name_len) & (pos < 1 + n_ctx + name_len)
    out = torch.where(is_ctx1, L + pos - 1, pos)
    out = torch.where(is_name, pos + (n_ctx - half), out)
    return torch.where(is_ctx2, L + pos - 1 - name_len, out)


@register_method("coop", "CoOp: learnable context tokens (Zhou et al. 2022)")
class CoOp(PromptMethod):
    config_cls = CoOpConfig
    train_defaults = {"epochs": 200, "batch_size": 32, "lr": 0.002}

    def __init__(self, backbone: Backbone, config: CoOpConfig, train_classnames: Sequence[str]):
        super().__init__(backbone, config, train_classnames)
        n_copies = len(self.train_classnames) if config.class_specific else 0
        self.ctx = nn.Parameter(init_context(backbone, config.n_ctx, config.ctx_init, config.init_std, n_copies))

    @classmethod
    def capabilities_for(cls, config: CoOpConfig) -> Capabilities:
        return Capabilities(open_vocabulary=not config.class_specific)

    @property
    def n_ctx(self) -> int:
        return self.ctx.shape[-2]

    def prompt_templates(self) -> list[str]:
        return [" ".join([PLACEHOLDER] * self.n_ctx) + " {}."]

    def prompt_embeddings(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[C, L] tokens -> ([C, L, W] embeddings with the context in place, [C] EOT index)."""
        eot = eot_positions(tokens, self.backbone.eot_token_id)
        emb = self.clip.token_embedding(tokens)  # [C, L, W]
        ctx = self.ctx
        if ctx.dim() == 2:
            ctx = ctx.unsqueeze(0).expand(tokens.shape[0], -1, -1)
        elif ctx.shape[0] != tokens.shape[0]:
            raise ValueError(
                f"class-specific context was trained for {ctx.shape[0]} classes and cannot embed "
                f"{tokens.shape[0]} other class names"
            )
        index = context_gather_index(tokens, eot, self.n_ctx, self.config.class_token_position)
        full = torch.cat([emb, ctx.to(emb.dtype)], dim=1)  # [C, L + n_ctx, W]
        return full.gather(1, index.unsqueeze(-1).expand(-1, -1, emb.shape[-1])), eot

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        emb, eot = self.prompt_embeddings(tokens)
        return encode_text_embeddings(self.clip, emb, eot)
