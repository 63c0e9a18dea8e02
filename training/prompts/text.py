"""Seams into open_clip's text tower that prompt methods share.

open_clip's ``CLIP.encode_text`` goes from token ids straight to features; prompt methods need to
edit the token embeddings in between. These helpers run the same computation from embeddings, with
an export-friendly end-of-text lookup.
"""
from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from open_clip.model import CLIP
from open_clip.transformer import LayerScale, QuickGELU, ResidualAttentionBlock, Transformer


def eot_positions(tokens: torch.Tensor, eot_token_id: int) -> torch.Tensor:
    """[C, L] token ids -> [C] index of the end-of-text token.

    open_clip takes ``tokens.argmax(-1)`` (the EOT id is the largest in the vocabulary). ONNX Runtime
    has no int64 ArgMax kernel, so compare against the id and take the argmax of a float mask; for
    well-formed tokens the result is identical.
    """
    return (tokens == eot_token_id).to(torch.float32).argmax(dim=-1)


def text_position_inputs(clip: CLIP, length: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Positional embeddings [L, W] and causal mask [L, L] for token sequences of ``length``.

    Sequences may be shorter than the context length (see :func:`trim_tokens`).
    """
    mask = clip.attn_mask
    return clip.positional_embedding[:length].to(dtype), None if mask is None else mask[:length, :length]


def trim_tokens(tokens: torch.Tensor, eot_token_id: int, margin: int = 0) -> torch.Tensor:
    """Drop the padding columns after the last end-of-text token of ``tokens`` [..., L], but ``margin``.

    The text tower is causal: position i attends to positions <= i only, so padding after a
    sequence's EOT never reaches the pooled EOT feature. Trimming is therefore exact and cuts the
    text encoder's cost by about L / (longest prompt) — 5-7x for short class names at L = 77. A
    tower that also looks ``margin`` positions ahead in all (LwEIB's token convolutions) keeps them.
    """
    keep = int(eot_positions(tokens.reshape(-1, tokens.shape[-1]), eot_token_id).max()) + 1 + margin
    return tokens[..., : min(keep, tokens.shape[-1])]


def pad_tokens(tokens: torch.Tensor, context_length: int) -> torch.Tensor:
    """``tokens`` [..., L] padded with zeros (the tokenizer's padding id) back to ``context_length``:
    what the reference implementations feed the text tower (the inverse of :func:`trim_tokens`)."""
    missing = context_length - tokens.shape[-1]
    if missing < 0:
        raise ValueError(f"tokens are {tokens.shape[-1]} long, more than the context length {context_length}")
    return torch.nn.functional.pad(tokens, (0, missing)) if missing else tokens


def encode_text_embeddings(clip: CLIP, embeddings: torch.Tensor, eot_idx: torch.Tensor,
                           share_prefix: bool = False) -> torch.Tensor:
    """Run the text transformer on token embeddings [C, L, W] and pool at ``eot_idx`` -> [C, D].

    ``share_prefix``: the caller vouches that equal leading positions of the rows are *the same
    tensors* (one context broadcast to every class, lookups of one embedding table), not merely
    equal values from different parameters (class-specific contexts that start out equal, per-image
    biases): then the common prefix runs through the tower once instead of once per class (see
    :func:`shared_prefix_length`), the same computation and the same gradients up to float rounding.
    Off by default; never while tracing or exporting (the graph must not depend on the example's prefix).
    """
    pos, mask = text_position_inputs(clip, embeddings.shape[1], embeddings.dtype)
    x = embeddings + pos
    prefix = shared_prefix_length(clip, embeddings, eot_idx, mask) if share_prefix else 0
    if prefix:
        return pool_text_features(clip, transformer_shared_prefix(clip.transformer, x, prefix), eot_idx - prefix)
    return pool_text_features(clip, clip.transformer(x, attn_mask=mask), eot_idx)


def pool_text_features(clip: CLIP, hidden: torch.Tensor, eot_idx: torch.Tensor) -> torch.Tensor:
    """The text tower's head: ``ln_final`` on the transformer's output [C, L, W], the hidden state at
    each row's end-of-text position ``eot_idx`` [C], then ``text_projection`` (a matrix, a Linear, or
    none) -> [C, D], not normalised. Every text path ends here, so all of them pool as open_clip does."""
    x = clip.ln_final(hidden)
    x = x[torch.arange(x.shape[0], device=x.device), eot_idx]  # [C, W]
    proj = clip.text_projection
    if proj is None:
        return x
    return proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj


#: the smallest common prefix worth the second attention path (the start token alone is not)
MIN_SHARED_PREFIX = 3
_SHARE_PREFIX = contextvars.ContextVar("promptbake_share_prefix", default=True)


@contextlib.contextmanager
def every_row_in_full() -> Iterator[None]:
    """Within it, :func:`encode_text_embeddings` runs every row through the whole tower, as the
    reference implementations do (``bench train``'s reference-style loop, ``--full-context``)."""
    token = _SHARE_PREFIX.set(False)
    try:
        yield
    finally:
        _SHARE_PREFIX.reset(token)


def shared_prefix_length(clip: CLIP, embeddings: torch.Tensor, eot_idx: torch.Tensor, mask: torch.Tensor | None) -> int:
    """How many leading positions of ``embeddings`` [C, L, W] are the same in every row and may run
    through the text tower once: 0 unless that is at least :data:`MIN_SHARED_PREFIX`, ends before
    every row's end-of-text token, and the tower is open_clip's plain causal one.

    Exact because the tower is causal: a position's hidden states depend only on the positions up to
    it, so the common prefix has the same states in every row. Its gradient flows into the first
    row's prefix only: exact when every row's prefix is the same tensor (the caller's promise, see
    :func:`encode_text_embeddings`), wrong for equal values of different parameters. Anything that
    could break the states' equality is refused: a mask other than the causal one, a block that is
    not open_clip's plain ``ResidualAttentionBlock`` (an adapter that replaced or hooked a module may
    mix positions), attention dropout, gradient checkpointing; and tracing or export.
    """
    if (not _SHARE_PREFIX.get() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
            or torch.compiler.is_compiling() or torch.compiler.is_exporting()):
        return 0
    if embeddings.shape[0] < 2 or mask is None or not _plain_causal_tower(clip.transformer, mask):
        return 0
    with torch.no_grad():
        same = (embeddings == embeddings[:1]).all(dim=-1).all(dim=0)  # [L]
        differs = (~same).nonzero()
        length = int(differs[0, 0]) if len(differs) else embeddings.shape[1]
        length = min(length, int(eot_idx.min()))  # every row pools after the prefix
    return length if length >= MIN_SHARED_PREFIX else 0


_PLAIN_MLP = (torch.nn.Linear, torch.nn.GELU, QuickGELU)


def _hooked(module: torch.nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or "forward" in vars(module))


def _plain_causal_tower(tower: torch.nn.Module, mask: torch.Tensor) -> bool:
    from torch.nn.modules import module as nn_module

    if type(tower) is not Transformer or tower.grad_checkpointing or not tower.batch_first or _hooked(tower):
        return False
    if (nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks or nn_module._global_backward_hooks
            or nn_module._global_backward_pre_hooks):
        return False
    n = mask.shape[-1]
    causal = torch.ones(n, n, dtype=torch.bool, device=mask.device).triu(1)
    if mask.dim() != 2 or not torch.equal(torch.isneginf(mask), causal) or bool(mask[~causal].any()):
        return False
    for block in tower.resblocks:
        if (type(block) is not ResidualAttentionBlock or hasattr(block, "ln_1_kv")
                or type(block.attn) is not torch.nn.MultiheadAttention or not block.attn.batch_first
                or block.attn.dropout or not block.attn._qkv_same_embed_dim or block.attn.add_zero_attn
                or block.attn.bias_k is not None or block.attn.bias_v is not None
                or not all(isinstance(n, torch.nn.LayerNorm) for n in (block.ln_1, block.ln_2))
                or not all(type(ls) in (torch.nn.Identity, LayerScale) for ls in (block.ls_1, block.ls_2))
                or type(block.mlp) is not torch.nn.Sequential or not all(type(m) in _PLAIN_MLP for m in block.mlp)):
            return False
        if any(_hooked(m) for m in block.modules()):
            return False
    return True


def _heads(attn: torch.nn.MultiheadAttention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[B, T, W] -> q, k, v [B, H, T, W / H] (the module's packed input projection)."""
    b, t, _ = x.shape
    qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).view(b, t, 3, attn.num_heads, -1)
    return qkv.permute(2, 0, 3, 1, 4).unbind(0)


def _merge_heads(attn: torch.nn.MultiheadAttention, o: torch.Tensor) -> torch.Tensor:
    b, h, t, d = o.shape
    return attn.out_proj(o.transpose(1, 2).reshape(b, t, h * d))


def transformer_shared_prefix(tower: Transformer, x: torch.Tensor, prefix: int,
                              edit_prefix: Callable[[int, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """open_clip's causal text transformer on ``x`` [C, L, W] whose first ``prefix`` positions are the
    same in every row (:func:`shared_prefix_length`): the prefix runs as one row, the rest attends to
    its keys and values. ``edit_prefix(i, states)`` may change the prefix's states [1, prefix, W]
    right before block ``i`` (deep prompts that replace or add to positions inside the prefix, the same
    for every row). Returns the hidden states of positions ``prefix..L-1`` [C, L - prefix, W]."""
    head, rest = x[:1, :prefix], x[:, prefix:]
    c, s = rest.shape[0], rest.shape[1]
    # rest position i (absolute prefix + i) sees every prefix position and rest positions <= i
    see = torch.ones(s, prefix + s, dtype=torch.bool, device=x.device).tril(prefix)
    for i, block in enumerate(tower.resblocks):
        if edit_prefix is not None:
            head = edit_prefix(i, head)
        attn = block.attn
        qh, kh, vh = _heads(attn, block.ln_1(head))
        qr, kr, vr = _heads(attn, block.ln_1(rest))
        out_head = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True)
        keys = torch.cat([kh.expand(c, -1, -1, -1), kr], dim=2)
        values = torch.cat([vh.expand(c, -1, -1, -1), vr], dim=2)
        out_rest = F.scaled_dot_product_attention(qr, keys, values, attn_mask=see)
        head = head + block.ls_1(_merge_heads(attn, out_head))
        head = head + block.ls_2(block.mlp(block.ln_2(head)))
        rest = rest + block.ls_1(_merge_heads(attn, out_rest))
        rest = rest + block.ls_2(block.mlp(block.ln_2(rest)))
    return rest


def description_rows(tokens: torch.Tensor, eot_token_id: int) -> torch.Tensor:
    """[S, C, L] prompt rows -> [S, C] bool: the real ones (a padding row is the empty prompt, its
    end-of-text token right after the start; see ``exports.prompts``)."""
    return tokens[..., 1] != eot_token_id


def mean_over_rows(feats: torch.Tensor, tokens: torch.Tensor, eot_token_id: int) -> torch.Tensor:
    """Normalised features [S, C, D] of the prompt rows ``tokens`` [S, C, L] -> [C, D]: the
    re-normalised mean over each class's real rows (padding rows left out; CuPL, LwEIB, HiCroPL)."""
    weights = description_rows(tokens, eot_token_id).to(feats.dtype)  # [S, C]
    mean = (feats * weights.unsqueeze(-1)).sum(0) / weights.sum(0).clamp_min(1.0).unsqueeze(-1)
    return torch.nn.functional.normalize(mean, dim=-1)
