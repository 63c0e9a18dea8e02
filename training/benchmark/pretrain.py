"""Contrastive pretraining of the embedded ``emoji-vit-s`` CLIP on captioned emoji scenes.

    python -m training.benchmark.pretrain --out runs/pretrain-emoji-vit-s --steps 1600 --install v3

Every batch is a pure function of ``(config.seed, step)``: classes are drawn without replacement,
each in a style it may be shown in, inside a scene drawn from a mixture of clean / cluttered /
corrupted presets, with grayscale, outline and invert augmentations against colour reliance, and a
caption from varied templates that name the style. Symbola line art is withheld for the novel
classes of ``emoji-lineart``, so those meet the style for the first time at test time.

A checkpoint (model, optimizer, step, torch RNG, config) is replaced atomically every
``checkpoint_every`` steps; a killed run resumes from it and ends with bit-identical weights.
Progress goes to ``logging`` and ``OUT/log.jsonl``; the result is ``OUT/emoji-vit-s.safetensors``
(fp16) plus ``OUT/report.json`` (curve and zero-shot accuracies).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from exports.preprocess import preprocess_batch
from training.benchmark.emoji_backbone import (
    NAME, TOKENIZER, VERSIONS, EmojiArch, arch_metadata, create_emoji_clip, emoji_preprocess, versioned_name,
    weights_path,
)
from training.benchmark.scenes import SceneConfig, SceneInfo, render_scene, scene_rng
from training.benchmark.suite import BENCHMARKS, novel_codepoints, universe
from training.prompts.text import pool_text_features

logger = logging.getLogger(__name__)

TRAIN_STREAM, PROBE_STREAM = 100, 101
MAX_WEIGHTS_BYTES = 40 * 2**20
ZERO_SHOT_TEMPLATE = "a photo of a {}."
UNIFORM_STYLES = (1.0, 1.0, 1.0)  # style_weights default: each allowed style equally likely
# Run-time knobs that may change between a run and its resumption.
_RUNTIME_FIELDS = frozenset({"threads", "log_every", "checkpoint_every", "eval_every", "final_eval"})

STYLE_WORDS = {
    "noto": ("emoji", "colorful emoji", "glossy emoji", "cartoon"),
    "openmoji": ("emoji", "flat icon", "cartoon", "clip art"),
    "symbola": ("line drawing", "black and white drawing", "sketch", "symbol"),
}
TEMPLATES = (
    "a photo of a {}.", "a drawing of a {}.", "an image of a {}.", "a picture of the {}.", "a {}.", "{}",
    "a small {}.", "a large {}.", "an icon of a {}.", "a close-up of a {}.",
)
STYLED_TEMPLATES = ("a {s} of a {c}.", "a {c} {s}.", "a {s} showing a {c}.", "the {c}, as a {s}.")
AUGMENT_WORDS = {
    "grayscale": ("a black and white image of a {}.", "a grayscale {}."),
    "outline": ("an outline of a {}.", "an edge drawing of a {}."),
    "inverted": ("an inverted image of a {}.", "a negative image of a {}."),
    "blurred": ("a blurry image of a {}.", "a low quality picture of a {}."),
    "distractors": ("a {} among other emoji.", "a {} and other things."),
}


@dataclass(frozen=True)
class PretrainConfig:
    """Everything that determines a pretraining run (besides the code and the fonts).

    Attributes:
        seed: seeds the initialisation and every batch (batch ``t`` depends only on ``(seed, t)``).
        steps: optimizer steps; the cosine schedule spans them.
        batch_size: image-caption pairs per step (classes are distinct within a batch).
        lr, weight_decay, warmup_steps: AdamW with linear warm-up then cosine decay to 0;
            no decay on embeddings, gains and biases.
        arch: the model shape (default ``emoji-vit-s``); its ``image_size`` is the scene size.
        scene_mix: weights of the (clean, cluttered, corrupted) scene presets.
        grayscale_p, invert_p, outline_p: augmentations against colour reliance.
        holdout_benchmark: Symbola is never shown for this benchmark's novel classes ("" disables).
        max_classes: train on the first this many classes only (tests); None for all.
        threads: torch intra-op threads.
        log_every, checkpoint_every, eval_every: in steps; eval is zero-shot on held-out scenes.
        eval_per_probe: held-out images per probe (noto, openmoji, symbola seen/unseen, grayscale).
        final_eval: after the last step, zero-shot on every benchmark's test split.
        style_weights: relative odds of the (noto, openmoji, symbola) styles among those allowed for a
            class; (1, 1, 1) = uniform. Raising symbola's weight is a line-art phase.
        init_from: start from these weights (an earlier run's fp16 safetensors) instead of a
            random initialisation: a second, longer phase with a fresh schedule and new scenes
            (give it another seed). "" = random init.
    """

    seed: int = 0
    steps: int = 1500
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 100
    arch: EmojiArch = EmojiArch()
    scene_mix: tuple[float, float, float] = (0.45, 0.25, 0.3)
    grayscale_p: float = 0.15
    invert_p: float = 0.07
    outline_p: float = 0.12
    holdout_benchmark: str = "emoji-lineart"
    max_classes: int | None = None
    threads: int = 1
    log_every: int = 10
    checkpoint_every: int = 25
    eval_every: int = 250
    eval_per_probe: int = 250
    final_eval: bool = True
    init_from: str = ""
    style_weights: tuple[float, float, float] = UNIFORM_STYLES

    def __post_init__(self) -> None:
        if isinstance(self.arch, dict):  # from JSON
            object.__setattr__(self, "arch", EmojiArch(**self.arch))
        object.__setattr__(self, "scene_mix", tuple(self.scene_mix))
        object.__setattr__(self, "style_weights", tuple(float(w) for w in self.style_weights))
        if len(self.style_weights) != 3 or min(self.style_weights) < 0 or sum(self.style_weights[:2]) <= 0:
            raise ValueError(f"style_weights are 3 weights >= 0 for (noto, openmoji, symbola), noto or openmoji > 0; "
                             f"got {self.style_weights}")
        for name in ("steps", "batch_size", "threads", "log_every", "checkpoint_every", "eval_every", "eval_per_probe"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.warmup_steps <= self.steps:
            raise ValueError(f"warmup_steps must be within 0..steps, got {self.warmup_steps}")
        if self.lr <= 0 or self.weight_decay < 0:
            raise ValueError("lr must be > 0 and weight_decay >= 0")
        if len(self.scene_mix) != 3 or min(self.scene_mix) < 0 or sum(self.scene_mix) <= 0:
            raise ValueError(f"scene_mix needs 3 non-negative weights, got {self.scene_mix}")
        for name in ("grayscale_p", "invert_p", "outline_p"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be a probability")
        if self.holdout_benchmark and self.holdout_benchmark not in BENCHMARKS:
            raise ValueError(f"unknown holdout_benchmark {self.holdout_benchmark!r}; known: {', '.join(BENCHMARKS)}")
        if self.max_classes is not None and self.max_classes < 2:
            raise ValueError("max_classes must be >= 2")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PretrainConfig:
        return cls(**d)


def scene_presets(cfg: PretrainConfig) -> tuple[SceneConfig, SceneConfig, SceneConfig]:
    """(clean, cluttered, corrupted) scene distributions; milder than the benchmarks' versions."""
    base = SceneConfig(
        size=cfg.arch.image_size, grayscale_p=cfg.grayscale_p, invert_p=cfg.invert_p, outline_p=cfg.outline_p
    )
    clutter = dataclasses.replace(
        base, scale=(0.4, 0.8), background=(0.1, 0.1, 0.4, 0.4), distractors=(1, 4), distractor_scale=(0.4, 0.75)
    )
    corrupt = dataclasses.replace(
        base, blur_p=0.5, blur_radius=(0.4, 1.2), noise_sigma=(3.0, 20.0), contrast=(0.5, 1.0),
        jpeg_p=0.7, jpeg_quality=(12, 60),
    )
    return base, clutter, corrupt


def caption(name: str, info: SceneInfo, rng: np.random.Generator) -> str:
    """A caption for a scene of class ``name``: plain, styled or naming an augmentation."""
    augs = [k for k, on in (("grayscale", info.grayscale), ("outline", info.outline), ("inverted", info.inverted),
                             ("blurred", info.blurred), ("distractors", info.distractors > 0)) if on]
    r = rng.random()
    if augs and r < 0.3:
        options = AUGMENT_WORDS[augs[int(rng.integers(len(augs)))]]
        return options[int(rng.integers(len(options)))].format(name)
    if r < 0.65:
        words = STYLE_WORDS[info.style]
        t = STYLED_TEMPLATES[int(rng.integers(len(STYLED_TEMPLATES)))]
        return t.format(s=words[int(rng.integers(len(words)))], c=name)
    return TEMPLATES[int(rng.integers(len(TEMPLATES)))].format(name)


class PretrainData:
    """Batches and held-out probes for pretraining; batch ``t`` is a pure function of ``(seed, t)``."""

    def __init__(self, cfg: PretrainConfig) -> None:
        import open_clip

        self.cfg = cfg
        classes = list(universe())
        self.classes = classes[: cfg.max_classes] if cfg.max_classes else classes
        self.codepoints = tuple(cp for cp, _ in self.classes)
        self.names = [n for _, n in self.classes]
        held = novel_codepoints(BENCHMARKS[cfg.holdout_benchmark]) if cfg.holdout_benchmark else set()
        self.symbola_unseen = frozenset(held)
        self.presets = scene_presets(cfg)
        self.preprocess = emoji_preprocess(cfg.arch.image_size)
        self.tokenizer = open_clip.get_tokenizer(TOKENIZER)

    def styles_for(self, cp: int) -> tuple[str, ...]:
        return ("noto", "openmoji") if cp in self.symbola_unseen else ("noto", "openmoji", "symbola")

    def choose_style(self, cp: int, rng: np.random.Generator) -> str:
        """The style of one training scene of ``cp``: among those allowed, by ``style_weights``."""
        styles = self.styles_for(cp)
        if self.cfg.style_weights == UNIFORM_STYLES:  # the draw every run before the option made
            return styles[int(rng.integers(len(styles)))]
        w = np.asarray(self.cfg.style_weights[: len(styles)], dtype=np.float64)
        return styles[int(rng.choice(len(styles), p=w / w.sum()))]

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(images [B, 3, S, S] float32, tokens [B, 77] long)`` for optimizer step ``step``."""
        rng = scene_rng(self.cfg.seed, TRAIN_STREAM, step)
        n, b = len(self.classes), self.cfg.batch_size
        labels = rng.choice(n, size=b, replace=b > n)
        mix = np.asarray(self.cfg.scene_mix, dtype=np.float64)
        images, captions = [], []
        for label in labels:
            cp = self.codepoints[label]
            preset = self.presets[int(rng.choice(3, p=mix / mix.sum()))]
            im, info = render_scene(preset, cp, self.choose_style(cp, rng), rng, self.codepoints)
            images.append(im)
            captions.append(caption(self.names[label], info, rng))
        return torch.from_numpy(preprocess_batch(images, self.preprocess)), self.tokenizer(captions)

    def probes(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Held-out clean scenes per style: name -> (images, labels into ``self.names``)."""
        clean = dataclasses.replace(self.presets[0], grayscale_p=0.0, invert_p=0.0, outline_p=0.0)
        gray = dataclasses.replace(clean, grayscale_p=1.0)
        seen = [i for i, cp in enumerate(self.codepoints) if cp not in self.symbola_unseen]
        unseen = [i for i, cp in enumerate(self.codepoints) if cp in self.symbola_unseen]
        plan = {
            "noto": ("noto", clean, seen + unseen),
            "openmoji": ("openmoji", clean, seen + unseen),
            "noto_grayscale": ("noto", gray, seen + unseen),
            "symbola_seen": ("symbola", clean, seen),
            "symbola_unseen": ("symbola", clean, unseen),
        }
        out = {}
        for p, (name, (style, scene, pool)) in enumerate(plan.items()):
            if not pool:
                continue
            pick = np.random.default_rng([self.cfg.seed, PROBE_STREAM, p]).permutation(pool)[: self.cfg.eval_per_probe]
            ims = [render_scene(scene, self.codepoints[i], style, scene_rng(self.cfg.seed, PROBE_STREAM, p, int(i)),
                                self.codepoints)[0] for i in pick]
            out[name] = (torch.from_numpy(preprocess_batch(ims, self.preprocess)), torch.as_tensor(pick))
        return out


def encode_text_trimmed(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """``model.encode_text`` computed on the first L positions only, L = the longest caption.

    The text tower is causal and pools at the end-of-text token, so positions after it never reach
    the output: this equals ``encode_text`` (unnormalised) at a fraction of the cost.
    """
    length = int(tokens.argmax(dim=-1).max()) + 1
    tokens = tokens[:, :length]
    x = model.token_embedding(tokens) + model.positional_embedding[:length]
    return pool_text_features(model, model.transformer(x, attn_mask=model.attn_mask[:length, :length]),
                              tokens.argmax(dim=-1))


@torch.no_grad()
def text_classifier(model: torch.nn.Module, tokenizer: Any, names: Sequence[str],
                    template: str = ZERO_SHOT_TEMPLATE) -> torch.Tensor:
    """Normalised class embeddings ``[n_cls, embed_dim]``."""
    feats = [encode_text_trimmed(model, tokenizer([template.format(n) for n in names[i:i + 512]]))
             for i in range(0, len(names), 512)]
    return F.normalize(torch.cat(feats), dim=-1)


@torch.no_grad()
def image_features(model: torch.nn.Module, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    return F.normalize(torch.cat([model.encode_image(images[i:i + batch]) for i in range(0, len(images), batch)]), dim=-1)


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        # matrices decay; embeddings, gains, biases, the logit scale do not
        if p.ndim < 2 or "embedding" in name or name.endswith("logit_scale"):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(cfg: PretrainConfig, step: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return 0.5 * cfg.lr * (1 + math.cos(math.pi * min(1.0, progress)))


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _config_json(cfg: PretrainConfig) -> dict[str, Any]:
    data = json.loads(json.dumps(asdict(cfg)))
    # fields at their default are not written: configs from before they existed stay resumable
    if not data["init_from"]:
        del data["init_from"]
    if tuple(data["style_weights"]) == UNIFORM_STYLES:
        del data["style_weights"]
    return data


def _check_resumable(saved: dict[str, Any], cfg: PretrainConfig, path: Path) -> None:
    now = _config_json(cfg)
    diff = sorted(k for k in set(saved) | set(now) if k not in _RUNTIME_FIELDS and saved.get(k) != now.get(k))
    if diff:
        raise ValueError(
            f"{path} was written by a different config (differs in {', '.join(diff)}); "
            "use another --out, or pass --no-resume to start over"
        )


class _Log:
    """Progress lines to ``logging`` and to ``out_dir/log.jsonl`` (appended, so resumed runs continue it)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, record: dict[str, Any]) -> None:
        record = {"time": round(time.time(), 1), **record}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def evaluate_probes(model: torch.nn.Module, data: PretrainData, probes: dict) -> dict[str, float]:
    """Zero-shot top-1 (%) per probe, classifying among all pretraining classes."""
    model.eval()
    classifier = text_classifier(model, data.tokenizer, data.names)
    out = {}
    for name, (images, labels) in probes.items():
        pred = (image_features(model, images) @ classifier.T).argmax(dim=-1)
        out[name] = round(100.0 * float((pred == labels).float().mean()), 2)
    model.train()
    return out


def evaluate_benchmarks(model: torch.nn.Module, tokenizer: Any, root: str | None = None) -> dict[str, dict[str, float]]:
    """Zero-shot top-1 (%) on every benchmark's test split: all classes, and base / novel halves alone."""
    from training.benchmark import list_benchmarks, load_benchmark

    model.eval()
    pre = emoji_preprocess(model.visual.image_size[0])
    results = {}
    for name, _ in list_benchmarks():
        ds = load_benchmark(name, root=root)
        images = torch.from_numpy(preprocess_batch([_load_rgb(s.path) for s in ds.test], pre))
        labels = torch.as_tensor([s.label for s in ds.test])
        logits = image_features(model, images) @ text_classifier(model, tokenizer, ds.classnames).T
        m = math.ceil(ds.num_classes / 2)
        base, novel = labels < m, labels >= m
        results[name] = {
            "all": round(100.0 * float((logits.argmax(-1) == labels).float().mean()), 2),
            "base": round(100.0 * float((logits[base, :m].argmax(-1) == labels[base]).float().mean()), 2),
            "novel": round(100.0 * float((logits[novel, m:].argmax(-1) + m == labels[novel]).float().mean()), 2),
        }
        logger.info("zero-shot %s: %s", name, results[name])
    return results


def _load_rgb(path: str):
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


def export_weights(model: torch.nn.Module, arch: EmojiArch, path: Path, extra: dict[str, str]) -> Path:
    """Write fp16 safetensors with the architecture in the metadata, atomically."""
    from safetensors.torch import save_file

    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    save_file(state, str(tmp), metadata={**arch_metadata(arch), **extra})
    size = tmp.stat().st_size
    if size > MAX_WEIGHTS_BYTES:
        tmp.unlink()
        raise ValueError(f"exported weights are {size / 2**20:.1f} MiB, over the {MAX_WEIGHTS_BYTES / 2**20:.0f} MiB limit")
    os.replace(tmp, path)
    return path


def pretrain(config: PretrainConfig, out_dir: str | os.PathLike, resume: bool = True,
             stop_after: int | None = None, install: str | None = None, benchmark_root: str | None = None) -> Path:
    """Run (or resume) pretraining; returns the path of the exported fp16 safetensors.

    Args:
        config: the run.
        out_dir: checkpoint, ``log.jsonl``, ``config.json``, ``report.json`` and the weights go here.
        resume: continue from ``out_dir/checkpoint.pt`` if present (its config must match).
        stop_after: stop after this many steps in this call (checkpointed; a time-boxed session);
            returns the checkpoint path then instead of weights.
        install: a version (``v3``): copy the final weights and report to ``training/weights/`` as it.
        benchmark_root: where benchmarks are materialised for the final evaluation.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(config.threads)
    ckpt_path = out / "checkpoint.pt"
    log = _Log(out / "log.jsonl")

    model = create_emoji_clip(config.arch, seed=config.seed)
    model.train()
    optimizer = torch.optim.AdamW(_param_groups(model, config.weight_decay), lr=config.lr, betas=(0.9, 0.98), eps=1e-6)
    start, history = 0, []
    if resume and ckpt_path.is_file():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        _check_resumable(state["config"], config, ckpt_path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        start, history = int(state["step"]), list(state.get("evals", []))
        logger.info("resuming %s at step %d of %d", out, start, config.steps)
    else:
        torch.manual_seed(config.seed)
        if config.init_from:
            from training.benchmark.emoji_backbone import load_emoji_weights

            arch, weights = load_emoji_weights(Path(config.init_from))
            if arch != config.arch:
                raise ValueError(f"{config.init_from} holds architecture {arch}, not {config.arch}")
            model.load_state_dict({k: v.float() for k, v in weights.items()})
            logger.info("initialised from %s", config.init_from)
    (out / "config.json").write_text(json.dumps(_config_json(config), indent=1))

    data = PretrainData(config)
    probes = data.probes()
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("pretraining %s: %.2fM parameters, %d classes, %d steps x %d, %d thread(s)",
                NAME, n_params / 1e6, len(data.names), config.steps, config.batch_size, config.threads)

    def save(step: int) -> None:
        _atomic_torch_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                            "torch_rng": torch.get_rng_state(), "config": _config_json(config), "evals": history},
                           ckpt_path)

    t_window, data_s, n_window, loss_sum = time.perf_counter(), 0.0, 0, 0.0
    step = start
    while step < config.steps:
        t0 = time.perf_counter()
        images, tokens = data.batch(step)
        data_s += time.perf_counter() - t0
        for group in optimizer.param_groups:
            group["lr"] = lr_at(config, step)
        img = F.normalize(model.encode_image(images), dim=-1)
        txt = F.normalize(encode_text_trimmed(model, tokens), dim=-1)
        logits = model.logit_scale.exp() * img @ txt.T  # [B, B]
        target = torch.arange(len(images))
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        step += 1
        n_window += 1
        loss_sum += loss.item()

        if step % config.log_every == 0 or step == config.steps:
            elapsed = time.perf_counter() - t_window
            per_step = elapsed / n_window
            rec = {"step": step, "loss": round(loss_sum / n_window, 4), "lr": round(lr_at(config, step - 1), 6),
                   "samples_per_s": round(config.batch_size / per_step, 1), "data_s_per_step": round(data_s / n_window, 3),
                   "step_s": round(per_step, 3), "eta_s": round(per_step * (config.steps - step)),
                   "logit_scale": round(model.logit_scale.detach().exp().item(), 2)}
            log.write(rec)
            logger.info("step %d/%d loss %.4f | %.1f samples/s (data %.2fs/step) | ETA %.0f min",
                        step, config.steps, rec["loss"], rec["samples_per_s"], rec["data_s_per_step"], rec["eta_s"] / 60)
            t_window, data_s, n_window, loss_sum = time.perf_counter(), 0.0, 0, 0.0
        if step % config.eval_every == 0 or step == config.steps:
            accs = evaluate_probes(model, data, probes)
            history.append({"step": step, "loss": round(loss.item(), 4), **accs})
            log.write({"step": step, "eval": accs})
            logger.info("step %d zero-shot top-1 over %d classes: %s", step, len(data.names), accs)
            t_window, data_s, n_window, loss_sum = time.perf_counter(), 0.0, 0, 0.0
        if step % config.checkpoint_every == 0 or step == config.steps:
            save(step)
        if stop_after is not None and step - start >= stop_after and step < config.steps:
            save(step)
            logger.info("stopping after %d steps at step %d (resume with the same command)", stop_after, step)
            return ckpt_path

    weights = export_weights(model, config.arch, out / f"{NAME}.safetensors",
                             {"config": json.dumps(_config_json(config)), "step": str(step)})
    report: dict[str, Any] = {"config": _config_json(config), "parameters": n_params, "classes": len(data.names),
                              "curve": history}
    if config.final_eval and not config.max_classes:
        report["zero_shot"] = evaluate_benchmarks(model, data.tokenizer, benchmark_root)
        log.write({"step": step, "zero_shot": report["zero_shot"]})
    (out / "report.json").write_text(json.dumps(report, indent=1))
    (out / "report.md").write_text(report_markdown(report))
    logger.info("wrote %s (%.1f MiB)", weights, weights.stat().st_size / 2**20)
    if install:
        install_weights(out, install)
    return weights


def install_weights(out: str | Path, version: str) -> Path:
    """Copy a finished run's weights and report to ``training/weights/emoji-vit-s-VERSION.*``.

    A shipped version is immutable (benchmark tables name it): installing over a different file of the
    same version is refused. ``emoji-vit-s`` names the last entry of ``training.constants.EMOJI_VIT_S_VERSIONS``,
    so a new version becomes the default only when it is added there.
    """
    out = Path(out)
    if not re.fullmatch(r"v[0-9]+", version):
        raise ValueError(f"version must look like v3, got {version!r}")
    src = out / f"{NAME}.safetensors"
    if not src.is_file():
        raise FileNotFoundError(f"{src} does not exist: the run in {out} has not finished")
    dst = weights_path(version)
    if dst.is_file() and dst.read_bytes() != src.read_bytes():
        raise FileExistsError(f"{dst} already holds different weights; shipped versions never change, pick a new one")
    dst.parent.mkdir(parents=True, exist_ok=True)
    for s, d in ((src, dst), (out / "report.json", dst.with_suffix(".json"))):
        tmp = d.with_name(d.name + ".tmp")
        shutil.copyfile(s, tmp)
        os.replace(tmp, d)
    logger.info("installed %s as %s%s", dst, versioned_name(version),
                "" if version in VERSIONS else f"; add {version!r} to training.constants.EMOJI_VIT_S_VERSIONS to make it loadable")
    return dst


def report_markdown(report: dict[str, Any]) -> str:
    """The training curve and zero-shot accuracies of ``report.json`` as markdown (for docs/benchmark.md)."""
    lines = ["| step | loss | " + " | ".join(k for k in report["curve"][0] if k not in ("step", "loss")) + " |"] if report.get("curve") else []
    if lines:
        keys = [k for k in report["curve"][0] if k not in ("step", "loss")]
        lines.append("|" + " ---: |" * (len(keys) + 2))
        for row in report["curve"]:
            lines.append(f"| {row['step']} | {row['loss']:.3f} | " + " | ".join(f"{row[k]:.1f}" for k in keys) + " |")
    zs = report.get("zero_shot")
    if zs:
        lines += ["", "| benchmark | all | base | novel |", "| --- | ---: | ---: | ---: |"]
        lines += [f"| {name} | {r['all']:.1f} | {r['base']:.1f} | {r['novel']:.1f} |" for name, r in zs.items()]
    return "\n".join(lines) + "\n"


def _three_floats(text: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"expected three comma-separated numbers, got {text!r}")
    return values  # type: ignore[return-value]


def _parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m training.benchmark.pretrain", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="run folder (checkpoint, log.jsonl, report.json, weights)")
    defaults = PretrainConfig()
    for f in dataclasses.fields(PretrainConfig):
        if f.name in ("arch", "scene_mix", "holdout_benchmark", "max_classes", "final_eval", "style_weights"):
            continue
        p.add_argument(f"--{f.name.replace('_', '-')}", type=type(getattr(defaults, f.name)),
                       default=getattr(defaults, f.name))
    p.add_argument("--style-weights", type=_three_floats, default=defaults.style_weights, metavar="N,O,S",
                   help="relative odds of the noto, openmoji and symbola styles (default 1,1,1; e.g. 1,1,4 for a "
                        "line-art phase)")
    p.add_argument("--no-final-eval", action="store_true", help="skip the zero-shot benchmark evaluation")
    p.add_argument("--no-resume", action="store_true", help="start over even if a checkpoint exists")
    p.add_argument("--stop-after", type=int, default=None, help="stop (checkpointed) after this many steps")
    p.add_argument("--install", metavar="VERSION", default=None,
                   help="copy the final weights to training/weights/emoji-vit-s-VERSION.safetensors (e.g. v3; never "
                        "over a different file); with --report: install a finished run without training")
    p.add_argument("--report", action="store_true", help="print OUT/report.json as markdown and exit")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = _parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.report:
        import sys

        sys.stdout.write(report_markdown(json.loads((Path(args.out) / "report.json").read_text())))
        if args.install:
            install_weights(args.out, args.install)
        return
    fields = {f.name for f in dataclasses.fields(PretrainConfig)}
    kwargs = {k: v for k, v in vars(args).items() if k in fields}
    cfg = PretrainConfig(**kwargs, final_eval=not args.no_final_eval)
    pretrain(cfg, args.out, resume=not args.no_resume, stop_after=args.stop_after, install=args.install)


if __name__ == "__main__":
    main()
