"""DPC: a parallel prompt tuned from a finished host run, for base classes; the host's prompt kept for new ones.

Follows "DPC: Dual-Prompt Collaboration for Tuning Vision-Language Models" (Li et al., CVPR 2025)
and its official code, JREion/DPC at 01e6b599d6515c38f4d723a8ea844ac4d1abfadd
(``trainers/sple_coop.py`` ``StackSPLE_CoOp``, the miner ``trainers/coop_stats.py``, defaults in
``train.py``'s ``cfg.SPLE`` block, ``configs/trainers/SPLE/CoOp/vit_b16_ep20.yaml``).

A plug-in (:class:`training.prompts.host.HostedMethod`): ``host`` is CoOp (the reference), MaPLe or
PromptSRC, and training starts from a finished run of that host (``--init-run``): its learned
tensors are the stage-1 prompt P (kept as learned buffers, never trained). Every learned tensor of
the host gets a parallel copy; the learned tensor is the *mixed* prompt ``M = w P' + (1 - w) P``
(w = ``weight``), initialised to P (``SPLE_INIT``), so the tuned prompt ``P' = (M - (1 - w) P) / w``
starts as a clone of P. As in the reference the gradient reaching M is the gradient on P' over w
(SGD's effective step on P' is lr / w^2; weight decay acts on M).

Training (the reference's "converse" mode): each batch is enlarged by the dynamic hard-negative
optimizer. The stage-1 host (P) scores every batch image against all base classes
(softmax of 100 cos); the top-``top_k`` classes other than the image's own, minus every class
already in the batch (``non_repeat``), are its hard negatives; with fewer than 2 left, random
classes not yet in the batch fill up to 2. Each hard-negative class brings one random training
image of that class, augmented like the others. The loss is CLIP's symmetric contrastive loss
over the enlarged batch with P' as the prompt: text features of the batch's labels only,
``(CE(logits, arange N) + CE(logits^T, arange N)) / 2`` at CLIP's logit scale. No accuracy is
reported (the reference logs none).

Serving, as the reference's code behaves (its forward un-mixes unconditionally, whatever a comment
says): base classes use P' alone (``base_prompt="tuned"``); new classes use
``w_new P' + (1 - w_new) P`` (``weight_new``, 0.0 in every released config: exactly the stage-1
prompt; ``train.py``'s default is 0.2). ``base_prompt="mixed"`` serves base classes with M instead
(what the code comment claims). Declared as two heads through the base/novel switch; with a host
that changes the image graph (MaPLe, PromptSRC) the image side has a base and a new output too.

Defaults: ``vit_b16_ep20``: w 0.5, top-k 8, non-repeat, SGD lr 0.002, batch 4, 20 epochs
(``train_defaults``); the reference does not say which of its five configs gave the published
numbers.

Deliberate deviations:
- Hard-negative images come from the same few-shot base pool the run trains on (the reference
  reads an external JSON image list, ``SPLE_<Dataset>.json``, not in the repository, whose extent is
  unknown): the protocol stays 16-shot.
- The random fill draws from all classes; the reference's ``random.randint(1, n_cls - 2)`` never
  draws the first or the last class (``reference_fill_range=True`` reproduces it).
- The miner is the stage-1 host evaluated in-process (the reference builds a second trainer);
  same tensors, same frozen CLIP.
- Stage 2 trains only with the DPC loss whatever the host (the reference's CoOp trainer does the
  same; its MaPLe/PromptSRC trainers are not in the repository at this commit).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Sequence

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
from training.prompts.host import HostedMethod, check_host

HOSTS = ("coop", "maple", "promptsrc")
IMAGE_BASE, CLASS_BASE = "image_embeddings_base", "class_embeddings_base"


@dataclass(frozen=True)
class DPCConfig(MethodConfig):
    """Args:
    host: the method whose finished run DPC starts from (coop, maple, promptsrc).
    host_options: the host's options as a JSON object (filled in from ``--init-run``).
    weight: w, the tuned prompt's share of the learned mixed prompt (``SPLE.STACK.WEIGHT``).
    weight_new: w_new, the tuned prompt's share for new classes (``WEIGHT_FOR_NEW``).
    base_prompt: "tuned" (P', the reference's behaviour) or "mixed" (M) for base classes.
    top_k: classes the stage-1 model ranks per image (``INFER_TOPK``).
    non_repeat: hard negatives never repeat a class already in the batch (``INFER_NONREPEAT``).
    reference_fill_range: fill with random classes from 1..n-2 only, as the reference.
    """

    host: str = "coop"
    host_options: str = "{}"
    weight: float = 0.5
    weight_new: float = 0.0
    base_prompt: Literal["tuned", "mixed"] = "tuned"
    top_k: int = 8
    non_repeat: bool = True
    reference_fill_range: bool = False

    def __post_init__(self) -> None:
        check_host(self, HOSTS, "dpc")
        if not 0.0 < self.weight <= 1.0:
            raise ValueError(f"weight must be in (0, 1], got {self.weight}")
        if not 0.0 <= self.weight_new <= 1.0:
            raise ValueError(f"weight_new must be in [0, 1], got {self.weight_new}")
        if self.base_prompt not in ("tuned", "mixed"):
            raise ValueError(f"base_prompt must be tuned or mixed, got {self.base_prompt!r}")
        if self.top_k < 2:
            raise ValueError(f"top_k must be >= 2, got {self.top_k}")


def _key(name: str) -> str:
    return name.replace(".", "__")


@register_method("dpc", "DPC: a parallel prompt from a finished host run for base classes, the host's for new ones (Li et al. 2025)")
class DPC(HostedMethod):
    config_cls = DPCConfig
    compatible_hosts = HOSTS
    train_defaults = {"epochs": 20, "batch_size": 4, "lr": 0.002}
    needs_init_run = True

    def __init__(self, backbone: Backbone, config: DPCConfig, train_classnames: Sequence[str]):
        super().__init__(backbone, config, train_classnames)
        host_state = self.host_tensors()
        self.mixed = nn.ParameterDict()
        for name in self.host_tensor_names():
            self.register_learned_buffer(f"stage1__{_key(name)}", host_state[name].clone())  # P
            self.mixed[_key(name)] = nn.Parameter(host_state[name].clone())  # M, initialised to P
        self.host_changes_image = self.host.capabilities.changes_image_graph
        sig = self.host.graph_signature()
        if len(sig.heads) != 1:
            raise ValueError(f"dpc needs a host with one head, {config.host} has {len(sig.heads)}")
        self._host_image, self._host_text = sig.image_outputs[0], sig.text_outputs[0]
        self._pool: dict[int, list[int]] | None = None
        self._train_set: Any = None

    @classmethod
    def capabilities_for(cls, config: DPCConfig) -> Capabilities:
        host = cls.host_capabilities(config)
        return Capabilities(changes_image_graph=host.changes_image_graph, base_novel_switch=True)

    # -- the prompt sets
    def stage1(self) -> dict[str, torch.Tensor]:
        """P: the host run's tensors."""
        return {n: getattr(self, f"stage1__{_key(n)}") for n in self.host_tensor_names()}

    def tuned(self) -> dict[str, torch.Tensor]:
        """P' = (M - (1 - w) P) / w."""
        w, p = self.config.weight, self.stage1()
        return {n: (self.mixed[_key(n)] - (1 - w) * p[n]) / w for n in self.host_tensor_names()}

    def base_tensors(self) -> dict[str, torch.Tensor]:
        if self.config.base_prompt == "mixed":
            return {n: self.mixed[_key(n)] for n in self.host_tensor_names()}
        return self.tuned()

    def new_tensors(self) -> dict[str, torch.Tensor]:
        """w_new P' + (1 - w_new) P (P itself at the default w_new = 0)."""
        w, p = self.config.weight_new, self.stage1()
        if w == 0.0:
            return p
        tuned = self.tuned()
        return {n: w * tuned[n] + (1 - w) * p[n] for n in self.host_tensor_names()}

    def init_from(self, other: PromptMethod) -> None:
        """Start from a finished host run: P and M := its learned tensors."""
        if other.name != self.config.host:
            raise ValueError(f"dpc with host={self.config.host!r} cannot start from a {other.name!r} run")
        state = other.learned_state()
        if sorted(state) != list(self.host_tensor_names()):
            raise ValueError(f"the {other.name} run's learned tensors {sorted(state)} do not fit this host "
                             f"({list(self.host_tensor_names())}); were its options different?")
        with torch.no_grad():
            for n in self.host_tensor_names():
                getattr(self, f"stage1__{_key(n)}").copy_(state[n])
                self.mixed[_key(n)].copy_(state[n])

    # -- declared graphs
    def graph_signature(self) -> GraphSignature:
        image = (IMAGE_EMBEDDINGS, IMAGE_BASE) if self.host_changes_image else (IMAGE_EMBEDDINGS,)
        heads = (Head(image[-1], CLASS_BASE, base_weight=1.0, novel_weight=0.0),
                 Head(IMAGE_EMBEDDINGS, CLASS_EMBEDDINGS, base_weight=0.0, novel_weight=1.0))
        return GraphSignature(image_outputs=image, text_outputs=(CLASS_EMBEDDINGS, CLASS_BASE), heads=heads)

    def image_outputs(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if not self.host_changes_image:
            return {IMAGE_EMBEDDINGS: self.host.image_outputs(images)[self._host_image]}
        return {IMAGE_EMBEDDINGS: self.call_host("image_outputs", images, tensors=self.new_tensors())[self._host_image],
                IMAGE_BASE: self.call_host("image_outputs", images, tensors=self.base_tensors())[self._host_image]}

    def text_outputs(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        return {CLASS_EMBEDDINGS: self.call_host("text_outputs", tokens, tensors=self.new_tensors())[self._host_text],
                CLASS_BASE: self.call_host("text_outputs", tokens, tensors=self.base_tensors())[self._host_text]}

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """The new-class path (stage-1 prompts at w_new = 0); :meth:`image_outputs` gives both."""
        return self.call_host("encode_image", images, tensors=self.new_tensors())

    def class_embeddings(self, tokens: torch.Tensor) -> torch.Tensor:
        """The new-class path; :meth:`text_outputs` gives both."""
        return self.text_outputs(tokens)[CLASS_EMBEDDINGS]

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("dpc embeds classes through its host; use class_embeddings / text_outputs")

    # -- training: the dynamic hard-negative optimizer
    def on_train_start(self, train_set: Any) -> None:
        self._train_set = train_set
        self._pool = {}
        for i, s in enumerate(train_set.samples):
            self._pool.setdefault(int(s.label), []).append(i)

    @torch.no_grad()
    def hard_negatives(self, images: torch.Tensor, labels: torch.Tensor, tokens: torch.Tensor) -> list[list[int]]:
        """Per image, the classes whose images join the batch (the reference's ``parse_sple_batch_train``)."""
        p = self.stage1()
        img = self.call_host("image_outputs", images, tensors=p)[self._host_image]
        txt = self.call_host("text_outputs", tokens, tensors=p)[self._host_text]
        sim = (100.0 * img @ txt.t()).softmax(dim=-1)  # the reference's fixed 100
        n_cls = txt.shape[0]
        in_batch = [int(y) for y in labels]
        out = []
        for i in range(len(labels)):
            # every non-GT class of the top-k (the reference's length check never bites: up to k of them)
            ranked = [int(c) for c in sim[i].topk(min(self.config.top_k, n_cls)).indices if int(c) != int(labels[i])]
            picked = []
            for c in ranked:
                if not self.config.non_repeat or c not in in_batch:
                    picked.append(c)
                    in_batch.append(c)
            lo, hi = (1, n_cls - 2) if self.config.reference_fill_range else (0, n_cls - 1)
            for _ in range(max(n_cls - 2, 0)):  # as many tries as the reference's loop
                if len(picked) >= 2:
                    break
                c = int(torch.randint(lo, hi + 1, ()))
                if c not in in_batch:
                    picked.append(c)
                    in_batch.append(c)
            out.append(picked)
        return out

    def _negative_image(self, label: int) -> torch.Tensor:
        if self._pool is None or not self._pool.get(label):
            raise ValueError(f"dpc draws hard-negative images from the training set; class {label} has none "
                             "(on_train_start was not called, or the class has no training image)")
        pool = self._pool[label]
        return self._train_set[pool[int(torch.randint(len(pool), ()))]][0]

    def compute_loss(
        self, inputs: torch.Tensor, labels: torch.Tensor, tokens: torch.Tensor, *, are_features: bool = False
    ) -> tuple[torch.Tensor, None]:
        if are_features:
            raise ValueError("dpc draws new images into every batch; it trains on images, not cached features")
        negatives = self.hard_negatives(inputs, labels, tokens)
        batch, batch_labels = [], []
        for i, hn in enumerate(negatives):
            batch += [inputs[i]] + [self._negative_image(c).to(inputs.device) for c in hn]
            batch_labels += [int(labels[i])] + hn
        x = torch.stack(batch)
        idx = torch.tensor(batch_labels, device=inputs.device)
        tuned = self.tuned()
        img = self.call_host("image_outputs", x, tensors=tuned)[self._host_image]  # [N, D], normalised
        txt = self.call_host("text_outputs", tokens[:, idx], tensors=tuned)[self._host_text]  # [N, D]
        logits = self.logit_scale() * img @ txt.t().to(img.dtype)
        target = torch.arange(len(idx), device=inputs.device)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2, None
