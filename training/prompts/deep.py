"""Deep prompts inside open_clip's towers, by wrapping them (never forking them).

VPT-deep, IVLP, MaPLe and PromptSRC all do the same thing to a frozen CLIP: some prompt tokens
enter a tower with its input, and before each of the next ``depth - 1`` transformer layers the
outputs at those positions are thrown away and replaced by fresh learned tokens (the reference
code, muzairkhattak/multimodal-prompt-learning at 69bce21ae8eda80ad6187534b2dce09cf6c59e17,
``clip/model.py`` ``ResidualAttentionBlock_IVLP`` / ``_MaPLe``, does it inside forked residual
blocks; here the method iterates open_clip's ``resblocks`` itself). Layers past the depth see the
prompt tokens as ordinary tokens. This module holds that one layer-by-layer forward
(:func:`run_blocks`), its variant that inserts tokens part-way up (:func:`run_blocks_inserting`,
MMRL), the two towers written around it (:func:`encode_text_deep`, :func:`encode_image_deep`), and
:class:`DeepPromptMethod`, the base the four methods share.

Layout (as the reference):
- text: ``[SOT] p_1..p_n <rest of the prompt> [EOT]``. The input prompts replace the token
  embeddings at positions 1..n before the positional embedding is added; deeper prompts replace
  the hidden states at the same positions (no positional embedding).
- vision: ``[CLS] patches p_1..p_n``. The prompts are appended after the positional embedding and
  before ``ln_pre``; deeper prompts replace the last n hidden states; features are pooled from the
  class token, then ``ln_post`` and ``proj``.

With no prompts both towers reproduce open_clip's ``encode_text`` / ``encode_image``. Everything
here is export-friendly: Python control flow depends only on the config and static shapes.
"""
from __future__ import annotations

import logging
from typing import Sequence

import torch
from open_clip.model import CLIP
from open_clip.transformer import Transformer, VisionTransformer
from torch import nn

from training.backbones import Backbone
from training.protocol import MethodConfig, PromptMethod
from training.prompts.context import PLACEHOLDER, init_context, place_context, prepend_prefix, register_text_prefix
from training.prompts.text import (eot_positions, pool_text_features, shared_prefix_length, text_position_inputs,
                                   transformer_shared_prefix)

logger = logging.getLogger(__name__)


# -- the one layer-by-layer forward ----------------------------------------------------------------

def replace_prompts(x: torch.Tensor, prompts: torch.Tensor, start: int) -> torch.Tensor:
    """x [N, L, W] with positions start..start+n replaced by prompts [n, W] (shared by all N)."""
    n = prompts.shape[0]
    p = prompts.to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
    return torch.cat([x[:, :start], p, x[:, start + n :]], dim=1)


def run_blocks(
    transformer: Transformer,
    x: torch.Tensor,
    deep_prompts: Sequence[torch.Tensor] = (),
    start: int = 0,
    attn_mask: torch.Tensor | None = None,
    add: bool = False,
) -> torch.Tensor:
    """Run ``transformer``'s residual blocks on x [N, L, W], replacing prompt tokens on the way.

    ``deep_prompts[k]`` ([n, W]) replaces ``x[:, start:start + n]`` right before block ``k + 1``
    (block 0 sees the prompts that came with the input); with ``add`` it is added to them instead
    (TAP's deep expert prompts). With no prompts this is exactly ``transformer(x, attn_mask)``.
    """
    if len(deep_prompts) >= len(transformer.resblocks):
        raise ValueError(f"{len(deep_prompts)} deep prompts for a {len(transformer.resblocks)}-layer transformer")
    if not getattr(transformer, "batch_first", False):
        raise ValueError("deep prompts need a batch-first open_clip transformer (as in open_clip 3.x)")
    for i, block in enumerate(transformer.resblocks):
        if 1 <= i <= len(deep_prompts):
            if add:
                n = deep_prompts[i - 1].shape[0]
                added = x[:, start : start + n] + deep_prompts[i - 1].to(x.dtype)
                x = torch.cat([x[:, :start], added, x[:, start + n :]], dim=1)
            else:
                x = replace_prompts(x, deep_prompts[i - 1], start)
        x = block(x, attn_mask=attn_mask)
    return x


