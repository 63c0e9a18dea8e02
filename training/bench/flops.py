"""FLOPs of one image through a backbone's image tower: counted, and the ViT formula to check the count.

torch's ``FlopCounterMode`` counts the matmuls and convolutions it sees, and attention can hide
from it twice: under ``no_grad`` ``nn.MultiheadAttention`` may take a fused fast path
(``_native_multi_head_attention``; measured at 22.5 instead of ~35 GFLOP for ViT-B-16 on an earlier
torch), and the CPU's fused scaled-dot-product kernel has no FLOP formula registered (33.7 with
torch 2.14: the attention products are missing). :func:`image_gflop` counts with the fast path off
and scaled-dot-product attention on its plain "math" kernel, so every product is a counted matmul.
:func:`vit_gflop` is the closed form for open_clip's ViT, multiply-adds as 2 FLOPs (35.1 for
ViT-B-16 at 224 px); a test holds the two equal.
"""
from __future__ import annotations

import torch
from torch import nn


def image_gflop(model: nn.Module, image_size: int, device: str | torch.device = "cpu") -> float:
    """GFLOP of ``model.encode_image`` on one ``image_size`` image, attention included."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            model.encode_image(torch.zeros(1, 3, image_size, image_size, device=device))
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
    return counter.get_total_flops() / 1e9


def vit_gflop(visual: nn.Module) -> float:
    """The closed form for an open_clip ``VisionTransformer`` (class token pooled, no attentional
    pooler): patch embedding, per block QKV + attention scores + weighted sum + output projection
    + a 4x-wide MLP, and the final projection; norms and softmax are not counted."""
    gh, gw = visual.grid_size
    width = visual.conv1.out_channels
    patch = visual.conv1.kernel_size[0] * visual.conv1.kernel_size[1] * visual.conv1.in_channels
    n = 1 + gh * gw
    hidden = visual.transformer.resblocks[0].mlp.c_fc.out_features
    per_block = 2 * (4 * n * width * width + 2 * n * n * width + 2 * n * width * hidden)
    proj = 2 * width * visual.proj.shape[1] if visual.proj is not None else 0
    return (2 * gh * gw * patch * width + len(visual.transformer.resblocks) * per_block + proj) / 1e9
