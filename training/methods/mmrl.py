"""MMRL: a shared representation space projected into the upper blocks of both towers.

Follows "MMRL: Multi-Modal Representation Learning for Vision-Language Models" (Guo & Gu, CVPR
2025) and its official code, yunncheng/MMRL at 27d8821f6ac135a1d0c8e4c5ed78af14df0cd82e
(``trainers/mmrl.py``, ``clip/model_mmrl.py``, ``configs/trainers/MMRL/vit_b16.yaml``).

Learned: K = 5 representation tokens ``rep_tokens`` [K, rep_dim] (N(0, 0.02)); per upper block of
each tower a linear map into that tower's width (``r2t[i]``, ``r2v[i]``); ``proj_rep`` [W_v, D], a
second visual projection for the representation tokens (N(0, 1) * W_v^-0.5, as the reference's
new parameter). Everything of CLIP stays frozen; there is no learned text context: the class
prompt is the hand-written ``template``.

Forward, both towers: before block ``s`` the projected tokens enter right after the first token
(SOT / CLS; no positional embedding), and before each later block they are replaced by that
block's projection. The text tower's causal mask is rebuilt for the longer sequence from block
``s`` on and the text feature is read at the end-of-text position + K. The image tower returns
two features: ``image_embeddings`` = ln_post(CLS) @ proj (CLIP's) and ``image_embeddings_rep`` =
mean over the K tokens of ln_post(token) @ proj_rep. Logits use a fixed scale of 100:
``z_cls = 100 cos(f_cls, t)``, ``z_rep = 100 cos(f_rep, t)``.

Base/novel switch (the reference's ``test``, task B2N): base classes are scored with the fused
``alpha * z_cls + (1 - alpha) * z_rep``, novel classes with ``z_cls`` alone. Declared as two heads
(base weights alpha and 1 - alpha, novel weights 1 and 0), so evaluation, ``predict`` and the
service apply the same switch (``mode`` forces one side).

Loss: ``alpha CE(z_cls) + (1 - alpha) CE(z_rep) + reg_weight (1 - mean cos(f_cls, f_cls^CLIP))
+ reg_weight (1 - mean cos(t, t^CLIP))``, with the frozen CLIP's features of the same augmented
image and of the same template. Defaults are ``vit_b16.yaml``: alpha 0.7, reg_weight 1.0 (the
reference's per-dataset table in ``trainers/config.py`` sets 0.01-7.0; pass the dataset's value to
reproduce it), K 5, rep_dim 512; AdamW lr 1e-3, 10 epochs, batch 4, RandomResizedCrop scale
(0.5, 1) (``train_defaults``).

Depth: the reference inserts at 1-based layers 6..12 of 12, i.e. from 0-based block 5 to the top.
For a tower of L blocks the tokens enter at block ``round(L * 5 / 12)`` (5 of 12; 1 of the
3-block text and 2 of the 4-block image tower of emoji-vit-s), separately per tower, unless
``rep_start`` fixes it for both; each tower has one projection per block from there on.

Reference behaviour kept: the per-block projections are copies of one freshly initialised Linear
(identical at the start); the fixed scale 100 (``scale``; ``use_backbone_scale`` takes the
backbone's learned scale, identical on OpenAI CLIP); ln_post is applied to each representation
token before the mean.

Deliberate deviations:
- fp32 master weights (the reference converts CLIP to fp16 and back to fp32 for "amp").
- The reference's per-dataset hand-written templates are ``template``: the dataset's CoOp template
  on the 11 standard datasets (``options_for_dataset``; MMRL's table is CoOp's), "a photo of a {}."
  elsewhere.
- The reference caches text features at the first eval call (stale if the class list changes);
  here every class list is embedded afresh.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from training.backbones import Backbone
from training.protocol import (
    CLASS_EMBEDDINGS,
    IMAGE_EMBEDDINGS,
    Capabilities,
    GraphSignature,
    Head,
    MethodConfig,
    PromptMethod,
    register_method,
)
from training.prompts.deep import check_vision_tower, run_blocks_inserting, tower_block, vision_input_tokens
from training.prompts.knowledge import check_template, handcrafted_train_features
from training.prompts.templates import template_option
from training.prompts.text import eot_positions, pool_text_features, text_position_inputs

IMAGE_REP = "image_embeddings_rep"


def default_rep_start(layers: int) -> int:
    """The reference enters at 0-based block 5 of 12; keep that relative depth."""
    return round(layers * 5 / 12)


@dataclass(frozen=True)
class MMRLConfig(MethodConfig):
    """Args:
    n_rep_tokens: K, representation tokens (reference 5).
    rep_dim: width of the shared representation space (reference 512; 2048 for EuroSAT).
    rep_start: 0-based block where the tokens enter both towers; None = ``round(layers * 5 / 12)``
        per tower (5 for 12 blocks).
    alpha: weight of the class-token logits in the fused (base) logits and the loss (0.7).
    reg_weight: weight of each consistency term with the frozen CLIP (1.0).
    template: the hand-written class prompt.
    scale: fixed logit scale (reference 100.0, which is OpenAI CLIP's learned scale).
    use_backbone_scale: use the backbone's learned scale instead (the same for OpenAI CLIP;
        emoji-vit-s's is 21.5, so 100 sharpens its softmax 4.6x).
    init_std: std of the representation tokens' initialisation.
    """

    n_rep_tokens: int = 5
    rep_dim: int = 512
    rep_start: int | None = None
    alpha: float = 0.7
    reg_weight: float = 1.0
    template: str = "a photo of a {}."
    scale: float = 100.0
    use_backbone_scale: bool = False
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.n_rep_tokens < 1 or self.rep_dim < 1:
            raise ValueError("n_rep_tokens and rep_dim must be >= 1")
        if self.rep_start is not None and self.rep_start < 0:
            raise ValueError(f"rep_start must be >= 0, got {self.rep_start}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.reg_weight < 0:
            raise ValueError(f"reg_weight must be >= 0, got {self.reg_weight}")
        if not self.scale > 0:
            raise ValueError(f"scale must be > 0, got {self.scale}")
        if self.init_std <= 0:
            raise ValueError("init_std must be > 0")
        check_template(self.template, "template")


def _copies(module: nn.Module, n: int) -> nn.ModuleList:
    return nn.ModuleList(copy.deepcopy(module) for _ in range(n))


@register_method("mmrl", "MMRL: shared representation tokens in the upper blocks of both towers, base/novel heads (Guo & Gu 2025)")
class MMRL(PromptMethod):
    config_cls = MMRLConfig
    train_defaults = {"epochs": 10, "batch_size": 4, "lr": 0.001, "optimizer": "adamw", "min_crop_scale": 0.5}
    published_b2n = (85.68, 77.16, 81.20)
    published_source = ("the paper's 11-dataset ViT-B/16 average (Table 1), as later papers' tables repeat it "
                        "(the repository's README has no results)")

    @classmethod
    def options_for_dataset(cls, dataset: str) -> dict:
        """The reference's hand-written template of the 11 standard datasets (:mod:`training.prompts.templates`)."""
        return template_option(dataset, "template")

    def __init__(self, backbone: Backbone, config: MMRLConfig, train_classnames: Sequence[str]):
        super().__init__(backbone, config, train_classnames)
        visual = check_vision_tower(self.clip.visual)
        text_blocks, vision_blocks = len(self.clip.transformer.resblocks), len(visual.transformer.resblocks)
        self.text_start, self.vision_start = (
            tower_block("rep_start", config.rep_start, default_rep_start(n), n, tower)
            for tower, n in (("text", text_blocks), ("image", vision_blocks)))
        text_width, vision_width = self.clip.token_embedding.weight.shape[1], visual.class_embedding.shape[0]
        rep = torch.empty(config.n_rep_tokens, config.rep_dim)
        nn.init.normal_(rep, std=config.init_std)
        self.rep_tokens = nn.Parameter(rep)  # [K, rep_dim]
        # the reference deep-copies one freshly initialised Linear: every block's map starts identical
        self.r2t = _copies(nn.Linear(config.rep_dim, text_width), text_blocks - self.text_start)
        self.r2v = _copies(nn.Linear(config.rep_dim, vision_width), vision_blocks - self.vision_start)
        self.proj_rep = nn.Parameter(torch.randn(vision_width, backbone.embed_dim) * vision_width ** -0.5)

    @classmethod
    def capabilities_for(cls, config: MMRLConfig) -> Capabilities:
        return Capabilities(changes_image_graph=True, base_novel_switch=config.alpha != 1.0)

    def graph_signature(self) -> GraphSignature:
        a = self.config.alpha
        heads = (Head(IMAGE_EMBEDDINGS, CLASS_EMBEDDINGS, base_weight=a, novel_weight=1.0),)
        if a != 1.0:
            heads += (Head(IMAGE_REP, CLASS_EMBEDDINGS, base_weight=1.0 - a, novel_weight=0.0),)
        return GraphSignature(image_outputs=(IMAGE_EMBEDDINGS, IMAGE_REP), heads=heads)

    def prompt_templates(self) -> list[str]:
        return [self.config.template]

    def logit_scale(self) -> torch.Tensor:
        if self.config.use_backbone_scale:
            return super().logit_scale()
        return torch.tensor(float(self.config.scale), device=self.rep_tokens.device)

    # -- towers
    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """[C, L] template tokens -> [C, D] (not normalised), representation tokens from ``text_start`` on."""
        clip = self.clip
        eot = eot_positions(tokens, self.backbone.eot_token_id)
        x = clip.token_embedding(tokens)
        pos, mask = text_position_inputs(clip, x.shape[1], x.dtype)
        inserted = [proj(self.rep_tokens) for proj in self.r2t]
        x = run_blocks_inserting(clip.transformer, x + pos, inserted, self.text_start, attn_mask=mask, causal=True)
        return pool_text_features(clip, x, eot + self.config.n_rep_tokens)

    def encode_image_both(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, 3, H, W] -> (f_cls, f_rep), each [B, D] and not normalised."""
        visual = self.clip.visual
        x = visual.ln_pre(vision_input_tokens(visual, images))
        inserted = [proj(self.rep_tokens) for proj in self.r2v]
        x = run_blocks_inserting(visual.transformer, x, inserted, self.vision_start)
        f_cls = visual.ln_post(x[:, 0]) @ visual.proj
        f_rep = visual.ln_post(x[:, 1 : 1 + self.config.n_rep_tokens]).mean(dim=1) @ self.proj_rep
        return f_cls, f_rep

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """The class-token feature (the novel-class path); :meth:`image_outputs` gives both."""
        return self.encode_image_both(images)[0]

    def image_outputs(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        f_cls, f_rep = self.encode_image_both(images)
        return {IMAGE_EMBEDDINGS: F.normalize(f_cls, dim=-1), IMAGE_REP: F.normalize(f_rep, dim=-1)}

    # -- training
    def compute_loss(
        self, inputs: torch.Tensor, labels: torch.Tensor, tokens: torch.Tensor, *, are_features: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if are_features:
            raise ValueError(f"{self.name} changes the image graph; it trains on images, not cached features")
        f_cls, f_rep = (F.normalize(f, dim=-1) for f in self.encode_image_both(inputs))
        text = self.class_embeddings(tokens)  # [C, D], normalised
        scale, a = self.logit_scale(), self.config.alpha
        z_cls = scale * f_cls @ text.t().to(f_cls.dtype)
        z_rep = scale * f_rep @ text.t().to(f_rep.dtype)
        with torch.no_grad():
            clip_img = F.normalize(self.clip.visual(inputs).float(), dim=-1)
        clip_txt = handcrafted_train_features(self, self.config.template, tokens[0])
        reg_img = 1.0 - F.cosine_similarity(f_cls.float(), clip_img, dim=-1).mean()
        reg_txt = 1.0 - F.cosine_similarity(text.float(), clip_txt, dim=-1).mean()
        loss = (a * F.cross_entropy(z_cls, labels) + (1 - a) * F.cross_entropy(z_rep, labels)
                + self.config.reg_weight * (reg_img + reg_txt))
        return loss, a * z_cls + (1 - a) * z_rep
