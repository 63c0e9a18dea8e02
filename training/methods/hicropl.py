"""HiCroPL: hierarchical cross-modal prompts, fused with the frozen CLIP's image feature and class descriptions.

Follows "Hierarchical Cross-modal Prompt Learning for Vision-Language Models" (ICCV 2025) and its
official code, zzeoZheng/HiCroPL at 2c2b2f2cd39a27e4f9862a202c402e31484b0ef3 (``trainers/hicropl.py``,
the IVLP-style blocks of ``clip/model.py``, ``configs/trainers/HiCroPL/vit_b16_c2_ep50_batch32_16ctx.yaml``).

Learned (the reference's ``CrossModalPromptLearner``):
- text prompts P^t_0..P^t_{d-1} [n_ctx, W_t] and visual prompts P^v_0..P^v_{d-1} [n_ctx, W_v], N(0, 0.02),
  entering the towers as IVLP's do: P^t_0 takes the n_ctx slots after SOT of ``"X ... X {name}."`` and
  P^t_l replaces them before text block l; P^v_0 is appended after the patch tokens (after the
  positional embedding, before ``ln_pre``) and P^v_l replaces it before vision block l;
- two knowledge mappers, ``text2visual`` (queries in W_v, keys and values from W_t) and ``visual2text``
  (the mirror): ``q = W_q x; q = q + MHA(LN1(q), LN1(W_k y), LN1(W_v y)); q = q + FFN(LN2(q))`` with an
  8-head attention and a QuickGELU FFN of 4x width;
- layer-specific knowledge proxies (LKP): per layer one proxy token (N(0, 1), the reference's
  ``torch.randn``) and one attention-pooling net, ``p = LN2(p + MHA(LN1(p), LN1(P), LN1(P)))``, that
  pools a layer's n_ctx prompts into one token.

The mapping (before both encoders, every forward): the first k layers flow text -> image (the text
prompts of layers 0..k-1 are pooled into k proxies, and ``text2visual`` maps the visual prompts of
layers 0..k-1, all k*n_ctx of them as one query sequence, onto those proxies), the rest image ->
text (the visual prompts of layers k..d-1 pooled into proxies; ``visual2text`` maps the text prompts
of layers k..d-1). The encoders use the mapped prompts where there are any, the raw ones elsewhere.

Fusion, train and test alike (so both graphs need the frozen model): image ``f = norm(norm(f_prompted)
+ f0)`` with ``f0`` the frozen CLIP's normalised feature of the same image (a second image-encoder
pass); text ``t = norm(norm(t_prompted) + w)`` with ``w`` the re-normalised mean of the frozen CLIP's
normalised embeddings of the class's descriptions, used as written (no template; the reference's
CoPrompt GPT files). So the method needs class descriptions at test time
(``needs_class_descriptions``): an artifact ships its run's and a request sends them for new names.

Loss: ``CE(logit_scale f . t) + lambd * [(1 - mean_c cos(t_c, w_c)) + (1 - mean_b cos(f_b, f0_b))]``
on the fused features, lambd 12. Defaults (the base-to-novel config): Adam lr 0.0025, eps 1e-3,
batch 32, 50 epochs, one warm-up epoch at 1e-5, cosine, 16 tokens, depth 12, k = 6.

``mapping``: the code and the paper differ, and both are here.
- ``"differentiable"`` (default; the paper's Sec. 3): the mapper outputs *are* the prompts the encoders
  read, inside autograd, so the mappers, the pooling nets and the proxy tokens train with the prompts;
  every layer's prompts are their own tensors. A forward is a pure function of the learned state, so
  an artifact gives what the model gives.
- ``"coded"`` (the reference, for comparison in training and evaluation): the mapper outputs are
  copied into the prompt parameters in place (``.data.copy_``) at every forward and the encoders read
  the parameters. The copy is outside autograd: the mappers, pooling nets and proxies never receive a
  gradient and keep their random init, and every forward (at test time too) moves the prompts again.
  The two copies touch disjoint sets (T->I writes the visual prompts of layers 0..k-1, I->T the text
  prompts of layers k..d-1), so neither reads the other's output. The reference also builds all d
  visual prompts, the k text proxies and the d-k visual proxies each from one tensor, and the pooling
  nets as deep copies of one: ``nn.Parameter(t)`` keeps ``t``'s storage, so on the CPU each group is
  one storage, but ``model.to("cuda")`` (where the reference trains) copies every parameter on its
  own, so what trains is separate tensors that start equal. That is what ``"coded"`` builds (the
  tests show both halves of the claim). Such a model has no fixed graph, so the exporter refuses it
  (:meth:`export_refusal`).
  Evaluation here embeds the classes once per class list, before the image batches (each of which
  moves the prompts again); the reference re-embeds them with every batch.

Backbones other than CLIP ViT-B/16: the depth d is ``prompt_depth`` clamped to each tower's layers
(the towers may differ), and k is ``cross_layer`` or half of each tower's depth (6 of 12); mapper
and pooling widths are the towers' own (the reference hard-codes 512 and 768).

Checkpoint: the reference's bundled Dassl selects the best epoch on the few-shot validation split
of the base classes (``TEST.FINAL_MODEL best_val``); ``--select best_val`` reproduces it. The default
here is the last epoch, as for every method of the benchmark.

Deliberate deviations:
- fp32 weights with the loop's AMP on CUDA (the reference runs CLIP, mappers and prompts in fp16).
- Dassl's Adam (coupled L2 decay 5e-4) is the loop's AdamW (decoupled 5e-4) with eps 1e-3 (``adam_eps``).
- The frozen image teacher is the backbone itself (the reference loads a second copy of the same
  ViT-B/16 as ``TEACHER_NAME``).
- ``ctx_init`` initialises P^t_0 from a phrase only when the phrase has at least ``n_ctx`` tokens
  (the reference uses CTX_INIT only for n_ctx <= 4 and reads EOT/padding embeddings past the phrase);
  its default, 16 tokens, is the random init either way.
"""
from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from open_clip.transformer import QuickGELU
from torch import nn

