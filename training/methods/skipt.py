"""SkipT: fine-tune the upper half of both CLIP towers, skipping the lower layers and most classes.

Follows "Skip Tuning: Pre-trained Vision-Language Models are Effective and Efficient Adapters
Themselves" (Wu et al., CVPR 2025) and its official code, Koorye/SkipTuning at
8c4636edc39cffacccbdb8db4c360088d39ee8a1 (``trainers/skip_tuning.py`` on ``trainers/baselines/ft_clip.py``,
``trainers/feature_loader.py``, defaults in ``train.py::extend_cfg``, ``configs/trainers/SkipTuning/vit_b16_bs4.yaml``).

Learned: CLIP's own weights from block ``start`` up in both towers, plus ln_final and the text
projection, ln_post and the visual projection (the reference's learnable set; embeddings, conv1,
ln_pre, the lower blocks and the logit scale stay frozen). No new tensors: checkpoints and
artifacts hold the tuned backbone tensors; at test time it is plain CLIP with these weights and the
hand-written ``template``.

Training (per step, on a batch of ``batch_size`` images of one class when shots >= 4, as the
reference's ``batch_random`` loader):
- *layer-wise skipping*: the lower blocks run without gradients, and the text tower's lower states
  of every class prompt are computed once (the lower blocks and the prompts are frozen);
- *class-wise skipping*: the batch's image features are compared with class prototypes (the
  normalised text features of the initial model, frozen), the true labels forced to the top; per
  class the best score over the batch ranks the classes; the top ``min(ceil(top_ratio * C),
  max_top)`` ranks are always kept, the other ranks by a mask drawn once for the whole run with
  keep probabilities from a min-max normalised exponential pdf (scale ``lam``) over linspace(0, 5);
- the upper text blocks run for the kept classes only; the loss is the cross-entropy of
  ``logit_scale * cos`` over them.
Optimizer: SGD, lr 2e-5 for the text side and 5e-6 for the image encoder (``STAGED_LR`` with
``NEW_LR``; ``image_lr_ratio`` 0.25), one constant warm-up epoch at 1e-6, cosine, 20 epochs
(``train_defaults``; the reference divides the epochs by 4 on ImageNet, SUN397 and Food101).

Depth: ``start`` is block 6 of 12 in the reference; for a tower of L blocks it is ``L // 2``
(the upper half; for odd L the larger half is tuned), per tower unless ``start_layer`` is given.

Deliberate deviations:
- fp32 weights and updates (the reference keeps CLIP in fp16 and applies SGD in fp16, where a
  2e-5 step drops many updates; its amp path raises NotImplemented).
- The reference caches the lower blocks' image outputs once per epoch (a pass over the training
  set at batch 128 with that epoch's augmentation); here each batch runs the lower blocks under
  ``no_grad`` when it is drawn: every image still passes them once per epoch, with the same
  values and no stored activations, and the loop's seeded augmentation keeps runs resumable.
- The CSkip mask and the prototypes are training state (saved in checkpoints), so a resumed run
  keeps the reference's once-per-run mask.
- The per-dataset template table of the reference is the option ``template``.
- The batch's own classes are always among the kept ones (with class-homogeneous batches they
  are anyway; with random batches the reference can rank a label past the kept set and then
  silently trains it as class 0).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F

from training.backbones import Backbone
from training.protocol import Capabilities, MethodConfig, PromptMethod, register_method
from training.prompts.deep import check_vision_tower, tower_block, vision_input_tokens
from training.prompts.knowledge import check_template
from training.prompts.text import encode_text_embeddings, eot_positions, pool_text_features, text_position_inputs


@dataclass(frozen=True)
class SkipTConfig(MethodConfig):
    """Args:
    start_layer: first tuned block of both towers; None = ``layers // 2`` per tower (6 of 12).
    top_ratio: share of the classes always kept per step (0.5); 1.0 keeps every class.
    max_top: cap on the always-kept classes (50).
    lam: scale of the exponential keep probabilities of the other ranks (0.3).
    image_lr_ratio: the image encoder's lr relative to the text side's (5e-6 / 2e-5).
    template: the hand-written class prompt.
    class_batches: class-homogeneous batches (the reference's choice for shots >= 4).
    """

    start_layer: int | None = None
    top_ratio: float = 0.5
    max_top: int = 50
    lam: float = 0.3
    image_lr_ratio: float = 0.25
    template: str = "a photo of a {}."
    class_batches: bool = True

    def __post_init__(self) -> None:
        if self.start_layer is not None and self.start_layer < 0:
            raise ValueError(f"start_layer must be >= 0, got {self.start_layer}")
        if not 0.0 < self.top_ratio <= 1.0:
            raise ValueError(f"top_ratio must be in (0, 1], got {self.top_ratio}")
        if self.max_top < 1 or self.lam <= 0 or self.image_lr_ratio <= 0:
            raise ValueError("max_top must be >= 1, lam and image_lr_ratio > 0")
        check_template(self.template, "template")


def keep_probabilities(n_classes: int, n_top: int, lam: float) -> torch.Tensor:
    """[C] keep probability per rank: 1 for the top ``n_top``, then the min-max normalised
    exponential pdf (scale ``lam``) over linspace(0, 5) (the reference's ``reserve_ratios``)."""
    rest = n_classes - n_top
    x = torch.linspace(0.0, 5.0, rest, dtype=torch.float64)
    pdf = torch.exp(-x / lam) / lam
    span = pdf.max() - pdf.min() if rest > 1 else torch.tensor(1.0, dtype=torch.float64)
    pdf = (pdf - pdf.min()) / span if rest > 1 else torch.ones(rest, dtype=torch.float64)
    return torch.cat([torch.ones(n_top, dtype=torch.float64), pdf]).float()


@register_method("skipt", "SkipT: fine-tunes the upper half of both towers with layer- and class-wise skipping (Wu et al. 2025)")
class SkipT(PromptMethod):
    config_cls = SkipTConfig
    train_defaults = {"epochs": 20, "batch_size": 4, "lr": 2e-5, "warmup_lr": 1e-6}
    published_b2n = (85.04, 77.53, 81.11)
    published_source = "its README (Koorye/SkipTuning @ 8c4636e, image of the table)"

    def __init__(self, backbone: Backbone, config: SkipTConfig, train_classnames: Sequence[str]):
        super().__init__(backbone, config, train_classnames)
        visual = check_vision_tower(self.clip.visual)
        self.text_start, self.vision_start = (
            tower_block("start_layer", config.start_layer, len(blocks) // 2, len(blocks), tower)
            for tower, blocks in (("text", self.clip.transformer.resblocks), ("image", visual.transformer.resblocks)))
        for m in [*self.clip.transformer.resblocks[self.text_start:], self.clip.ln_final,
                  *visual.transformer.resblocks[self.vision_start:], visual.ln_post]:
            m.requires_grad_(True)
        for p in (self.clip.text_projection, visual.proj):  # a Parameter or a Linear, either way tuned
            p.requires_grad_(True)
        n = len(self.train_classnames)
        n_top = min(math.ceil(config.top_ratio * n), config.max_top)
        self.n_top = n_top
        self._prototypes: torch.Tensor | None = None  # [C, D] initial text features, frozen
        self._keep: torch.Tensor | None = None  # [C] bool, per rank, drawn once per run
        self._text_lower: tuple[torch.Tensor, torch.Tensor] | None = None  # (prompt tokens, their lower states)

    @classmethod
    def capabilities_for(cls, config: SkipTConfig) -> Capabilities:
        return Capabilities(changes_image_graph=True)

    def prompt_templates(self) -> list[str]:
        return [self.config.template]

    def param_groups(self) -> list[dict[str, Any]]:
        image = [p for p in self.clip.visual.parameters() if p.requires_grad]
        ids = {id(p) for p in image}
        text = [p for p in self.parameters() if p.requires_grad and id(p) not in ids]
        return [{"params": text, "lr_scale": 1.0}, {"params": image, "lr_scale": self.config.image_lr_ratio}]

    # -- the towers, split at the first tuned block
    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        eot = eot_positions(tokens, self.backbone.eot_token_id)
        return encode_text_embeddings(self.clip, self.clip.token_embedding(tokens), eot,
                                      share_prefix=True)  # lookups of one embedding table

    def _text_lower_states(self, tokens: torch.Tensor) -> torch.Tensor:
        """[C, L, W] text hidden states after the frozen blocks (no grad)."""
        clip = self.clip
        with torch.no_grad():
            x = clip.token_embedding(tokens)
            pos, mask = text_position_inputs(clip, x.shape[1], x.dtype)
            x = x + pos
            for block in clip.transformer.resblocks[: self.text_start]:
                x = block(x, attn_mask=mask)
        return x

    def _text_upper(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        clip = self.clip
        _, mask = text_position_inputs(clip, x.shape[1], x.dtype)
        for block in clip.transformer.resblocks[self.text_start:]:
            x = block(x, attn_mask=mask)
        return pool_text_features(clip, x, eot_positions(tokens, self.backbone.eot_token_id))

    def _image_skipping_lower(self, images: torch.Tensor) -> torch.Tensor:
        visual = self.clip.visual
        with torch.no_grad():
            x = visual.ln_pre(vision_input_tokens(visual, images))
            for block in visual.transformer.resblocks[: self.vision_start]:
                x = block(x)
        for block in visual.transformer.resblocks[self.vision_start:]:
            x = block(x)
        pooled = visual.ln_post(x[:, 0])
        return pooled @ visual.proj if visual.proj is not None else pooled

    # -- training
    def on_train_start(self, train_set: Any) -> None:
        self._text_lower = None  # recomputed on the training device at the first step

    def train_batches(self, train_set: Any, batch_size: int, generator: torch.Generator) -> list[list[int]] | None:
        """Class-homogeneous batches (the reference's ``batch_random``): a random class, ``batch_size``
        of its unused samples, until every class has fewer than ``batch_size`` left."""
        if not self.config.class_batches:
            return None
        by_class: dict[int, list[int]] = {}
        for i, s in enumerate(train_set.samples):
            by_class.setdefault(int(s.label), []).append(i)
        if min(len(v) for v in by_class.values()) < batch_size:
            return None  # fewer shots than a batch (the reference's "random" mode below 4 shots)
        batches = []
        pools = {c: [v[j] for j in torch.randperm(len(v), generator=generator).tolist()] for c, v in by_class.items()}
        while pools:
            classes = sorted(pools)
            c = classes[int(torch.randint(len(classes), (), generator=generator))]
            batches.append(pools[c][:batch_size])
            pools[c] = pools[c][batch_size:]
            if len(pools[c]) < batch_size:
                del pools[c]
        return batches

    def training_state(self) -> dict[str, torch.Tensor]:
        state = {}
        if self._prototypes is not None:
            state["prototypes"] = self._prototypes
        if self._keep is not None:
            state["keep"] = self._keep
        return state

    def load_training_state(self, state: Mapping[str, torch.Tensor]) -> None:
        unknown = set(state) - {"prototypes", "keep"}
        if unknown:
            raise ValueError(f"{self.name}: unknown training state {sorted(unknown)}")
        self._prototypes, self._keep = state.get("prototypes"), state.get("keep")

    def kept_classes(self, image_features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Sorted indices of the classes this step trains on (class-wise skipping)."""
        n = self._prototypes.shape[0]
        if self.n_top >= n:
            return torch.arange(n, device=labels.device)
        with torch.no_grad():
            sim = F.normalize(image_features.float(), dim=-1) @ self._prototypes.t()  # [B, C]
            sim[torch.arange(len(labels)), labels] = 1e4
            order = sim.max(dim=0).values.sort(descending=True).indices  # classes by rank
            if self._keep is None:  # drawn once for the whole run, on rank positions
                self._keep = torch.rand(n) < keep_probabilities(n, self.n_top, self.config.lam)
            kept = order[self._keep.to(order.device)]
            # the batch's own classes always (the reference would mislabel one ranked past the kept set)
            return torch.unique(torch.cat([kept, labels]))

    def compute_loss(
        self, inputs: torch.Tensor, labels: torch.Tensor, tokens: torch.Tensor, *, are_features: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if are_features:
            raise ValueError(f"{self.name} tunes the image encoder; it trains on images, not cached features")
        prompt_tokens = tokens[0]
        if self._text_lower is None or self._text_lower[0].shape != prompt_tokens.shape \
                or not torch.equal(self._text_lower[0], prompt_tokens):
            self._text_lower = (prompt_tokens.clone(), self._text_lower_states(prompt_tokens))
        if self._prototypes is None:  # the initial model's text features, frozen for the run
            with torch.no_grad():
                self._prototypes = F.normalize(self._text_upper(self._text_lower[1], prompt_tokens).float(), dim=-1)
        feats = self._image_skipping_lower(inputs)
        kept = self.kept_classes(feats.detach(), labels)
        text = F.normalize(self._text_upper(self._text_lower[1][kept], prompt_tokens[kept]), dim=-1)
        logits = self.logit_scale() * F.normalize(feats, dim=-1) @ text.t().to(feats.dtype)
        remap = torch.full((self._prototypes.shape[0],), -1, dtype=torch.long, device=labels.device)
        remap[kept] = torch.arange(len(kept), device=labels.device)
        loss = F.cross_entropy(logits, remap[labels])
        # accuracy over every class is what the loop logs: scatter the kept logits back
        full = torch.full((len(labels), self._prototypes.shape[0]), float("-inf"), device=logits.device, dtype=logits.dtype)
        full[:, kept] = logits.detach()
        return loss, full
