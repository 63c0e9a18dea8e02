"""Export a trained run: wrap the method's encoders, pick parity inputs, call the exporter.

The method is only used through the :class:`~training.methods.PromptMethod` protocol
(``encode_image``, ``class_embeddings``, ``prompt_templates``, ``logit_scale``) and its declared
capabilities; :mod:`exports.onnx_export` does the tracing, checking and writing.
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from exports.manifest import Manifest
from exports.onnx_export import ArtifactInfo, ExportError, check_exportable, export_artifact
from exports.preprocess import preprocess_batch
from training.jobs import load_run_method, recorded_descriptions
from training.methods import PromptMethod
from training.runs import RunError, RunInfo

logger = logging.getLogger(__name__)

MAX_PARITY_IMAGES = 32
#: fp16 / int8 parity is a top-1 agreement rate: judged on enough images that 99% can tolerate a few
#: disagreements (at 32 images a single one failed the README's own quickstart run in int8)
MAX_QUANTIZED_PARITY_IMAGES = 256
BENTOML_ARTIFACT_SUBDIR = "artifact"  # the artifact inside a BentoML model's directory
# Names for the text parity when the run's dataset cannot be read (one word, several, punctuation, unicode).
FALLBACK_CLASSNAMES = ("cat", "dog", "golden retriever", "airplane", "red car", "apple pie", "crème brûlée", "t-shirt")


def _in_order(outputs: dict[str, torch.Tensor], names: Sequence[str], what: str) -> torch.Tensor | tuple[torch.Tensor, ...]:
    if list(outputs) != list(names):
        raise ExportError(f"the method's {what} are {list(outputs)}, but its graph signature declares {list(names)}")
    values = tuple(outputs[n] for n in names)
    return values[0] if len(values) == 1 else values


class ImageEncoder(nn.Module):
    """pixels [B, 3, S, S] -> the method's declared image outputs, each L2-normalised [B, D].

    One tensor for a method with one image output (the usual ``image_embeddings``), else a tuple
    in the order of ``graph_signature().image_outputs``.
    """

    def __init__(self, method: PromptMethod):
        super().__init__()
        self.method = method
        self.names = method.graph_signature().image_outputs

    def forward(self, pixels: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        return _in_order(self.method.image_outputs(pixels), self.names, "image outputs")


class TextEncoder(nn.Module):
    """token ids [T, C, L] (every template x every class name) -> the declared class outputs [C, D], L2-normalised.

    The method's own ``text_outputs`` (by default its ``class_embeddings``): the template ensemble
    of zero-shot CLIP, or TCP's two templates with different roles, is traced into the graph rather
    than re-implemented at runtime.
    """

    def __init__(self, method: PromptMethod):
        super().__init__()
        self.method = method
        self.names = method.graph_signature().text_outputs

    def forward(self, tokens: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        return _in_order(self.method.text_outputs(tokens), self.names, "text outputs")


class ConditionedTextEncoder(nn.Module):
    """For ``text_depends_on_image`` methods: (token ids [T, C, L], every image output) -> logits [B, C].

    The method's own ``logits_from_outputs`` on the image graph's outputs; :func:`export_method`
    checks first that this path gives the method's own logits on the images (CoCoOp: that its
    logits do not depend on the norm of the image features the graph normalises).
    """

    def __init__(self, method: PromptMethod):
        super().__init__()
        self.method = method
        self.names = method.graph_signature().image_outputs

    def forward(self, tokens: torch.Tensor, *image_outputs: torch.Tensor) -> torch.Tensor:
        return self.method.logits_from_outputs(dict(zip(self.names, image_outputs, strict=True)), tokens)


class ScoreEncoder(nn.Module):
    """For a scored signature: (every image output, every class output) -> logits [B, C], the method's
    own ``score_outputs``: the artifact's third graph."""

    def __init__(self, method: PromptMethod):
        super().__init__()
        self.method = method
        sig = method.graph_signature()
        self.image_names, self.class_names = sig.image_outputs, sig.text_outputs

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        n = len(self.image_names)
        return self.method.score_outputs(dict(zip(self.image_names, tensors[:n], strict=True)),
                                         dict(zip(self.class_names, tensors[n:], strict=True)))


def _check_conditioned_path(method: PromptMethod, pixels: np.ndarray, classnames: Sequence[str],
                            descriptions: Mapping[str, Any] | None = None) -> None:
    with torch.no_grad():
        x = torch.from_numpy(pixels[:4])
        tokens = method.tokenize(list(classnames), descriptions if method.capabilities.needs_class_descriptions else None)
        own = method(x, tokens)
        graph = method.logits_from_outputs(method.image_outputs(x), tokens)
    gap = float((own - graph).abs().max() / method.logit_scale())
    if gap > 1e-5:
        raise ExportError(
            f"{method.name}: its logits from the image outputs differ from its own logits (difference {gap:.2g}; "
            "e.g. the class embeddings depend on the norm of the image features the graph normalises)"
        )