from training.backbones import Backbone
from training.protocol import Capabilities, MethodConfig, register_method
from training.prompts.context import place_context, register_text_prefix
from training.prompts.deep import (
    DeepPromptMethod,
    check_vision_tower,
    effective_depth,
    encode_text_deep,
    init_text_context,
    normal_prompts,
)
from training.prompts.knowledge import cached_frozen_text_features, frozen_text_features
from training.prompts.text import eot_positions, mean_over_rows

MAPPINGS = ("differentiable", "coded")


@dataclass(frozen=True)
class HiCroPLConfig(MethodConfig):
    """Args:
    n_ctx: prompt tokens per layer in each tower (16).
    ctx_init: phrase for the input text prompt ("" = N(0, init_std) and "X" placeholders).
    prompt_depth: layers with prompts, both towers (12; clamped to each tower).
    cross_layer: k, the layers mapped text -> image (the rest image -> text); None = half of each
        tower's depth.
    heads: attention heads of the mappers and pooling nets (8).
    init_std: std of the prompts' init.
    lambd: weight of the two distillation terms (12).
    mapping: "differentiable" (the paper; default) or "coded" (the reference's in-place copy).
    """

    n_ctx: int = 16
    ctx_init: str = ""
    prompt_depth: int = 12
    cross_layer: int | None = None
    heads: int = 8
    init_std: float = 0.02
    lambd: float = 12.0
    mapping: Literal["differentiable", "coded"] = "differentiable"

    def __post_init__(self) -> None:
        if self.n_ctx < 1 or self.heads < 1:
            raise ValueError("n_ctx and heads must be >= 1")
        if self.prompt_depth < 2:
            raise ValueError(f"prompt_depth must be >= 2 (text -> image layers, then image -> text), got {self.prompt_depth}")
        if self.cross_layer is not None and not 1 <= self.cross_layer < self.prompt_depth:
            raise ValueError(f"cross_layer must be in [1, prompt_depth), got {self.cross_layer}")
        if self.init_std <= 0 or self.lambd < 0:
            raise ValueError("init_std must be > 0 and lambd >= 0")
        if self.mapping not in MAPPINGS:
            raise ValueError(f"mapping must be one of {MAPPINGS}, got {self.mapping!r}")


