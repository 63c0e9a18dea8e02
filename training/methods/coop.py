"""CoOp: learnable context vectors in front of (or around) the class name.

Follows "Learning to Prompt for Vision-Language Models" (Zhou et al., IJCV 2022) and its official
code, KaiyangZhou/CoOp at ff61507 (``trainers/coop.py``). Defaults are the base-to-novel config
``vit_b16_ctxv1``: 4 context tokens initialised from "a photo of a", class token at the end,
unified context; 16 shots, batch 32, SGD lr 0.002 (see ``train_defaults``).

Deliberate deviations:
- With ``ctx_init`` the number of context tokens is the number of BPE tokens of the phrase; the
  reference counts words (``len(ctx_init.split(" "))``), which misaligns for multi-token words.
- Class-specific context with ``ctx_init`` copies the initial phrase to every class; the reference
  silently falls back to one shared context in that case.
- Context slots are placed by index arithmetic from the end-of-text position instead of a
  per-class Python loop, so "middle"/"front" export to a single ONNX graph
  (:mod:`training.prompts.context`; the token sequences are the reference's).
"""
from __future__ import annotations

from dataclasses import dataclass

from training.protocol import register_method
from training.prompts.context import ContextConfig, ContextPromptMethod


@dataclass(frozen=True)
class CoOpConfig(ContextConfig):
    """CoOp's options are those of its context (:class:`~training.prompts.context.ContextConfig`)."""


@register_method("coop", "CoOp: learnable context tokens (Zhou et al. 2022)")
class CoOp(ContextPromptMethod):
    config_cls = CoOpConfig
    train_defaults = {"epochs": 200, "batch_size": 32, "lr": 0.002}
    published_b2n = (82.69, 63.22, 71.66)
    published_source = "CoCoOp paper (Zhou et al., CVPR 2022), Table 1"
