"""Seams into open_clip's text tower that prompt methods share.

open_clip's ``CLIP.encode_text`` goes from token ids straight to features; prompt methods need to
edit the token embeddings in between. These helpers run the same computation from embeddings, with
an export-friendly end-of-text lookup.
"""
from __future__ import annotations

import torch
from open_clip.model import CLIP


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


def encode_text_embeddings(clip: CLIP, embeddings: torch.Tensor, eot_idx: torch.Tensor) -> torch.Tensor:
    """Run the text transformer on token embeddings [C, L, W] and pool at ``eot_idx`` -> [C, D]."""
    pos, mask = text_position_inputs(clip, embeddings.shape[1], embeddings.dtype)
    x = clip.transformer(embeddings + pos, attn_mask=mask)
    x = clip.ln_final(x)  # [C, L, W]
    x = x[torch.arange(x.shape[0], device=x.device), eot_idx]  # [C, W]
    proj = clip.text_projection
    return proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj


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
