"""SurPL: IVLP deep prompts plus surrogate features that condition the class embeddings on each image.

Follows "Surrogate Prompt Learning" (ICML 2025) and its official code, llcllc1997/SurPL at
1a83a0700aa8e0670d2b1a3ad6efd498aae2c2f8 (``trainers/SurPL.py``, ``clip/model.py`` with its
value-path blocks, ``configs/trainers/SurPL/vit_b16_few_shot.yaml``, ``train.py``).

Learned: IVLP prompts (text context of ``n_ctx_text`` tokens initialised from "a photo of a" with
fresh N(0, 0.02) prompts before text blocks 1..11; ``n_ctx_vision`` visual tokens after the patches
with fresh ones before vision blocks 1..11); the surrogate-feature generator ``sfg`` (pre-LN: one
``ln_1`` for query and key, ``nn.MultiheadAttention`` with ``sfg_heads`` heads, ``ln_2``, MLP D ->
D/2 -> D with QuickGELU, both residual); ``fg_signals`` [4, D] ~ N(1/D, 0.02); ``feature_proj``, a
D x D map without bias initialised to the identity.

Image: the prompted ViT gives the global feature ``g`` = ln_post(CLS) @ proj, and, from its last
block's *value path* (:func:`training.prompts.vision.value_path_tokens`: the attention replaced by
out_proj(W_v ln_1(x) + b_v), then the block's MLP), local tokens ln_post(v) @ proj for every token
but CLS (the patches and the visual prompts; 200 for ViT-B/16), through ``feature_proj``.

Three logit heads, each at CLIP's logit scale s, with t the prompted text features:
1. ``s cos(g, t)``;
2. ``s cos(g_b, SFG(t, g_b))``: the class features as queries cross-attend to the image's global
   feature (a single key, so the attention output is the same for every class: a per-image shift of
   every class feature, then the MLP), per image;
3. for each signal k: the class features attend to ``fg_signals[k]`` (image-independent); the score
   of a class is the mean of its top ``m_k`` cosines with the local tokens, m_k = 10, 20, 30, 40.
Test time: ``(logits_1 + logits_2 + mean_k logits_3k) / 3`` (train time: each head's cross-entropy).
Loss: ``CE(l1) + CE(l2) + mean_k CE(l3k) + 10 L1(norm g, norm g^CLIP) + 25 L1(norm t, t^ens)``, where
g^CLIP is the frozen CLIP's feature of the same image and t^ens the frozen embeddings of the 60
ImageNet templates averaged before normalising (the training classes only).

Serving: heads 2 and 3 depend on the image, so the method is image-conditioned
(``text_depends_on_image``), with a scored signature: the image graph returns the normalised ``g``
(``image_embeddings``, what ``/embed_image`` returns) and ``image_tokens`` [B, 1 + T, D] (the raw
``g`` then the T local tokens); the text graph returns the image-independent class side (``t`` and
the 4 signal-attended class features), cached per name like class embeddings; a score graph turns
both into the averaged logits. What costs per (image, class) pair is the SFG's MLP on the shifted
class features and the top-k over the local tokens.

Base-to-novel: the repository ships only the all-class few-shot setting (no SUBSAMPLE_CLASSES, no
base-to-novel script). Here the protocol is the standard one with the few-shot config's
hyper-parameters: SGD lr 0.0025, batch 32, 50 epochs (the config's; ``train.py`` overrides it per
dataset: Food101 10, SUN397 and ImageNet 20, EuroSAT and Aircraft 150, Flowers and Cars 200), one
constant warm-up epoch at 1e-5, cosine; 4+4 tokens, depth 12 in both towers.

Top-k on other backbones: the reference's m_k are counts out of 200 local tokens; with
``scale_top_k`` (default) they are taken as the same fractions of the backbone's local tokens
(``round(m_k T / 200)``, at least 1), else as counts capped at T. Identical for ViT-B/16.

Reference behaviour kept: the SFG's query and key projections never receive a gradient (a single
key makes the softmax 1, so the output does not depend on them; they change only by weight decay).

Deliberate deviations:
- fp32 weights (the reference trains in pure fp16 without a GradScaler, casting the SFG to fp16 in
  place on its first call).
- The frozen CLIP image encoder is the backbone itself run without prompts (the reference loads a
  second copy and saves it in every checkpoint).
- The value path is computed for the last block only (the reference computes it in every block of
  both towers and keeps the last vision block's).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from open_clip.transformer import LayerNorm, QuickGELU
from torch import nn

from training.backbones import Backbone
from training.protocol import IMAGE_EMBEDDINGS, Capabilities, GraphSignature, MethodConfig, register_method
from training.prompts.deep import DeepPromptMethod, replace_prompts, validate_prompt_options, vision_input_tokens
from training.prompts.knowledge import template_ensemble_features
from training.prompts.templates import IMAGENET_TEMPLATES
from training.prompts.vision import value_path_tokens

IMAGE_TOKENS = "image_tokens"
CLASS_FEATURES, SIGNAL_FEATURES = "class_features", "signal_features"
REFERENCE_LOCAL_TOKENS = 200  # 196 patches + 4 visual prompts of ViT-B/16


@dataclass(frozen=True)
class SurPLConfig(MethodConfig):
    """Args:
    n_ctx_text, n_ctx_vision: prompt tokens per layer of each tower (4, 4).
    ctx_init: phrase initialising the text context ("a photo of a").
    prompt_depth_text, prompt_depth_vision: layers receiving fresh prompts (12, 12; clamped).
    init_std: std of the N(0, std) prompts.
    sfg_heads: attention heads of the surrogate-feature generator (8).
    n_signals: fine-grained signals (4).
    top_k: local tokens averaged per signal, out of the reference's 200 (10, 20, 30, 40).
    scale_top_k: take ``top_k`` as fractions of 200 on backbones with another token count.
    image_weight, text_weight: weights of the two L1 terms (10, 25).
    text_templates: the frozen templates of the text target (CLIP's 60 ImageNet templates).
    """

    n_ctx_text: int = 4
    n_ctx_vision: int = 4
    ctx_init: str = "a photo of a"
    prompt_depth_text: int = 12
    prompt_depth_vision: int = 12
    init_std: float = 0.02
    sfg_heads: int = 8
    n_signals: int = 4
    top_k: tuple[int, ...] = (10, 20, 30, 40)
    scale_top_k: bool = True
    image_weight: float = 10.0
    text_weight: float = 25.0
    text_templates: tuple[str, ...] = IMAGENET_TEMPLATES

    def __post_init__(self) -> None:
        object.__setattr__(self, "top_k", tuple(self.top_k))
        object.__setattr__(self, "text_templates", tuple(self.text_templates))
        validate_prompt_options(self, n_ctx=("n_ctx_text", "n_ctx_vision"), depth=("prompt_depth_text", "prompt_depth_vision"),
                                min_depth=1)
        if self.sfg_heads < 1 or self.n_signals < 1:
            raise ValueError("sfg_heads and n_signals must be >= 1")
        if len(self.top_k) != self.n_signals or min(self.top_k) < 1:
            raise ValueError(f"top_k needs one count >= 1 per signal ({self.n_signals}), got {list(self.top_k)}")
        if min(self.image_weight, self.text_weight) < 0:
            raise ValueError("image_weight and text_weight must be >= 0")
        if not self.text_templates or any(t.count("{}") != 1 for t in self.text_templates):
            raise ValueError("text_templates must be templates with one '{}' each")


class SurrogateFeatureGenerator(nn.Module):
    """Pre-LN cross-attention block: queries [Nq, B, D] attend to keys [Nk, B, D] (sequence first)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"sfg_heads={heads} does not divide the embedding width {dim}")
        self.ln_1 = LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads)
        self.ln_2 = LayerNorm(dim)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(dim, dim // 2))
        self.mlp.add_module("gelu", QuickGELU())
        self.mlp.add_module("c_proj", nn.Linear(dim // 2, dim))

    def forward(self, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        k = self.ln_1(key)
        x = query + self.attn(self.ln_1(query), k, k, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


def top_k_counts(top_k: Sequence[int], n_tokens: int, scale: bool) -> list[int]:
    """Local tokens averaged per signal on a backbone with ``n_tokens`` local tokens."""
    if scale:
        return [min(n_tokens, max(1, round(k * n_tokens / REFERENCE_LOCAL_TOKENS))) for k in top_k]
    return [min(n_tokens, k) for k in top_k]


@register_method("surpl", "SurPL: IVLP prompts with surrogate image-conditioned and fine-grained local heads (ICML 2025)")
class SurPL(DeepPromptMethod):
    config_cls = SurPLConfig
    train_defaults = {"epochs": 50, "batch_size": 32, "lr": 0.0025}

    def __init__(self, backbone: Backbone, config: SurPLConfig, train_classnames: Sequence[str]):
        super().__init__(backbone, config, train_classnames)
        self._init_text_prompts(config.n_ctx_text, config.ctx_init, config.prompt_depth_text, config.init_std)
        self._init_vision_prompts(config.n_ctx_vision, config.prompt_depth_vision, config.init_std)
        dim = backbone.embed_dim
        self.sfg = SurrogateFeatureGenerator(dim, config.sfg_heads)
        signals = torch.empty(config.n_signals, dim)
        nn.init.normal_(signals, mean=1.0 / dim, std=0.02)
        self.fg_signals = nn.Parameter(signals)
        self.feature_proj = nn.Linear(dim, dim, bias=False)
        with torch.no_grad():
            self.feature_proj.weight.copy_(torch.eye(dim))
        visual = self.clip.visual
        grid = visual.grid_size
        self.n_local = grid[0] * grid[1] + config.n_ctx_vision
        self.top_k = top_k_counts(config.top_k, self.n_local, config.scale_top_k)
        self._text_target: torch.Tensor | None = None

    @classmethod
    def capabilities_for(cls, config: SurPLConfig) -> Capabilities:
        return Capabilities(changes_image_graph=True, text_depends_on_image=True)

    def graph_signature(self) -> GraphSignature:
        signals = tuple(f"{SIGNAL_FEATURES}_{k}" for k in range(self.config.n_signals))
        return GraphSignature(image_outputs=(IMAGE_EMBEDDINGS, IMAGE_TOKENS), text_outputs=(CLASS_FEATURES, *signals),
                              heads=(), scored=True)

    # -- image
    def image_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, 3, H, W] -> (g [B, D] global, [B, T, D] local tokens after ``feature_proj``), not normalised."""
        visual = self.clip.visual
        prompts, deep = self.vision_prompts()
        x = vision_input_tokens(visual, images)
        start = x.shape[1]
        x = torch.cat([x, prompts.to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)], dim=1)
        x = visual.ln_pre(x)
        blocks = visual.transformer.resblocks
        v = x
        for i, block in enumerate(blocks):
            if 1 <= i <= len(deep):
                x = replace_prompts(x, deep[i - 1], start)
            if i == len(blocks) - 1:
                v = value_path_tokens(block, x)
            x = block(x)
        g = visual.ln_post(x[:, 0]) @ visual.proj
        local = visual.ln_post(v[:, 1:]) @ visual.proj
        return g, self.feature_proj(local)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.image_features(images)[0]

    def image_outputs(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        g, local = self.image_features(images)
        return {IMAGE_EMBEDDINGS: F.normalize(g, dim=-1), IMAGE_TOKENS: torch.cat([g.unsqueeze(1), local], dim=1)}

    # -- the three heads
    def text_outputs(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """The image-independent class side, cached per name: the raw prompted text features ``t``
        [C, D] and, per signal k, the normalised ``SFG(t, fg_signals[k])`` [C, D]."""
        t = self.encode_text(tokens[0])  # [C, D] raw
        K = self.fg_signals.shape[0]
        fg = self.sfg(t.unsqueeze(1).expand(-1, K, -1), self.fg_signals.unsqueeze(0).to(t.dtype))  # [C, K, D]
        fg = F.normalize(fg, dim=-1)
        return {CLASS_FEATURES: t, **{f"{SIGNAL_FEATURES}_{k}": fg[:, k] for k in range(K)}}

    def head_logits(self, g: torch.Tensor, local: torch.Tensor, class_outputs: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        """[l1 [B, C], l2 [B, C], l3_k [B, C] per signal] from raw g [B, D], local tokens [B, T, D] and
        the class outputs of :meth:`text_outputs`."""
        t = class_outputs[CLASS_FEATURES]
        s = self.logit_scale()
        B = g.shape[0]
        g_n = F.normalize(g, dim=-1)
        l1 = s * g_n @ F.normalize(t, dim=-1).t().to(g.dtype)
        shifted = self.sfg(t.unsqueeze(1).expand(-1, B, -1), g.unsqueeze(0).to(t.dtype))  # [C, B, D]
        l2 = s * torch.einsum("bd,bcd->bc", g_n, F.normalize(shifted.permute(1, 0, 2), dim=-1).to(g.dtype))
        local_n = F.normalize(local, dim=-1)
        l3 = []
        for k, m in enumerate(self.top_k):
            fg = class_outputs[f"{SIGNAL_FEATURES}_{k}"]
            sims = torch.einsum("btd,cd->bct", local_n, fg.to(local_n.dtype))  # [B, C, T]
            l3.append(s * sims.topk(m, dim=-1).values.mean(dim=-1))
        return [l1, l2, *l3]

    def combine(self, heads: list[torch.Tensor]) -> torch.Tensor:
        l1, l2, *l3 = heads
        return (l1 + l2 + torch.stack(l3).mean(dim=0)) / 3.0

    def score_outputs(self, image_outputs: Mapping[str, torch.Tensor], class_outputs: Mapping[str, torch.Tensor]
                      ) -> torch.Tensor:
        packed = image_outputs[IMAGE_TOKENS]  # [B, 1 + T, D]: raw g, then the local tokens
        return self.combine(self.head_logits(packed[:, 0], packed[:, 1:], class_outputs))

    def logits_from_features(self, image_features: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{self.name} scores from its global and local image tokens; use logits_from_outputs")

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return self.logits_from_outputs(self.image_outputs(images), tokens)

    # -- training
    def text_target(self, device: torch.device) -> torch.Tensor:
        """[C, D] the frozen template-ensemble embeddings of the training classes (cached)."""
        if self._text_target is None or self._text_target.device != device:
            self._text_target = template_ensemble_features(self, self.config.text_templates, self.train_classnames, device)
        return self._text_target

    def compute_loss(
        self, inputs: torch.Tensor, labels: torch.Tensor, tokens: torch.Tensor, *, are_features: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if are_features:
            raise ValueError(f"{self.name} changes the image graph; it trains on images, not cached features")
        if tokens.shape[1] != len(self.train_classnames):
            raise ValueError(f"{self.name} regularises against its {len(self.train_classnames)} training classes, "
                             f"got tokens for {tokens.shape[1]}")
        g, local = self.image_features(inputs)
        class_outputs = self.text_outputs(tokens)
        l1, l2, *l3 = heads = self.head_logits(g, local, class_outputs)
        loss = F.cross_entropy(l1, labels) + F.cross_entropy(l2, labels)
        loss = loss + torch.stack([F.cross_entropy(l, labels) for l in l3]).mean()
        with torch.no_grad():
            frozen = F.normalize(self.clip.visual(inputs).float(), dim=-1)
        text = F.normalize(class_outputs[CLASS_FEATURES].float(), dim=-1)
        loss = loss + self.config.image_weight * F.l1_loss(F.normalize(g.float(), dim=-1), frozen)
        loss = loss + self.config.text_weight * F.l1_loss(text, self.text_target(inputs.device))
        return loss, self.combine([h.detach() for h in heads])
