"""DeKg: the knowledge-guided term plus an HSIC independence term, as a plug-in on CoOp or TCP.

Follows "Divergence-enhanced Knowledge-guided Context Optimization for Visual-Language Prompt
Tuning" (Li et al., ICLR 2025) and its official code, cnunlp/DeKg at
b8f2f1c8247c427042a0ed1ecaf450925fe50ed0 (``trainers/DeKg.py``, ``trainers/DeKg_TCP.py``,
``HSICLoss`` in ``trainers/loss.py``, ``scripts/run.sh``, ``configs/trainers/DeKg*/``).

With ``t`` the host's class embeddings of the training classes (normalised, [C, D]) and ``a`` the
frozen CLIP's embeddings of a hand-written prompt (normalised):

    loss = CE(logits, y) + w1 * (1 - mean_c cos(t_c, a_c)) + w2 * HSIC(t, a),
    HSIC(X, Y) = trace(H K_X H K_Y),  K_X = X' X'^T,  X' = X / ||X||_F,  H = I - 11^T / C

(linear kernels of the Frobenius-normalised matrices, no 1 / (C - 1)^2 factor, as ``HSICLoss``).
Minimising HSIC pushes the learned embeddings' class-similarity structure away from the
hand-written prompt's while the first term keeps each class close to its anchor.

A plug-in (:class:`~training.prompts.host.HostedMethod`) that trains its host's own tensors:
``host="coop"`` is ``trainers/DeKg.py`` (CoOp's 4 context tokens from "a photo of a"),
``host="tcp"`` is ``trainers/DeKg_TCP.py`` (TCP's class-aware tokens; the loss above replaces
TCP's own, whose weight 8 becomes w1). At test time the method is its host: the exported graphs
are the host's under the trained tensors.

Defaults: w1 = 8, w2 = 6, the values ``scripts/run.sh`` gives all 11 datasets (the README's example
runs Stanford Cars with 6 and 2; the config defaults are 1 and 1). On CoOp: SGD lr 0.002, batch 128,
100 epochs (``vit_b16_ep100_ctxv1``); on TCP: Adam lr 0.002, batch 32, 100 epochs
(``DeKg_TCP/vit_b16_ep100_ctxv1``, random context), see :meth:`DeKg.train_defaults_for`. The
hand-written prompt is the reference's per-dataset ``CUSTOM_TEMPLATES`` on the 11 standard
datasets (``options_for_dataset``), "a photo of a {}." elsewhere; a TCP host takes the same
template for its class-aware tokens unless ``host_options`` sets its own.

Deliberate deviations:
- One anchor table for both hosts: ``DeKg_TCP.py`` anchors with TCP's table, which differs on
  FGVC-Aircraft ("a photo of an aircraft {}.") and Food-101 ("a photo of a {}, a type of food.");
  give those with ``handcrafted_template`` to reproduce it.
- ``DeKg_TCP.py`` computes HSIC on the *unnormalised* text features (``DeKg.py`` on the normalised
  ones). Since HSIC normalises the whole matrix, not each row, the two differ; the default here is
  the normalised form on every host, and ``hsic_features="raw"`` reproduces ``DeKg_TCP.py``.
- Precision: the reference trains in fp16 with anchors from a second fp16 CLIP; here fp32 (AMP
  autocast on CUDA), anchors computed once in fp32. Its "amp" branch drops both terms; here the loss
  is the same in every precision.
- The unused ``bias_vectors``, ``latent_norm``, ``meta_net`` and ``MIloss`` are not built; Dassl's
  coupled-L2 "adam" is the loop's AdamW (decay 5e-4, negligible at lr 0.002), as for TCP.
- Checkpoint: the last epoch, as the reference (``--load-epoch 100``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

from training.prompts.host import HostedMethod, check_host
from training.prompts.knowledge import HANDCRAFTED_TEMPLATE, check_template, handcrafted_train_features, knowledge_distance
from training.prompts.templates import COOP_TEMPLATES, coop_dataset
from training.protocol import Capabilities, MethodConfig, get_method, register_method

HOSTS = ("coop", "tcp")

#: ``CUSTOM_TEMPLATES`` of ``trainers/DeKg.py``: CoOp's table but for DTD
DEKG_TEMPLATES = {**COOP_TEMPLATES, "dtd": "a photo of a {}, a type of texture."}


def hsic(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """HSIC of [C, D] embeddings with linear kernels, as the reference's ``HSICLoss`` (see module doc)."""
    x, y = x.float(), y.float()
    x, y = x / x.norm(), y / y.norm()
    n = x.shape[0]
    h = torch.eye(n, device=x.device) - torch.full((n, n), 1.0 / n, device=x.device)
    return torch.trace(h @ (x @ x.t()) @ h @ (y @ y.t()))


