"""The prompt-method protocol and registry.

A method is one small module: a frozen, typed config dataclass and a :class:`PromptMethod`
subclass, registered under an explicit lowercase name with :func:`register_method`. The trainer,
evaluator and exporter only talk to this protocol and read the declared :class:`Capabilities`;
nothing anywhere branches on a method's name.
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Literal, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from exports.prompts import DESCRIPTION_TEMPLATE, ClassDescriptions, DescriptionLayout, prompt_rows
from training.backbones import Backbone
from training.config import check_types
from training.prompts.text import trim_tokens


@dataclass(frozen=True)
class Capabilities:
    """What a method is, declared by the method itself.

    Attributes:
        changes_image_graph: learned tensors enter the image encoder (visual prompts), so the image
            graph differs from the backbone's and image features cannot be cached across training.
        text_depends_on_image: class embeddings are a function of the image (CoCoOp); they cannot
            be computed once per class list.
        base_novel_switch: the method treats names it was trained on differently from new ones.
        needs_class_descriptions: class descriptions (not just names) are needed at test time.
        open_vocabulary: the learned state applies to class names never seen in training.
        trainable: the method has tensors to learn (zero-shot CLIP has none).
    """

    changes_image_graph: bool = False
    text_depends_on_image: bool = False
    base_novel_switch: bool = False
    needs_class_descriptions: bool = False
    open_vocabulary: bool = True
    trainable: bool = True

    def to_dict(self) -> dict[str, bool]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Stage:
    """One stage of a method's training recipe (:meth:`PromptMethod.stages`).

    Attributes:
        name: shown in the log and recorded in the checkpoint's metadata.
        share: the stage's fraction of the run's epochs (the shares of a recipe sum to 1; rounding
            gives the last stage the rest).
        warmup: whether the stage starts with the constant warm-up (then its own cosine).
    """

    name: str = "train"
    share: float = 1.0
    warmup: bool = True
    track: str = ""

    def __post_init__(self) -> None:
        if not 0.0 < self.share <= 1.0:
            raise ValueError(f"stage {self.name!r}: share must be in (0, 1], got {self.share}")
        if "/" in self.track or "@" in self.track or self.track.startswith("#"):
            raise ValueError(f"stage {self.name!r}: a track name holds no '/' or '@' and does not start with '#' "
                             f"(the keys of stages without a track), got {self.track!r}")


@dataclass(frozen=True)
class PlannedStage:
    """A stage placed on the epochs of a run (:func:`stage_plan`).

    Attributes:
        stage: the stage.
        first: the run's epoch (0-based) the stage starts at.
        epochs: how many epochs it runs.
        track: the key of its optimizer and schedule (the stage's ``track``, or ``#i`` for the i-th
            stage when it names none: then the stage is a track of its own).
        track_first: how many epochs of its track ran before the stage starts.
        track_epochs: the track's epochs in the whole run (the length of its cosine schedule).
    """

    stage: Stage
    first: int
    epochs: int
    track: str
    track_first: int
    track_epochs: int

    def __iter__(self):  # (stage, first, epochs), the plan's earlier tuple form
        return iter((self.stage, self.first, self.epochs))


def stage_plan(epochs: int, stages: Sequence[Stage]) -> list[PlannedStage]:
    """The stages placed on ``epochs``: each ends at its cumulative share rounded, the last the rest.

    Stages that name the same ``track`` (TAP's alternating vision and text phases) share one optimizer
    and one schedule, counted over the track's epochs across the run; a stage naming none is a track
    of its own (a fresh optimizer and schedule, the default).

    Raises:
        ValueError: no stage, shares that do not sum to 1, or a stage left with no epoch.
    """
    if not stages:
        raise ValueError("a method needs at least one training stage")
    if abs(sum(st.share for st in stages) - 1.0) > 1e-6:
        raise ValueError(f"stage shares must sum to 1, got {[st.share for st in stages]}")
    spans, start, cumulative = [], 0, 0.0
    for i, st in enumerate(stages):
        cumulative += st.share
        # stage ends at the rounded cumulative share, so rounding errors do not pile up on the last stage
        n = epochs - start if i == len(stages) - 1 else round(epochs * cumulative) - start
        if n < 1 and epochs > 0:
            raise ValueError(f"stage {st.name!r} (#{i + 1} of {len(stages)}) gets no epoch of {epochs}; train for "
                             "more epochs, or change the method's options that set its stages")
        spans.append((st, start, n, st.track or f"#{i}"))
        start += n
    total: dict[str, int] = {}
    for _, _, n, track in spans:
        total[track] = total.get(track, 0) + n
    plan, done = [], {}
    for st, first, n, track in spans:
        plan.append(PlannedStage(st, first, n, track, done.get(track, 0), total[track]))
        done[track] = done.get(track, 0) + n
    return plan


def track_epoch(plan: Sequence[PlannedStage], epoch: int) -> tuple[PlannedStage, int]:
    """The planned stage the run's ``epoch`` (0-based) belongs to, and the epoch's index in its track."""
    for p in plan:
        if p.first <= epoch < p.first + p.epochs:
            return p, p.track_first + epoch - p.first
    raise ValueError(f"epoch {epoch} is outside the plan of {sum(p.epochs for p in plan)} epochs")


IMAGE_EMBEDDINGS = "image_embeddings"
CLASS_EMBEDDINGS = "class_embeddings"


@dataclass(frozen=True)
class Head:
    """One term of the logits: ``weight * logit_scale * cos(image output, text output)``.

    ``base_weight`` applies to class names the method treats as base (by default the names it was
    trained on), ``novel_weight`` to the others; :mod:`exports.scoring` reads the same fields.
    """

    image: str = IMAGE_EMBEDDINGS
    text: str = CLASS_EMBEDDINGS
    base_weight: float = 1.0
    novel_weight: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class GraphSignature:
    """What a method's two graphs output and how the outputs become logits.

    Attributes:
        image_outputs: names of :meth:`PromptMethod.image_outputs`, main one first.
        text_outputs: names of :meth:`PromptMethod.text_outputs`, main one first (an
            image-conditioned method has the single output ``logits``).
        heads: the terms of the logits (none for image-conditioned methods, whose text graph
            returns the logits).
        scored: an image-conditioned method whose class outputs do not depend on the image (SurPL):
            ``text_outputs`` are those class outputs (cached per name like class embeddings), and
            a third graph, :meth:`PromptMethod.score_outputs`, turns image and class outputs into
            the logits; no heads.
        whole_class_list: scored only: a class's logit depends on the other classes of the request
            (CPR's head attends over every class feature), so the score graph runs on all the
            request's names at once instead of in blocks of names.
    """

    image_outputs: tuple[str, ...] = (IMAGE_EMBEDDINGS,)
    text_outputs: tuple[str, ...] = (CLASS_EMBEDDINGS,)
    heads: tuple[Head, ...] = (Head(),)
    scored: bool = False
    whole_class_list: bool = False

    def __post_init__(self) -> None:
        if self.whole_class_list and not self.scored:
            raise ValueError("whole_class_list is a property of a score graph: declare scored=True")
        if self.scored and self.heads:
            raise ValueError("a scored signature has no heads: its score graph returns the logits")
        if len(set(self.image_outputs) | set(self.text_outputs)) != len(self.image_outputs) + len(self.text_outputs):
            raise ValueError("image and text output names must be distinct")
        for i, h in enumerate(self.heads):
            if h.image not in self.image_outputs or h.text not in self.text_outputs:
                raise ValueError(f"head {i} uses {h.image!r} / {h.text!r}, which are not declared outputs")
            if min(h.base_weight, h.novel_weight) < 0:
                raise ValueError(f"head {i}: weights must be >= 0")

    @property
    def switch(self) -> bool:
        """Whether base and novel names are scored differently (``Capabilities.base_novel_switch``)."""
        return any(h.base_weight != h.novel_weight for h in self.heads)


@dataclass(frozen=True)
class MethodConfig:
    """Base of every method config: frozen, typed, validated in ``__post_init__``."""

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "MethodConfig":
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown option(s) {unknown}; known: {sorted(names)}")
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        check_types(cls, kwargs)
        return cls(**kwargs)


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


class PromptMethod(nn.Module):
    """A frozen CLIP plus a method's learned tensors.

    Subclasses set ``config_cls`` and implement :meth:`encode_text` (and :meth:`encode_image` if
    they change the image graph). Class names are not part of the learned state: they are
    tokenized through :meth:`prompt_templates` whenever embeddings are needed.

    Args:
        backbone: the frozen CLIP; its parameters stay frozen.
        config: the method's config.
        train_classnames: class names of the training set. Only methods whose state is tied to
            them (class-specific context, knowledge-guided losses) use them.
    """

    name: ClassVar[str] = ""
    config_cls: ClassVar[type[MethodConfig]] = MethodConfig
    #: training hyper-parameters of the reference config (epochs, batch_size, lr, ...)
    train_defaults: ClassVar[dict[str, Any]] = {}
    #: the published base-to-novel average (Base, Novel, HM) over the 11 standard datasets with CLIP
    #: ViT-B/16, 16 shots, and where it comes from; None where no number is published (or verified)
    published_b2n: ClassVar[tuple[float, float, float] | None] = None
    published_source: ClassVar[str] = ""
    #: what the loop feeds :meth:`backward_step`: few-shot "images" (with labels), or "texts"
    #: (pairs from :meth:`training_texts`; ProText trains on class descriptions alone)
    training_data: ClassVar[Literal["images", "texts"]] = "images"
    #: the method trains on class descriptions (``--descriptions``; :meth:`use_descriptions`)
    needs_train_descriptions: ClassVar[bool] = False
    #: the kind of descriptions it reads: "sentences" per class (CuPL's format) or "attributes", an
    #: attribute tree per class (TAP's); see :mod:`exports.prompts`
    description_kind: ClassVar[Literal["sentences", "attributes"]] = "sentences"


    @classmethod
    def options_for_dataset(cls, dataset: str) -> dict[str, Any]:
        """Method options the reference sets per dataset (a hand-written template on the 11 standard
        datasets); the caller's options win over them. Most methods have none."""
        return {}

    @classmethod
    def options_for_descriptions(cls, config: MethodConfig, descriptions: Mapping[str, ClassDescriptions]) -> dict[str, Any]:
        """Method options the training classes' descriptions decide when ``config`` leaves them open
        (TAP: its attributes and sentences per attribute); the caller's options win. Most have none."""
        return {}

    @classmethod
    def published_b2n_for(cls, config: MethodConfig) -> tuple[float, float, float] | None:
        """The published average under ``config`` (default ``published_b2n``; a plug-in's per host)."""
        return cls.published_b2n

    @classmethod
    def train_defaults_for(cls, config: MethodConfig) -> dict[str, Any]:
        """The reference training hyper-parameters under ``config`` (default ``train_defaults``); a
        plug-in whose reference trains differently per host (DeKg on TCP: Adam, batch 32) overrides it."""
        return dict(cls.train_defaults)

    @classmethod
    def reference_epochs(cls, config: MethodConfig, n_images: int, shots: int, batch_size: int) -> int | None:
        """Epochs of the reference schedule when it is counted in steps tied to the data (2SFS: 300
        steps per shot), for a few-shot set of ``n_images`` at ``batch_size``; None (default): the
        ``epochs`` of :meth:`train_defaults_for`. Used when the caller gives no epochs."""
        return None

    @classmethod
    def options_for_epochs(cls, config: MethodConfig, epochs: int) -> dict[str, Any]:
        """Method options to change when training ``epochs`` instead of the reference's epochs.

        For options counted in epochs (PromptSRC's aggregation window); most methods have none.
        """
        return {}

    def __init__(self, backbone: Backbone, config: MethodConfig, train_classnames: Sequence[str]):
        super().__init__()
        if not isinstance(config, self.config_cls):
            raise TypeError(f"{type(self).__name__} needs a {self.config_cls.__name__}, got {type(config).__name__}")
        self.backbone = backbone
        self.config = config
        self.train_classnames = tuple(train_classnames)
        self.clip = backbone.model
        for p in self.clip.parameters():
            p.requires_grad_(False)
        self.descriptions: dict[str, Any] = {}

    def use_descriptions(self, descriptions: Mapping[str, ClassDescriptions]) -> None:
        """Class descriptions (``{class name: [sentence, ...]}``, or attribute trees for a method whose
        ``description_kind`` is "attributes") of the training classes, for training (test-time
        descriptions go with the class names to :meth:`tokenize` instead).

        Only the training classes' descriptions are kept; a method that needs them checks coverage
        when it builds its training data.
        """
        keep = set(self.train_classnames)
        self.descriptions = {k: ({a: list(d) for a, d in v.items()} if isinstance(v, Mapping) else list(v))
                             for k, v in descriptions.items() if k in keep}

    def every_training_description(self, purpose: str) -> list[list[str]]:
        """Each training class's descriptions, in training-class order, for a method that needs all of
        them (``purpose``: TAC clusters them, CPR builds its text prototypes); a class without any is
        a ValueError naming it."""
        missing = [c for c in self.train_classnames if not self.descriptions.get(c)]
        if missing:
            raise ValueError(f"{self.name} {purpose}; no descriptions for {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        return [self.descriptions[c] for c in self.train_classnames]

    def training_texts(self) -> torch.utils.data.Dataset:
        """For ``training_data == "texts"``: a dataset of ``(inputs, targets)`` tensor pairs the loop
        batches and hands to :meth:`backward_step` in place of images and labels."""
        raise NotImplementedError(f"{self.name} trains on images")

    # -- declared properties -------------------------------------------------------------------
    @classmethod
    def capabilities_for(cls, config: MethodConfig) -> Capabilities:
        """Capabilities of this method under ``config`` (override when a config option changes them)."""
        return Capabilities()

    @property
    def capabilities(self) -> Capabilities:
        return self.capabilities_for(self.config)

    def prompt_templates(self) -> list[str]:
        """Templates with one ``{}`` for the class name; embeddings are averaged over them."""
        return ["{}"]

    def lookahead(self) -> int:
        """How many positions past a prompt's end of text can reach its feature (0 for CLIP's causal
        text tower); :meth:`tokenize` keeps that much padding after the longest prompt (LwEIB's
        token convolutions look ahead)."""
        return 0

    def description_template(self) -> str:
        """For a method that embeds classes from descriptions: how one becomes a prompt (``{description}``
        and optionally ``{name}``; :func:`exports.prompts.prompt_rows`). Default: the sentence itself."""
        return DESCRIPTION_TEMPLATE

    def description_layout(self) -> DescriptionLayout | None:
        """For a method that reads attribute trees: which attributes, how many sentences of each
        (:class:`exports.prompts.DescriptionLayout`, the rows :meth:`tokenize` lays out). None: sentences."""
        return None

    def export_refusal(self) -> str | None:
        """Why this method, as configured, cannot become an artifact (None: it can). For a behaviour the
        two graphs cannot hold, e.g. a forward that rewrites the learned state (HiCroPL's coded prompt
        update), so that no fixed graph gives what the method gives."""
        return None

    def graph_signature(self) -> GraphSignature:
        """The graphs' outputs and heads (default: one image and one class embedding, one head).

        A method with several heads or a base/novel switch overrides this together with
        :meth:`image_outputs` / :meth:`text_outputs`, and declares ``base_novel_switch``.
        """
        if self.capabilities.text_depends_on_image:
            return GraphSignature(text_outputs=("logits",), heads=())
        return GraphSignature()

    def image_outputs(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """[B, 3, H, W] pixels -> ``{name: [B, D] L2-normalised}`` for every declared image output (an
        output an image-conditioned text graph reads may be ``[B, K, D]`` tokens, SurPL's)."""
        return {IMAGE_EMBEDDINGS: F.normalize(self.encode_image(images), dim=-1)}

    def text_outputs(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """[T, C, L] tokens -> ``{name: [C, D] L2-normalised}`` for every declared text output (for a
        scored signature: whatever ``[C, D]`` class outputs its score graph reads)."""
        return {CLASS_EMBEDDINGS: self.class_embeddings(tokens)}

    # -- encoders --------------------------------------------------------------------------------
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] preprocessed pixels -> [B, D] (not normalised)."""
        return self.clip.visual(images)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """[C, L] token ids of templated class names -> [C, D] (not normalised)."""
        raise NotImplementedError

    def tokenize(self, classnames: Sequence[str], descriptions: Mapping[str, ClassDescriptions] | None = None) -> torch.Tensor:
        """[T, C, L'] token ids: every template filled with every class name.

        For a method that needs class descriptions (``capabilities.needs_class_descriptions``) the
        rows are each class's own prompts instead, templates then ``descriptions``, padded with the
        empty prompt (:func:`exports.prompts.prompt_rows`, the layout the runtime uses too).

        Padding after the longest prompt is trimmed (exact for the causal text tower, and several
        times cheaper); exported graphs still take the full context length.
        """
        if self.capabilities.needs_class_descriptions:
            if descriptions is None:
                raise ValueError(f"{self.name} embeds classes from their descriptions: pass descriptions for "
                                 f"{len(classnames)} class names")
            rows = prompt_rows(self.prompt_templates(), classnames, descriptions, self.description_template(),
                               self.description_layout())
        else:
            rows = prompt_rows(self.prompt_templates(), classnames)
        tokens = torch.stack([self.backbone.tokenizer(r) for r in rows])
        return trim_tokens(tokens, self.backbone.eot_token_id, self.lookahead())

    def class_features(self, tokens: torch.Tensor) -> torch.Tensor:
        """[T, C, L] tokens -> [C, D] class features before normalisation, for a loss that needs them
        (DeKg_TCP's HSIC). Defined for one prompt per class; a method whose class embedding is not the
        normalised text feature of one prompt (TCP) overrides it."""
        if tokens.shape[0] != 1:
            raise ValueError(f"{self.name} averages {tokens.shape[0]} templates: its class features are only normalised")
        return self.encode_text(tokens[0])

    def class_embeddings(self, tokens: torch.Tensor) -> torch.Tensor:
        """[T, C, L] tokens -> [C, D] L2-normalised, averaged over templates (open_clip's recipe)."""
        feats = torch.stack([F.normalize(self.encode_text(t), dim=-1) for t in tokens])
        return F.normalize(feats.mean(dim=0), dim=-1)

    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale.exp()

    def logits_from_features(self, image_features: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Logits [B, C] from image features [B, D] (not normalised) and class tokens [T, C, L]."""
        image_feats = F.normalize(image_features, dim=-1)
        text_feats = self.class_embeddings(tokens)
        return self.logit_scale() * image_feats @ text_feats.t()

    def logits_from_outputs(self, image_outputs: Mapping[str, torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
        """Logits [B, C] from every declared image output (:meth:`image_outputs`) and class tokens: the
        image-conditioned text graph of a ``text_depends_on_image`` method takes all of them. Default:
        :meth:`score_outputs` on :meth:`text_outputs` for a scored signature (SurPL), else
        :meth:`logits_from_features` on the main output (CoCoOp)."""
        sig = self.graph_signature()
        if sig.scored:
            return self.score_outputs(image_outputs, self.text_outputs(tokens))
        return self.logits_from_features(image_outputs[sig.image_outputs[0]], tokens)

    def score_outputs(self, image_outputs: Mapping[str, torch.Tensor], class_outputs: Mapping[str, torch.Tensor]
                      ) -> torch.Tensor:
        """For a scored signature: logits [B, C] from the image outputs and the (image-independent)
        class outputs of :meth:`text_outputs`; the artifact's third graph."""
        raise NotImplementedError(f"{self.name} has no score graph")

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Logits [B, C] of images against the classes whose templated tokens are [T, C, L]."""
        return self.logits_from_features(self.encode_image(images), tokens)

    def compute_loss(
        self, inputs: torch.Tensor, labels: torch.Tensor, tokens: torch.Tensor, *, are_features: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Training loss and logits for one batch; methods add their regularisers here.

        ``inputs`` are images, or cached image features when ``are_features`` (only offered to
        methods that do not change the image graph); for ``training_data == "texts"`` they and
        ``labels`` are the two tensors of a :meth:`training_texts` batch, and the logits may be
        None (no accuracy to report).
        """
        feats = inputs if are_features else self.encode_image(inputs)
        logits = self.logits_from_features(feats, tokens)
        return F.cross_entropy(logits, labels), logits

    def backward_step(
        self,
        inputs: torch.Tensor,
        labels: torch.Tensor,
        tokens: torch.Tensor,
        *,
        are_features: bool,
        scaler: torch.amp.GradScaler,
        amp: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss and logits of one batch, with gradients accumulated into the learned tensors.

        The loop zeroes gradients before and steps the optimizer after. The default is
        ``compute_loss`` under autocast (forward only) + a scaled backward; methods that edit
        gradients (ProGrad) override this.
        """
        with torch.autocast(inputs.device.type, dtype=torch.float16, enabled=amp):
            loss, logits = self.compute_loss(inputs, labels, tokens, are_features=are_features)
        scaler.scale(loss).backward()
        return loss, logits

    def on_epoch_end(self, epoch: int, epochs: int) -> None:
        """Called after each finished epoch (1-based), before the checkpoint is written."""

    def training_state(self) -> dict[str, torch.Tensor]:
        """Extra tensors a resumed run needs besides the learned ones (e.g. running aggregates)."""
        return {}

    def load_training_state(self, state: Mapping[str, torch.Tensor]) -> None:
        if state:
            raise ValueError(f"{self.name} keeps no training state, got {sorted(state)}")

    def final_learned_state(self) -> dict[str, torch.Tensor]:
        """The learned tensors a finished run keeps (PromptSRC: its Gaussian-weighted aggregate)."""
        return self.learned_state()

    # -- learned state ---------------------------------------------------------------------------
    def register_learned_buffer(self, name: str, tensor: torch.Tensor) -> None:
        """A tensor that is part of the learned state without being trained (a stage-1 prompt, a
        concept cache, cluster centres): saved in checkpoints and artifacts, loaded back, never
        handed to the optimizer."""
        self.register_buffer(name, tensor)
        self._learned_buffers = getattr(self, "_learned_buffers", ()) + (name,)

    def _learned_tensors(self) -> dict[str, torch.Tensor]:
        declared = getattr(self, "_learned_params", None)
        out = {n: p for n, p in self.named_parameters() if (p.requires_grad if declared is None else n in declared)}
        buffers = dict(self.named_buffers())
        out.update({n: buffers[n] for n in getattr(self, "_learned_buffers", ())})
        return out

    def learned_state(self) -> dict[str, torch.Tensor]:
        """Only the tensors the method learns (what a checkpoint holds): trainable parameters and learned buffers."""
        return {n: t.detach() for n, t in self._learned_tensors().items()}

    def load_learned_state(self, state: Mapping[str, torch.Tensor]) -> None:
        tensors = self._learned_tensors()
        missing, unexpected = sorted(set(tensors) - set(state)), sorted(set(state) - set(tensors))
        if missing or unexpected:
            raise ValueError(f"learned state does not fit {self.name}: missing {missing}, unexpected {unexpected}")
        with torch.no_grad():
            for n, t in state.items():
                if tensors[n].shape != t.shape:
                    raise ValueError(f"learned tensor {n!r} has shape {tuple(t.shape)}, expected {tuple(tensors[n].shape)}")
                tensors[n].copy_(t)

    # -- training hooks --------------------------------------------------------------------------
    #: the method's training starts from a finished run of another method (``--init-run``; DPC's stage 2)
    needs_init_run: ClassVar[bool] = False

    def init_from(self, other: "PromptMethod") -> None:
        """Take what the method starts from out of ``other``, the trained method of the ``--init-run``."""
        raise ValueError(f"{self.name} does not start from another run")

    def train_transform(self, augment: Callable[[Any], torch.Tensor], preprocess: Any) -> Callable[[Any], torch.Tensor]:
        """The per-image transform of the training set, given the loop's augmentation ``augment`` (PIL
        image -> [3, S, S]) and the backbone's preprocessing; what it returns reaches
        :meth:`compute_loss` as ``inputs``, batched. Default: ``augment`` itself. TAC stacks several
        augmented views and the un-augmented image (:class:`training.data.transforms.MultiView`)."""
        return augment

    def on_train_start(self, train_set: Any) -> None:
        """Called by the loop once before the first (or resumed) epoch with the training dataset
        (methods that draw extra samples from it: DPC's hard negatives)."""

    def stages(self) -> tuple[Stage, ...]:
        """The training recipe's stages, in order (default: one). Each gets its share of the epochs,
        its own optimizer and schedule, or its track's when stages share a ``track`` (:func:`stage_plan`);
        :meth:`begin_stage` switches what trains. Checkpoints record the stage and every track's
        optimizer state, and a killed run resumes inside it."""
        return (Stage(),)

    def begin_stage(self, stage: Stage) -> None:
        """Called before a stage's first epoch, and when a run resumes inside it: set ``requires_grad``
        on what this stage trains. The learned state stays what :meth:`declare_learned` fixed."""

    def declare_learned(self) -> None:
        """Fix the learned state to the tensors trainable now (call at the end of ``__init__``), so a
        stage that freezes some of them keeps them in checkpoints and artifacts."""
        self._learned_params = tuple(n for n, p in self.named_parameters() if p.requires_grad)

    def param_groups(self) -> list[dict[str, Any]]:
        """The optimizer's parameter groups: ``{"params": [...], "lr_scale": s}`` (default: one group of
        every trainable tensor at the training lr). A group's peak lr is ``lr * lr_scale``; the
        constant warm-up runs every group at ``warmup_lr`` (Dassl's ConstantWarmupScheduler)."""
        return [{"params": [p for p in self.parameters() if p.requires_grad], "lr_scale": 1.0}]

    def train_batches(self, train_set: Any, batch_size: int, generator: torch.Generator) -> list[list[int]] | None:
        """Index batches of one epoch, drawn with ``generator``; None (default) = shuffled batches of
        ``batch_size`` (SkipT draws class-homogeneous ones)."""
        return None


@dataclass(frozen=True)
class MethodSpec:
    name: str
    method_cls: type[PromptMethod]
    config_cls: type[MethodConfig]
    description: str


_REGISTRY: dict[str, MethodSpec] = {}


def register_method(name: str, description: str) -> Callable[[type[PromptMethod]], type[PromptMethod]]:
    """Class decorator: register a method under an explicit lowercase name (duplicates refused)."""
    if name != name.lower() or not name.isidentifier():
        raise ValueError(f"method names are lowercase identifiers, got {name!r}")

    def deco(cls: type[PromptMethod]) -> type[PromptMethod]:
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} is already registered by {_REGISTRY[name].method_cls.__qualname__}")
        cls.name = name
        _REGISTRY[name] = MethodSpec(name, cls, cls.config_cls, description)
        return cls

    return deco


def get_method(name: str) -> MethodSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise KeyError(f"unknown method {name!r}.{hint} Registered: {', '.join(sorted(_REGISTRY))}") from None


def list_methods() -> list[MethodSpec]:
    return [_REGISTRY[n] for n in sorted(_REGISTRY)]


def create_method(name: str, backbone: Backbone, config: MethodConfig | Mapping[str, Any] | None, train_classnames: Sequence[str]) -> PromptMethod:
    """Build a registered method; ``config`` may be a config object, a dict of options, or None (defaults)."""
    spec = get_method(name)
    if config is None:
        config = spec.config_cls()
    elif not isinstance(config, MethodConfig):
        config = spec.config_cls.from_dict(config)
    return spec.method_cls(backbone, config, train_classnames)
