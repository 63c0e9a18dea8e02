"""ATPrompt: attribute words as anchors in the prompt, learned blocks beside them, as a plug-in on CoOp, CoCoOp or MaPLe.

Follows "Advancing Textual Prompt Learning with Anchored Attributes" (Li et al., ICCV 2025) and its
official code, zhengli97/ATPrompt at 86980a10041094aeb071badab73597d536a59c73
(``trainers/coop_atp.py``, ``cocoop_atp.py``, ``maple_atp.py`` with ``clip/model_atp.py``; the
per-dataset attributes in ``train.py``'s ``choose_attribute_for_atprompt``; schedules in
``docs/ATPrompt.md`` and ``scripts/``).

For attribute words ``a_1..a_K`` (K = 1..3, fixed per dataset) the prompt of class ``name`` is

    [SOS] [A_1 x n_att] emb(a_1) [A_2 x n_att] emb(a_2) ... [C x n_ctx] name . [EOT]

where the ``A_k`` blocks are learned (N(0, 0.01)), ``emb(a_k)`` are the frozen token embeddings of
the attribute words (the anchors), and ``C`` is the host's own learned context (random N(0, 0.02):
the reference disables word initialisation in all three trainers). The attribute part is the
host's ``text_prefix`` (:func:`training.prompts.context.prepend_prefix`), swapped in for every host
call, so the host does the rest unchanged, and only ``C`` gets what the host does to its context:

- CoOp: plain CLIP text encoder.
- CoCoOp: the meta-net bias pi(x) shifts ``C`` only; the attribute blocks and words are unshifted.
- MaPLe: the first visual prompt is ``proj(C)`` (C alone); deeper text prompts replace C's slots,
  after the attribute part (``model_atp.py``: positions 1 + K (n_att + 1) onwards).

The host's tensors train with the blocks (its context, CoCoOp's meta-net, MaPLe's deep prompts and
projections); plain CE, no extra loss. At test time the prompts are rebuilt for any class names.

Defaults (the reference's scripts): ``n_att`` = the host's ``n_ctx``; host context 2 tokens on CoOp
and CoCoOp, 4 on MaPLe (``docs/ATPrompt.md``: 9 of 11 datasets); CoOp: SGD lr 0.002, batch 32, 100
epochs; CoCoOp: lr 0.002, batch 1, 10 epochs; MaPLe: lr 0.0035, batch 4, 5 epochs
(:meth:`ATPrompt.train_defaults_for`); the last epoch is evaluated. Attributes: the reference's
table on the 11 standard datasets (``options_for_dataset``); elsewhere ImageNet's ("color",
"shape") unless given, e.g. from ``promptbake atprompt-search`` (:mod:`training.atprompt_search`).

The one-token assumption: the reference slices the token sequence of
``"X..X a_1 X..X a_2 X..X name."`` as if every attribute word were one BPE token. "playfulness"
(Oxford Pets) is two ("play", "fulness"), so its Pets prompt becomes
``[A A] play [A A] X [C C] X name .``: "fulness" and "energy" are lost and two placeholder "X"
embeddings enter the prompt. ``reference_splice=True`` reproduces that slicing exactly (the
leftover placeholders sit between C and the name); the default splices every token of a
multi-token word, which is what the paper describes. For one-token words the two are identical.

Deliberate deviations:
- Per-dataset context lengths and epochs (``docs/ATPrompt.md``: DTD 4 tokens on CoOp, ImageNet 10
  epochs, ...) are not applied automatically; give them as ``host_options`` / ``--epochs``.
- Precision: the reference trains in fp16 (CLIP, prompts, MaPLe's hard-coded ``.half()``); here
  fp32 with the loop's AMP on CUDA.
- Only the K blocks in use are built (the reference always builds three; unused ones never train).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from training.backbones import Backbone
from training.prompts.context import PLACEHOLDER
from training.prompts.host import HostedMethod, check_host
from training.prompts.text import eot_positions
from training.protocol import Capabilities, GraphSignature, MethodConfig, register_method
from training.prompts.templates import coop_dataset

HOSTS = ("coop", "cocoop", "maple")

#: ``choose_attribute_for_atprompt`` in the reference's ``train.py`` (ImageNet's also for its variants)
REFERENCE_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "imagenet": ("color", "shape"),
    "caltech101": ("shape", "size"),
    "oxford_pets": ("playfulness", "energy"),
    "stanford_cars": ("luxury",),
    "oxford_flowers": ("color", "habitat", "growth"),
    "food101": ("flavor", "preparation"),
    "fgvc_aircraft": ("design", "range"),
    "sun397": ("function",),
    "dtd": ("pattern", "color", "design"),
    "eurosat": ("habitat",),
    "ucf101": ("precision",),
}
DEFAULT_ATTRIBUTES = REFERENCE_ATTRIBUTES["imagenet"]
#: the host context the reference's scripts use (N_CTX; word initialisation off)
HOST_CONTEXT = {"coop": 2, "cocoop": 2, "maple": 4}
#: the reference's schedules per host trainer (``scripts/*/atprompt_base2new_train.sh``, configs)
HOST_SCHEDULES = {
    "coop": {"epochs": 100, "batch_size": 32, "lr": 0.002},
    "cocoop": {"epochs": 10, "batch_size": 1, "lr": 0.002},
    "maple": {"epochs": 5, "batch_size": 4, "lr": 0.0035},
}
MAX_ATTRIBUTES = 3
#: the README's 11-dataset averages (Base, Novel, HM) per host
PUBLISHED = {"coop": (82.68, 68.04, 74.65), "cocoop": (81.69, 74.54, 77.95), "maple": (82.98, 75.76, 79.21)}


@dataclass(frozen=True)
class ATPromptConfig(MethodConfig):
    """Args:
    host: the method ATPrompt extends (coop, cocoop, maple).
    host_options: the host's options as a JSON object (defaults: random context of the reference's length).
    attributes: the attribute words, 1 to 3, in prompt order (``--attributes color,shape``).
    n_att: learned tokens before each attribute word; None = the host's context length (reference).
    init_std: std of the attribute blocks' N(0, std) initialisation (reference 0.01).
    reference_splice: slice as if every attribute word were one token, as the reference does.
    """

    host: str = "coop"
    host_options: str = "{}"
    attributes: tuple[str, ...] = DEFAULT_ATTRIBUTES
    n_att: int | None = None
    init_std: float = 0.01
    reference_splice: bool = False

    def __post_init__(self) -> None:
        check_host(self, HOSTS, "atprompt")
        # "--attributes color,shape" and "--attributes color shape" alike
        items = (self.attributes,) if isinstance(self.attributes, str) else self.attributes
        object.__setattr__(self, "attributes", tuple(w.strip() for a in items for w in str(a).split(",") if w.strip()))
        if not 1 <= len(self.attributes) <= MAX_ATTRIBUTES:
            raise ValueError(f"atprompt takes 1 to {MAX_ATTRIBUTES} attributes, got {list(self.attributes)}")
        for a in self.attributes:
            if not isinstance(a, str) or not a.strip() or "{" in a or "}" in a:
                raise ValueError(f"attributes must be non-empty words, got {a!r}")
        if self.n_att is not None and self.n_att < 1:
            raise ValueError(f"n_att must be >= 1, got {self.n_att}")
        if self.init_std <= 0:
            raise ValueError("init_std must be > 0")


def attribute_token_ids(backbone: Backbone, attributes: tuple[str, ...], n_att: int, n_ctx: int,
                        reference: bool) -> tuple[list[torch.Tensor], int]:
    """Token ids of each attribute's anchor, and how many placeholders follow the context.

    ``reference``: the reference's slicing of ``"X*n_att a_1 ... X*n_att a_K X*n_ctx"``, one token per
    attribute at the position a one-token word would have; the tokens it skips are dropped and the
    sequence's last tokens (placeholders) end up after the context.
    """
    tok = backbone.tokenizer
    if not reference:
        ids = []
        for a in attributes:
            t = tok([a])[0]
            ids.append(t[1 : int(eot_positions(t[None], backbone.eot_token_id)[0])])
        return ids, 0
    x = " ".join([PLACEHOLDER] * n_att)
    text = " ".join(f"{x} {a}" for a in attributes) + " " + " ".join([PLACEHOLDER] * n_ctx)
    t = tok([text])[0]
    body = t[1 : int(eot_positions(t[None], backbone.eot_token_id)[0])]  # without SOS / EOT
    ids = [body[k * (n_att + 1) + n_att : k * (n_att + 1) + n_att + 1] for k in range(len(attributes))]
    used = len(attributes) * (n_att + 1) + n_ctx
    leftover = body[used:]
    placeholder = tok([PLACEHOLDER])[0][1]
    if bool((leftover != placeholder).any()):
        raise ValueError(f"reference_splice: attributes {list(attributes)} are longer than the context can absorb; "
                         "the reference's slicing would cut into them")
    return ids, int(leftover.numel())


@register_method("atprompt", "ATPrompt: learned blocks anchored on attribute words before the host's context (Li et al. 2025)")
class ATPrompt(HostedMethod):
    config_cls = ATPromptConfig
    compatible_hosts = HOSTS
    train_defaults = HOST_SCHEDULES["coop"]
    published_b2n = PUBLISHED["coop"]
    published_source = "its README (11-dataset averages per host: PUBLISHED)"

    @classmethod
    def published_b2n_for(cls, config: ATPromptConfig) -> tuple[float, float, float] | None:
        return PUBLISHED[config.host]

    @classmethod
    def train_defaults_for(cls, config: ATPromptConfig) -> dict[str, Any]:
        return dict(HOST_SCHEDULES[config.host])

    @classmethod
    def options_for_dataset(cls, dataset: str) -> dict[str, Any]:
        name = coop_dataset(dataset)
        return {} if name is None else {"attributes": REFERENCE_ATTRIBUTES[name]}

    @classmethod
    def host_options_for(cls, config: ATPromptConfig, options: dict[str, Any]) -> dict[str, Any]:
        return {"ctx_init": "", "n_ctx": HOST_CONTEXT[config.host], **options}

    @classmethod
    def capabilities_for(cls, config: ATPromptConfig) -> Capabilities:
        return cls.host_capabilities(config)

    def __init__(self, backbone: Backbone, config: ATPromptConfig, train_classnames):
        super().__init__(backbone, config, train_classnames)
        host = self.host
        if not isinstance(getattr(host, "text_prefix", None), torch.Tensor):
            raise ValueError(f"host {config.host} has no text prefix")
        if getattr(host.config, "class_token_position", "end") != "end" or getattr(host.config, "class_specific", False):
            raise ValueError("atprompt needs the host's class name after a shared context (class_token_position end)")
        n_ctx = host.ctx.shape[-2]
        self.n_att = config.n_att or n_ctx
        ids, self.trailing = attribute_token_ids(backbone, config.attributes, self.n_att, n_ctx, config.reference_splice)
        for k, t in enumerate(ids):
            self.register_buffer(f"attribute_ids_{k}", t.clone(), persistent=False)
        width = host.text_prefix.shape[1]
        self.blocks = nn.ParameterList()
        for _ in config.attributes:
            block = torch.empty(self.n_att, width)
            nn.init.normal_(block, std=config.init_std)
            self.blocks.append(nn.Parameter(block))

    def trained_host_tensors(self) -> tuple[str, ...]:
        return self.host_tensor_names()

    @property
    def prefix_length(self) -> int:
        return sum(self.n_att + getattr(self, f"attribute_ids_{k}").numel() for k in range(len(self.blocks)))

    def attribute_prefix(self) -> torch.Tensor:
        """[P, W]: each learned block followed by its attribute word's frozen token embeddings."""
        parts = []
        for k, block in enumerate(self.blocks):
            parts += [block, self.clip.token_embedding(getattr(self, f"attribute_ids_{k}")).to(block.dtype)]
        return torch.cat(parts)

    def prompt_templates(self) -> list[str]:
        """The host's templates with placeholder slots for the attribute part in front (and, with
        ``reference_splice``, the reference's leftover placeholders before the class name)."""
        lead = " ".join([PLACEHOLDER] * self.prefix_length) + " "
        trail = " ".join([PLACEHOLDER] * self.trailing + ["{}"])
        return [lead + t.replace("{}", trail) for t in self.host.prompt_templates()]

    def _host(self, fn: str, *args: Any, **kwargs: Any) -> Any:
        return self.call_host(fn, *args, tensors={"text_prefix": self.attribute_prefix()}, **kwargs)

    # -- every protocol call goes to the host with the attribute part in place
    def graph_signature(self) -> GraphSignature:
        return self.host.graph_signature()

    def image_outputs(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self._host("image_outputs", images)

    def text_outputs(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        return self._host("text_outputs", tokens)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self._host("encode_image", images)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._host("encode_text", tokens)

    def class_embeddings(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._host("class_embeddings", tokens)

    def logits_from_features(self, image_features: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return self._host("logits_from_features", image_features, tokens)

    def compute_loss(
        self, inputs: torch.Tensor, labels: torch.Tensor, tokens: torch.Tensor, *, are_features: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self._host("compute_loss", inputs, labels, tokens, are_features=are_features)
