"""Every output token of open_clip's ViT, and its last block's class-token attention.

Methods that read local image features (TextRefiner's concept cache, later SurPL's local tokens)
need what CLIP's pooled embedding hides: the last block's tokens through ``ln_post`` and ``proj``,
and where the class token looks. open_clip's blocks call ``nn.MultiheadAttention`` with
``need_weights=False`` (the fused kernel returns no weights), so the attention of the last block is
recomputed here from its own ``ln_1`` and input projection; the block itself then runs unchanged,
so the class token's output is exactly ``visual(images)`` (tested).
"""
from __future__ import annotations

import math

import torch
from open_clip.transformer import VisionTransformer

from training.prompts.deep import check_vision_tower, vision_input_tokens


def attention_weights(block: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Head-averaged softmax attention [B, T, T] of an open_clip block on its input x [B, T, W]
    (what ``nn.MultiheadAttention(need_weights=True)`` returns by default)."""
    attn = block.attn
    if not isinstance(attn, torch.nn.MultiheadAttention) or not attn._qkv_same_embed_dim:  # noqa: SLF001
        raise ValueError("attention weights need open_clip blocks with nn.MultiheadAttention")
    h = block.ln_1(x)
    W, heads = h.shape[-1], attn.num_heads
    q, k, _ = torch.nn.functional.linear(h, attn.in_proj_weight, attn.in_proj_bias).split(W, dim=-1)
    B, T = h.shape[:2]
    q = q.reshape(B, T, heads, W // heads).transpose(1, 2)  # [B, heads, T, d]
    k = k.reshape(B, T, heads, W // heads).transpose(1, 2)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(W // heads)
    return scores.softmax(dim=-1).mean(dim=1)  # [B, T, T]


def image_tokens(visual: VisionTransformer, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, 3, H, W] -> (all last-block tokens through ``ln_post`` and ``proj`` [B, 1 + N, D], class
    token first; the last block's head-averaged attention of the class token over the N patches [B, N])."""
    visual = check_vision_tower(visual)
    if not visual.transformer.batch_first:
        raise ValueError("image tokens need a batch-first open_clip ViT (as in open_clip 3.x)")
    x = visual.ln_pre(vision_input_tokens(visual, images))
    blocks = visual.transformer.resblocks
    for block in blocks[:-1]:
        x = block(x)
    cls_attention = attention_weights(blocks[-1], x)[:, 0, 1:]  # [B, N]
    x = visual.ln_post(blocks[-1](x))
    if visual.proj is not None:
        x = x @ visual.proj
    return x, cls_attention


def value_path_tokens(block: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """SurPL's surrogate of an open_clip block on its input x [B, T, W]: the attention replaced by its
    value path, ``v = x + out_proj(W_v ln_1(x) + b_v)``, then the block's MLP, ``v + mlp(ln_2(v))``
    (each token on its own: no token mixing) -> [B, T, W]."""
    attn = block.attn
    if not isinstance(attn, torch.nn.MultiheadAttention) or not attn._qkv_same_embed_dim:  # noqa: SLF001
        raise ValueError("the value path needs open_clip blocks with nn.MultiheadAttention")
    W = x.shape[-1]
    bias = None if attn.in_proj_bias is None else attn.in_proj_bias[2 * W :]
    v = torch.nn.functional.linear(block.ln_1(x), attn.in_proj_weight[2 * W :], bias)
    v = x + block.ls_1(attn.out_proj(v))
    return v + block.ls_2(block.mlp(block.ln_2(v)))
