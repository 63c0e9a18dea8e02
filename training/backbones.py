"""Frozen CLIP backbones from one spec string.

Spec forms:
    ``MODEL:TAG``            an open_clip architecture with its pretrained tag (``ViT-B-16:openai``);
                             open_clip downloads the weights, so this needs internet or a warm cache.
    ``MODEL:/path/weights``  an open_clip architecture with a local ``.safetensors`` file, or a
                             ``.pt``/``.bin``/``.pth`` state dict read with ``weights_only=True``.
    ``hf-hub:ORG/REPO``      an open_clip model published on the Hugging Face Hub (its
                             ``open_clip_config.json`` and weights), read from the local Hugging
                             Face cache when it holds them (offline: ``HF_HUB_OFFLINE=1``).
    ``local-dir:/path``      the same files in a local directory (open_clip's ``local-dir:``).
    ``NAME``                 a project backbone registered with :func:`register_backbone`
                             (``test-tiny``: a tiny random ViT CLIP for tests) or an alias of one
                             (``emoji-vit-s`` = the latest ``emoji-vit-s-vN``); runs record the
                             resolved name, so a new version never changes a finished run.

Every backbone carries its preprocessing (size, mean, std, interpolation, resize mode) and its
tokenizer, so nothing downstream guesses them.
"""
from __future__ import annotations

import contextlib
import difflib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import open_clip
import torch
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

from exports.preprocess import PreprocessConfig

logger = logging.getLogger(__name__)

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


class BackboneError(ValueError):
    """A backbone spec that cannot be resolved; the message names the alternatives."""


@dataclass
class Backbone:
    """A frozen CLIP with everything needed to feed it.

    Attributes:
        spec: the spec string it was created from (stored in runs and manifests).
        model: the open_clip ``CLIP`` module, in eval mode with gradients off.
        tokenizer: open_clip's tokenizer (callable: list of str -> LongTensor [N, context_length]).
        preprocess: the eval-time image preprocessing the model was trained with.
    """

    spec: str
    model: CLIP
    tokenizer: open_clip.tokenizer.SimpleTokenizer
    preprocess: PreprocessConfig

    @property
    def embed_dim(self) -> int:
        return int(self.model.text_projection.shape[1])

    @property
    def context_length(self) -> int:
        return int(self.model.context_length)

    @property
    def eot_token_id(self) -> int:
        return int(self.tokenizer.eot_token_id)

    @property
    def sot_token_id(self) -> int:
        return int(self.tokenizer.sot_token_id)


_PROJECT_BACKBONES: dict[str, tuple[Callable[[], Backbone], str]] = {}


def register_backbone(name: str, description: str) -> Callable[[Callable[[], Backbone]], Callable[[], Backbone]]:
    """Decorator registering a named project backbone builder (no arguments, returns a Backbone)."""

    def deco(fn: Callable[[], Backbone]) -> Callable[[], Backbone]:
        if name in _PROJECT_BACKBONES:
            raise ValueError(f"backbone {name!r} is already registered")
        _PROJECT_BACKBONES[name] = (fn, description)
        return fn

    return deco


_ALIASES: dict[str, tuple[str, str]] = {}  # alias -> (target now, target of runs recorded before versioning)


def register_backbone_alias(alias: str, target: str, recorded_as: str | None = None) -> None:
    """Make ``alias`` name the registered backbone ``target`` (e.g. the latest version of a family).

    Runs and manifests record the target, never the alias, so a later change of what the alias means
    cannot swap the weights under a finished run. ``recorded_as`` is the backbone that runs which
    recorded the bare alias (written before it was versioned) were trained on.
    """
    if alias in _PROJECT_BACKBONES:
        raise ValueError(f"{alias!r} is already a registered backbone")
    _ALIASES[alias] = (target, recorded_as or target)


def resolve_backbone_spec(spec: str) -> str:
    """The spec a new run records: aliases resolved to the backbone they name today."""
    spec = spec.strip()
    _register_builtin()
    return _ALIASES[spec][0] if spec in _ALIASES else spec


def recorded_backbone_spec(spec: str) -> str:
    """The backbone a run or manifest that recorded ``spec`` was built with (a bare alias in a record
    written before versioning means the version it named then)."""
    spec = spec.strip()
    _register_builtin()
    return _ALIASES[spec][1] if spec in _ALIASES else spec


def _register_builtin() -> None:
    """Import the modules that register the project's own backbones (lazily: they import more)."""
    import training.benchmark.emoji_backbone  # noqa: F401  (registers "emoji-vit-s")


def list_backbones() -> list[tuple[str, str]]:
    """Named project backbones with a one-line description."""
    _register_builtin()
    named = [(name, desc) for name, (_, desc) in _PROJECT_BACKBONES.items()]
    named += [(alias, f"= {target} (the latest version)") for alias, (target, _) in _ALIASES.items()]
    return sorted(named)