def run_blocks_injecting(
    transformer: Transformer,
    x: torch.Tensor,
    tokens: torch.Tensor,
    block: int,
    start: int,
    weight: float = 1.0,
    attn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run ``transformer``'s blocks on x [N, L, W]; right before block ``block`` the n positions from
    ``start`` (negative: counted from the end) become ``weight * tokens + (1 - weight) * x`` there, with
    ``tokens`` [N, n, W] one set per sequence (TCP's class-aware text tokens, BIP's image-conditioned
    visual tokens)."""
    blocks = transformer.resblocks
    if not 0 <= block < len(blocks):
        raise ValueError(f"injection before block {block} of a {len(blocks)}-block transformer")
    if not getattr(transformer, "batch_first", False):
        raise ValueError("injected tokens need a batch-first open_clip transformer (as in open_clip 3.x)")
    n = tokens.shape[1]
    lo = start if start >= 0 else x.shape[1] + start
    for i, b in enumerate(blocks):
        if i == block:
            new = tokens.to(x.dtype)
            if weight != 1.0:
                new = weight * new + (1.0 - weight) * x[:, lo : lo + n]
            x = torch.cat([x[:, :lo], new, x[:, lo + n :]], dim=1)
        x = b(x, attn_mask=attn_mask)
    return x


def causal_mask(length: int, device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[L, L] additive mask with -inf above the diagonal (CLIP's text-tower mask for any length)."""
    return torch.full((length, length), float("-inf"), device=device, dtype=dtype).triu_(1)


def run_blocks_inserting(
    transformer: Transformer,
    x: torch.Tensor,
    inserted: Sequence[torch.Tensor],
    first_block: int,
    position: int = 1,
    attn_mask: torch.Tensor | None = None,
    causal: bool = False,
) -> torch.Tensor:
    """Run ``transformer``'s blocks on x [N, L, W]; before block ``first_block`` the tokens
    ``inserted[0]`` ([n, W], shared by all N) enter after the first ``position`` tokens (the sequence
    grows to L + n), and before each next block ``first_block + k`` they are replaced by ``inserted[k]``.

    ``causal`` rebuilds CLIP's causal mask for the longer sequence from ``first_block`` on (the text
    tower); otherwise ``attn_mask`` is used throughout. MMRL's representation tokens enter this way.
    """
    blocks = transformer.resblocks
    if not 0 <= first_block or first_block + len(inserted) > len(blocks):
        raise ValueError(f"{len(inserted)} inserted token sets from block {first_block} do not fit {len(blocks)} blocks")
    if not getattr(transformer, "batch_first", False):
        raise ValueError("inserted tokens need a batch-first open_clip transformer (as in open_clip 3.x)")
    for i, block in enumerate(blocks):
        k = i - first_block
        if 0 <= k < len(inserted):
            p = inserted[k].to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
            rest = x[:, position:] if k == 0 else x[:, position + p.shape[1] :]
            x = torch.cat([x[:, :position], p, rest], dim=1)
            if causal and k == 0:
                attn_mask = causal_mask(x.shape[1], x.device, x.dtype)
        x = block(x, attn_mask=attn_mask)
    return x


# -- the two towers --------------------------------------------------------------------------------

def encode_text_deep(
    clip: CLIP, embeddings: torch.Tensor, eot_idx: torch.Tensor, deep_prompts: Sequence[torch.Tensor] = (), start: int = 1,
    share_prefix: bool = False,
) -> torch.Tensor:
    """open_clip's text tower from token embeddings [C, L, W], with deep prompts -> [C, D].

    With ``share_prefix`` (the caller's promise, as for :func:`training.prompts.text.encode_text_embeddings`:
    one context broadcast to every row), where every deep prompt lies inside the prefix all rows
    share (the start token and the context), that prefix runs once
    (:func:`training.prompts.text.transformer_shared_prefix`; exact, as there).
    """
    pos, mask = text_position_inputs(clip, embeddings.shape[1], embeddings.dtype)
    prefix = shared_prefix_length(clip, embeddings, eot_idx, mask) if share_prefix else 0
    if prefix and len(deep_prompts) < len(clip.transformer.resblocks) and all(
            start + p.shape[0] <= prefix for p in deep_prompts):
        def replace_in_prefix(i: int, head: torch.Tensor) -> torch.Tensor:
            return replace_prompts(head, deep_prompts[i - 1], start) if 1 <= i <= len(deep_prompts) else head

        hidden = transformer_shared_prefix(clip.transformer, embeddings + pos, prefix, replace_in_prefix)
        return pool_text_features(clip, hidden, eot_idx - prefix)
    return pool_text_features(clip, run_blocks(clip.transformer, embeddings + pos, deep_prompts, start, attn_mask=mask), eot_idx)


def check_vision_tower(visual: nn.Module) -> VisionTransformer:
    """The ViT a visual prompt can enter: open_clip's VisionTransformer pooled at the class token."""
    if not isinstance(visual, VisionTransformer):
        raise ValueError(f"visual prompts need an open_clip ViT image tower, this backbone has {type(visual).__name__}")
    if visual.attn_pool is not None or visual.pool_type != "tok":
        raise ValueError("visual prompts need a ViT pooled at the class token (pool_type 'tok', no attentional pooler)")
    return visual


def vision_input_tokens(visual: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    """open_clip's ViT up to (not including) ``ln_pre``: [B, 3, H, W] -> [B, 1 + g*g, W] class + patch tokens."""
    x = visual.conv1(images)  # [B, W, g, g]
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)  # [B, g*g, W]
    cls = visual.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
    x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)  # [B, 1 + g*g, W]
    return visual.patch_dropout(x)


