"""Learned context tokens around the class name (CoOp's prompt), and the method body built on them.

The prompt of class ``name`` is the token sequence of ``"X X ... X {name}."`` (``n_ctx``
placeholders) whose placeholder embeddings are replaced by learned vectors. CoOp, KgCoOp, ProGrad,
CoCoOp and TCP all lay their context out this way; :class:`ContextPromptMethod` is CoOp's whole
text side, which CoOp, KgCoOp and ProGrad use as it is.

Context slots are placed by index arithmetic from the end-of-text position instead of a per-class
Python loop, so every layout exports to one ONNX graph. The token sequences are CoOp's
(KaiyangZhou/CoOp at ff61507, ``trainers/coop.py``): ``[SOT] ctx name . [EOT]`` (end),
``[SOT] name ctx . [EOT]`` (front), ``[SOT] ctx[:n/2] name ctx[n/2:] . [EOT]`` (middle).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch
from torch import nn

from training.backbones import Backbone
from training.protocol import Capabilities, MethodConfig, PromptMethod
from training.prompts.text import encode_text_embeddings, eot_positions

PLACEHOLDER = "X"


def init_context(backbone: Backbone, n_ctx: int | None, ctx_init: str, std: float, n_copies: int = 0) -> torch.Tensor:
    """Context vectors [n_ctx, W] (or [n_copies, n_ctx, W]) from a phrase or N(0, std).

    With a phrase, the number of context tokens is its number of BPE tokens (CoOp's code counts
    words, ``len(ctx_init.split(" "))``, which misaligns for multi-token words).
    """
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


def place_context(token_embeddings: torch.Tensor, tokens: torch.Tensor, eot_idx: torch.Tensor, ctx: torch.Tensor,
                  position: str = "end") -> torch.Tensor:
    """Token embeddings [C, L, W] of placeholder prompts with the context [C, n_ctx, W] in its slots."""
    index = context_gather_index(tokens, eot_idx, ctx.shape[-2], position)
    full = torch.cat([token_embeddings, ctx.to(token_embeddings.dtype)], dim=1)  # [C, L + n_ctx, W]
    return full.gather(1, index.unsqueeze(-1).expand(-1, -1, token_embeddings.shape[-1]))


def register_text_prefix(module: nn.Module, width: int) -> None:
    """An empty ``text_prefix`` buffer [0, W] on a method with a learned context: the fixed-position
    tokens a plug-in may put between the start token and the context (ATPrompt's attribute blocks),
    swapped in through :meth:`~training.prompts.host.HostedMethod.call_host`. Not saved (it is
    empty on every host; a plug-in owns what it swaps in)."""
    module.register_buffer("text_prefix", torch.zeros(0, width), persistent=False)


def prepend_prefix(prefix: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
    """The context [n, W] or [B, n, W] with ``prefix`` [P, W] in front (the context itself when P = 0)."""
    if prefix.shape[0] == 0:
        return ctx
    p = prefix.to(ctx.dtype)
    if ctx.dim() == 3:
        p = p.unsqueeze(0).expand(ctx.shape[0], -1, -1)
    return torch.cat([p, ctx], dim=-2)


def context_template(n_ctx: int) -> str:
    """The placeholder prompt whose first ``n_ctx`` word slots the context replaces."""
    return " ".join([PLACEHOLDER] * n_ctx) + " {}."


@dataclass(frozen=True)
class ContextConfig(MethodConfig):
    """Options of a CoOp-style context (methods extend it with their own).

    Args:
        n_ctx: number of context tokens; None takes it from ``ctx_init`` (or 16 for random init).
        ctx_init: phrase whose token embeddings initialise the context; "" for random N(0, init_std).
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


class ContextPromptMethod(PromptMethod):
    """Learned context ``ctx`` ([n_ctx, W], or [n_classes, n_ctx, W] class-specific) in the text prompt.

    Not registered: CoOp, KgCoOp and ProGrad are this body with their own config, losses and (for
    ProGrad) initialisation (:meth:`initial_context`).
    """

    config_cls = ContextConfig

    def __init__(self, backbone: Backbone, config: ContextConfig, train_classnames: Sequence[str]):
        super().__init__(backbone, config, train_classnames)
        n_copies = len(self.train_classnames) if config.class_specific else 0
        self.ctx = nn.Parameter(self.initial_context(n_copies))
        register_text_prefix(self, self.ctx.shape[-1])

    def initial_context(self, n_copies: int) -> torch.Tensor:
        """The context before training (``n_copies`` > 0: one per training class)."""
        c = self.config
        return init_context(self.backbone, c.n_ctx, c.ctx_init, c.init_std, n_copies)

    @classmethod
    def capabilities_for(cls, config: ContextConfig) -> Capabilities:
        return Capabilities(open_vocabulary=not config.class_specific)

    @property
    def n_ctx(self) -> int:
        return self.ctx.shape[-2]

    def prompt_templates(self) -> list[str]:
        return [context_template(self.n_ctx)]

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
        ctx = prepend_prefix(self.text_prefix, ctx)  # [C, P + n_ctx, W]
        return place_context(emb, tokens, eot, ctx, self.config.class_token_position), eot

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        emb, eot = self.prompt_embeddings(tokens)
        # one context broadcast to every class: its prefix may run once (not class-specific contexts,
        # which start out equal but are different parameters)
        return encode_text_embeddings(self.clip, emb, eot, share_prefix=self.ctx.dim() == 2)
