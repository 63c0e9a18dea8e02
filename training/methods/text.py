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


def encode_text_embeddings(clip: CLIP, embeddings: torch.Tensor, eot_idx: torch.Tensor) -> torch.Tensor:
    """Run the text transformer on token embeddings [C, L, W] and pool at ``eot_idx`` -> [C, D]."""
    x = embeddings + clip.positional_embedding.to(embeddings.dtype)
    x = clip.transformer(x, attn_mask=clip.attn_mask)
    x = clip.ln_final(x)  # [C, L, W]
    x = x[torch.arange(x.shape[0], device=x.device), eot_idx]  # [C, W]
    proj = clip.text_projection
    return proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj
