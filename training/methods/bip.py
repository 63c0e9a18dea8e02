"""BIP: class-aware text tokens and image-aware visual tokens, each fused with the frozen CLIP's feature.

Follows the official code htyao89/BIP at 427ed6c99c82d56418d206d8e58b8e937fe7878e (``trainers/bip.py``,
the blocks of ``trainers/clip_text/model.py``, ``scripts/base2new_train.sh``, the TCP configs it
reuses). The venue, TPAMI 2025, is the project's method list's: the repository names no paper (its
README is TCP's), so every detail here is from the code.

Learned (the reference's ``prompt_learner``):
- ``ctx`` [n_ctx, W_t], random N(0, 0.02): the prompt is ``[SOT] X X X X {name}. [EOT]``;
- ``meta_net``: Linear(D, D/4) -> QuickGELU -> Linear(D/4, n_ctx W_t), fed the frozen CLIP's
  normalised embedding ``t0`` of the hand-crafted prompt (``handcrafted_template``) of each class;
  before text block ``inject_layer`` its tokens take the context slots, ``text_mix * tokens + (1 -
  text_mix) * x`` (1.0: replaced);
- ``ctx_visual`` [n_ctx, W_v], N(0, 0.02), appended after the patch tokens (no positional embedding,
  before ``ln_pre``);
- ``meta_vis``: Linear(D, D/4) -> QuickGELU -> Linear(D/4, n_ctx W_v), fed the frozen CLIP's
  normalised image feature ``f0`` of the same image; before vision block ``inject_layer`` the last
  n_ctx tokens become ``visual_mix * tokens + (1 - visual_mix) * x`` (0.75).

Features, train and test alike: ``t = norm(norm(t_prompted) + t0)`` and ``f = norm(norm(f_prompted) +
f0)``; logits ``logit_scale * f . t``. The image graph therefore runs the image encoder twice (the
frozen pass conditions the prompted one); the export bakes both into one graph. Class embeddings do
not depend on the image, so they are cached per class list as for any method.

Loss: ``CE(logits) + proto_weight * [CE(s cos(f, P)) + CE(s cos(f0, P))] + text_weight * (1 - mean_c
cos(t_c, t0_c)) + image_weight * (1 - mean_b cos(f0_b, f_b))`` with s = 10, proto_weight 0.5,
text_weight 8.0, image_weight (the reference's W) 4.0. ``P`` [n_base, D] is a prototype head
(the reference's ``VPT_fc``) initialised, once at the start of training, to the normalised per-class
mean of the normalised ``f0`` over one pass of the training set with its training augmentation. It
trains (the second CE only moves P) but is training state: checkpoints keep it for a resumed run,
artifacts do not (the reference rebuilds it for every class list and never uses it at test time).

Defaults (``base2new_train.sh``: N_CTX 4, L 0, VFW 0.75, TFW 1.0, W 4.0; ``vit_b32_ep50_ctxv1``):
Adam lr 0.002, eps 1e-3, batch 32, 50 epochs, one warm-up epoch at 1e-5 (``train_defaults``; the
reference uses batch 128 and 25 epochs on ImageNet and SUN397).

Depth: the reference's L=0 injects before block 8 (0-based) of both 12-block towers. Here that is
``round(layers * 8 / 12)`` per tower (as TCP), unless ``inject_layer`` fixes it for both.

Deliberate deviations:
- fp32 weights (the reference keeps CLIP, the generators and the prompts in fp16).
- Dassl's Adam (coupled L2 decay 5e-4) is the loop's AdamW (decoupled decay 5e-4), with the
  reference's eps 1e-3 (``adam_eps``); at lr 0.002 the decay matters little either way.
- The per-dataset hand-written template table is ``handcrafted_template`` (the dataset's CoOp
  template on the 11 standard datasets, as the reference's table; "a photo of a {}." elsewhere).
- Only one visual generator: the reference builds three copies (``meta_vis`` and two clones) and
  uses the first clone at L=0; the others never receive a gradient.
- The injection depth is one block (L=0); the reference's other L values select lists of blocks.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from open_clip.transformer import QuickGELU
from torch import nn

from training.backbones import Backbone
from training.protocol import Capabilities, MethodConfig, PromptMethod, register_method
from training.prompts.context import context_template, init_context, place_context
from training.prompts.deep import check_vision_tower, run_blocks_injecting, tower_block, vision_input_tokens
from training.prompts.knowledge import HANDCRAFTED_TEMPLATE, cached_frozen_text_features, check_template, frozen_text_features
from training.prompts.templates import template_option
from training.prompts.text import eot_positions, pool_text_features, text_position_inputs


def default_inject_layer(layers: int) -> int:
    """The reference injects before block 8 of 12 (L=0); keep that relative depth."""
    return round(layers * 8 / 12)


@dataclass(frozen=True)
class BIPConfig(MethodConfig):
    """Args:
    n_ctx: context tokens of each tower (and generated tokens per class / image).
    init_std: std of the random text and visual contexts.
    handcrafted_template: the hand-written prompt whose frozen embedding ``t0`` feeds the text
        generator and is fused with the learned class feature.
    inject_layer: block of both towers before which the generated tokens enter; None =
        ``round(layers * 8 / 12)`` per tower.
    text_mix: TFW, the generated text tokens' share at the context slots (1.0).
    visual_mix: VFW, the generated visual tokens' share at the visual prompt slots (0.75).
    meta_reduction: the generators' hidden width is ``embed_dim // meta_reduction`` (4).
    text_weight: weight of 1 - cos(t, t0) (8.0, hard-coded in the reference).
    image_weight: W, weight of 1 - cos(f0, f) (4.0).
    proto_weight: weight of the two prototype-head cross-entropies (0.5).
    proto_scale: the prototype head's logit scale (10.0).
    """

    n_ctx: int = 4
    init_std: float = 0.02
    handcrafted_template: str = HANDCRAFTED_TEMPLATE
    inject_layer: int | None = None
    text_mix: float = 1.0
    visual_mix: float = 0.75
    meta_reduction: int = 4
    text_weight: float = 8.0
    image_weight: float = 4.0
    proto_weight: float = 0.5
    proto_scale: float = 10.0

    def __post_init__(self) -> None:
        if self.n_ctx < 1 or self.meta_reduction < 1:
            raise ValueError("n_ctx and meta_reduction must be >= 1")
        if self.init_std <= 0 or self.proto_scale <= 0:
            raise ValueError("init_std and proto_scale must be > 0")
        if self.inject_layer is not None and self.inject_layer < 0:
            raise ValueError(f"inject_layer must be >= 0, got {self.inject_layer}")
        for name in ("text_mix", "visual_mix"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if min(self.text_weight, self.image_weight, self.proto_weight) < 0:
            raise ValueError("loss weights must be >= 0")
        check_template(self.handcrafted_template, "handcrafted_template")


def _generator(dim: int, hidden: int, out: int) -> nn.Sequential:
    return nn.Sequential(OrderedDict([("linear1", nn.Linear(dim, hidden)), ("gelu", QuickGELU()),
                                      ("linear2", nn.Linear(hidden, out))]))


@register_method("bip", "BIP: class-aware text and image-aware visual tokens, fused with frozen features (Yao et al. 2025)")
class BIP(PromptMethod):
    config_cls = BIPConfig
    train_defaults = {"epochs": 50, "batch_size": 32, "lr": 0.002, "optimizer": "adamw", "adam_eps": 1e-3}

    @classmethod
    def options_for_dataset(cls, dataset: str) -> dict:
        """The reference's hand-written template of the 11 standard datasets (:mod:`training.prompts.templates`)."""
        return template_option(dataset, "handcrafted_template")

    def __init__(self, backbone: Backbone, config: BIPConfig, train_classnames: Sequence[str]):
        super().__init__(backbone, config, train_classnames)
        visual = check_vision_tower(self.clip.visual)
        self.ctx = nn.Parameter(init_context(backbone, config.n_ctx, "", config.init_std))
        text_width, vision_width = self.ctx.shape[-1], visual.class_embedding.shape[0]
        self.text_layer, self.vision_layer = (
            tower_block("inject_layer", config.inject_layer, default_inject_layer(len(blocks)), len(blocks), tower)
            for tower, blocks in (("text", self.clip.transformer.resblocks), ("image", visual.transformer.resblocks)))
        dim = backbone.embed_dim
        hidden = max(dim // config.meta_reduction, 1)
        self.meta_net = _generator(dim, hidden, config.n_ctx * text_width)
        self.meta_vis = _generator(dim, hidden, config.n_ctx * vision_width)
        ctx_visual = torch.empty(config.n_ctx, vision_width)
        nn.init.normal_(ctx_visual, std=config.init_std)
        self.ctx_visual = nn.Parameter(ctx_visual)
        self.declare_learned()
        # the prototype head: trained, but training state (rebuilt for each run, unused at test)
        self.proto = nn.Parameter(torch.zeros(len(self.train_classnames), dim))
        self.register_buffer("proto_ready", torch.zeros((), dtype=torch.bool), persistent=False)

    @classmethod
    def capabilities_for(cls, config: BIPConfig) -> Capabilities:
        return Capabilities(changes_image_graph=True)

    def prompt_templates(self) -> list[str]:
        """The learned prompt's template, then the hand-crafted one (two roles, not an ensemble)."""
        return [context_template(self.config.n_ctx), self.config.handcrafted_template]

    # -- text
    def _split(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if tokens.dim() != 3 or tokens.shape[0] != 2:
            raise ValueError(f"{self.name} needs tokens [2, C, L] (learned prompt, hand-crafted prompt), got {tuple(tokens.shape)}")
        return tokens[0], tokens[1]

    def _handcrafted(self, hand_tokens: torch.Tensor) -> torch.Tensor:
        """[C, D] normalised frozen embeddings of the hand-crafted prompts (cached while training)."""
        return cached_frozen_text_features(self, hand_tokens) if self.training else frozen_text_features(self, hand_tokens)

    def prompted_text(self, tokens: torch.Tensor, t0: torch.Tensor) -> torch.Tensor:
        """Learned-prompt tokens [C, L] and t0 [C, D] -> [C, D] prompted text features (not normalised)."""
        clip = self.clip
        eot = eot_positions(tokens, self.backbone.eot_token_id)
        ctx = self.ctx.unsqueeze(0).expand(tokens.shape[0], -1, -1)
        x = place_context(clip.token_embedding(tokens), tokens, eot, ctx)
        pos, mask = text_position_inputs(clip, x.shape[1], x.dtype)
        generated = self.meta_net(t0.to(x.dtype)).reshape(tokens.shape[0], self.config.n_ctx, -1)
        x = run_blocks_injecting(clip.transformer, x + pos, generated, self.text_layer, 1, self.config.text_mix, mask)
        return pool_text_features(clip, x, eot)

    def _text(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        learned, hand = self._split(tokens)
        t0 = self._handcrafted(hand)
        return F.normalize(F.normalize(self.prompted_text(learned, t0), dim=-1) + t0.to(self.ctx.dtype), dim=-1), t0

    def class_features(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._text(tokens)[0]

    def class_embeddings(self, tokens: torch.Tensor) -> torch.Tensor:
        """[2, C, L] (learned prompt, hand-crafted prompt) tokens -> [C, D] ``norm(norm(t_prompted) + t0)``."""
        return self._text(tokens)[0]

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{self.name} embeds a class from two prompts; use class_embeddings(tokens [2, C, L])")

    # -- image: the frozen pass, then the prompted one conditioned on it
    def frozen_image(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, D] normalised frozen CLIP feature f0 (no grad)."""
        with torch.no_grad():
            return F.normalize(self.clip.visual(images), dim=-1)

    def prompted_image(self, images: torch.Tensor, f0: torch.Tensor) -> torch.Tensor:
        visual = self.clip.visual
        x = vision_input_tokens(visual, images)
        n = self.config.n_ctx
        x = torch.cat([x, self.ctx_visual.to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)], dim=1)
        x = visual.ln_pre(x)
        generated = self.meta_vis(f0.to(x.dtype)).reshape(x.shape[0], n, -1)
        x = run_blocks_injecting(visual.transformer, x, generated, self.vision_layer, -n, self.config.visual_mix)
        pooled = visual.ln_post(x[:, 0])
        return pooled @ visual.proj if visual.proj is not None else pooled

    def _image(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f0 = self.frozen_image(images)
        return F.normalize(F.normalize(self.prompted_image(images, f0), dim=-1) + f0, dim=-1), f0

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """``norm(norm(f_prompted) + f0)`` [B, D]: two image-encoder passes."""
        return self._image(images)[0]

    # -- training
    def training_state(self) -> dict[str, torch.Tensor]:
        return {"proto": self.proto.detach(), "proto_ready": self.proto_ready.clone()}

    def load_training_state(self, state: Mapping[str, torch.Tensor]) -> None:
        unknown = set(state) - {"proto", "proto_ready"}
        if unknown:
            raise ValueError(f"{self.name}: unknown training state {sorted(unknown)}")
        with torch.no_grad():
            if "proto" in state:
                self.proto.copy_(state["proto"])
            if "proto_ready" in state:
                self.proto_ready.copy_(state["proto_ready"])

    def on_train_start(self, train_set: Any) -> None:
        """The prototype head: the normalised class means of f0 over one augmented pass (once per run)."""
        if bool(self.proto_ready):
            return
        device = self.proto.device
        sums = torch.zeros_like(self.proto)
        loader = torch.utils.data.DataLoader(train_set, batch_size=64, shuffle=False)
        was_training = self.training
        self.eval()
        for x, y in loader:
            sums.index_add_(0, y.to(device), self.frozen_image(x.to(device)).to(sums.dtype))
        self.train(was_training)
        with torch.no_grad():
            self.proto.copy_(F.normalize(sums, dim=-1))
            self.proto_ready.fill_(True)

    def compute_loss(
        self, inputs: torch.Tensor, labels: torch.Tensor, tokens: torch.Tensor, *, are_features: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if are_features:
            raise ValueError(f"{self.name} changes the image graph; it trains on images, not cached features")
        cfg = self.config
        f, f0 = self._image(inputs)
        t, t0 = self._text(tokens)
        logits = self.logit_scale() * f @ t.t().to(f.dtype)
        proto = F.normalize(self.proto, dim=-1)
        loss_proto = (F.cross_entropy(cfg.proto_scale * f @ proto.t(), labels)
                      + F.cross_entropy(cfg.proto_scale * f0 @ proto.t(), labels))
        text_dist = 1.0 - F.cosine_similarity(t.float(), t0.float(), dim=-1).mean()
        image_dist = 1.0 - F.cosine_similarity(f0.float(), f.float(), dim=-1).mean()
        loss = (F.cross_entropy(logits, labels) + cfg.proto_weight * loss_proto
                + cfg.text_weight * text_dist + cfg.image_weight * image_dist)
        return loss, logits
