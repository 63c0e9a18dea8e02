"""IVLP: independent deep prompts in the text and the image encoder.

Independent Vision-Language Prompting, the baseline of MaPLe (Khattak et al., CVPR 2023, Sec. 4)
and PromptSRC: muzairkhattak/multimodal-prompt-learning at
69bce21ae8eda80ad6187534b2dce09cf6c59e17, ``trainers/independentVL.py`` with ``design_details``
trainer "IVLP" in ``clip/model.py``. Text: the prompt of a class is ``"a photo of a {name}."``
whose first ``n_ctx_text`` token embeddings are learned (initialised from the phrase), and before
each of the next ``prompt_depth_text - 1`` layers the hidden states at those positions are
replaced by fresh N(0, 0.02) prompts. Image: ``n_ctx_vision`` N(0, 0.02) tokens appended after the
patches before ``ln_pre`` and replaced in the same way for ``prompt_depth_vision - 1`` layers. The
two sets of prompts never interact (contrast MaPLe).

Defaults are ``configs/trainers/IVLP/vit_b16_c2_ep5_batch4_2+2ctx.yaml`` (the config of
``scripts/independent-vlp/base2new_train_ivlp.sh``): 2+2 tokens, depth 12 in both towers, 16 shots,
SGD lr 0.0035, batch 4, 5 epochs, constant warm-up 1 epoch at 1e-5, cosine. (The PromptSRC
repository's IVLP baseline, ``vit_b16_c2_ep20_batch4_4+4ctx.yaml``, is 4+4 tokens, depth 9, lr
0.0025, 20 epochs: pass those options to reproduce it.)

Deliberate deviations:
- Wrapper instead of the reference's forked ``model.py`` (same token layout).
- Precision: the reference trains an fp16 CLIP and casts prompts ``.half()`` at insertion; we keep
  fp32 prompts and leave mixed precision to the loop's AMP.
- ``ctx_init`` with fewer tokens than ``n_ctx_text`` is an error; the reference reads EOT/padding
  embeddings then. With ``n_ctx_text > 4`` the reference silently ignores ``ctx_init``; we use it
  whenever it is long enough (pass ``ctx_init=""`` for the random init).
- A depth beyond the backbone's layer count is clamped (the reference ignores the extra layers).
- Checkpoint: the last epoch, like the reference's ``--load-epoch 5`` evaluation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from training.backbones import Backbone
from training.protocol import Capabilities, MethodConfig, register_method
from training.prompts.deep import DeepPromptMethod, validate_prompt_options


@dataclass(frozen=True)
class IVLPConfig(MethodConfig):
    """Args:
    n_ctx_text: learned text tokens (after SOT) per layer.
    n_ctx_vision: visual prompt tokens per layer.
    ctx_init: phrase whose first ``n_ctx_text`` tokens initialise the text context and which stays
        in the prompt ("" = random init and "X" placeholders).
    prompt_depth_text: text layers receiving fresh prompts (>= 1; clamped to the tower).
    prompt_depth_vision: image layers receiving fresh prompts (0 = no visual prompts).
    init_std: std of the N(0, std) prompt initialisation.
    """

    n_ctx_text: int = 2
    n_ctx_vision: int = 2
    ctx_init: str = "a photo of a"
    prompt_depth_text: int = 12
    prompt_depth_vision: int = 12
    init_std: float = 0.02

    def __post_init__(self) -> None:
        validate_prompt_options(self, n_ctx=("n_ctx_text", "n_ctx_vision"), depth=("prompt_depth_text",), min_depth=1)
        validate_prompt_options(self, n_ctx=(), depth=("prompt_depth_vision",), min_depth=0)


@register_method("ivlp", "IVLP: independent deep prompts in the text and image encoders (MaPLe repo baseline)")
class IVLP(DeepPromptMethod):
    config_cls = IVLPConfig
    train_defaults = {"epochs": 5, "batch_size": 4, "lr": 0.0035}

    def __init__(self, backbone: Backbone, config: IVLPConfig, train_classnames: Sequence[str]):
        super().__init__(backbone, config, train_classnames)
        self._init_text_prompts(config.n_ctx_text, config.ctx_init, config.prompt_depth_text, config.init_std)
        self._init_vision_prompts(config.n_ctx_vision, config.prompt_depth_vision, config.init_std)

    @classmethod
    def capabilities_for(cls, config: IVLPConfig) -> Capabilities:
        return Capabilities(changes_image_graph=config.prompt_depth_vision > 0)