@dataclass(frozen=True)
class DeKgConfig(MethodConfig):
    """Args:
    host: the method DeKg regularises (coop: ``DeKg.py``; tcp: ``DeKg_TCP.py``).
    host_options: the host's options as a JSON object.
    weight: w1, the knowledge-guided term's weight (``TRAINER.COOP.W``, 8 in ``run.sh``).
    hsic_weight: w2, the HSIC term's weight (``LOSS.WEIGHT``, 6 in ``run.sh``).
    handcrafted_template: the hand-written prompt whose frozen embeddings anchor both terms.
    hsic_features: "normalised" (``DeKg.py``) or "raw" (``DeKg_TCP.py``) text features in HSIC.
    """

    host: str = "coop"
    host_options: str = "{}"
    weight: float = 8.0
    hsic_weight: float = 6.0
    handcrafted_template: str = HANDCRAFTED_TEMPLATE
    hsic_features: Literal["normalised", "raw"] = "normalised"

    def __post_init__(self) -> None:
        check_host(self, HOSTS, "dekg")
        if self.weight < 0 or self.hsic_weight < 0:
            raise ValueError(f"weights must be >= 0, got weight={self.weight}, hsic_weight={self.hsic_weight}")
        check_template(self.handcrafted_template, "handcrafted_template")
        if self.hsic_features not in ("normalised", "raw"):
            raise ValueError(f"hsic_features must be normalised or raw, got {self.hsic_features!r}")


@register_method("dekg", "DeKg: knowledge-guided term + HSIC independence from the hand-written prompt, on CoOp or TCP (Li et al. 2025)")
class DeKg(HostedMethod):
    config_cls = DeKgConfig
    compatible_hosts = HOSTS
    train_defaults = {"epochs": 100, "batch_size": 128, "lr": 0.002}

    @classmethod
    def train_defaults_for(cls, config: DeKgConfig) -> dict[str, Any]:
        if config.host == "tcp":  # DeKg_TCP/vit_b16_ep100_ctxv1.yaml
            return {"epochs": 100, "batch_size": 32, "lr": 0.002, "optimizer": "adamw"}
        return dict(cls.train_defaults)

    @classmethod
    def options_for_dataset(cls, dataset: str) -> dict[str, Any]:
        name = coop_dataset(dataset)
        return {} if name is None else {"handcrafted_template": DEKG_TEMPLATES[name]}

    @classmethod
    def host_options_for(cls, config: DeKgConfig, options: dict[str, Any]) -> dict[str, Any]:
        """A host with a hand-written prompt of its own (TCP's class-aware tokens) takes DeKg's."""
        fields = get_method(config.host).config_cls.__dataclass_fields__
        if "handcrafted_template" in fields and "handcrafted_template" not in options:
            return {**options, "handcrafted_template": config.handcrafted_template}
        return options

    @classmethod
    def capabilities_for(cls, config: DeKgConfig) -> Capabilities:
        return cls.host_capabilities(config)

    def trained_host_tensors(self) -> tuple[str, ...]:
        return self.host_tensor_names()

    # -- at test time DeKg is its host
    def graph_signature(self):
        return self.host.graph_signature()

    def image_outputs(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.host.image_outputs(images)

    def text_outputs(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.host.text_outputs(tokens)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.host.encode_image(images)

    def class_embeddings(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.host.class_embeddings(tokens)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.host.encode_text(tokens)

    # -- training
    def compute_loss(
        self, inputs: torch.Tensor, labels: torch.Tensor, tokens: torch.Tensor, *, are_features: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        feats = inputs if are_features else self.encode_image(inputs)
        raw = self.host.class_features(tokens)  # [C, D], one text pass for all three terms
        text = F.normalize(raw, dim=-1)
        anchors = handcrafted_train_features(self, self.config.handcrafted_template, tokens[0])
        logits = self.logit_scale() * F.normalize(feats, dim=-1) @ text.t().to(feats.dtype)
        loss = F.cross_entropy(logits, labels) + self.config.weight * knowledge_distance(text, anchors, "cosine")
        if self.config.hsic_weight:
            loss = loss + self.config.hsic_weight * hsic(raw if self.config.hsic_features == "raw" else text, anchors)
        return loss, logits
