"""2SFS: tune CLIP's LayerNorms, then a linear head for the base classes; new names use the tuned text tower.

Follows "Rethinking Few-Shot Adaptation of Vision-Language Models in Two Stages" (Farina et al.,
CVPR 2025) and its official code, FarinaMatteo/rethinking_fewshot_vlms at
64ac143c7d22803bfeeaadfe42f570220ab29b06 (``fs/twostage.py``, the parameter selection in
``fs/utils/model_utils.py``, defaults in ``main.py``).

Learned: the affine parameters of CLIP's LayerNorms (stage 1) and a linear classifier ``head``
[n_base, D] (stage 2). Checkpoints and artifacts keep only these tensors; the artifact's graphs
carry them as new CLIP weights (the image graph is CLIP's with other LayerNorm parameters).

Training, two stages (:meth:`stages`), cross-entropy in both, CLIP's logit scale:
- ``ln`` (the first ``stage1_share`` = 60% of the run): ``logit_scale * cos(image, text)`` with the
  class prompts ``template`` through the LN-tuned text tower at every step;
- ``head``: the towers frozen (the image tower runs without gradients); ``head`` is initialised to
  the normalised class features of the base classes from the stage-1-tuned text tower, stored
  unnormalised and normalised in the forward: ``logit_scale * cos(image, head)``.

Selective inference, through the base/novel switch: a base class name is scored with its row of
``head``; any other name with the stage-1-tuned text tower. Declared as two heads on two text
outputs (``class_embeddings``: the tuned text tower; ``class_embeddings_head``: the head's row where
the name's prompt tokens are those of a base class, else the tuned text tower), so evaluation,
``predict`` and the service apply the same rule and ``mode`` can force either side.

Which LayerNorms train (``ln_set``): the reference lists every LayerNorm of both towers, but its
selection helper reaches ``ln_pre``, ``ln_post`` and ``ln_final`` a second time and switches them
off again, so only ``ln_1`` / ``ln_2`` of every residual block train (the other three stay in the
optimizer's list and never receive a gradient). ``ln_set="blocks"`` (the default) reproduces that;
``ln_set="all"`` tunes the three as well, as the paper's text says.

Defaults (``main.py``): AdamW lr 2e-4, weight decay 0.01, batch 32, no warm-up, RandomResizedCrop
scale (0.08, 1); one "a photo of a {}." for every dataset. The reference counts its budget in
iterations: ``iterations_per_shot * shots`` = 300 x 16 = 4,800 steps of 32 images;
:meth:`reference_epochs` turns that into epochs of the run's few-shot set (⌈9600 / n_base⌉ at 16
shots); ``--epochs`` overrides it.

Deliberate deviations:
- fp32 weights (the reference trains under fp16 autocast with a GradScaler, and its iteration
  counter does not advance on a skipped step).
- Both cosine schedules step once per epoch down to 0 (the reference steps per iteration down to
  1e-6); a stage's epochs are its share of the run's, rounded.
- Base names are recognised by their prompt tokens (the tokenizer lower-cases and collapses
  whitespace; the reference matches class indices of its own dataset).
- The reference's LoRA and BitFit alternatives to LayerNorm tuning are not offered.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

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
    Stage,
    register_method,
)
from training.prompts.deep import check_vision_tower
from training.prompts.knowledge import check_template
from training.prompts.text import encode_text_embeddings, eot_positions, trim_tokens

CLASS_HEAD = "class_embeddings_head"
LN_SETS = ("blocks", "all")


@dataclass(frozen=True)
class TwoSFSConfig(MethodConfig):
    """Args:
    stage1_share: the LayerNorm stage's share of the run (the reference's 0.6).
    ln_set: "blocks" = the residual blocks' ln_1/ln_2 only (what the reference's code trains);
        "all" = also ln_pre, ln_post and ln_final (what its parameter list names).
    template: the class prompt (the reference uses "a photo of a {}." for every dataset).
    iterations_per_shot: M, the reference's budget is M * shots steps (300).
    """

    stage1_share: float = 0.6
    ln_set: Literal["blocks", "all"] = "blocks"
    template: str = "a photo of a {}."
    iterations_per_shot: int = 300

    def __post_init__(self) -> None:
        if not 0.0 < self.stage1_share < 1.0:
            raise ValueError(f"stage1_share must be in (0, 1), got {self.stage1_share}")
        if self.ln_set not in LN_SETS:
            raise ValueError(f"ln_set must be one of {LN_SETS}, got {self.ln_set!r}")
        if self.iterations_per_shot < 1:
            raise ValueError(f"iterations_per_shot must be >= 1, got {self.iterations_per_shot}")
        check_template(self.template, "template")


def tuned_layer_norms(clip: nn.Module, ln_set: str) -> list[tuple[str, nn.LayerNorm]]:
    """``(name, module)`` of the LayerNorms 2SFS tunes: every residual block's of both towers, plus
    ln_pre / ln_post / ln_final with ``ln_set="all"``."""
    out = []
    for name, module in clip.named_modules():
        if not isinstance(module, nn.LayerNorm):
            continue
        in_block = ".resblocks." in f".{name}"
        if in_block or ln_set == "all":
            out.append((name, module))
    return out


@register_method("twosfs", "2SFS: LayerNorm tuning, then a base-class linear head; new names by the tuned text tower (Farina et al. 2025)")
class TwoSFS(PromptMethod):
    config_cls = TwoSFSConfig
    train_defaults = {"epochs": 20, "batch_size": 32, "lr": 2e-4, "optimizer": "adamw", "weight_decay": 0.01,
                      "warmup_epochs": 0}
    published_b2n = (85.55, 75.48, 80.20)
    published_source = ("the 11-dataset ViT-B/16 average as later papers report it (the repository's README "
                        "links its results, not a table)")

    def __init__(self, backbone: Backbone, config: TwoSFSConfig, train_classnames: Sequence[str]):
        super().__init__(backbone, config, train_classnames)
        check_vision_tower(self.clip.visual)
        self.layer_norms = [m for _, m in tuned_layer_norms(self.clip, config.ln_set)]
        if not self.layer_norms:
            raise ValueError(f"{self.name}: the backbone has no LayerNorm to tune")
        base = self.backbone.tokenizer([config.template.format(c) for c in self.train_classnames]) \
            if self.train_classnames else torch.zeros(0, self.clip.context_length, dtype=torch.long)
        self.register_buffer("base_tokens", base, persistent=False)  # [n_base, context length]
        with torch.no_grad():  # zero-shot rows until stage 2 starts from the tuned text tower
            init = F.normalize(self.encode_text(trim_tokens(base, backbone.eot_token_id)), dim=-1) if len(base) \
                else torch.zeros(0, backbone.embed_dim)
        self.head = nn.Parameter(init.clone())  # [n_base, D], stored unnormalised
        for m in self.layer_norms:
            m.requires_grad_(True)
        self.declare_learned()
        self._stage = "ln"
        self.register_buffer("head_started", torch.zeros((), dtype=torch.bool), persistent=False)

    @classmethod
    def capabilities_for(cls, config: TwoSFSConfig) -> Capabilities:
        return Capabilities(changes_image_graph=True, base_novel_switch=True)

    @classmethod
    def reference_epochs(cls, config: TwoSFSConfig, n_images: int, shots: int, batch_size: int) -> int:
        """The reference's ``iterations_per_shot * shots`` steps as epochs over ``n_images``."""
        return max(2, math.ceil(config.iterations_per_shot * shots * batch_size / max(n_images, 1)))

    def graph_signature(self) -> GraphSignature:
        return GraphSignature(
            text_outputs=(CLASS_EMBEDDINGS, CLASS_HEAD),
            heads=(Head(IMAGE_EMBEDDINGS, CLASS_EMBEDDINGS, base_weight=0.0, novel_weight=1.0),
                   Head(IMAGE_EMBEDDINGS, CLASS_HEAD, base_weight=1.0, novel_weight=0.0)),
        )

    def prompt_templates(self) -> list[str]:
        return [self.config.template]

    # -- the two stages
    def stages(self) -> tuple[Stage, ...]:
        s = self.config.stage1_share
        return (Stage("ln", share=s, warmup=False), Stage("head", share=1.0 - s, warmup=False))

    def begin_stage(self, stage: Stage) -> None:
        self._stage = stage.name
        for m in self.layer_norms:
            m.requires_grad_(stage.name == "ln")
        self.head.requires_grad_(stage.name == "head")

    def training_state(self) -> dict[str, torch.Tensor]:
        return {"head_started": self.head_started.clone()}

    def load_training_state(self, state) -> None:
        unknown = set(state) - {"head_started"}
        if unknown:
            raise ValueError(f"{self.name}: unknown training state {sorted(unknown)}")
        if "head_started" in state:
            self.head_started.copy_(state["head_started"])

    # -- towers
    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        eot = eot_positions(tokens, self.backbone.eot_token_id)
        return encode_text_embeddings(self.clip, self.clip.token_embedding(tokens), eot)

    def base_match(self, tokens: torch.Tensor) -> torch.Tensor:
        """[C, L] prompt tokens -> [C, n_base] float, 1 where a prompt is a base class's (same tokens
        up to and including its end-of-text; trimmed tokens compare on their length)."""
        base = self.base_tokens[:, : tokens.shape[1]]
        diff = (tokens[:, None, :] != base[None, :, :]).to(torch.float32).sum(dim=-1)
        return (diff == 0).to(torch.float32)

    def text_outputs(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        text = self.class_embeddings(tokens)  # [C, D], the tuned text tower
        match = self.base_match(tokens[0])
        rows = match @ F.normalize(self.head, dim=-1)
        known = match.sum(dim=-1, keepdim=True).clamp(max=1.0)
        return {CLASS_EMBEDDINGS: text, CLASS_HEAD: F.normalize(rows + (1.0 - known) * text, dim=-1)}

    # -- training
    def compute_loss(
        self, inputs: torch.Tensor, labels: torch.Tensor, tokens: torch.Tensor, *, are_features: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if are_features:
            raise ValueError(f"{self.name} tunes the image encoder; it trains on images, not cached features")
        if self._stage == "ln":
            return super().compute_loss(inputs, labels, tokens)
        if not bool(self.head_started):  # stage 2 begins: the head from the tuned text tower (once per run)
            with torch.no_grad():
                self.head.copy_(F.normalize(self.encode_text(tokens[0]), dim=-1))
                self.head_started.fill_(True)
        with torch.no_grad():
            feats = F.normalize(self.encode_image(inputs), dim=-1)
        logits = self.logit_scale() * feats @ F.normalize(self.head, dim=-1).t().to(feats.dtype)
        return F.cross_entropy(logits, labels), logits