def encode_image_deep(
    visual: VisionTransformer,
    images: torch.Tensor,
    prompts: torch.Tensor | None = None,
    deep_prompts: Sequence[torch.Tensor] = (),
) -> torch.Tensor:
    """open_clip's ViT forward on images [B, 3, H, W] with prompts [n, W] after the patches -> [B, D]."""
    x = vision_input_tokens(visual, images)
    start = x.shape[1]
    if prompts is not None:
        x = torch.cat([x, prompts.to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)], dim=1)
    elif deep_prompts:
        raise ValueError("deep visual prompts need input prompts")
    x = visual.ln_pre(x)
    x = run_blocks(visual.transformer, x, deep_prompts, start)
    # LayerNorm acts per token, so ln_post before or after taking the class token is the same
    pooled = visual.ln_post(x[:, 0])
    return pooled @ visual.proj if visual.proj is not None else pooled


# -- initialisation --------------------------------------------------------------------------------

def tower_block(option: str, configured: int | None, default: int, layers: int, tower: str) -> int:
    """The block of a ``layers``-block tower where a method acts: ``configured`` (the option's value)
    or ``default`` (the reference's depth scaled to the tower); refused past the tower's top."""
    block = default if configured is None else configured
    if block >= layers:
        raise ValueError(f"{option}={block} but the {tower} tower has {layers} blocks")
    return block


def effective_depth(depth: int, n_layers: int, what: str) -> int:
    """The reference ignores prompt depth beyond the tower's layers; so do we, with a warning."""
    if depth > n_layers:
        logger.warning("%s depth %d exceeds the %d layers of the backbone; using %d", what, depth, n_layers, n_layers)
    return min(depth, n_layers)


def init_text_context(backbone: Backbone, n_ctx: int, ctx_init: str, std: float) -> tuple[torch.Tensor, str]:
    """The first ``n_ctx`` token embeddings of ``ctx_init`` (or N(0, std)), and the prompt prefix.

    As the reference, the prompt of class ``name`` is ``"{ctx_init} {name}."`` and the learned
    context replaces its first ``n_ctx`` tokens; MaPLe's 2 tokens from "a photo of a" therefore
    learn "a photo" and keep "of a" fixed. With no ``ctx_init`` the prefix is n_ctx placeholders.
    """
    phrase = ctx_init.replace("_", " ").strip()
    if not phrase:
        return init_context(backbone, n_ctx, "", std), " ".join([PLACEHOLDER] * n_ctx)
    full = init_context(backbone, None, phrase, std)  # [n_phrase, W]
    if full.shape[0] < n_ctx:
        raise ValueError(
            f"ctx_init {phrase!r} is {full.shape[0]} tokens, fewer than n_ctx={n_ctx}; use ctx_init='' for random init"
        )
    return full[:n_ctx].clone(), phrase


def normal_prompts(count: int, n_tokens: int, width: int, std: float) -> nn.ParameterList:
    """``count`` prompt sets [n_tokens, width] drawn from N(0, std) (the reference's init)."""
    out = nn.ParameterList()
    for _ in range(count):
        p = torch.empty(n_tokens, width)
        nn.init.normal_(p, std=std)
        out.append(nn.Parameter(p))
    return out