def synthetic_images(n: int = 8, size: int = 64, seed: int = 0) -> list[Image.Image]:
    """Deterministic images (colour fields with noise and a square) when no real test set is at hand."""
    rng = np.random.default_rng(seed)
    images = []
    for i in range(n):
        base = rng.integers(0, 256, 3)
        px = np.clip(base[None, None] + rng.normal(0, 25, (size, size + 8 * (i % 3), 3)), 0, 255)
        a, b = sorted(rng.integers(0, size, 2))
        px[a : b + 1, a : b + 1] = rng.integers(0, 256, 3)
        images.append(Image.fromarray(px.astype(np.uint8)))
    return images


def parity_inputs(info: RunInfo, max_images: int = MAX_PARITY_IMAGES) -> tuple[list[Image.Image], list[str], str]:
    """Real test images (base and novel, spread over classes) and all class names of the run's dataset.

    Falls back to :func:`synthetic_images` and :data:`FALLBACK_CLASSNAMES` when the dataset
    cannot be loaded here (a run trained on another machine).

    Returns:
        (images, class names, a description of where they came from)
    """
    from training.data import DatasetError, load_dataset
    from training.data.transforms import load_image

    try:
        ds = load_dataset(info.dataset)
    except (DatasetError, OSError) as e:
        logger.warning("dataset %s is not readable here (%s); parity uses synthetic images", info.dataset, e)
        return synthetic_images(), list(FALLBACK_CLASSNAMES), "synthetic images, fixed class names"
    by_label: dict[int, list] = {}
    for s in ds.test:
        by_label.setdefault(s.label, []).append(s)
    # round-robin over classes, so base and novel classes are both covered
    picked, depth = [], 0
    while len(picked) < max_images and any(depth < len(v) for v in by_label.values()):
        for label in sorted(by_label):
            if depth < len(by_label[label]) and len(picked) < max_images:
                picked.append(by_label[label][depth])
        depth += 1
    if not picked:
        return synthetic_images(), list(ds.classnames), f"synthetic images, {ds.name} class names (no test split)"
    return [load_image(s.path) for s in picked], list(ds.classnames), f"{len(picked)} test images of {ds.name}"


def check_method_exportable(method: PromptMethod) -> None:
    """Refuse, with the reason, a method the artifact cannot represent: from its declared
    capabilities (:func:`exports.onnx_export.check_exportable`) and its own :meth:`export_refusal`."""
    check_exportable(method.capabilities.to_dict())
    reason = method.export_refusal()
    if reason:
        raise ExportError(f"{method.name} cannot be exported as configured: {reason}")


def _vocab_path(method: PromptMethod) -> Path:
    from open_clip.tokenizer import default_bpe

    # open_clip's SimpleTokenizer for CLIP towers reads this file; the exporter checks that the
    # artifact's tokenizer built from it gives the training tokenizer's ids.
    return Path(default_bpe())