def _freeze(model: CLIP) -> CLIP:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def build_clip(embed_dim: int, vision: dict, text: dict, seed: int = 0) -> CLIP:
    """An open_clip ``CLIP`` with a deterministic random initialisation."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CLIP(embed_dim=embed_dim, vision_cfg=CLIPVisionCfg(**vision), text_cfg=CLIPTextCfg(**text))


@register_backbone("test-tiny", "tiny random-initialised ViT CLIP (32 px, 2+2 layers) for tests")
def _test_tiny() -> Backbone:
    model = build_clip(
        embed_dim=32,
        vision=dict(image_size=32, patch_size=8, width=64, layers=2, head_width=32),
        text=dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=2),
    )
    pre = PreprocessConfig(image_size=32, mean=OPENAI_MEAN, std=OPENAI_STD)
    return Backbone("test-tiny", _freeze(model), open_clip.get_tokenizer("ViT-B-16"), pre)


def _alternatives() -> str:
    named = ", ".join(name for name, _ in list_backbones())
    return (
        f"named backbones: {named}; or MODEL:TAG for an open_clip model with a pretrained tag "
        f"(needs internet), e.g. ViT-B-16:openai; or MODEL:/path/to/weights.safetensors; or hf-hub:ORG/REPO "
        f"(from the local Hugging Face cache) or local-dir:/path (open_clip_config.json + weights)"
    )


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # TorchScript archives and pickles with code land here
            raise BackboneError(
                f"cannot read {path} as a plain state dict with weights_only=True ({e.__class__.__name__}: {e}); "
                "convert it to .safetensors, or use MODEL:TAG"
            ) from e
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise BackboneError(f"{path} does not hold a state dict")
    return {k.removeprefix("module."): v for k, v in state.items()}


class _DropRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()


@contextlib.contextmanager
def _no_random_init_warning() -> Iterator[None]:
    """open_clip warns "Model initialized randomly" (on the root logger) when it builds a model without
    weights, which is how a weights file is loaded here: silence that one message while it builds."""
    root, drop = logging.getLogger(), _DropRandomInitWarning()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


def _open_clip_backbone(spec: str, model_name: str, source: str) -> Backbone:
    known = open_clip.list_models()
    if model_name not in known:
        close = difflib.get_close_matches(model_name, known, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise BackboneError(f"unknown open_clip model {model_name!r} in backbone spec {spec!r}.{hint} ({_alternatives()})")
    is_path = source.endswith(WEIGHT_SUFFIXES) or "/" in source or source.startswith(".")
    if is_path:
        path = Path(source).expanduser()
        if not path.is_file():
            raise BackboneError(f"weights file not found: {path} (backbone spec {spec!r}; {_alternatives()})")
        with _no_random_init_warning():  # the file's weights are loaded right after
            model = open_clip.create_model(model_name, pretrained=None)
        state = _load_state_dict(path)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise BackboneError(
                f"{path} does not match open_clip {model_name}: {len(missing)} missing keys "
                f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
            )
    else:
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        if source not in tags:
            raise BackboneError(f"unknown pretrained tag {source!r} for {model_name}; known tags: {', '.join(tags) or 'none'}")
        try:
            model = open_clip.create_model(model_name, pretrained=source)
        except Exception as e:  # offline hub, missing cache, partial download
            raise BackboneError(
                f"could not load {model_name} weights {source!r} ({e.__class__.__name__}: {e}). "
                f"This machine may be offline. Alternatives: {_alternatives()}"
            ) from e
    return _open_clip_wrapped(spec, model, open_clip.get_tokenizer(model_name))


def _open_clip_wrapped(spec: str, model: CLIP, tokenizer: Callable) -> Backbone:
    """An open_clip model as a frozen fp32 :class:`Backbone` with the preprocessing its config names."""
    return _open_clip_wrapped(spec, model, tokenizer)


SCHEMAS = ("hf-hub:", "local-dir:")  # open_clip's: config and weights come from the repository / directory


def _schema_backbone(spec: str) -> Backbone:
    """``hf-hub:ORG/REPO`` or ``local-dir:/path``: open_clip reads the model's config and weights there."""
    if spec.startswith("local-dir:") and not (Path(spec.removeprefix("local-dir:")).expanduser() / "open_clip_config.json").is_file():
        raise BackboneError(f"{spec}: no open_clip_config.json in that directory (a local-dir: backbone holds "
                            "open_clip_config.json and open_clip_model.safetensors)")
    try:
        model = open_clip.create_model(spec, require_pretrained=True)
        tokenizer = open_clip.get_tokenizer(spec)
    except Exception as e:  # not in the cache while offline, a broken config, weights that do not fit
        where = ("the local Hugging Face cache (HF_HUB_CACHE, default ~/.cache/huggingface/hub) must hold it "
                 "when this machine is offline; set HF_HUB_OFFLINE=1 to read only the cache"
                 if spec.startswith("hf-hub:") else "check the directory's config and weights")
        raise BackboneError(f"could not load {spec} ({e.__class__.__name__}: {str(e)[:300]}); {where}") from e
    model = model.float()
    pre = PreprocessConfig.from_open_clip(open_clip.get_model_preprocess_cfg(model))
    return Backbone(spec, _freeze(model), tokenizer, pre)


def create_backbone(spec: str) -> Backbone:
    """Resolve a backbone spec (see module docstring) to a frozen :class:`Backbone` on CPU."""
    spec = resolve_backbone_spec(spec)
    if spec in _PROJECT_BACKBONES:
        return _PROJECT_BACKBONES[spec][0]()
    if spec.startswith(SCHEMAS):
        return _schema_backbone(spec)
    if ":" not in spec:
        close = difflib.get_close_matches(spec, [*_PROJECT_BACKBONES, *_ALIASES], n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        model = spec.replace("/", "-")
        if model in open_clip.list_models():  # OpenAI's spelling ("ViT-B/32"), or an open_clip model without weights
            why = "open_clip writes OpenAI's 'ViT-B/32' as 'ViT-B-32'; " if "/" in spec else ""
            hint = f" Did you mean {model}:openai? ({why}the weights follow the ':': a pretrained tag or a file)"
        raise BackboneError(f"unknown backbone {spec!r}.{hint} ({_alternatives()})")
    model_name, source = spec.split(":", 1)
    return _open_clip_backbone(spec, model_name, source)
