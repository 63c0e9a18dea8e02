"""TAC: deep prompts on both towers led by tokens projected from k-means centres of the class descriptions.

Follows "Task-Aware Clustering for Prompting Vision-Language Models" (CVPR 2025) and its official
code, FushengHao/TAC at 914c3067ca5ce48b0a354dc2ccd1e5b1fc1115a8 (``trainers/tac.py``, the prompted
blocks of ``clip/model.py``, ``configs/trainers/TAC/basetonovel.yaml``, ``scripts/tac/base2new_*.sh``).
Only the paper's abstract is public; every detail below is the code's.

Task-aware centres: each base class is embedded by the frozen CLIP as the mean of its descriptions'
(unnormalised) text features, normalised (``w``); cosine k-means (5 clusters, seeded by the run)
over those, normalised, gives the centres ``C`` [k, D]. They are learned state that never trains:
computed once at the start of training, saved in checkpoints and in the artifact, so novel classes
are served with the base-class centres (the reference recomputes k-means on the novel classes and
then overwrites the result with the checkpoint's). Descriptions are needed to train, not to serve.

Learned: ``Ct = Linear(D, W_t)(C)`` and ``Cv = Linear(D, W_v)(C)`` (no activation); a text context of
5 tokens initialised from positions 1..5 of the tokenised ``ctx_init`` "a photo of a" (its four
words *and the end-of-text embedding*, as the reference); deep text prompts for text blocks 1..11
and visual prompts (input + blocks 1..11), 5 tokens each, N(0, 0.02).
- Text: ``[SOT, Ct, ctx, a photo of a {name}. EOT]``: the soft tokens come *before* the whole
  hand-crafted prompt (``prompt_text``); before each text block l >= 1 the Ct slots are set to Ct
  again and the ctx slots to block l's prompts; the feature is read at the end of text.
- Image: ``[CLS, patches] + pos``, then ``[Cv, visual ctx]`` appended, ``ln_pre``; before each block l
  >= 1 the same for Cv and block l's visual prompts. Every block's attention is masked so that the
  patch tokens do not attend to the cluster tokens (CLS and the prompt tokens do). The image
  feature goes through Dropout(0.3) in training.

Training: each image comes as ``views`` (4) independent augmentations plus the un-augmented image
(resized straight to the input size, Dassl's ``img0``): :meth:`train_transform`. The loss over the
4B views is ``CE + 20 * L1(t, w) + 25 * L1(f, z)`` with ``t`` the normalised class embeddings, ``f``
the normalised (dropped-out) image features and ``z`` the frozen CLIP's normalised feature of the
un-augmented image, repeated per view. After every epoch the trained tensors join a uniform average
(1/E each) that the finished run keeps (the reference's epoch averaging).
Defaults (``basetonovel.yaml``): SGD lr 0.0025, batch 8 (x4 views), 20 epochs, one warm-up epoch at
1e-5, cosine, RandomResizedCrop scale (0.4, 1).

``teacher_dropout``: the reference's frozen image encoder is the same modified ViT class, inside the
trained model and in train mode, so its feature goes through Dropout(0.3) too (one mask per image,
shared by its views). True (default) keeps that, as the published numbers come from it; False gives
the plain frozen feature.

Deliberate deviations:
- fp32 weights with the loop's AMP on CUDA (the reference trains fp16 CLIP, ctx and projections).
- The average covers the trained tensors only; the reference averages the whole state dict (frozen
  CLIP, teacher and centres too) in each tensor's dtype, which perturbs the fp16 weights by rounding.
  The running average is training state, so a resumed run still averages (the reference's restarts).
- k-means (:func:`training.prompts.clustering.cosine_kmeans`): seeded by the run through torch's
  generator (the package draws with NumPy's global state), an empty cluster keeps its centre (the
  package gives NaN), at most 1000 iterations (the package has no bound). With fewer base classes
  than clusters there is one centre per class.
- The frozen teacher is the backbone itself (the reference holds a second copy of the ViT).
- Descriptions are needed for the training classes only (the reference's constructor also encodes
  the test classes' and fails without them, then discards the result).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from training.backbones import Backbone
from training.data.transforms import MultiView, build_resize_transform
from training.protocol import Capabilities, MethodConfig, register_method
from training.prompts.aggregate import SnapshotAverage
from training.prompts.clustering import cosine_kmeans
from training.prompts.context import PLACEHOLDER, init_context, register_text_prefix
from training.prompts.deep import (
    DeepPromptMethod,
    check_vision_tower,
    effective_depth,
    normal_prompts,
    run_blocks,
    validate_prompt_options,
    vision_input_tokens,
)
from training.prompts.knowledge import check_template, class_text_means


@dataclass(frozen=True)
class TACConfig(MethodConfig):
    """Args:
    n_ctx_text, n_ctx_vision: learned tokens per layer of each tower (5).
    ctx_init: phrase whose tokenised positions 1..n_ctx_text initialise the text context ("" =
        N(0, init_std)).
    prompt_text: the hand-crafted prompt that follows the soft tokens.
    prompt_depth_text, prompt_depth_vision: layers with prompts (12; clamped to the tower).
    n_clusters: k-means centres (5).
    views: augmented views per training image (4).
    dropout: on the image feature in training (0.3).
    teacher_dropout: the same dropout on the frozen teacher feature, as the reference.
    text_weight, image_weight: the L1 terms' weights (20, 25).
    average_epochs: finish with the uniform average of the epoch-end tensors.
    init_std: std of the prompts' init.
    """

    n_ctx_text: int = 5
    n_ctx_vision: int = 5
    ctx_init: str = "a photo of a"
    prompt_text: str = "a photo of a {}."
    prompt_depth_text: int = 12
    prompt_depth_vision: int = 12
    n_clusters: int = 5
    views: int = 4
    dropout: float = 0.3
    teacher_dropout: bool = True
    text_weight: float = 20.0
    image_weight: float = 25.0
    average_epochs: bool = True
    init_std: float = 0.02

    def __post_init__(self) -> None:
        validate_prompt_options(self, n_ctx=("n_ctx_text", "n_ctx_vision", "n_clusters", "views"),
                                depth=("prompt_depth_text", "prompt_depth_vision"), min_depth=1)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.text_weight < 0 or self.image_weight < 0:
            raise ValueError("loss weights must be >= 0")
        check_template(self.prompt_text, "prompt_text")


def cluster_mask(length: int, patches: slice, clusters: slice, dtype: torch.dtype = torch.float32,
                 device: torch.device | None = None) -> torch.Tensor:
    """[L, L] additive attention mask: -inf where a patch query meets a cluster key, 0 elsewhere."""
    mask = torch.zeros(length, length, dtype=dtype, device=device)
    mask[patches, clusters] = float("-inf")
    return mask


@register_method("tac", "TAC: deep prompts led by k-means centres of the class descriptions (CVPR 2025)")
class TAC(DeepPromptMethod):
    config_cls = TACConfig
    train_defaults = {"epochs": 20, "batch_size": 8, "lr": 0.0025, "min_crop_scale": 0.4}
    needs_train_descriptions = True

    def __init__(self, backbone: Backbone, config: TACConfig, train_classnames: Sequence[str]):
        super().__init__(backbone, config, train_classnames)
        check_vision_tower(self.clip.visual)
        k = min(config.n_clusters, len(self.train_classnames))
        clip = self.clip
        if config.ctx_init.strip():  # positions 1..n of the tokenised phrase, its end of text included
            ids = backbone.tokenizer([config.ctx_init.replace("_", " ").strip()])[0, 1 : 1 + config.n_ctx_text]
            ctx = clip.token_embedding(ids).detach().clone()
        else:
            ctx = init_context(backbone, config.n_ctx_text, "", config.init_std)
        self.ctx = nn.Parameter(ctx)
        text_width = ctx.shape[1]
        register_text_prefix(self, text_width)
        self._template = " ".join([PLACEHOLDER] * (k + config.n_ctx_text)) + " " + config.prompt_text
        depth_t = effective_depth(config.prompt_depth_text, len(clip.transformer.resblocks), "text prompt")
        self.deep_text = normal_prompts(depth_t - 1, config.n_ctx_text, text_width, config.init_std)
        self._init_vision_prompts(config.n_ctx_vision, config.prompt_depth_vision, config.init_std)
        self.project_text = nn.Linear(backbone.embed_dim, text_width)
        self.project_vision = nn.Linear(backbone.embed_dim, self.vision_ctx.shape[1])
        self.dropout = nn.Dropout(config.dropout)
        self.declare_learned()
        self.register_learned_buffer("centres", torch.zeros(k, backbone.embed_dim))
        self.register_buffer("centres_ready", torch.zeros((), dtype=torch.bool), persistent=False)
        self._average = SnapshotAverage("average", names=self._learned_params)
        self._teacher: torch.Tensor | None = None  # [C, D] description embeddings of the training classes

    @classmethod
    def capabilities_for(cls, config: TACConfig) -> Capabilities:
        return Capabilities(changes_image_graph=True)

    # -- prompts: the cluster tokens lead both towers' prompts at every layer
    def text_prompts(self) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        ct = self.project_text(self.centres)
        return torch.cat([ct, self.ctx]), [torch.cat([ct, p]) for p in self.deep_text]

    def vision_prompts(self) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        cv = self.project_vision(self.centres)
        return torch.cat([cv, self.vision_ctx]), [torch.cat([cv, p]) for p in self.deep_vision]

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, D]; patches never attend to the cluster tokens; dropout in training."""
        visual = self.clip.visual
        prompts, deep = self.vision_prompts()
        x = vision_input_tokens(visual, images)
        n_tokens, k = x.shape[1], self.centres.shape[0]
        x = torch.cat([x, prompts.to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)], dim=1)
        x = visual.ln_pre(x)
        mask = cluster_mask(x.shape[1], slice(1, n_tokens), slice(n_tokens, n_tokens + k), x.dtype, x.device)
        x = run_blocks(visual.transformer, x, deep, n_tokens, attn_mask=mask)
        pooled = visual.ln_post(x[:, 0])
        return self.dropout(pooled @ visual.proj if visual.proj is not None else pooled)

    # -- the task-aware centres and the text teacher
    def description_embeddings(self, device: torch.device) -> torch.Tensor:
        """[C, D]: per training class, the frozen CLIP's text features of its descriptions averaged
        unnormalised, then normalised (the reference's teacher and k-means input)."""
        texts = self.every_training_description("clusters the training classes' descriptions")
        return class_text_means(self, texts, device, normalize_each=False)

    def on_train_start(self, train_set: Any) -> None:
        device = self.centres.device
        self._teacher = self.description_embeddings(device)
        if bool(self.centres_ready):  # resumed: the centres came with the checkpoint
            return
        centres, _ = cosine_kmeans(self._teacher.cpu(), self.centres.shape[0])
        with torch.no_grad():
            self.centres.copy_(F.normalize(centres, dim=-1).to(device))
            self.centres_ready.fill_(True)

    def teacher_features(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] un-augmented images -> [B, D] the frozen CLIP's normalised features (through the
        training dropout with ``teacher_dropout``, as the reference's teacher)."""
        with torch.no_grad():
            z = self.clip.visual(images)
            if self.config.teacher_dropout:
                z = self.dropout(z)
            return F.normalize(z.float(), dim=-1)

    def train_transform(self, augment: Callable[[Any], torch.Tensor], preprocess: Any) -> Callable[[Any], torch.Tensor]:
        """``views`` augmentations and the un-augmented image: [views + 1, 3, S, S] per image."""
        return MultiView(augment, self.config.views, extra=(build_resize_transform(preprocess),))

    # -- training
    def compute_loss(
        self, inputs: torch.Tensor, labels: torch.Tensor, tokens: torch.Tensor, *, are_features: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if are_features:
            raise ValueError(f"{self.name} changes the image graph; it trains on images, not cached features")
        if inputs.dim() != 5 or inputs.shape[1] != self.config.views + 1:
            raise ValueError(f"{self.name} trains on [B, views + 1, 3, H, W] (its train_transform), got {tuple(inputs.shape)}")
        if self._teacher is None:
            raise ValueError(f"{self.name}: on_train_start must run before the first step (it builds the centres)")
        cfg = self.config
        batch, views = inputs.shape[0], cfg.views
        augmented = inputs[:, :views].transpose(0, 1).reshape(views * batch, *inputs.shape[2:])  # view-major
        z = self.teacher_features(inputs[:, views]).repeat(views, 1)
        f = F.normalize(self.encode_image(augmented), dim=-1)
        t = self.class_embeddings(tokens)
        logits = self.logit_scale() * f @ t.t().to(f.dtype)
        loss = (F.cross_entropy(logits, labels.repeat(views))
                + cfg.text_weight * F.l1_loss(t.float(), self._teacher.to(t.device))
                + cfg.image_weight * F.l1_loss(f.float(), z))
        return loss, logits[:batch]  # the first view of each image, for the loop's accuracy

    # -- the epoch average
    def on_epoch_end(self, epoch: int, epochs: int) -> None:
        if self.config.average_epochs:
            self._average.add(self.learned_state(), 1.0 / epochs)

    def training_state(self) -> dict[str, torch.Tensor]:
        return {"centres_ready": self.centres_ready.clone(), **self._average.state()}

    def load_training_state(self, state: Mapping[str, torch.Tensor]) -> None:
        state = dict(state)
        ready = state.pop("centres_ready", None)
        if ready is not None:
            self.centres_ready.copy_(ready)
        self._average.load(state, self.learned_state(), self.name)

    def final_learned_state(self) -> dict[str, torch.Tensor]:
        """The uniform epoch average (loaded into the method too, as the reference does)."""
        return self._average.apply(self)
