"""CoCoOp: CoOp's context shifted per image by a small meta-network.

Follows "Conditional Prompt Learning for Vision-Language Models" (Zhou et al., CVPR 2022) and its
official code, KaiyangZhou/CoOp at ff61507c790454bce7c5052c3ac39e60772f1f89 (``trainers/cocoop.py``).
Every context vector gets the same image-conditioned bias ``pi(x) = meta_net(x / |x|)``, where
``meta_net`` is Linear(D, D // 16) -> ReLU -> Linear(D // 16, W) on the normalised image feature, so
each image sees its own class embeddings. Defaults are the base-to-novel config
``vit_b16_c4_ep10_batch1_ctxv1``: 4 context tokens initialised from "a photo of a", class name at
the end; 16 shots, batch size 1, SGD lr 0.002 for 10 epochs (``train_defaults``).

Cost: the text encoder runs once per (image, class) pair, so a batch of B images over C classes
encodes B*C prompts, in training and at test time (the reason the reference trains at batch 1).

Deliberate deviations:
- Precision: the reference config runs CLIP and the meta-net in fp16 (``PREC: "fp16"``); here the
  loop's precision applies (fp32 on CPU, fp16 autocast with fp32 master weights on CUDA).
- ``n_ctx`` with ``ctx_init`` counts BPE tokens, not words (as in :mod:`training.methods.coop`).
- :meth:`CoCoOp.class_embeddings` (tokens only, no image) returns the *unconditioned* embeddings
  (context without the meta-net bias); the reference has no such function. Classification always
  goes through :meth:`CoCoOp.conditioned_class_embeddings` via ``logits_from_features``.
- The per-image Python loop of the reference is one batched text-encoder call over B*C prompts
  (same numbers, one graph for export).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from training.backbones import Backbone
from training.protocol import Capabilities, MethodConfig, PromptMethod, register_method
from training.prompts.context import context_gather_index, context_template, init_context, prepend_prefix, register_text_prefix
from training.prompts.text import encode_text_embeddings, eot_positions

#: prompts per text-encoder call when evaluating (image chunks of MAX_PROMPTS // n_classes)
MAX_PROMPTS = 4096


@dataclass(frozen=True)
class CoCoOpConfig(MethodConfig):
    """Args:
    n_ctx: number of context tokens; None takes it from ``ctx_init`` (or 16 for random init).
    ctx_init: phrase whose token embeddings initialise the context; "" for random N(0, init_std).
    init_std: std of the random context initialisation.
    meta_reduction: hidden width of the meta-net is ``embed_dim // meta_reduction`` (reference: 16).
    """

    n_ctx: int | None = None
    ctx_init: str = "a photo of a"
    init_std: float = 0.02
    meta_reduction: int = 16

    def __post_init__(self) -> None:
        if self.n_ctx is not None and self.n_ctx < 1:
            raise ValueError(f"n_ctx must be >= 1, got {self.n_ctx}")
        if self.init_std <= 0:
            raise ValueError("init_std must be > 0")
        if self.meta_reduction < 1:
            raise ValueError(f"meta_reduction must be >= 1, got {self.meta_reduction}")


@register_method("cocoop", "CoCoOp: image-conditioned context via a meta-net (Zhou et al. 2022)")
class CoCoOp(PromptMethod):
    config_cls = CoCoOpConfig
    train_defaults = {"epochs": 10, "batch_size": 1, "lr": 0.002}
    published_b2n = (80.47, 71.69, 75.83)
    published_source = "CoCoOp paper (Zhou et al., CVPR 2022), Table 1"

    def __init__(self, backbone: Backbone, config: CoCoOpConfig, train_classnames: Sequence[str]):
        super().__init__(backbone, config, train_classnames)
        self.ctx = nn.Parameter(init_context(backbone, config.n_ctx, config.ctx_init, config.init_std))
        vis_dim = backbone.embed_dim  # CLIP's visual.output_dim
        width = self.ctx.shape[-1]
        hidden = max(vis_dim // config.meta_reduction, 1)
        self.meta_net = nn.Sequential(OrderedDict([
            ("linear1", nn.Linear(vis_dim, hidden)),
            ("relu", nn.ReLU(inplace=True)),
            ("linear2", nn.Linear(hidden, width)),
        ]))
        register_text_prefix(self, width)

    @classmethod
    def capabilities_for(cls, config: CoCoOpConfig) -> Capabilities:
        return Capabilities(text_depends_on_image=True)

    @property
    def n_ctx(self) -> int:
        return self.ctx.shape[0]

    def prompt_templates(self) -> list[str]:
        return [context_template(self.n_ctx)]

    def _encode(self, ctx: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Context [B, n_ctx, W] and tokens [C, L] -> text features [B, C, D] (not normalised).

        A plug-in's ``text_prefix`` goes in front of the (shifted) context, unshifted."""
        ctx = prepend_prefix(self.text_prefix, ctx)  # [B, P + n_ctx, W]
        B, (C, L) = ctx.shape[0], tokens.shape
        eot = eot_positions(tokens, self.backbone.eot_token_id)  # [C]
        emb = self.clip.token_embedding(tokens)  # [C, L, W]
        W = emb.shape[-1]
        index = context_gather_index(tokens, eot, ctx.shape[1], "end")  # [C, L]
        full = torch.cat([emb.unsqueeze(0).expand(B, -1, -1, -1),
                          ctx.to(emb.dtype).unsqueeze(1).expand(-1, C, -1, -1)], dim=2)  # [B, C, L + n_ctx, W]
        prompts = full.gather(2, index[None, :, :, None].expand(B, -1, -1, W))  # [B, C, L, W]
        # one image (the reference's batch of 1): its shifted context is one tensor broadcast to every
        # class, so the prefix it forms with the start token runs through the tower once
        feats = encode_text_embeddings(self.clip, prompts.reshape(B * C, L, W), eot.repeat(B), share_prefix=B == 1)  # [B*C, D]
        return feats.reshape(B, C, -1)

    def image_bias(self, image_features: torch.Tensor) -> torch.Tensor:
        """[B, D] image features (not normalised) -> [B, W] shift added to every context vector."""
        return self.meta_net(F.normalize(image_features, dim=-1))

    def conditioned_class_embeddings(self, image_features: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """[B, D] image features and [T, C, L] tokens -> [B, C, D] L2-normalised class embeddings.

        Without autograd (evaluation), images are taken in chunks of at most ``MAX_PROMPTS`` prompts
        (B*C can reach 50,000 for 100 images over 500 classes); never while tracing for export.
        """
        B, C = image_features.shape[0], tokens.shape[1]
        step = max(MAX_PROMPTS // max(C, 1), 1)
        exporting = torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling()
        if B > step and not torch.is_grad_enabled() and not exporting:
            return torch.cat([self.conditioned_class_embeddings(image_features[i : i + step], tokens) for i in range(0, B, step)])
        ctx = self.ctx.unsqueeze(0) + self.image_bias(image_features).unsqueeze(1)  # [B, n_ctx, W]
        feats = torch.stack([F.normalize(self._encode(ctx, t), dim=-1) for t in tokens])  # [T, B, C, D]
        return F.normalize(feats.mean(dim=0), dim=-1)

    def logits_from_features(self, image_features: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        image_feats = F.normalize(image_features, dim=-1)  # [B, D]
        text_feats = self.conditioned_class_embeddings(image_features, tokens)  # [B, C, D]
        return self.logit_scale() * torch.einsum("bd,bcd->bc", image_feats, text_feats.to(image_feats.dtype))

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Unconditioned text features [C, D]: the context without any image bias."""
        return self._encode(self.ctx.unsqueeze(0), tokens)[0]
