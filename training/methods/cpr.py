"""CPR: CoOp class features rectified per image by a head that attends over visual and textual prototypes.

Follows "Conditional Prototype Rectification Prompt Learning" and its official code, chenhaoxing/CPR
at ee00ae812cdf09129c3015fc153b09f003b5130f (``model/CPR.py``, ``model/base.py``, ``main.py``,
``configs/<dataset>.yaml``; a Tip-Adapter-style codebase, not Dassl). The repository publishes no
base-to-novel numbers.

Learned: a CoOp context of 16 random tokens (``"X ... X {name}."``) giving the class features ``T``
[C, D] (normalised), and one head of five Linear(D, D) layers (``q``, ``k``, ``v`` initialised N(0,
sqrt(2/D)), ``out`` Xavier-normal, ``proj`` PyTorch's default) and a LayerNorm:
``attend(x, K) = LN(out(softmax(q(x) k(K)^T / sqrt(D)) v(K)) + proj(x))``. With ``x`` the frozen CLIP's
normalised image feature (the image graph is CLIP's own):

    w = attend(x, P_vis) + attend(x, T)        E[b, c] = norm(T_c + w_b)        logit[b, c] = s E[b, c] . x_b

with ``s`` the backbone's logit scale (CLIP's 100, the reference's constant). ``P_vis`` [n_base, D],
the visual prototypes, is built as the reference's Tip-Adapter cache (``build_cache_model``): each
few-shot training image's frozen feature averaged over ``prototype_views`` (10) augmented passes,
then normalised (a cache key), and the per-class mean of the keys (not re-normalised). Computed
once at the start of training; learned state that never trains.

``reference_cache_order``: the reference fills that cache from its shuffled training loader, so
cache slot i averages the i-th image of each pass's own shuffle and takes its label from the first
pass: the keys mix images of different classes and the prototypes come out close to class-agnostic.
False (default) averages each image's own passes; True reproduces the reference.

Because ``attend(x, T)`` is a softmax over every class of the request, a class's logit depends on the
other names sent with it: the artifact's score graph runs on a request's whole class list
(``GraphSignature.whole_class_list``), and results for a name change with the list it comes in, as
in the reference.

Loss: ``CE + 8 * (1 - mean_{b,c} cos(E[b, c], T_cupl_c))`` with ``T_cupl`` the frozen CLIP's CuPL
prototypes of the training classes (the re-normalised mean of the normalised embeddings of "a photo
of a {name}." and every description of the class): descriptions are needed to train, not to serve.
Defaults (``configs/*.yaml``, ViT-B/16): AdamW lr 0.002, eps 1e-3, PyTorch's weight decay 0.01, 10
epochs, batch 1 (every dataset but ImageNet), cosine, no warm-up, RandomResizedCrop scale (0.5, 1).

Deliberate deviations:
- Novel classes are served with the *base* visual prototypes: the visual attention reads the head's
  memory of the training images whatever the request's names. The reference evaluates novel classes
  with prototypes built from their own labelled 16-shot images, which a base-to-novel protocol (and a
  served model) does not have.
- The last epoch is kept; the reference selects the epoch of best base *test* accuracy.
- The cosine schedule steps per epoch (the loop's), not per iteration; the test-time transductive
  rectification (``update=True``, off in ``main.py``) is not implemented.
- fp32 weights (the reference runs context, head and LayerNorm in fp16).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from training.backbones import Backbone
from training.protocol import (
    CLASS_EMBEDDINGS,
    IMAGE_EMBEDDINGS,
    Capabilities,
    GraphSignature,
    register_method,
)
from training.prompts.context import ContextConfig, ContextPromptMethod
from training.prompts.knowledge import HANDCRAFTED_TEMPLATE, check_template, class_text_means


@dataclass(frozen=True)
class CPRConfig(ContextConfig):
    """Args (and the context's, :class:`~training.prompts.context.ContextConfig`; 16 random tokens here):
    prototype_views: augmented passes averaged per training image for the visual prototypes (10).
    reference_cache_order: fill the prototype cache as the reference's shuffled loader does.
    cupl_template: the hand-written prompt that joins the descriptions in the CuPL prototypes.
    weight: of 1 - cos(E, T_cupl) (8).
    """

    n_ctx: int | None = 16
    ctx_init: str = ""
    prototype_views: int = 10
    reference_cache_order: bool = False
    cupl_template: str = HANDCRAFTED_TEMPLATE
    weight: float = 8.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.prototype_views < 1:
            raise ValueError(f"prototype_views must be >= 1, got {self.prototype_views}")
        if self.weight < 0:
            raise ValueError("weight must be >= 0")
        check_template(self.cupl_template, "cupl_template")


class PrototypeAttention(nn.Module):
    """``LN(out(softmax(q(x) k(K)^T / sqrt(D)) v(K)) + proj(x))``: images [B, D] attend over keys [N, D]."""

    def __init__(self, dim: int):
        super().__init__()
        self.q, self.k, self.v, self.proj, self.out = (nn.Linear(dim, dim) for _ in range(5))
        for layer in (self.q, self.k, self.v):
            nn.init.normal_(layer.weight, std=math.sqrt(2.0 / dim))
        nn.init.xavier_normal_(self.out.weight)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        keys = keys.to(x.dtype)
        weights = torch.softmax(self.q(x) @ self.k(keys).t() / math.sqrt(x.shape[-1]), dim=-1)  # [B, N]
        return self.norm(self.out(weights @ self.v(keys)) + self.proj(x))


@register_method("cpr", "CPR: class features rectified per image over visual and textual prototypes (Chen et al.)")
class CPR(ContextPromptMethod):
    config_cls = CPRConfig
    train_defaults = {"epochs": 10, "batch_size": 1, "lr": 0.002, "optimizer": "adamw", "adam_eps": 1e-3,
                      "weight_decay": 0.01, "warmup_epochs": 0, "min_crop_scale": 0.5}
    needs_train_descriptions = True

    def __init__(self, backbone: Backbone, config: CPRConfig, train_classnames: Sequence[str]):
        super().__init__(backbone, config, train_classnames)
        dim = backbone.embed_dim
        self.head = PrototypeAttention(dim)
        self.declare_learned()
        self.register_learned_buffer("visual_prototypes", torch.zeros(len(self.train_classnames), dim))
        self.register_buffer("prototypes_ready", torch.zeros((), dtype=torch.bool), persistent=False)
        self._cupl: torch.Tensor | None = None  # [C, D] the training classes' CuPL prototypes

    @classmethod
    def capabilities_for(cls, config: CPRConfig) -> Capabilities:
        return Capabilities(text_depends_on_image=True, open_vocabulary=not config.class_specific)

    def graph_signature(self) -> GraphSignature:
        return GraphSignature(heads=(), scored=True, whole_class_list=True)

    # -- the head
    def rectified(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Normalised image features x [B, D] and class features t [C, D] -> E [B, C, D]."""
        w = self.head(x, self.visual_prototypes) + self.head(x, t.to(x.dtype))  # [B, D]
        return F.normalize(t.to(x.dtype).unsqueeze(0) + w.unsqueeze(1), dim=-1)

    def score_outputs(self, image_outputs: Mapping[str, torch.Tensor], class_outputs: Mapping[str, torch.Tensor]
                      ) -> torch.Tensor:
        x = image_outputs[IMAGE_EMBEDDINGS]
        e = self.rectified(x, class_outputs[CLASS_EMBEDDINGS])
        return self.logit_scale() * (e @ x.unsqueeze(-1)).squeeze(-1)

    def logits_from_features(self, image_features: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return self.logits_from_outputs({IMAGE_EMBEDDINGS: F.normalize(image_features, dim=-1)}, tokens)

    # -- the prototypes
    def on_train_start(self, train_set: Any) -> None:
        device = self.visual_prototypes.device
        self._cupl = self.cupl_prototypes(device)
        if bool(self.prototypes_ready):  # resumed: they came with the checkpoint
            return
        n = len(train_set)
        keys = torch.zeros(n, self.visual_prototypes.shape[1], device=device)
        labels = torch.zeros(n, dtype=torch.long, device=device)
        was_training = self.training
        self.eval()
        with torch.no_grad():
            for p in range(self.config.prototype_views):  # the training augmentation, drawn anew each pass
                # slot i holds image order[i]: itself, or the i-th of this pass's shuffle (the reference)
                order = torch.randperm(n) if self.config.reference_cache_order else torch.arange(n)
                loader = torch.utils.data.DataLoader(train_set, batch_size=64, sampler=order.tolist())
                start = 0
                for x, y in loader:
                    slots = slice(start, start + len(y))
                    keys[slots] += self.clip.visual(x.to(device)).float()
                    if p == 0:
                        labels[slots] = y.to(device)
                    start += len(y)
            keys = F.normalize(keys / self.config.prototype_views, dim=-1)
            sums = torch.zeros_like(self.visual_prototypes).index_add_(0, labels, keys)
            counts = torch.bincount(labels, minlength=len(self.train_classnames)).clamp_min(1).unsqueeze(1)
            self.visual_prototypes.copy_(sums / counts)
            self.prototypes_ready.fill_(True)
        self.train(was_training)

    def cupl_prototypes(self, device: torch.device) -> torch.Tensor:
        """[C, D]: per training class the re-normalised mean of the normalised frozen embeddings of the
        hand-written prompt and every description."""
        described = self.every_training_description("builds its text prototypes from descriptions")
        texts = [[self.config.cupl_template.format(c), *d] for c, d in zip(self.train_classnames, described)]
        return class_text_means(self, texts, device, normalize_each=True)

    # -- training
    def compute_loss(
        self, inputs: torch.Tensor, labels: torch.Tensor, tokens: torch.Tensor, *, are_features: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self._cupl is None:
            raise ValueError(f"{self.name}: on_train_start must run before the first step (it builds the prototypes)")
        with torch.no_grad():
            x = inputs if are_features else self.encode_image(inputs)
        x = F.normalize(x.float(), dim=-1)
        t = self.class_embeddings(tokens)
        e = self.rectified(x, t)  # [B, C, D]
        logits = self.logit_scale() * (e @ x.unsqueeze(-1)).squeeze(-1)
        dist = 1.0 - F.cosine_similarity(e, self._cupl.to(e.device).unsqueeze(0), dim=-1).mean()
        return F.cross_entropy(logits, labels) + self.config.weight * dist, logits

    def training_state(self) -> dict[str, torch.Tensor]:
        return {"prototypes_ready": self.prototypes_ready.clone()}

    def load_training_state(self, state: Mapping[str, torch.Tensor]) -> None:
        unknown = set(state) - {"prototypes_ready"}
        if unknown:
            raise ValueError(f"{self.name}: unknown training state {sorted(unknown)}")
        if "prototypes_ready" in state:
            self.prototypes_ready.copy_(state["prototypes_ready"])
