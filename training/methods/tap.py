"""TAP: a tree of attributes per class, pooled per image by vision-conditional attention.

Follows "Tree of Attributes Prompt Learning for Vision-Language Models" (Ding et al., ICLR 2025) and
its official code, HHenryD/TAP at ef70c4c7aea9e09b2406a5cb14d0351b2e1b97d3 (``trainers/TAP.py``,
``utils/utils.py``, ``configs/trainers/TAP/TAP.yaml``, ``scripts/base_to_new.sh``).

Knowledge: each class is described by an attribute tree ``{attribute: [sentence, ...]}`` (an LLM's in
the paper; :mod:`exports.prompts`), read through a fixed :class:`~exports.prompts.DescriptionLayout`:
the attributes (the reference takes the first class's keys; here those that at least half of the
training classes have, in first-seen order, unless ``attributes`` is given) and per attribute how many
sentences each class gets (``int(quantile(counts, max_len_quantile))`` over the training classes, the
reference's ``MAX_LEN_QUANTILE``; longer lists keep their first sentences, shorter ones are masked).
Every sentence becomes ``"a photo of a {sentence}"``, and a "cls" bag of 7 templates
``"a photo of a " + t`` per class (``IMAGENET_TEMPLATES_SELECT``, the doubled prefix included:
"a photo of a itap of a {}.") comes first.

Learned, in two groups that train in alternating phases:
- vision (``vision`` track): A expert tokens [A, W] between the class token and the patches (no
  positional embedding; uniform(+-sqrt(6 / (3 p^2 + W))) for patch size p), deep prompts [A, W] *added*
  to the expert tokens before every later block (zeros at init), and A + 1 pooling heads (one per
  attribute, one for the cls bag): ``q``, ``k`` = Linear(D, D) (trunc-normal 0.02, zero bias);
- text (``text`` track): a context of 4 tokens initialised from "a photo of a" that replaces those
  four words in every prompt (one context for all attributes and classes).

Image: the class token gives ``g`` and the expert tokens ``e_a`` (both through ``ln_post`` and the
projection); nothing masks the patches from the experts, so ``g`` is not the frozen CLIP's. Class
side: every prompt's feature, normalised. Head h pools class c's rows of its block with the image as
query: ``softmax(q(x) . k(t_j) / sqrt(D))`` over the class's real rows, the values being the
normalised features themselves, the result normalised; logit ``s * cos(x, pooled)`` with ``x = e_a``
for attribute a and ``g`` for the cls bag. Test: ``0.4 * cls + (0.6 / A) * sum_a attribute`` (the 0.6
is hard-coded in the reference, not 1 - 0.4; ``attribute_weight``).

Training (the loop's alternating *tracks*, :class:`~training.protocol.Stage`): ``cycles`` (10) x
(5 vision epochs, 1 text epoch), one AdamW and one cosine per track over the track's own epochs (50 and
10), each starting with the constant warm-up epoch. Loss: the mean over the A + 1 heads of CE, plus
``u2`` (2.5) times the mean over heads of KL(frozen CLIP || head) summed over the batch's logits and
divided by their count (the frozen CLIP scores with ``kl_template``, the dataset's CoOp template);
vision phase: ``u1`` (10) * L1(normalised g, the frozen CLIP's normalised image feature); text phase:
``u3`` (1.5 or 3) times a symmetric contrastive loss between one sampled row per (class, head) with the
learned context and the same row through the frozen CLIP (temperature the logit scale). With more
than ``max_text_classes`` (80) training classes, a text step scores the batch's classes and random
others up to 80. After each epoch of a track its tensors join that track's Gaussian-weighted sum
(``N(0.9 E, 0.2 E)`` over the track's E epochs); at the track's last epoch the sum is loaded (GPA).
Defaults: batch 32, lr 0.004 (vision), ``text_lr_scale`` 1, 60 epochs; the reference's per-dataset
quantile / text lr / vision lr / u3 are :meth:`options_for_dataset` (lrs as scales of ``--lr``).

Serving: a scored signature. The image graph returns ``g`` and the expert features; the text graph
returns every class's row features ``[C, R, D]`` (padding rows zero), cached per name; the score graph
pools and fuses. Descriptions are needed for every name, trees of the layout's attributes.

Deliberate deviations:
- The layout is fixed when training starts and travels with the artifact, so a class's rows never
  depend on the other names of a request; the reference recomputes the quantile cut over the
  evaluated split's classes (base, then novel).
- A class without a sentence for an attribute gets its name there ("a photo of a {name}."); the
  reference's LLM trees have every attribute for every class.
- The text features of the vision phase are computed once per phase (the context is frozen then);
  the reference recomputes them at every step of the first vision epoch after a text epoch, and at
  every test batch (same values).
- Resuming: the GPA sums and the phase position are checkpointed (the reference keeps neither).
- The reference builds the subsampled class list from a Python ``set`` (arbitrary order); here the
  batch's classes come first, sorted, and the draw comes from the epoch's seeded generator
  (:func:`training.prompts.classes.step_classes`, LwEIB's sampling too).
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from exports.prompts import ClassDescriptions, DescriptionLayout
from training.backbones import Backbone
from training.protocol import (
    IMAGE_EMBEDDINGS,
    Capabilities,
    GraphSignature,
    MethodConfig,
    PromptMethod,
    Stage,
    register_method,
    stage_plan,
    track_epoch,
)
from training.prompts.aggregate import SnapshotAverage
from training.prompts.classes import step_classes
from training.prompts.context import init_context
from training.prompts.deep import check_vision_tower, replace_prompts, run_blocks, vision_input_tokens
from training.prompts.knowledge import check_template, frozen_text_features
from training.prompts.templates import coop_dataset, template_option
from training.prompts.text import description_rows, encode_text_embeddings, eot_positions

ATTRIBUTE_EMBEDDINGS = "attribute_embeddings"
DESCRIPTION_FEATURES = "description_features"
#: utils/utils.py IMAGENET_TEMPLATES_SELECT: the "cls" bag
CLS_TEMPLATES = ("itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.",
                 "a {} in a video game.", "art of the {}.", "a photo of the small {}.")
#: scripts/base_to_new.sh: (MAX_LEN_QUANTILE, TEXT_LR, VISION_LR, U3) per dataset
REFERENCE_DATASETS = {
    "dtd": (1.0, 0.002, 0.006, 3.0), "eurosat": (1.0, 0.004, 0.004, 1.5), "oxford_pets": (1.0, 0.004, 0.004, 1.5),
    "food101": (1.0, 0.004, 0.004, 1.5), "oxford_flowers": (1.0, 0.002, 0.006, 3.0),
    "stanford_cars": (0.95, 0.002, 0.006, 3.0), "fgvc_aircraft": (1.0, 0.004, 0.004, 1.5),
    "ucf101": (0.95, 0.002, 0.006, 3.0), "caltech101": (1.0, 0.002, 0.006, 3.0), "sun397": (0.95, 0.004, 0.004, 1.5),
    "imagenet": (0.95, 0.004, 0.004, 1.5),
}
REFERENCE_LR = 0.004  # train.py's VISION_LR / TEXT_LR default: the scales below are relative to it
TEXT_CHUNK = 1024  # prompts per text-tower call (a class list of hundreds has thousands of rows)


@dataclass(frozen=True)
class TAPConfig(MethodConfig):
    """Options of TAP (reference defaults).

    Attributes:
        attributes: the attributes read from each class's tree, in order (empty: those at least half
            of the training classes have, decided when training starts).
        rows_per_attribute: sentences per attribute each class gets (empty: from the training classes
            with ``max_len_quantile``).
        max_len_quantile: quantile of the training classes' sentence counts that cuts each attribute.
        ctx_init: the words the learned text context starts from and replaces in every prompt.
        deep: deep (additive) expert prompts before every block after the first.
        alpha, attribute_weight: test fusion ``alpha * cls + attribute_weight / A * sum of attributes``.
        u1, u2, u3: weights of the image L1 anchor (vision phase), the KL to the frozen CLIP (both
            phases) and the text contrastive loss (text phase).
        kl_template: the frozen CLIP's prompt for the KL target (the dataset's CoOp template).
        cycles, vision_epochs, text_epochs: the alternation, ``cycles`` x (vision, text) epochs; the
            shares of the run's epochs (60 = 10 x (5 + 1) in the reference).
        text_lr_scale, vision_lr_scale: each track's peak lr as a multiple of ``--lr``.
        max_text_classes: a text step scores at most this many classes (the batch's first).
        gpa_mean, gpa_std: the Gaussian over a track's epochs, as fractions of them.
    """

    attributes: tuple[str, ...] = ()
    rows_per_attribute: tuple[int, ...] = ()
    max_len_quantile: float = 1.0
    ctx_init: str = "a photo of a"
    deep: bool = True
    alpha: float = 0.4
    attribute_weight: float = 0.6
    u1: float = 10.0
    u2: float = 2.5
    u3: float = 1.5
    kl_template: str = "a photo of a {}."
    cycles: int = 10
    vision_epochs: int = 5
    text_epochs: int = 1
    text_lr_scale: float = 1.0
    vision_lr_scale: float = 1.0
    max_text_classes: int = 80
    gpa_mean: float = 0.9
    gpa_std: float = 0.2

    def __post_init__(self) -> None:
        if self.rows_per_attribute and len(self.rows_per_attribute) != len(self.attributes):
            raise ValueError(f"rows_per_attribute needs one count per attribute, got {list(self.rows_per_attribute)} "
                             f"for {list(self.attributes)}")
        if self.attributes and self.rows_per_attribute:
            DescriptionLayout(self.attributes, self.rows_per_attribute)  # its checks
        if not 0.0 < self.max_len_quantile <= 1.0:
            raise ValueError(f"max_len_quantile must be in (0, 1], got {self.max_len_quantile}")
        if min(self.cycles, self.vision_epochs, self.text_epochs) < 1:
            raise ValueError("cycles, vision_epochs and text_epochs must be >= 1")
        if min(self.u1, self.u2, self.u3, self.alpha, self.attribute_weight) < 0:
            raise ValueError("loss and fusion weights must be >= 0")
        if min(self.text_lr_scale, self.vision_lr_scale, self.gpa_mean, self.gpa_std) <= 0:
            raise ValueError("lr scales and the GPA mean and std must be > 0")
        if self.max_text_classes < 2:
            raise ValueError("max_text_classes must be >= 2")
        check_template(self.kl_template, "kl_template")
        if not self.ctx_init.strip():
            raise ValueError("ctx_init: TAP's context replaces these words of every prompt; give a phrase")


class PoolingHead(nn.Module):
    """One head's vision-conditional pooling (TAP.py AttentionPooling with ``normto1``): the image
    feature queries a class's normalised row features; the values are those features."""

    def __init__(self, dim: int):
        super().__init__()
        self.q, self.k = nn.Linear(dim, dim), nn.Linear(dim, dim)
        for lin in (self.q, self.k):
            nn.init.trunc_normal_(lin.weight, std=0.02)
            nn.init.zeros_(lin.bias)

    def forward(self, query: torch.Tensor, rows: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """query [B, D] and rows [C, K, D] (normalised; ``real`` [C, K] marks real rows) -> [B, C, D] normalised."""
        q = self.q(query)  # [B, D]
        k = self.k(rows)  # [C, K, D]
        scores = torch.einsum("bd,ckd->bck", q, k) / math.sqrt(q.shape[-1])
        scores = scores.masked_fill(~real.unsqueeze(0), torch.finfo(scores.dtype).min)
        pooled = torch.einsum("bck,ckd->bcd", scores.softmax(dim=-1), rows)
        return F.normalize(pooled, dim=-1)


def derived_layout(descriptions: Mapping[str, Mapping[str, Sequence[str]]], attributes: Sequence[str],
                   quantile: float) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """``(attributes, rows per attribute)`` from the training classes' trees: the given attributes (else
    those at least half of the classes have, first-seen order), each cut at
    ``int(quantile(counts of the classes that have it, q))`` (numpy's linear interpolation, floored), at least 1."""
    trees = [t for t in descriptions.values() if isinstance(t, Mapping)]
    if not trees:
        raise ValueError("tap reads attribute trees {attribute: [sentence, ...]} per class; got none")
    if not attributes:
        seen = Counter(a for t in trees for a, v in t.items() if v)
        attributes = [a for a in dict.fromkeys(a for t in trees for a in t) if seen[a] * 2 >= len(trees)]
        if not attributes:
            raise ValueError("no attribute is described for at least half of the training classes")
    rows = []
    for a in attributes:
        counts = [len(t[a]) for t in trees if t.get(a)]
        rows.append(max(1, int(np.quantile(counts, quantile))) if counts else 1)
    return tuple(attributes), tuple(rows)


def tap_stages(vision_epochs: int, text_epochs: int, cycles: int) -> tuple[Stage, ...]:
    """``cycles`` x (a vision stage, a text stage), shares in proportion to their epochs, one track each."""
    total = cycles * (vision_epochs + text_epochs)
    out = []
    for i in range(cycles):
        out.append(Stage(f"vision-{i + 1}", vision_epochs / total, track="vision"))
        out.append(Stage(f"text-{i + 1}", text_epochs / total, track="text"))
    return tuple(out)


def gaussian_weights(n: int, mean: float, std: float) -> list[float]:
    """The reference's GPA weights over epochs 1..n: N(mean * n, std * n) at each, normalised to sum 1."""
    w = [math.exp(-0.5 * ((e - mean * n) / (std * n)) ** 2) for e in range(1, n + 1)]
    total = sum(w)
    return [x / total for x in w]


@register_method("tap", "TAP: attribute trees pooled per image by expert-token queries, alternating vision/text phases (ICLR 2025)")
class TAP(PromptMethod):
    config_cls = TAPConfig
    description_kind = "attributes"
    train_defaults = {"epochs": 60, "batch_size": 32, "lr": REFERENCE_LR, "optimizer": "adamw"}
    published_b2n = (84.75, 77.63, 81.04)
    published_source = "TAP README (HHenryD/TAP), 11-dataset base-to-novel average"

    @classmethod
    def capabilities_for(cls, config: TAPConfig) -> Capabilities:
        return Capabilities(changes_image_graph=True, text_depends_on_image=True, needs_class_descriptions=True)

    @classmethod
    def options_for_dataset(cls, dataset: str) -> dict[str, Any]:
        out: dict[str, Any] = template_option(dataset, "kl_template")
        ref = REFERENCE_DATASETS.get(coop_dataset(dataset) or "")
        if ref is not None:
            q, text_lr, vision_lr, u3 = ref
            out.update(max_len_quantile=q, text_lr_scale=text_lr / REFERENCE_LR,
                       vision_lr_scale=vision_lr / REFERENCE_LR, u3=u3)
        return out

    @classmethod
    def options_for_descriptions(cls, config: TAPConfig, descriptions: Mapping[str, ClassDescriptions]) -> dict[str, Any]:
        if config.attributes and config.rows_per_attribute:
            return {}
        attributes, rows = derived_layout(descriptions, config.attributes, config.max_len_quantile)
        return {"attributes": attributes, "rows_per_attribute": rows}

    @classmethod
    def options_for_epochs(cls, config: TAPConfig, epochs: int) -> dict[str, Any]:
        """A run of other epochs than ``cycles x (vision + text)`` keeps the 5:1 alternation with as many
        cycles as give every phase at least one epoch (one cycle of ``epochs - text`` vision epochs when
        fewer than a cycle's epochs).

        Raises:
            ValueError: fewer epochs than one vision and one text epoch.
        """
        per_cycle = config.vision_epochs + config.text_epochs
        if epochs == config.cycles * per_cycle:
            return {}
        if epochs < 1 + config.text_epochs:
            raise ValueError(f"tap alternates vision and text epochs: train at least {1 + config.text_epochs} epochs, "
                             f"got {epochs}")
        if epochs < per_cycle:
            return {"cycles": 1, "vision_epochs": epochs - config.text_epochs}
        for cycles in range(max(1, round(epochs / per_cycle)), 0, -1):
            try:
                stage_plan(epochs, tap_stages(config.vision_epochs, config.text_epochs, cycles))
                return {"cycles": cycles}
            except ValueError:
                continue
        return {"cycles": 1}

    def __init__(self, backbone: Backbone, config: TAPConfig, train_classnames: Sequence[str]):
        super().__init__(backbone, config, train_classnames)
        if not (config.attributes and config.rows_per_attribute):
            raise ValueError("tap reads a fixed set of attributes: give attributes=... and rows_per_attribute=... "
                             "(training derives both from the training classes' attribute trees)")
        self.layout = DescriptionLayout(config.attributes, config.rows_per_attribute)
        A, dim = len(config.attributes), backbone.embed_dim
        visual = check_vision_tower(self.clip.visual)
        width = visual.class_embedding.shape[0]
        patch = visual.conv1.kernel_size[0]
        bound = math.sqrt(6.0 / (3 * patch * patch + width))
        self.experts = nn.Parameter(torch.empty(A, width).uniform_(-bound, bound))  # [A, W]
        n_deep = len(visual.transformer.resblocks) - 1 if config.deep else 0
        self.deep_experts = nn.Parameter(torch.zeros(n_deep, A, width))  # added before blocks 1..n
        self.poolings = nn.ModuleList(PoolingHead(dim) for _ in range(A + 1))  # attributes, then the cls bag
        self.ctx = nn.Parameter(init_context(backbone, None, config.ctx_init, 0.02))  # [n_ctx, W_text]
        self._prefix = config.ctx_init.replace("_", " ").strip()
        self.vision_names = tuple(n for n, _ in self.named_parameters() if n.startswith(("experts", "deep_experts", "poolings")))
        self.declare_learned()
        self.gpa = {"vision": SnapshotAverage("gpa_vision", self.vision_names), "text": SnapshotAverage("gpa_text", ("ctx",))}
        self._phase = "vision"
        self._cached: tuple[torch.Tensor, torch.Tensor] | None = None  # (tokens, features) of the vision phase
        self._frozen: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # (tokens, rows, kl targets)

    # -- declared properties -------------------------------------------------------------------
    def description_layout(self) -> DescriptionLayout:
        return self.layout

    def description_template(self) -> str:
        return self._prefix + " {description}"

    def prompt_templates(self) -> list[str]:
        return [f"{self._prefix} {t}" for t in CLS_TEMPLATES]

    def graph_signature(self) -> GraphSignature:
        return GraphSignature(image_outputs=(IMAGE_EMBEDDINGS, ATTRIBUTE_EMBEDDINGS), text_outputs=(DESCRIPTION_FEATURES,),
                              heads=(), scored=True)

    def blocks(self) -> list[slice]:
        """Row slices of the heads in a class's rows: each attribute's block, then the cls bag."""
        n_cls, out, start = len(CLS_TEMPLATES), [], len(CLS_TEMPLATES)
        for k in self.layout.rows:
            out.append(slice(start, start + k))
            start += k
        return out + [slice(0, n_cls)]

    # -- image ---------------------------------------------------------------------------------
    def image_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, 3, H, W] -> (g [B, D], expert features [B, A, D]), not normalised."""
        visual = self.clip.visual
        x = vision_input_tokens(visual, images)  # [B, 1 + g*g, W], positions added
        experts = self.experts.to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
        x = visual.ln_pre(torch.cat([x[:, :1], experts, x[:, 1:]], dim=1))
        x = run_blocks(visual.transformer, x, list(self.deep_experts), start=1, add=True)
        A = self.experts.shape[0]
        out = visual.ln_post(x[:, : 1 + A]) @ visual.proj  # [B, 1 + A, D]
        return out[:, 0], out[:, 1:]

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.image_features(images)[0]

    def image_outputs(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        g, e = self.image_features(images)
        return {IMAGE_EMBEDDINGS: F.normalize(g, dim=-1), ATTRIBUTE_EMBEDDINGS: F.normalize(e, dim=-1)}

    # -- text ----------------------------------------------------------------------------------
    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """[N, L] prompts starting with ``ctx_init`` -> [N, D]: the learned context in those words' slots."""
        emb = replace_prompts(self.clip.token_embedding(tokens), self.ctx, 1)
        return encode_text_embeddings(self.clip, emb, eot_positions(tokens, self.backbone.eot_token_id))

    def text_outputs(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """[R, C, L] rows -> ``{description_features: [C, R, D]}`` normalised, padding rows zero."""
        R, C, L = tokens.shape
        flat = tokens.transpose(0, 1).reshape(C * R, L)
        real = description_rows(flat.unsqueeze(0), self.backbone.eot_token_id)[0]  # [C * R]
        index = real.nonzero().squeeze(1)  # only real rows go through the tower (padding is zero anyway)
        rows = flat[index]
        if rows.shape[0] <= TEXT_CHUNK:  # (an exported graph is traced on a few rows: this branch)
            feats = self.encode_text(rows)
        else:
            feats = torch.cat([self.encode_text(chunk) for chunk in rows.split(TEXT_CHUNK)])
        feats = F.normalize(feats, dim=-1)
        out = feats.new_zeros(C * R, feats.shape[-1]).index_copy(0, index, feats)
        return {DESCRIPTION_FEATURES: out.reshape(C, R, -1)}

    # -- scoring -------------------------------------------------------------------------------
    def head_logits(self, g: torch.Tensor, e: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """[A + 1, B, C] logits (attributes, then the cls bag) from normalised g [B, D], e [B, A, D] and
        class rows [C, R, D]."""
        real = rows.abs().sum(dim=-1) > 0  # [C, R]: padding rows are zero
        s = self.logit_scale()
        out = []
        for h, (head, block) in enumerate(zip(self.poolings, self.blocks())):
            query = g if h == len(self.poolings) - 1 else e[:, h]
            pooled = head(query, rows[:, block], real[:, block])  # [B, C, D]
            out.append(s * torch.einsum("bd,bcd->bc", query, pooled))
        return torch.stack(out)

    def fuse(self, heads: torch.Tensor) -> torch.Tensor:
        A = heads.shape[0] - 1
        return self.config.alpha * heads[-1] + (self.config.attribute_weight / A) * heads[:-1].sum(dim=0)

    def score_outputs(self, image_outputs: Mapping[str, torch.Tensor], class_outputs: Mapping[str, torch.Tensor]
                      ) -> torch.Tensor:
        rows = class_outputs[DESCRIPTION_FEATURES]
        return self.fuse(self.head_logits(image_outputs[IMAGE_EMBEDDINGS].to(rows.dtype),
                                          image_outputs[ATTRIBUTE_EMBEDDINGS].to(rows.dtype), rows))

    def logits_from_features(self, image_features: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{self.name} scores with its expert features too; use logits_from_outputs")

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return self.logits_from_outputs(self.image_outputs(images), tokens)

    # -- training ------------------------------------------------------------------------------
    def stages(self) -> tuple[Stage, ...]:
        c = self.config
        return tap_stages(c.vision_epochs, c.text_epochs, c.cycles)

    def begin_stage(self, stage: Stage) -> None:
        self._phase = stage.track
        for n, p in self.named_parameters():
            if n in self._learned_params:
                p.requires_grad_((n in self.vision_names) == (stage.track == "vision"))
        self._cached = None  # the context may have changed

    def param_groups(self) -> list[dict[str, Any]]:
        scale = self.config.vision_lr_scale if self._phase == "vision" else self.config.text_lr_scale
        return [{"params": [p for p in self.parameters() if p.requires_grad], "lr_scale": scale}]

    def _frozen_targets(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the training classes' rows through the frozen CLIP [C, R, D], the KL template's features
        [C, D]), computed once per tokens and device."""
        if self._frozen is None or self._frozen[0].shape != tokens.shape or self._frozen[0].device != tokens.device \
                or not torch.equal(self._frozen[0], tokens):
            R, C, L = tokens.shape
            rows = torch.cat([frozen_text_features(self, chunk) for chunk in tokens.reshape(R * C, L).split(1024)])
            hand = self.backbone.tokenizer([self.config.kl_template.format(n) for n in self.train_classnames])
            self._frozen = (tokens.clone(), rows.reshape(R, C, -1).transpose(0, 1),
                            frozen_text_features(self, hand.to(tokens.device)))
        return self._frozen[1], self._frozen[2]

    def _rows(self, tokens: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """[C', R, D] class rows: with the context's gradient in the text phase, else cached for the phase."""
        if self._phase == "text":
            return self.text_outputs(tokens[:, classes])[DESCRIPTION_FEATURES]
        if self._cached is None or self._cached[0].shape != tokens.shape or not torch.equal(self._cached[0], tokens):
            with torch.no_grad():
                self._cached = (tokens.clone(), self.text_outputs(tokens)[DESCRIPTION_FEATURES])
        return self._cached[1][classes]

    def compute_loss(
        self, inputs: torch.Tensor, labels: torch.Tensor, tokens: torch.Tensor, *, are_features: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if are_features:
            raise ValueError(f"{self.name} changes the image graph; it trains on images, not cached features")
        C = tokens.shape[1]
        if C != len(self.train_classnames):
            raise ValueError(f"{self.name} regularises against its {len(self.train_classnames)} training classes, "
                             f"got tokens for {C}")
        cfg, text_phase = self.config, self._phase == "text"
        classes, y = torch.arange(C, device=labels.device), labels
        if text_phase and C > cfg.max_text_classes:  # the batch's classes and random others
            classes, y = step_classes(labels, C, cfg.max_text_classes - int(labels.unique().numel()))
        with torch.set_grad_enabled(torch.is_grad_enabled() and not text_phase):
            g, e = self.image_features(inputs)
        g, e = F.normalize(g, dim=-1), F.normalize(e, dim=-1)
        with torch.no_grad():
            z = F.normalize(self.clip.visual(inputs).float(), dim=-1)
        frozen_rows, kl_text = self._frozen_targets(tokens)
        rows = self._rows(tokens, classes)
        heads = self.head_logits(g, e, rows)  # [A + 1, B, C']
        n_heads = heads.shape[0]
        loss = sum(F.cross_entropy(h, y) for h in heads) / n_heads
        s = self.logit_scale()
        target = F.log_softmax(s * z @ kl_text[classes].t(), dim=-1)
        kl = sum(F.kl_div(F.log_softmax(h, dim=-1), target, reduction="sum", log_target=True) / h.numel() for h in heads)
        loss = loss + cfg.u2 * kl / n_heads
        if text_phase:
            loss = loss + cfg.u3 * self._contrastive(rows, frozen_rows[classes], s)
        else:
            loss = loss + cfg.u1 * F.l1_loss(g, z)
        fused = self.fuse(heads.detach())
        if len(classes) < C:  # accuracy over every class: the ones not scored never win
            full = fused.new_full((fused.shape[0], C), torch.finfo(fused.dtype).min)
            fused = full.index_copy(1, classes, fused)
        return loss, fused

    def _contrastive(self, rows: torch.Tensor, frozen: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """One random real row per (class, head) block, learned vs frozen features, symmetric CE over them."""
        real = rows.detach().abs().sum(dim=-1) > 0  # [C, R]
        picks = []
        for block in self.blocks():
            r = real[:, block].float()
            picks.append(block.start + torch.multinomial(r, 1).squeeze(1))  # [C]: a real row of each class
        index = torch.stack(picks, dim=1)  # [C, H]
        gather = index.unsqueeze(-1).expand(-1, -1, rows.shape[-1])
        f = rows.gather(1, gather).reshape(-1, rows.shape[-1])
        t = frozen.gather(1, gather).reshape(-1, rows.shape[-1])
        logits = scale * F.normalize(f, dim=-1) @ F.normalize(t, dim=-1).t()
        target = torch.arange(len(f), device=f.device)
        return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))

    def on_epoch_end(self, epoch: int, epochs: int) -> None:
        """GPA: the finished epoch's tensors of its track join the track's Gaussian sum; at the track's
        last epoch the sum replaces them."""
        planned, index = track_epoch(stage_plan(epochs, self.stages()), epoch - 1)
        n = planned.track_epochs
        weight = gaussian_weights(n, self.config.gpa_mean, self.config.gpa_std)[index]
        avg = self.gpa[planned.track]
        avg.add(self.learned_state(), weight)
        if index == n - 1:
            avg.apply(self)
            self._cached = None

    def training_state(self) -> dict[str, torch.Tensor]:
        return {**self.gpa["vision"].state(), **self.gpa["text"].state()}

    def load_training_state(self, state: Mapping[str, torch.Tensor]) -> None:
        learned = self.learned_state()
        for avg in self.gpa.values():
            avg.load({k: v for k, v in state.items() if k.startswith(f"{avg.prefix}/")}, learned, self.name)
        unknown = sorted(k for k in state if not k.startswith(tuple(f"{a.prefix}/" for a in self.gpa.values())))
        if unknown:
            raise ValueError(f"{self.name} training state does not fit: got {unknown}")