class KnowledgeMapper(nn.Module):
    """Queries [n, W_q] attend over keys/values [m, W_kv]: ``q = W_q x; q += MHA(LN1 q, LN1 W_k y, LN1 W_v y);
    q += FFN(LN2 q)`` -> [n, W_q] (the reference's ``CrossPromptAttention``)."""

    def __init__(self, width: int, source_width: int, heads: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.linear_q = nn.Linear(width, width)
        self.linear_k = nn.Linear(source_width, width)
        self.linear_v = nn.Linear(source_width, width)
        self.ln_1 = nn.LayerNorm(width)
        self.ffn = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, 4 * width)), ("gelu", QuickGELU()),
                                              ("c_proj", nn.Linear(4 * width, width))]))
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, queries: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        q = self.linear_q(queries)
        k, v = self.ln_1(self.linear_k(source)), self.ln_1(self.linear_v(source))
        q = q + self.attn(self.ln_1(q).unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), need_weights=False)[0][0]
        return q + self.ffn(self.ln_2(q))


class ProxyPooling(nn.Module):
    """One layer's prompts [n, W] pooled into its proxy token [1, W]: ``LN2(p + MHA(LN1 p, LN1 P, LN1 P))``
    (the reference's LKP ``AttentionPooling``)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_1 = nn.LayerNorm(width)
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, proxy: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        seq = self.ln_1(prompts).unsqueeze(0)
        pooled = proxy + self.attn(self.ln_1(proxy).unsqueeze(0), seq, seq, need_weights=False)[0][0]
        return self.ln_2(pooled)


def proxy_tokens(count: int, width: int, equal: bool) -> nn.ParameterList:
    """``count`` proxy tokens [1, width], N(0, 1), each its own tensor; ``equal``: all starting from
    one draw (the reference)."""
    first = torch.randn(1, width)
    return nn.ParameterList([nn.Parameter(first.clone() if equal or i == 0 else torch.randn(1, width))
                             for i in range(count)])


def pooling_nets(count: int, width: int, heads: int, equal: bool) -> nn.ModuleList:
    """``count`` LKP pooling nets; ``equal``: deep copies of one (the reference's ``_get_clones``)."""
    if equal:
        first = ProxyPooling(width, heads)
        return nn.ModuleList([copy.deepcopy(first) for _ in range(count)])
    return nn.ModuleList([ProxyPooling(width, heads) for _ in range(count)])


@register_method("hicropl", "HiCroPL: hierarchical cross-modal prompts, fused with frozen features and descriptions (ICCV 2025)")
class HiCroPL(DeepPromptMethod):
    config_cls = HiCroPLConfig
    train_defaults = {"epochs": 50, "batch_size": 32, "lr": 0.0025, "optimizer": "adamw", "adam_eps": 1e-3}
    published_b2n = (85.89, 77.99, 81.75)
    published_source = "HiCroPL README (zzeoZheng/HiCroPL), 11-dataset base-to-novel average"

    def __init__(self, backbone: Backbone, config: HiCroPLConfig, train_classnames: Sequence[str]):
        super().__init__(backbone, config, train_classnames)
        visual = check_vision_tower(self.clip.visual)
        coded = config.mapping == "coded"
        # text: P^t_0 at the input, P^t_1.. replacing it before the next blocks
        ctx, prefix = init_text_context(backbone, config.n_ctx, config.ctx_init, config.init_std)
        self.ctx = nn.Parameter(ctx)
        register_text_prefix(self, ctx.shape[1])
        self._template = prefix + " {}."
        text_width, vision_width = ctx.shape[1], visual.class_embedding.shape[0]
        depth_t = effective_depth(config.prompt_depth, len(self.clip.transformer.resblocks), "text prompt")
        depth_v = effective_depth(config.prompt_depth, len(visual.transformer.resblocks), "vision prompt")
        self.deep_text = normal_prompts(depth_t - 1, config.n_ctx, text_width, config.init_std)
        # image: P^v_0 after the patches, P^v_1.. replacing it; the reference's are one storage
        first = torch.empty(config.n_ctx, vision_width)
        nn.init.normal_(first, std=config.init_std)
        self.vision_ctx = nn.Parameter(first)
        self.deep_vision = (nn.ParameterList([nn.Parameter(first.clone()) for _ in range(depth_v - 1)]) if coded
                            else normal_prompts(depth_v - 1, config.n_ctx, vision_width, config.init_std))
        self.cross_text, self.cross_vision = (self._cross_layer(d, tower) for d, tower in ((depth_t, "text"), (depth_v, "image")))
        for width in (text_width, vision_width):
            if width % config.heads:
                raise ValueError(f"heads={config.heads} must divide the towers' widths ({text_width}, {vision_width})")
        self.text2visual = KnowledgeMapper(vision_width, text_width, config.heads)
        self.visual2text = KnowledgeMapper(text_width, vision_width, config.heads)
        self.text_pooling = pooling_nets(self.cross_text, text_width, config.heads, coded)
        self.vision_pooling = pooling_nets(depth_v - self.cross_vision, vision_width, config.heads, coded)
        self.text_proxies = proxy_tokens(self.cross_text, text_width, coded)
        self.vision_proxies = proxy_tokens(depth_v - self.cross_vision, vision_width, coded)
        self.declare_learned()

    def _cross_layer(self, depth: int, tower: str) -> int:
        k = self.config.cross_layer if self.config.cross_layer is not None else max(1, depth // 2)
        if not 1 <= k < depth:
            raise ValueError(f"cross_layer={k} needs a {tower} prompt depth above it, the {tower} tower has {depth}")
        return k

    @classmethod
    def capabilities_for(cls, config: HiCroPLConfig) -> Capabilities:
        return Capabilities(changes_image_graph=True, needs_class_descriptions=True)

    def export_refusal(self) -> str | None:
        if self.config.mapping == "coded":
            return ("mapping='coded' (the reference's in-place prompt update) changes the prompts at every forward, "
                    "so no fixed graph reproduces it; train with mapping='differentiable' to export")
        return None

    # -- the cross-modal mapping
    def _raw_prompts(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return [self.ctx, *self.deep_text], [self.vision_ctx, *self.deep_vision]

    def _map_text_to_vision(self, text: Sequence[torch.Tensor], vision: Sequence[torch.Tensor]) -> torch.Tensor:
        """[k_v, n, W_v]: the visual prompts of the first k_v layers mapped onto the text proxies."""
        kt, kv = self.cross_text, self.cross_vision
        proxies = torch.cat([pool(p, t) for pool, p, t in zip(self.text_pooling, self.text_proxies, text[:kt])])
        return self.text2visual(torch.cat(list(vision[:kv])), proxies).view(kv, self.config.n_ctx, -1)

    def _map_vision_to_text(self, text: Sequence[torch.Tensor], vision: Sequence[torch.Tensor]) -> torch.Tensor:
        """[d_t - k_t, n, W_t]: the text prompts of the later layers mapped onto the visual proxies."""
        kt, kv = self.cross_text, self.cross_vision
        proxies = torch.cat([pool(p, v) for pool, p, v in zip(self.vision_pooling, self.vision_proxies, vision[kv:])])
        return self.visual2text(torch.cat(list(text[kt:])), proxies).view(len(text) - kt, self.config.n_ctx, -1)

    @torch.no_grad()
    def coded_update(self) -> None:
        """The reference's forward prologue: both mappings copied into the prompt parameters in place
        (text -> image first; the two write disjoint sets)."""
        text, vision = self._raw_prompts()
        for p, new in zip(vision, self._map_text_to_vision(text, vision)):
            p.data.copy_(new)
        for p, new in zip(text[self.cross_text:], self._map_vision_to_text(text, vision)):
            p.data.copy_(new)

    def _forward_prologue(self) -> None:
        if self.config.mapping == "coded":
            self.coded_update()

    def text_prompts(self) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        text, vision = self._raw_prompts()
        if self.config.mapping == "differentiable":
            text = text[: self.cross_text] + list(self._map_vision_to_text(text, vision).unbind(0))
        return text[0], text[1:]

    def vision_prompts(self) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        text, vision = self._raw_prompts()
        if self.config.mapping == "differentiable":
            vision = list(self._map_text_to_vision(text, vision).unbind(0)) + vision[self.cross_vision:]
        return vision[0], vision[1:]

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """[C, L] -> [C, D] prompted text features, the prompts mapped once (the body's path maps twice)."""
        ctx, deep = self.text_prompts()
        eot = eot_positions(tokens, self.backbone.eot_token_id)
        emb = place_context(self.clip.token_embedding(tokens), tokens, eot, ctx.unsqueeze(0).expand(tokens.shape[0], -1, -1))
        return encode_text_deep(self.clip, emb, eot, deep, start=1, share_prefix=True)  # one context for every class

    # -- text: the prompted class feature fused with the description embedding
    def _descriptions(self, rows: torch.Tensor) -> torch.Tensor:
        """[S, C, L] description rows (padding rows empty) -> [C, D] ``w``: the re-normalised mean of the
        frozen CLIP's normalised embeddings of each class's descriptions (cached while training)."""
        S, C, L = rows.shape
        flat = rows.reshape(S * C, L)
        feats = (cached_frozen_text_features(self, flat) if self.training else frozen_text_features(self, flat)).view(S, C, -1)
        return mean_over_rows(feats, rows, self.backbone.eot_token_id)

    def _text(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if tokens.dim() != 3 or tokens.shape[0] < 2:
            raise ValueError(f"{self.name} needs tokens [1 + S, C, L] (learned prompt, then description rows), "
                             f"got {tuple(tokens.shape)}")
        w = self._descriptions(tokens[1:])
        t = F.normalize(self.encode_text(tokens[0]), dim=-1)
        return F.normalize(t + w.to(t.dtype), dim=-1), w

    def class_embeddings(self, tokens: torch.Tensor) -> torch.Tensor:
        """[1 + S, C, L] (learned prompt, description rows) -> [C, D] ``norm(norm(t_prompted) + w)``."""
        self._forward_prologue()
        return self._text(tokens)[0]

    def class_features(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.class_embeddings(tokens)

    # -- image: the prompted feature fused with the frozen one
    def _image(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            f0 = F.normalize(self.clip.visual(images), dim=-1)
        f = F.normalize(super().encode_image(images), dim=-1)
        return F.normalize(f + f0.to(f.dtype), dim=-1), f0

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """``norm(norm(f_prompted) + f0)`` [B, D]: two image-encoder passes."""
        self._forward_prologue()
        return self._image(images)[0]

    # -- training
    def compute_loss(
        self, inputs: torch.Tensor, labels: torch.Tensor, tokens: torch.Tensor, *, are_features: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if are_features:
            raise ValueError(f"{self.name} changes the image graph; it trains on images, not cached features")
        self._forward_prologue()  # once per step, as the reference's forward
        f, f0 = self._image(inputs)
        t, w = self._text(tokens)
        logits = self.logit_scale() * f @ t.t().to(f.dtype)
        text_dist = 1.0 - F.cosine_similarity(t.float(), w.float(), dim=-1, eps=1e-7).mean()
        image_dist = 1.0 - F.cosine_similarity(f.float(), f0.float(), dim=-1, eps=1e-7).mean()
        return F.cross_entropy(logits, labels) + self.config.lambd * (text_dist + image_dist), logits
