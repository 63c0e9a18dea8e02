"""MaPLe: deep language prompts, with the vision prompts coupled to them by linear projections.

"MaPLe: Multi-modal Prompt Learning" (Khattak et al., CVPR 2023) and its official code,
muzairkhattak/multimodal-prompt-learning at 69bce21ae8eda80ad6187534b2dce09cf6c59e17
(``trainers/maple.py``; ``ResidualAttentionBlock_MaPLe`` / ``VisionTransformer_MaPLe`` in
``clip/model.py``). The language prompts are learned: the first ``n_ctx`` tokens of
``"a photo of a {name}."`` (initialised from the phrase; with n_ctx 2, "a photo" is learned and
"of a" stays) and, for each of the next ``prompt_depth - 1`` text layers, fresh N(0, 0.02)
prompts that replace the hidden states at those positions. The vision prompts are not parameters
of their own: layer j's vision prompts are ``F_j(language prompts of layer j)`` with a linear
``F_j: ctx_dim -> vis_dim`` (the vision-language coupling function), appended after the patch
tokens before ``ln_pre`` and replaced before the next ``prompt_depth - 1`` ViT layers.

Defaults are ``configs/trainers/MaPLe/vit_b16_c2_ep5_batch4_2ctx.yaml``: n_ctx 2, prompt depth
J = 9, ctx init "a photo of a", 16 shots, SGD lr 0.0035, batch 4, 5 epochs, constant warm-up
1 epoch at 1e-5, cosine (``train_defaults``).

Deliberate deviations:
- The reference forks CLIP (``design_details['trainer'] == 'MaPLe'`` selects other blocks and a
  different ViT inside the backbone, MaPLe#55); here the prompts are applied by a wrapper around
  the unchanged open_clip towers (:mod:`training.prompts.deep`), with the same token layout.
- Widths come from the backbone; the reference hard-codes 512 (text) and 768 (vision), ViT-B/16's.
- Precision: the reference (PREC fp16) runs an fp16 CLIP, holds ``ctx`` and the first projection
  in fp16 and casts every vision prompt ``.half()``; we keep fp32 tensors and leave mixed precision
  to the loop's AMP.
- Initialisation as the reference, including its quirk that the deep projections are deep copies
  of one ``nn.Linear`` (identical initial weights); the first projection has its own init.
- ``ctx_init`` with fewer tokens than ``n_ctx`` is an error (the reference reads EOT/padding
  embeddings then); with ``n_ctx > 4`` the reference silently ignores ``ctx_init``, we use it
  whenever it is long enough.
- A depth beyond the backbone's layer count is clamped (the reference ignores the extra prompts).
- Checkpoint: the last epoch, like the reference's ``--load-epoch 5`` evaluation.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from training.backbones import Backbone
from training.protocol import Capabilities, MethodConfig, register_method
from training.prompts.deep import DeepPromptMethod, check_vision_tower, effective_depth, validate_prompt_options


@dataclass(frozen=True)
class MaPLeConfig(MethodConfig):
    """Args:
    n_ctx: language prompt tokens per layer (also the number of vision prompt tokens).
    ctx_init: phrase whose first ``n_ctx`` tokens initialise the context and which stays in the
        prompt ("" = random init and "X" placeholders).
    prompt_depth: J, the layers of both towers receiving fresh prompts (1 = shallow MaPLe).
    init_std: std of the N(0, std) deep language prompts.
    """

    n_ctx: int = 2
    ctx_init: str = "a photo of a"
    prompt_depth: int = 9
    init_std: float = 0.02

    def __post_init__(self) -> None:
        validate_prompt_options(self, n_ctx=("n_ctx",), depth=("prompt_depth",), min_depth=1)


@register_method("maple", "MaPLe: deep language prompts coupled to vision prompts (Khattak et al. 2023)")
class MaPLe(DeepPromptMethod):
    config_cls = MaPLeConfig
    train_defaults = {"epochs": 5, "batch_size": 4, "lr": 0.0035}
    published_b2n = (82.28, 75.14, 78.55)
    published_source = "its paper (Khattak et al., CVPR 2023)"

    def __init__(self, backbone: Backbone, config: MaPLeConfig, train_classnames: Sequence[str]):
        super().__init__(backbone, config, train_classnames)
        visual = check_vision_tower(self.clip.visual)
        vis_dim = visual.class_embedding.shape[0]
        ctx_dim = self.clip.token_embedding.weight.shape[1]
        n_layers = min(len(visual.transformer.resblocks), len(self.clip.transformer.resblocks))
        depth = effective_depth(config.prompt_depth, n_layers, "MaPLe prompt")
        self.proj = nn.Linear(ctx_dim, vis_dim)  # F_0: couples the input prompts
        self._init_text_prompts(config.n_ctx, config.ctx_init, depth, config.init_std)
        one = nn.Linear(ctx_dim, vis_dim)
        self.deep_proj = nn.ModuleList([copy.deepcopy(one) for _ in self.deep_text])  # F_1..F_{J-1}

    @classmethod
    def capabilities_for(cls, config: MaPLeConfig) -> Capabilities:
        return Capabilities(changes_image_graph=True)

    def vision_prompts(self) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """The vision prompts of every layer, projected from that layer's language prompts."""
        assert self.ctx is not None
        return self.proj(self.ctx), [f(p) for f, p in zip(self.deep_proj, self.deep_text)]
