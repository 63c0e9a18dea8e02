"""The adapter hook wraps modules inside open_clip's blocks without touching their forward code."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from training.prompts.adapters import wrap_modules


class ZeroAdapter(nn.Module):
    """out = inner(x) + up(down(x)), up initialised to zero: the wrapped model starts unchanged."""

    def __init__(self, inner: nn.Linear, rank: int = 2):
        super().__init__()
        self.inner = inner
        self.down = nn.Linear(inner.in_features, rank, bias=False)
        self.up = nn.Linear(rank, inner.out_features, bias=False)
        nn.init.zeros_(self.up.weight)

    def forward(self, x):
        return self.inner(x) + self.up(self.down(x))


def test_wrapping_the_text_mlps(tiny_backbone):
    clip = copy.deepcopy(tiny_backbone.model)
    tokens = tiny_backbone.tokenizer(["a photo of a dog.", "red"])
    with torch.no_grad():
        before = clip.encode_text(tokens)
    names = wrap_modules(clip.transformer, lambda n, m: isinstance(m, nn.Linear) and n.endswith("mlp.c_proj"),
                         lambda n, m: ZeroAdapter(m))
    assert names == ["resblocks.0.mlp.c_proj", "resblocks.1.mlp.c_proj"]
    assert isinstance(clip.transformer.resblocks[1].mlp.c_proj, ZeroAdapter)
    with torch.no_grad():
        torch.testing.assert_close(clip.encode_text(tokens), before)  # zero-initialised: unchanged
    for p in clip.parameters():
        p.requires_grad_(False)
    for b in clip.transformer.resblocks:
        b.mlp.c_proj.up.weight.requires_grad_(True)
    clip.encode_text(tokens).sum().backward()
    assert all(b.mlp.c_proj.up.weight.grad is not None for b in clip.transformer.resblocks)


def test_rules_that_match_nothing_or_nest_are_refused(tiny_backbone):
    clip = copy.deepcopy(tiny_backbone.model)
    with pytest.raises(ValueError, match="no module matched"):
        wrap_modules(clip, lambda n, m: False, lambda n, m: m)
    with pytest.raises(ValueError, match="inside it"):
        wrap_modules(clip.transformer, lambda n, m: n.endswith("mlp") or n.endswith("mlp.c_fc"), lambda n, m: m)
