"""PromptSRC: IVLP prompts regulated by the frozen CLIP, and Gaussian prompt aggregation.

"Self-regulating Prompts: Foundational Model Adaptation without Forgetting" (Khattak et al.,
ICCV 2023) and its official code, muzairkhattak/PromptSRC at
bb95c77b634d63488f2cad81ff4a72d53bdd06d5 (``trainers/promptsrc.py``,
``configs/trainers/PromptSRC/vit_b16_c2_ep20_batch4_4+4ctx.yaml``). The prompts are IVLP's (deep,
independent text and vision prompts; see :mod:`training.methods.ivlp`). Training adds three
self-regulating terms to the cross-entropy, exactly as the reference's ``forward_backward``:

- ``L_SCL_text = text_loss_weight * L1(t, t_zs)``: ``t`` the L2-normalised prompted class
  embeddings, ``t_zs`` the frozen CLIP's class embeddings averaged (unnormalised) over a template
  ensemble and then normalised, the "textual diversity" of the paper;
- ``L_SCL_image = image_loss_weight * L1(f, f_zs)``: prompted vs frozen normalised image features;
- ``L_SCL_logits = KL(p_zs || p) `` summed and divided by ``B * C`` (``F.kl_div(log p, log p_zs,
  reduction="sum", log_target=True) / logits.numel()``), with the zero-shot logits
  ``scale * f_zs @ t_zs.T``.

After every epoch e (1-based) of N, the learned tensors are added to a running sum with weight
``g(e) / sum_k g(k)``, ``g`` the N(gpa_mean, gpa_std) density (Gaussian prompt aggregation); the
finished run keeps that aggregate. The running sum is part of the checkpoint
(``training_state``), so a resumed run reaches the same aggregate as an uninterrupted one.

Defaults are the reference base-to-novel config: 4+4 tokens, depth 9 in both towers, ctx init
"a photo of a", loss weights 25 (text) and 10 (image), GPA mean 15 and std 1; 16 shots, SGD lr
0.0025, batch 4, 20 epochs, constant warm-up 1 epoch at 1e-5, cosine (``train_defaults``).

Deliberate deviations:
- Templates: the reference encodes the 60 templates of its ``IMAGENET_TEMPLATES`` (CLIP's ImageNet
  prompt-engineering list) for every dataset; they are the default of ``teacher_templates`` here,
  a config field, so a dataset's own templates can be passed instead.
- The frozen branch is the backbone's own unprompted forward (``clip.visual``/``clip.encode_text``,
  never exported); the reference holds a second fp16 copy of CLIP's image encoder for it. The
  teacher text features are computed on first use (training only), for the training class names.
- GPA aggregates the learned tensors only; the reference weights and sums the whole state dict,
  which adds fp16 rounding to the frozen weights of its fp16 model. As the reference, the
  aggregate is also loaded into the method when the run finishes (``final_learned_state``).
- Precision: the reference trains with PREC fp16 (fp16 CLIP, prompts cast ``.half()``); its "amp"
  path does not compute the regularisers. We keep fp32 prompts, the loop's AMP on CUDA, and
  compute the loss terms in fp32.
- Prompt options (ctx_init length, depth clamping): as :mod:`training.methods.ivlp`.
- Checkpoint: the aggregate, as the reference's last-epoch checkpoint holds the GPA model.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F

from training.backbones import Backbone
from training.protocol import Capabilities, MethodConfig, register_method
from training.prompts.aggregate import SnapshotAverage
from training.prompts.deep import DeepPromptMethod, validate_prompt_options
from training.prompts.knowledge import template_ensemble_features
from training.prompts.templates import IMAGENET_TEMPLATES

logger = logging.getLogger(__name__)

# the reference's teacher ensemble for every dataset: CLIP's 60 ImageNet templates
TEACHER_TEMPLATES = IMAGENET_TEMPLATES


@dataclass(frozen=True)
class PromptSRCConfig(MethodConfig):
    """Args:
    n_ctx_text, n_ctx_vision, ctx_init, prompt_depth_text, prompt_depth_vision, init_std: the IVLP
        prompts (see :class:`training.methods.ivlp.IVLPConfig`).
    text_loss_weight: weight of the L1 between prompted and frozen class embeddings.
    image_loss_weight: weight of the L1 between prompted and frozen image features.
    gpa_mean, gpa_std: the Gaussian over epochs (1-based) weighting the prompt aggregate.
    teacher_templates: templates (one ``{}`` each) of the frozen text ensemble.
    """

    n_ctx_text: int = 4
    n_ctx_vision: int = 4
    ctx_init: str = "a photo of a"
    prompt_depth_text: int = 9
    prompt_depth_vision: int = 9
    init_std: float = 0.02
    text_loss_weight: float = 25.0
    image_loss_weight: float = 10.0
    gpa_mean: float = 15.0
    gpa_std: float = 1.0
    teacher_templates: tuple[str, ...] = TEACHER_TEMPLATES

    def __post_init__(self) -> None:
        validate_prompt_options(self, n_ctx=("n_ctx_text", "n_ctx_vision"), depth=("prompt_depth_text",), min_depth=1)
        validate_prompt_options(self, n_ctx=(), depth=("prompt_depth_vision",), min_depth=0)
        if self.text_loss_weight < 0 or self.image_loss_weight < 0:
            raise ValueError("loss weights must be >= 0")
        if self.gpa_std <= 0:
            raise ValueError("gpa_std must be > 0")
        if not self.teacher_templates:
            raise ValueError("teacher_templates must not be empty")
        for t in self.teacher_templates:
            if t.count("{}") != 1:
                raise ValueError(f"template {t!r} must contain exactly one '{{}}'")


def gpa_weights(epochs: int, mean: float, std: float) -> list[float]:
    """Normalised Gaussian weights of epochs 1..epochs (the reference's ``get_gauss``)."""
    dens = [math.exp(-0.5 * ((e - mean) / std) ** 2) / (std * math.sqrt(2 * math.pi)) for e in range(1, epochs + 1)]
    total = sum(dens)
    if not total > 0:
        raise ValueError(f"the Gaussian N({mean}, {std}) gives no weight to epochs 1..{epochs}")
    return [d / total for d in dens]


@register_method("promptsrc", "PromptSRC: self-regulated IVLP prompts, Gaussian aggregation (Khattak et al. 2023)")
class PromptSRC(DeepPromptMethod):
    config_cls = PromptSRCConfig
    train_defaults = {"epochs": 20, "batch_size": 4, "lr": 0.0025}
    published_b2n = (84.26, 76.10, 79.97)
    published_source = "its paper (Khattak et al., ICCV 2023)"

    @classmethod
    def options_for_epochs(cls, config: PromptSRCConfig, epochs: int) -> dict[str, Any]:
        """Keep the Gaussian where it sits in the reference schedule (epoch 15 of 20 -> 75%), its width
        scaled alike but at least half an epoch, so a shortened run still aggregates trained epochs
        rather than the warm-up's."""
        ref = cls.train_defaults["epochs"]
        if epochs == ref:
            return {}
        f = epochs / ref
        return {"gpa_mean": config.gpa_mean * f, "gpa_std": max(0.5, config.gpa_std * f)}

    def __init__(self, backbone: Backbone, config: PromptSRCConfig, train_classnames: Sequence[str]):
        super().__init__(backbone, config, train_classnames)
        self._init_text_prompts(config.n_ctx_text, config.ctx_init, config.prompt_depth_text, config.init_std)
        self._init_vision_prompts(config.n_ctx_vision, config.prompt_depth_vision, config.init_std)
        self._teacher: torch.Tensor | None = None  # [C, D] frozen ensemble class embeddings
        self._gpa = SnapshotAverage("gpa")  # running Gaussian-weighted sum of the learned tensors

    @classmethod
    def capabilities_for(cls, config: PromptSRCConfig) -> Capabilities:
        return Capabilities(changes_image_graph=config.prompt_depth_vision > 0)

    # -- frozen branch (training only) ---------------------------------------------------------------
    def teacher_text_features(self, device: torch.device) -> torch.Tensor:
        """[C, D]: frozen CLIP's training-class embeddings, averaged over the templates, normalised."""
        if self._teacher is None:
            self._teacher = template_ensemble_features(self, self.config.teacher_templates, self.train_classnames, device)
        if self._teacher.device != device:
            self._teacher = self._teacher.to(device)
        return self._teacher

    def loss_terms(
        self, inputs: torch.Tensor, labels: torch.Tensor, tokens: torch.Tensor, *, are_features: bool = False
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The reference's four loss terms (already weighted) and the prompted logits [B, C]."""
        if tokens.shape[1] != len(self.train_classnames):
            raise ValueError(
                f"PromptSRC regularises against its {len(self.train_classnames)} training classes, "
                f"got tokens for {tokens.shape[1]}"
            )
        feats = inputs if are_features else self.encode_image(inputs)
        image = F.normalize(feats.float(), dim=-1)  # [B, D]
        text = self.class_embeddings(tokens).float()  # [C, D], normalised
        scale = self.logit_scale().float()
        logits = scale * image @ text.t()
        with torch.no_grad():
            # with cached features the image graph is the frozen one (no visual prompts)
            zs_feats = inputs if are_features else self.clip.visual(inputs)
            zs_image = F.normalize(zs_feats.float(), dim=-1)
            teacher = self.teacher_text_features(inputs.device)
            zs_logits = scale * zs_image @ teacher.t()
        cfg = self.config
        terms = {
            "ce": F.cross_entropy(logits, labels),
            "scl_text": F.l1_loss(text, teacher, reduction="mean") * cfg.text_loss_weight,
            "scl_image": F.l1_loss(image, zs_image, reduction="mean") * cfg.image_loss_weight,
            # KL(zero-shot || prompted), summed and divided by B * C as the reference
            "scl_logits": F.kl_div(
                F.log_softmax(logits, dim=1), F.log_softmax(zs_logits, dim=1), reduction="sum", log_target=True
            ) / logits.numel(),
        }
        return terms, logits

    def compute_loss(
        self, inputs: torch.Tensor, labels: torch.Tensor, tokens: torch.Tensor, *, are_features: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        terms, logits = self.loss_terms(inputs, labels, tokens, are_features=are_features)
        return sum(terms.values()), logits

    # -- Gaussian prompt aggregation -------------------------------------------------------------------
    def on_epoch_end(self, epoch: int, epochs: int) -> None:
        weights = gpa_weights(epochs, self.config.gpa_mean, self.config.gpa_std)
        if epoch == 1 and not 1 <= self.config.gpa_mean <= epochs:
            logger.warning("gpa_mean %s lies outside epochs 1..%d: the aggregate is mostly one epoch",
                           self.config.gpa_mean, epochs)
        self._gpa.add(self.learned_state(), weights[epoch - 1])

    def training_state(self) -> dict[str, torch.Tensor]:
        return self._gpa.state()

    def load_training_state(self, state: Mapping[str, torch.Tensor]) -> None:
        self._gpa.load(state, self.learned_state(), "PromptSRC")

    def final_learned_state(self) -> dict[str, torch.Tensor]:
        """The Gaussian-weighted aggregate (loaded into the method too, as the reference does)."""
        return self._gpa.apply(self)
