"""VPT-deep as the MaPLe repository runs it: learned prompts in every ViT layer, a fixed text prompt.

Visual Prompt Tuning (Jia et al., ECCV 2022), in the CLIP form used as a base-to-novel baseline by
MaPLe (Khattak et al., CVPR 2023): muzairkhattak/multimodal-prompt-learning at
69bce21ae8eda80ad6187534b2dce09cf6c59e17, ``trainers/vpt.py`` with ``design_details`` trainer
"VPT" in ``clip/model.py``. There the text side is neither CoOp nor learned: ``FixedEmbeddings``
encodes the hand-crafted ``"a photo of a {}."`` once with the plain text encoder (language depth
0). Only the image tower is prompted: ``N_CTX_VISION`` tokens are appended after the patch tokens
(after the positional embedding, before ``ln_pre``) and replaced before each of the next
``PROMPT_DEPTH_VISION - 1`` layers by fresh learned tokens; everything is initialised N(0, 0.02).

Defaults are ``configs/trainers/VPT/vit_b16_c2_ep5_batch4_4.yaml`` (the config of
``scripts/vpt/base2new_train_vpt.sh``): 8 vision tokens (despite the "_4" in the file name), depth
12, 16 shots, SGD lr 0.0025, batch 4, 5 epochs, constant warm-up 1 epoch at 1e-5, cosine.

Deliberate deviations:
- The reference forks CLIP's ``model.py``; here open_clip's blocks are iterated by a wrapper
  (:mod:`training.prompts.deep`), with identical token layout.
- Precision: the reference config says fp16, its loader nevertheless returns an fp32 CLIP, and the
  prompts are cast ``.half()`` at insertion (so they are rounded to fp16 and promoted back). We keep
  fp32 prompts; the loop's AMP covers mixed precision on CUDA.
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
class VPTConfig(MethodConfig):
    """Args:
    n_ctx_vision: visual prompt tokens per layer.
    prompt_depth_vision: layers that receive fresh prompts (1 = shallow VPT; clamped to the ViT).
    template: the fixed hand-crafted text prompt (one ``{}`` for the class name).
    init_std: std of the N(0, std) prompt initialisation.
    """

    n_ctx_vision: int = 8
    prompt_depth_vision: int = 12
    template: str = "a photo of a {}."
    init_std: float = 0.02

    def __post_init__(self) -> None:
        validate_prompt_options(self, n_ctx=("n_ctx_vision",), depth=("prompt_depth_vision",), min_depth=1)
        if self.template.count("{}") != 1:
            raise ValueError(f"template {self.template!r} must contain exactly one '{{}}'")


@register_method("vpt", "VPT-deep: learned prompts in every ViT layer, fixed text prompt (MaPLe repo baseline)")
class VPT(DeepPromptMethod):
    config_cls = VPTConfig
    train_defaults = {"epochs": 5, "batch_size": 4, "lr": 0.0025}

    def __init__(self, backbone: Backbone, config: VPTConfig, train_classnames: Sequence[str]):
        super().__init__(backbone, config, train_classnames)
        self._init_vision_prompts(config.n_ctx_vision, config.prompt_depth_vision, config.init_std)
        self._template = config.template

    @classmethod
    def capabilities_for(cls, config: VPTConfig) -> Capabilities:
        return Capabilities(changes_image_graph=True)