def export_method(
    method: PromptMethod,
    out_dir: str | os.PathLike[str],
    info: RunInfo,
    *,
    images: Sequence[Image.Image],
    classnames: Sequence[str],
    precision: str = "fp32",
    overwrite: bool = False,
    exporter: str | None = None,
    descriptions: Mapping[str, Any] | None = None,
    min_top1: float | None = None,
) -> Manifest:
    """Export an in-memory method (see :func:`export_run` for a run directory).

    ``exporter`` overrides :data:`exports.onnx_export.DEFAULT_EXPORTER` (benchmarks compare them).
    ``descriptions``: for methods that embed classes from descriptions, those the artifact ships
    (every parity class name needs some).
    """
    check_method_exportable(method)  # before anything slow
    method = method.eval()
    bb = method.backbone
    sig = method.graph_signature()
    if sig.switch != method.capabilities.base_novel_switch:
        raise ExportError(f"{method.name}: capabilities.base_novel_switch is {method.capabilities.base_novel_switch} "
                          f"but its heads {'do' if sig.switch else 'do not'} score base and novel names differently")
    art = ArtifactInfo(
        method=method.name,
        capabilities=method.capabilities.to_dict(),
        backbone=bb.spec,
        preprocess=bb.preprocess,
        prompt_templates=method.prompt_templates(),
        logit_scale=float(method.logit_scale()),
        embed_dim=bb.embed_dim,
        run_config={"method_config": info.method_config, "train": info.train, "dataset": info.dataset,
                    "shots": info.shots, "seed": info.seed},
        base_classnames=list(info.base_classnames),
        image_outputs=sig.image_outputs,
        text_outputs=sig.text_outputs,
        scored=sig.scored,
        whole_class_list=sig.whole_class_list,
        description_template=method.description_template(),
        description_layout=method.description_layout(),
        heads=[h.to_dict() for h in sig.heads],
        class_descriptions=dict(descriptions or {}) if method.capabilities.needs_class_descriptions else {},
    )
    if method.capabilities.needs_class_descriptions:
        missing = [n for n in classnames if not (descriptions or {}).get(n)]
        if missing:
            raise ExportError(f"{method.name} embeds classes from their descriptions; none for the parity class names "
                              f"{missing[:5]}: export needs the run's descriptions (its file, or its benchmark)")
    pixels = preprocess_batch(list(images), bb.preprocess)
    conditioned = method.capabilities.text_depends_on_image
    if conditioned and len(pixels) and classnames:
        _check_conditioned_path(method, pixels, classnames, descriptions)
    return export_artifact(
        out_dir,
        image_encoder=ImageEncoder(method),
        text_encoder=ConditionedTextEncoder(method) if conditioned and not sig.scored else TextEncoder(method),
        score_encoder=ScoreEncoder(method) if sig.scored else None,
        info=art,
        vocab_path=_vocab_path(method),
        context_length=bb.context_length,
        reference_tokenize=lambda texts: bb.tokenizer(texts).numpy(),
        parity_pixels=pixels,
        parity_classnames=list(classnames),
        precision=precision,  # type: ignore[arg-type]
        overwrite=overwrite,
        **({"exporter": exporter} if exporter else {}),
        **({"min_top1": min_top1} if min_top1 is not None else {}),
    )


def export_run(
    run_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    precision: str = "fp32",
    parity_images: Sequence[Image.Image] | None = None,
    parity_classnames: Sequence[str] | None = None,
    overwrite: bool = False,
    min_top1: float | None = None,
) -> Manifest:
    """Export a trained run directory to an artifact directory.

    Args:
        run_dir: a finished run (``learned.safetensors`` present).
        out_dir: the artifact directory to write.
        precision: ``fp32``, ``fp16`` or ``int8``.
        parity_images: images for the torch-vs-onnxruntime check; default: up to 32 test images
            of the run's dataset for fp32, up to 256 for fp16 / int8 (synthetic images when it is
            not readable here).
        parity_classnames: class names for the check; default: all names of the run's dataset.
        overwrite: replace an existing artifact directory.
        min_top1: fp16 / int8 top-1 agreement needed (default 0.99).

    Raises:
        ExportError: the method cannot be exported or a check failed; nothing is written then.
    """
    method, info = load_run_method(run_dir)
    check_method_exportable(method)
    if parity_images is None or parity_classnames is None:
        images, names, source = parity_inputs(info, MAX_PARITY_IMAGES if precision == "fp32" else MAX_QUANTIZED_PARITY_IMAGES)
        parity_images = images if parity_images is None else parity_images
        parity_classnames = names if parity_classnames is None else parity_classnames
        logger.info("parity inputs: %s", source)
    descriptions = None
    if method.capabilities.needs_class_descriptions:
        try:
            descriptions = recorded_descriptions(info, list(parity_classnames))
        except RunError as e:
            raise ExportError(str(e)) from None
    return export_method(method, out_dir, info, images=parity_images, classnames=parity_classnames,
                         precision=precision, overwrite=overwrite, descriptions=descriptions, min_top1=min_top1)


def save_to_bentoml(artifact_dir: str | os.PathLike[str], name: str, manifest: Manifest) -> str:
    """Copy a verified artifact into the BentoML model store; returns the model tag.

    The artifact sits in the model's ``artifact/`` subdirectory (BentoML adds its own
    ``model.yaml`` at the top, which the artifact's no-extra-files check would refuse).
    """
    import bentoml

    with bentoml.models.create(
        name,
        labels={"method": manifest.method, "precision": manifest.precision},
        metadata={"backbone": manifest.backbone, "artifact_subdir": BENTOML_ARTIFACT_SUBDIR,
                  "schema_version": manifest.schema_version},
    ) as model:
        shutil.copytree(artifact_dir, model.path_of(BENTOML_ARTIFACT_SUBDIR))
    return str(model.tag)


__all__ = ["ConditionedTextEncoder", "ExportError", "ImageEncoder", "TextEncoder", "export_method", "export_run", "parity_inputs", "save_to_bentoml"]
