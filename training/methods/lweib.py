"""LwEIB: depthwise-convolution adapters in every block of both towers, classes embedded from descriptions.

Follows "Learning with Enriched Inductive Biases for Vision-Language Models" (IJCV 2025) and its
official code, ZjjConan/VLM-LwEIB at af61e13567a3ad230a66aa32f4e7bc46b58074ff (``trainers/lweib.py``,
the adapted blocks of ``clip/model.py``, ``trainers/gsl.py``, ``configs/trainers/LwEIB/base2new.yaml``).

Learned: only adapters, in the blocks ``adapter_start``.. of both towers (all 12 in the reference),
through the adapter hook (:func:`training.prompts.adapters.wrap_modules`); each adapter is
``z + s conv(z)`` with a depthwise convolution (kernel 3, padding 1, no bias, PyTorch's default
init, no norm or activation):
- on the output of ``ln_1`` (what q, k and v read; never added to the residual stream): along the
  token axis in the text tower (a non-causal kernel: a position sees the next one, so a prompt's
  feature depends on up to 2 positions per block past its end of text; prompts keep that much
  padding, :meth:`lookahead`, which gives the full context's features), over the patch grid in
  the vision tower (the class token bypasses it);
- on the MLP's hidden layer, after ``c_fc`` and before the activation, in the same way (4x width).
The gradient-scaling op (identity forward, gradient times a factor backward) wraps the adapter's
input by ``s`` and its output by ``1/s``: the convolution's weights get the gradient of an unscaled
branch while the frozen stream gets the usual one (``gradient_scaling=False`` drops it).

Scales: at test ``s = adapter_scale`` (0.025); in training each block of each tower draws, at every
forward, ``adapter_scale * scale_factor`` (0.0625) with probability ``1 - slow_fast_ratio`` (0.2),
else ``adapter_scale`` ("slow-fast"), from torch's global generator (seeded per epoch by the loop).

Classes: each class is embedded from its descriptions, one prompt per description,
``"a photo of a {name}, {description}"`` (:meth:`description_template`; no plain template, no
learned context): training draws one of a class's descriptions at random at every step; test time
averages the normalised features of all of them and re-normalises. An artifact ships its run's
descriptions and a request sends them for other names (``needs_class_descriptions``).

Training: when the base classes outnumber the batch, the step's classes are the batch's own plus
``min(others, neg_sampling * positives)`` others drawn uniformly without replacement (labels
remapped); CE of ``logit_scale cos`` over them; ``neg_sampling < 0`` uses every class.
Defaults (``base2new.yaml``): SGD lr 0.28, batch 16, 25 epochs, no warm-up, cosine.

Deliberate deviations:
- fp32 weights with the loop's AMP on CUDA (the reference: amp with an fp32 CLIP, the same).
- Any number of descriptions per class (the reference stacks exactly 20 per class into one
  tensor); the test-time mean is over each class's own.
- The reference truncates a description prompt to 77 tokens (one prompt of its files is longer);
  the tokenizer here does the same.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from training.backbones import Backbone
from training.protocol import Capabilities, MethodConfig, PromptMethod, register_method
from training.prompts.adapters import wrap_modules
from training.prompts.classes import step_classes
from training.prompts.deep import check_vision_tower, tower_block
from training.prompts.text import description_rows, encode_text_embeddings, eot_positions, mean_over_rows


@dataclass(frozen=True)
class LwEIBConfig(MethodConfig):
    """Args:
    adapter_scale: s at test time and the slow scale in training (0.025).
    scale_factor: the fast scale is ``adapter_scale * scale_factor`` (2.5).
    slow_fast_ratio: probability of the slow scale per block and forward in training (0.8).
    neg_sampling: negative classes per positive class of a step (7); < 0: every class.
    adapter_start: first 0-based block with adapters in both towers (0: all, the reference's 1..12).
    kernel_size: the depthwise convolutions' kernel (3).
    gradient_scaling: the reference's gradient-scaling op around each adapter.
    prompt_prefix: the text before the class name in a description prompt ("a photo of a").
    """

    adapter_scale: float = 0.025
    scale_factor: float = 2.5
    slow_fast_ratio: float = 0.8
    neg_sampling: int = 7
    adapter_start: int = 0
    kernel_size: int = 3
    gradient_scaling: bool = True
    prompt_prefix: str = "a photo of a"

    def __post_init__(self) -> None:
        if not self.adapter_scale > 0 or not self.scale_factor > 0:
            raise ValueError("adapter_scale and scale_factor must be > 0")
        if not 0.0 <= self.slow_fast_ratio <= 1.0:
            raise ValueError(f"slow_fast_ratio must be in [0, 1], got {self.slow_fast_ratio}")
        if self.adapter_start < 0:
            raise ValueError(f"adapter_start must be >= 0, got {self.adapter_start}")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and >= 1, got {self.kernel_size}")
        if "{" in self.prompt_prefix or "}" in self.prompt_prefix:
            raise ValueError("prompt_prefix is plain text")


class _GradScale(torch.autograd.Function):
    """Identity forward; the gradient times ``factor`` backward (the reference's ``GradientScaleLayer``)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: float) -> torch.Tensor:  # noqa: ANN001
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # noqa: ANN001
        return grad * ctx.factor, None


def grad_scale(x: torch.Tensor, factor: float) -> torch.Tensor:
    return _GradScale.apply(x, factor)


class BlockScale:
    """The scale of one block's two adapters: drawn by the first adapter of a training forward
    (slow or fast), reused by the second; ``adapter_scale`` outside training."""

    def __init__(self, config: LwEIBConfig):
        self.config = config
        self.value = config.adapter_scale

    def draw(self, training: bool) -> float:
        cfg = self.config
        fast = training and float(torch.rand(())) > cfg.slow_fast_ratio
        self.value = cfg.adapter_scale * cfg.scale_factor if fast else cfg.adapter_scale
        return self.value


class ConvAdapter(nn.Module):
    """``module`` followed by ``z + s conv(z)`` on its output ``z`` [N, T, C]: a depthwise conv over the
    token axis (``grid=False``) or over the patch grid, the first token bypassing it (``grid=True``)."""

    def __init__(self, module: nn.Module, channels: int, grid: bool, scale: BlockScale, first: bool,
                 config: LwEIBConfig):
        super().__init__()
        self.module = module
        k = config.kernel_size
        conv = nn.Conv2d if grid else nn.Conv1d
        self.conv = conv(channels, channels, k, padding=k // 2, groups=channels, bias=False)
        self.grid, self.scale, self.first = grid, scale, first
        self.gradient_scaling = config.gradient_scaling

    @property
    def weight(self) -> torch.Tensor:  # open_clip reads resblocks[0].mlp.c_fc.weight.dtype
        return self.module.weight

    def _conv(self, z: torch.Tensor) -> torch.Tensor:
        if not self.grid:
            return self.conv(z.transpose(1, 2)).transpose(1, 2)
        cls, patches = z[:, :1], z[:, 1:]
        n, t, c = patches.shape
        side = math.isqrt(t)
        grid = patches.transpose(1, 2).reshape(n, c, side, side)
        out = self.conv(grid).reshape(n, c, t).transpose(1, 2)
        return torch.cat([torch.zeros_like(cls), out], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.module(x)
        s = self.scale.draw(self.training) if self.first else self.scale.value
        if self.gradient_scaling and self.training and torch.is_grad_enabled():
            return z + grad_scale(s * self._conv(grad_scale(z, s)), 1.0 / s)
        return z + s * self._conv(z)


@register_method("lweib", "LwEIB: depthwise-conv adapters in every block, classes embedded from descriptions (IJCV 2025)")
class LwEIB(PromptMethod):
    config_cls = LwEIBConfig
    train_defaults = {"epochs": 25, "batch_size": 16, "lr": 0.28, "warmup_epochs": 0}

    def __init__(self, backbone: Backbone, config: LwEIBConfig, train_classnames: Sequence[str]):
        super().__init__(backbone, config, train_classnames)
        visual = check_vision_tower(self.clip.visual)
        grid = visual.grid_size
        if grid[0] != grid[1]:
            raise ValueError(f"{self.name} needs a square patch grid, this backbone has {grid}")
        for tower, blocks, is_grid in (("text", self.clip.transformer.resblocks, False),
                                       ("image", visual.transformer.resblocks, True)):
            for i in range(tower_block("adapter_start", config.adapter_start, 0, len(blocks), tower), len(blocks)):
                scale = BlockScale(config)
                block = blocks[i]
                width = block.ln_1.normalized_shape[0]
                wrap_modules(block, lambda n, m: n == "ln_1",
                             lambda n, m: ConvAdapter(m, width, is_grid, scale, True, config))
                hidden = block.mlp.c_fc.out_features
                wrap_modules(block, lambda n, m: n == "mlp.c_fc",
                             lambda n, m: ConvAdapter(m, hidden, is_grid, scale, False, config))

    @classmethod
    def capabilities_for(cls, config: LwEIBConfig) -> Capabilities:
        return Capabilities(changes_image_graph=True, needs_class_descriptions=True)

    def prompt_templates(self) -> list[str]:
        return []  # descriptions only

    def lookahead(self) -> int:
        """Each text adapter sees ``kernel_size // 2`` positions ahead, two adapters per adapted block;
        a change past that many positions after the end of text never reaches its feature."""
        blocks = len(self.clip.transformer.resblocks) - self.config.adapter_start
        return 2 * blocks * (self.config.kernel_size // 2)

    def description_template(self) -> str:
        return f"{self.config.prompt_prefix} {{name}}, {{description}}"

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return encode_text_embeddings(self.clip, self.clip.token_embedding(tokens), eot_positions(tokens, self.backbone.eot_token_id))

    def class_embeddings(self, tokens: torch.Tensor) -> torch.Tensor:
        """[S, C, L] description rows (padding rows empty) -> [C, D]: the re-normalised mean of the
        normalised features of each class's descriptions."""
        S, C, L = tokens.shape
        feats = F.normalize(self.encode_text(tokens.reshape(S * C, L)), dim=-1).reshape(S, C, -1)
        return mean_over_rows(feats, tokens, self.backbone.eot_token_id)

    # -- training
    def step_classes(self, labels: torch.Tensor, n_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(the step's classes [C'], labels remapped into them): the batch's own classes, then up to
        ``neg_sampling`` x as many others drawn uniformly without replacement; all classes when the
        base classes do not outnumber the batch or ``neg_sampling < 0``."""
        if self.config.neg_sampling < 0 or n_classes <= len(labels):
            return torch.arange(n_classes, device=labels.device), labels
        return step_classes(labels, n_classes, self.config.neg_sampling * int(labels.unique().numel()))

    def drawn_prompts(self, tokens: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """[C', L]: one of each class's descriptions, drawn uniformly (its real rows come first)."""
        counts = description_rows(tokens, self.backbone.eot_token_id).sum(0)[classes]  # [C']
        rows = (torch.rand(len(classes), device=tokens.device) * counts).long().clamp(max=tokens.shape[0] - 1)
        return tokens[rows, classes]

    def compute_loss(
        self, inputs: torch.Tensor, labels: torch.Tensor, tokens: torch.Tensor, *, are_features: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if are_features:
            raise ValueError(f"{self.name} changes the image graph; it trains on images, not cached features")
        n = tokens.shape[1]
        classes, targets = self.step_classes(labels, n)
        text = F.normalize(self.encode_text(self.drawn_prompts(tokens, classes)), dim=-1)
        image = F.normalize(self.encode_image(inputs), dim=-1)
        logits = self.logit_scale() * image @ text.t().to(image.dtype)
        loss = F.cross_entropy(logits, targets)
        full = torch.full((len(labels), n), float("-inf"), device=logits.device, dtype=logits.dtype)
        full[:, classes] = logits.detach()  # accuracy over every class is what the loop logs
        return loss, full