def validate_prompt_options(config: MethodConfig, *, n_ctx: Sequence[str], depth: Sequence[str], min_depth: int) -> None:
    """Shared ``__post_init__`` checks: token counts >= 1, depths >= ``min_depth``, std > 0."""
    for name in n_ctx:
        if getattr(config, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(config, name)}")
    for name in depth:
        if getattr(config, name) < min_depth:
            raise ValueError(f"{name} must be >= {min_depth}, got {getattr(config, name)}")
    if getattr(config, "init_std", 1.0) <= 0:
        raise ValueError("init_std must be > 0")


# -- the shared method body ------------------------------------------------------------------------

class DeepPromptMethod(PromptMethod):
    """Text context + deep text prompts and/or visual + deep visual prompts (not registered).

    Subclasses call :meth:`_init_text_prompts` / :meth:`_init_vision_prompts` and may override
    :meth:`text_prompts` / :meth:`vision_prompts` (MaPLe derives its visual prompts).
    """

    def __init__(self, backbone: Backbone, config: MethodConfig, train_classnames: Sequence[str]):
        super().__init__(backbone, config, train_classnames)
        self.ctx: nn.Parameter | None
        self.vision_ctx: nn.Parameter | None
        self.register_parameter("ctx", None)  # [n_ctx, W_text] text context, when the method has one
        self.register_parameter("vision_ctx", None)  # [n_ctx, W_vision] input visual prompts
        self.deep_text = nn.ParameterList()
        self.deep_vision = nn.ParameterList()
        self._template = "{}"

    # -- construction helpers
    def _init_text_prompts(self, n_ctx: int, ctx_init: str, depth: int, std: float) -> None:
        ctx, prefix = init_text_context(self.backbone, n_ctx, ctx_init, std)
        self.ctx = nn.Parameter(ctx)  # [n_ctx, W_text]
        register_text_prefix(self, ctx.shape[1])
        self._template = prefix + " {}."
        depth = effective_depth(depth, len(self.clip.transformer.resblocks), "text prompt")
        self.deep_text = normal_prompts(depth - 1, n_ctx, ctx.shape[1], std)

    def _init_vision_prompts(self, n_ctx: int, depth: int, std: float) -> None:
        if depth == 0:  # no visual prompts: the image tower stays open_clip's
            return
        visual = check_vision_tower(self.clip.visual)
        width = visual.class_embedding.shape[0]
        ctx = torch.empty(n_ctx, width)
        nn.init.normal_(ctx, std=std)
        self.vision_ctx = nn.Parameter(ctx)  # [n_ctx, W_vision]
        depth = effective_depth(depth, len(visual.transformer.resblocks), "vision prompt")
        self.deep_vision = normal_prompts(depth - 1, n_ctx, width, std)

    # -- prompts
    def text_prompts(self) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """(context [n, W] at positions 1..n or None, deep prompts for layers 1..depth-1)."""
        return self.ctx, list(self.deep_text)

    def vision_prompts(self) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """(input prompts [n, W] or None, deep prompts for layers 1..depth-1)."""
        return self.vision_ctx, list(self.deep_vision)

    def prompt_templates(self) -> list[str]:
        return [self._template]

    # -- encoders
    def prompt_embeddings(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[C, L] tokens -> ([C, L, W] embeddings with the context at 1..n_ctx, [C] EOT index)."""
        eot = eot_positions(tokens, self.backbone.eot_token_id)
        emb = self.clip.token_embedding(tokens)  # [C, L, W]
        ctx, _ = self.text_prompts()
        if ctx is None:
            return emb, eot
        ctx = prepend_prefix(self.text_prefix, ctx)  # a plug-in's fixed-position tokens first (ATPrompt)
        return place_context(emb, tokens, eot, ctx.unsqueeze(0).expand(tokens.shape[0], -1, -1)), eot

    def _prefix_length(self) -> int:
        prefix = getattr(self, "text_prefix", None)
        return 0 if prefix is None else prefix.shape[0]

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        emb, eot = self.prompt_embeddings(tokens)
        _, deep = self.text_prompts()
        # deep prompts replace the context's own slots, after any prefix
        # the context and deep prompts are one set broadcast to every class: the prefix may run once
        return encode_text_deep(self.clip, emb, eot, deep, start=1 + self._prefix_length(), share_prefix=True)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        prompts, deep = self.vision_prompts()
        if prompts is None:
            return self.clip.visual(images)
        return encode_image_deep(self.clip.visual, images, prompts, deep)
