"""CuPL: zero-shot CLIP whose class embedding is the mean over the class's descriptions.

Follows "What does a platypus look like? Generating customized prompts for zero-shot image
classification" (Pratt et al., ICCV 2023) and its official code, sarahpratt/CuPL at 719619c
(``classify_imagenet.py``, ``zeroshot_classifier_gpt``): every description of a class goes through
the frozen text tower, the normalised embeddings are averaged and the mean re-normalised. With
``templates`` (the reference's ``use_both``, "CuPL + e") the hand-written templates filled with the
class name join the descriptions in that mean. Nothing is learned.

Here CuPL is the baseline of the description-using 2025 methods (ProText compares with it) and the
method that needs class descriptions at test time: an artifact ships the descriptions of the
classes its run knew, a request sends descriptions for other names, and a name with neither is
refused. Descriptions are CuPL-format files (``--descriptions``; LLM-written in the paper, the
shipped CLDR ones on the emoji benchmarks).

Export: the text graph takes ``[S, C, L]`` token ids, row s of class c being its s-th prompt
(templates, then descriptions) and padding rows the empty prompt (start and end of text only),
which the graph leaves out of the mean (:func:`training.prompts.text.description_rows`).

Deliberate deviation: descriptions longer than the context are truncated by the tokenizer as the
reference's ``truncate=True`` does; open_clip's tokenizer keeps the end-of-text token.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from training.protocol import Capabilities, MethodConfig, PromptMethod, register_method
from training.prompts.knowledge import check_template
from training.prompts.text import encode_text_embeddings, eot_positions, mean_over_rows


@dataclass(frozen=True)
class CuPLConfig(MethodConfig):
    """Args:
    templates: hand-written templates averaged with the descriptions ("CuPL + e"); empty = CuPL.
    """

    templates: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for t in self.templates:
            check_template(t, "template")


@register_method("cupl", "CuPL: zero-shot CLIP on the mean embedding of each class's descriptions (Pratt et al. 2023)")
class CuPL(PromptMethod):
    config_cls = CuPLConfig
    train_defaults = {"epochs": 0}
    published_b2n = (72.56, 74.22, 73.38)
    published_source = "the ProText paper's base-to-novel table (Khattak et al., AAAI 2025; muzairkhattak/ProText README)"

    @classmethod
    def capabilities_for(cls, config: CuPLConfig) -> Capabilities:
        return Capabilities(needs_class_descriptions=True, trainable=False)

    def prompt_templates(self) -> list[str]:
        return list(self.config.templates)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return encode_text_embeddings(self.clip, self.clip.token_embedding(tokens), eot_positions(tokens, self.backbone.eot_token_id),
                                      share_prefix=True)  # lookups of one embedding table

    def class_embeddings(self, tokens: torch.Tensor) -> torch.Tensor:
        """[S, C, L] prompt rows (padding rows empty) -> [C, D]: the re-normalised mean over each class's rows."""
        S, C, L = tokens.shape
        feats = F.normalize(self.encode_text(tokens.reshape(S * C, L)), dim=-1).reshape(S, C, -1)
        return mean_over_rows(feats, tokens, self.backbone.eot_token_id)
