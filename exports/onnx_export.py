"""Export two torch encoders to ONNX as a verified, self-describing artifact.

The caller (``training.export``) supplies the encoders as ``nn.Module``s with the learned tensors
inside; this module traces them, checks the graphs, measures onnxruntime against torch on the
caller's real inputs, and writes the artifact atomically. It never imports ``training``.

Graphs (their outputs and the heads that fuse them into logits are the method's declared
signature, ``ArtifactInfo.image_outputs`` / ``text_outputs`` / ``heads``; nothing here knows a method):
    image: ``pixels`` [B, 3, S, S] float32 -> one or more image outputs [B, D] (the first usually
        ``image_embeddings``), L2-normalised.
    text: ``token_ids`` [T, C, L] int64 (every prompt template filled with every class name) ->
        one or more class outputs [C, D] (usually ``class_embeddings``), L2-normalised: the
        method's whole class-embedding side, so template ensembles and methods whose templates
        play different roles (TCP) need no logic in the runtime. B and C are dynamic; T and L are
        fixed by the method.
    text, for methods whose class embeddings depend on the image (``text_depends_on_image``,
        CoCoOp): ``token_ids`` [T, C, L] and ``image_embeddings`` [B, D] (the image graph's output)
        -> ``logits`` [B, C], the method's ``logits_from_features``. Nothing can be cached per
        class list; the text tower runs B x C prompts.

Exporter: the TorchScript exporter (``dynamo=False``) with ``dynamic_axes``, chosen after measuring
both on 2 shared CPU cores (parity identical, ~1e-7):

    =====================  ==========================  ===========================
    graph                  TorchScript (dynamo=False)  torch.export (dynamo=True)
    =====================  ==========================  ===========================
    test-tiny image/text   0.2 s / 0.4 s               5-10 s / 5-20 s
    ViT-B/16 image tower   10 s                        23 s
    =====================  ==========================  ===========================

The suite exports every registered method on every test run, which the torch.export path would
make minutes long (its decompositions dominate). The TorchScript exporter is deprecated since
torch 2.9 but present in the pinned torch; ``export_graph(exporter="dynamo")`` is kept, used by
``training.bench.export``, and switching is one argument. Pitfalls handled:

- ``nn.MultiheadAttention``'s fused fast path (taken in eval whenever no parameter needs a
  gradient, i.e. always for a frozen CLIP) lowers to ``aten::_native_multi_head_attention``,
  which has no ONNX symbolic: it is switched off while tracing.
- Tracing bakes Python-level shape logic into constants. The graphs are traced with 2 images /
  2 classes and the parity check runs at other sizes (the caller's N and C, and 1), so a baked
  shape fails the export instead of a later request.
- The end-of-text lookup avoids int64 ArgMax (``training.prompts.text.eot_positions``).
- ``dynamic_axes`` is the TorchScript exporter's API; with ``dynamo=True`` the axes are given as
  ``dynamic_shapes`` with ``torch.export.Dim`` (``dynamic_axes`` is only converted best-effort).
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from exports.manifest import (
    IMAGE_GRAPH_FILENAME,
    MANIFEST_FILENAME,
    SCORE_GRAPH_FILENAME,
    TEXT_GRAPH_FILENAME,
    CapabilitiesInfo,
    GraphInfo,
    Graphs,
    Head,
    LayoutInfo,
    Manifest,
    Parity,
    Precision,
    TokenizerInfo,
    describe_files,
    load_artifact,
)
from exports.preprocess import PreprocessConfig
from exports.prompts import DESCRIPTION_TEMPLATE, DescriptionLayout, prompt_rows
from exports.runtime import create_session
from exports.scoring import base_mask, head_logits
from exports.tempdirs import make_owned_dir, remove_stale_dirs
from exports.tokenizer import VOCAB_FILENAME, Tokenizer

logger = logging.getLogger(__name__)

DEFAULT_OPSET = 18
FP32_TOLERANCE = 1e-4
MIN_TOP1_AGREEMENT = 0.99  # fp16 and int8 against torch fp32
IMAGE_INPUT, IMAGE_OUTPUT = "pixels", "image_embeddings"
TEXT_INPUT, TEXT_OUTPUT = "token_ids", "class_embeddings"
# image-conditioned methods (text_depends_on_image): the text graph also takes the image embeddings
TEXT_IMAGE_INPUT, LOGITS_OUTPUT = "image_embeddings", "logits"
EXPORTERS = ("torchscript", "dynamo")
DEFAULT_EXPORTER = "torchscript"
PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "int8")


class ExportError(ValueError):
    """An export that was refused or failed its checks; nothing was written.

    A ValueError, like the CLI's other user-facing errors (one line, exit status 2).
    """


@dataclass(frozen=True)
class ArtifactInfo:
    """What the manifest says about the method; filled in by the caller from the run.

    Attributes:
        method: registered method name.
        capabilities: the method's declared capabilities (``Capabilities.to_dict()``).
        backbone: the backbone spec string.
        run_config: the run's configuration (method options, training options, dataset, ...).
        base_classnames: the class names the method was trained on.
        preprocess: the eval image preprocessing.
        prompt_templates: templates with one ``{}``; the text graph takes each filled with each name.
        logit_scale: the (exponentiated) logit scale.
        embed_dim: D, the embedding width.
        image_outputs, text_outputs: the names of the encoders' outputs, in the order they return
            them (an image-conditioned text encoder returns the single output ``logits``).
        heads: how the outputs become logits (:class:`exports.manifest.Head` or its fields as a
            dict); empty for image-conditioned methods.
        class_descriptions: for methods that need class descriptions: those the artifact ships
            (the parity check embeds its classes from them); attribute trees with a
            ``description_layout`` (:class:`exports.prompts.DescriptionLayout`).
        scored: an image-conditioned method with image-independent class outputs (``text_outputs``)
            and a score graph (image outputs, class outputs) -> logits.
        whole_class_list: scored only: the score graph must see every name of a request at once
            (a class's logit depends on the others).
    """

    method: str
    capabilities: Mapping[str, bool]
    backbone: str
    preprocess: PreprocessConfig
    prompt_templates: Sequence[str]
    logit_scale: float
    embed_dim: int
    run_config: Mapping[str, Any] = field(default_factory=dict)
    base_classnames: Sequence[str] = ()
    image_outputs: Sequence[str] = (IMAGE_OUTPUT,)
    text_outputs: Sequence[str] = (TEXT_OUTPUT,)
    heads: Sequence[Any] = ({"image": IMAGE_OUTPUT, "text": TEXT_OUTPUT},)
    class_descriptions: Mapping[str, Sequence[str]] = field(default_factory=dict)
    scored: bool = False
    whole_class_list: bool = False
    description_template: str = DESCRIPTION_TEMPLATE
    description_layout: DescriptionLayout | None = None


def check_exportable(capabilities: Mapping[str, bool]) -> None:
    """Refuse, with the reason, what the two-graph artifact cannot represent.

    Decided from the declared capabilities only, never from a method's name.
    """
    unknown = sorted(set(capabilities) - set(CapabilitiesInfo.model_fields))
    missing = sorted(set(CapabilitiesInfo.model_fields) - set(capabilities))
    if unknown or missing:
        raise ExportError(f"the method declares capabilities the artifact schema does not know (unknown {unknown}, "
                          f"missing {missing}); exports.manifest.CapabilitiesInfo must learn them first")
    caps = CapabilitiesInfo.model_validate(dict(capabilities))
    if not caps.open_vocabulary:
        raise ExportError(
            "this method is not open-vocabulary (its learned state is tied to the training class names, "
            "e.g. CoOp with class_specific=True), so an artifact could not embed new class names; "
            "train it with a shared context to export it"
        )


@contextlib.contextmanager
def _quiet_exporter_logs(root: bool = False) -> Iterator[None]:
    # onnx_ir's optimiser logs every deduplicated initializer at INFO; keep them for -v only.
    loggers = [logging.getLogger(n) for n in ("onnx_ir", "onnxscript")] + ([logging.getLogger()] if root else [])
    levels = [lg.level for lg in loggers]
    if not logger.isEnabledFor(logging.DEBUG):
        for lg in loggers:
            lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


@contextlib.contextmanager
def _mha_fastpath_disabled() -> Iterator[None]:
    # nn.MultiheadAttention's fused fast path (eval, no grad needed) lowers to
    # aten::_native_multi_head_attention; trace the plain attention instead.
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)


def export_graph(module: nn.Module, examples: tuple[torch.Tensor, ...], path: Path, input_names: Sequence[str],
                 output_names: Sequence[str], dynamic: Mapping[str, Mapping[int, str]], opset: int = DEFAULT_OPSET,
                 exporter: str = DEFAULT_EXPORTER) -> float:
    """Trace ``module`` (tensors in; one tensor, or a tuple in ``output_names`` order, out) to a single-file ONNX graph.

    Args:
        examples: one example tensor per input, in ``input_names`` order.
        dynamic: ``{input or output name: {axis: dimension name}}``; equal names are one dimension.

    Returns:
        Seconds the export took.
    """
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    t0 = time.perf_counter()
    module.eval()
    with _mha_fastpath_disabled(), _quiet_exporter_logs(), torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx")
        warnings.filterwarnings("ignore", category=DeprecationWarning)  # the TorchScript exporter's notice
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)  # shape logic: caught by parity
        if exporter == "torchscript":
            torch.onnx.export(
                module, tuple(examples), str(path), input_names=list(input_names), output_names=list(output_names),
                opset_version=opset, dynamo=False, do_constant_folding=True,
                dynamic_axes={k: dict(v) for k, v in dynamic.items()},
            )
        else:
            dims: dict[str, Any] = {}
            shapes = tuple({axis: dims.setdefault(name, torch.export.Dim(name, min=1)) for axis, name in dynamic.get(i, {}).items()}
                           for i in input_names)
            program = torch.onnx.export(  # verbose=False: no progress prints on stdout
                module, tuple(examples), input_names=list(input_names), output_names=list(output_names), opset_version=opset,
                dynamo=True, dynamic_shapes=shapes, verbose=False,
            )
            if program is None:
                raise ExportError(f"torch.onnx.export returned no program for {path.name}")
            # CLIP towers stay under protobuf's 2 GB limit: one file per graph keeps the artifact simple
            program.save(str(path), external_data=False)
    return time.perf_counter() - t0


def _convert_precision(src: Path, dst: Path, precision: str) -> None:
    if precision == "fp16":
        from onnxruntime.transformers.float16 import convert_float_to_float16

        # Inputs and outputs stay float32 so the runtime feeds every precision the same way.
        model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
        _toposort(model.graph)  # the converter appends its input casts after their consumers
        onnx.save(model, str(dst))
    elif precision == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        # Dynamic quantization: int8 weights of MatMul/Gemm, activations quantized per run; the
        # gather-based token embedding stays float (it is a lookup, not a matmul).
        model = onnx.load(str(src))
        if _unshare_weights(model.graph, ("MatMul", "Gemm")):
            onnx.save(model, str(dst))  # the quantizer reads a file
            src = dst
        with _quiet_exporter_logs(root=True):  # the quantizer logs one INFO line per tensor on the root logger
            quantize_dynamic(str(src), str(dst), op_types_to_quantize=["MatMul", "Gemm"], weight_type=QuantType.QInt8)
    else:
        raise ValueError(f"unknown precision {precision!r}")


_PROTOBUF_LIMIT = 1_900_000_000  # bytes: one ONNX file without external data stays under protobuf's 2 GB


def _unshare_weights(graph: onnx.GraphProto, op_types: Sequence[str]) -> int:
    """Give every ``op_types`` node its own copy of an initializer other nodes read too; returns how
    many copies were made.

    onnxruntime's dynamic quantizer rewrites a weight once per tensor name, so a weight that two
    MatMuls share (HiCroPL's prompted and frozen image passes run the same ViT blocks) came out
    wrong for the second: its int8 export agreed with torch on 1.2% of the top-1 labels, although
    each quantized MatMul alone was within 1%.
    """
    inits = {i.name: i for i in graph.initializer}
    # the TorchScript exporter shares a weight through Identity nodes: read through them
    alias = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Identity" and n.input[0] in inits}
    readers: dict[str, int] = {}  # how many quantizable nodes read each weight
    for node in graph.node:
        if node.op_type in op_types:
            for name in node.input:
                weight = alias.get(name, name)
                if weight in inits:
                    readers[weight] = readers.get(weight, 0) + 1
    extra = sum(inits[w].ByteSize() * (n - 1) for w, n in readers.items() if n > 1)
    if extra + graph.ByteSize() > _PROTOBUF_LIMIT:
        logger.warning("int8: %d MB of shared weights would not fit one ONNX file once copied; quantizing them shared",
                       extra >> 20)
        return 0
    copies = 0
    for node in graph.node:
        if node.op_type not in op_types:
            continue
        for k, name in enumerate(node.input):
            weight = alias.get(name, name)
            if weight in inits and readers.get(weight, 0) > 1:
                new = onnx.TensorProto()
                new.CopyFrom(inits[weight])
                new.name = f"{weight}__copy{copies}"
                graph.initializer.append(new)
                node.input[k] = new.name
                readers[weight] -= 1
                copies += 1
    return copies


def _toposort(graph: onnx.GraphProto) -> None:
    """Reorder ``graph.node`` so every node comes after the producers of its inputs (Kahn)."""
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending = list(graph.node)
    ordered: list[onnx.NodeProto] = []
    while pending:
        ready = [n for n in pending if all(i in available for i in n.input)]
        if not ready:
            raise ExportError(f"graph {graph.name!r} has a cycle or an input nobody produces")
        for n in ready:
            available.update(n.output)
        ordered.extend(ready)
        ready_ids = {id(n) for n in ready}
        pending = [n for n in pending if id(n) not in ready_ids]
    nodes = [onnx.NodeProto() for _ in ordered]
    for dst, src in zip(nodes, ordered):
        dst.CopyFrom(src)
    del graph.node[:]
    graph.node.extend(nodes)


# -- parity ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Signature:
    """The encoders' outputs and heads, as the parity check and the manifest need them."""

    image_outputs: tuple[str, ...]
    text_outputs: tuple[str, ...]
    heads: tuple[Head, ...]
    conditioned: bool
    logit_scale: float
    scored: bool = False
    whole_class_list: bool = False

    @classmethod
    def of(cls, info: ArtifactInfo) -> "Signature":
        heads = tuple(h if isinstance(h, Head) else Head.model_validate(h if isinstance(h, Mapping) else vars(h))
                      for h in info.heads)
        return cls(tuple(info.image_outputs), tuple(info.text_outputs), heads,
                   bool(info.capabilities["text_depends_on_image"]), float(info.logit_scale), bool(info.scored),
                   bool(info.whole_class_list))


@dataclass(frozen=True)
class Outputs:
    """Every output of both graphs as float64, and the cosines [N, C] (logits / logit scale) they score to.

    For image-conditioned methods ``text`` holds the text graph's logits divided by the logit scale
    (cosines, comparable with the same tolerance).
    """

    image: dict[str, np.ndarray]
    text: dict[str, np.ndarray]
    cosines: np.ndarray


def _as_tuple(out: Any) -> tuple[Any, ...]:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _score(sig: Signature, image: dict[str, np.ndarray], text: dict[str, np.ndarray], is_base: np.ndarray) -> Outputs:
    cos = next(iter(text.values())) if sig.conditioned else head_logits(image, text, sig.heads, is_base, 1.0)
    return Outputs(image, text, cos)


@torch.no_grad()
def torch_outputs(image_encoder: nn.Module, text_encoder: nn.Module, pixels: np.ndarray, tokens: np.ndarray,
                  sig: Signature, is_base: np.ndarray, score_encoder: nn.Module | None = None) -> Outputs:
    """Reference outputs of the torch encoders."""
    img_t = _as_tuple(image_encoder(torch.from_numpy(pixels)))
    image = {n: t.double().numpy() for n, t in zip(sig.image_outputs, img_t, strict=True)}
    if sig.scored:
        cls_t = _as_tuple(text_encoder(torch.from_numpy(tokens)))
        text = {LOGITS_OUTPUT: (score_encoder(*img_t, *cls_t) / sig.logit_scale).double().numpy()}
    elif sig.conditioned:
        text = {sig.text_outputs[0]: (text_encoder(torch.from_numpy(tokens), *img_t) / sig.logit_scale).double().numpy()}
    else:
        txt_t = _as_tuple(text_encoder(torch.from_numpy(tokens)))
        text = {n: t.double().numpy() for n, t in zip(sig.text_outputs, txt_t, strict=True)}
    return _score(sig, image, text, is_base)


def ort_outputs(image_graph: Path, text_graph: Path, pixels: np.ndarray, tokens: np.ndarray, sig: Signature,
                is_base: np.ndarray, providers: Sequence[str], precision: str = "fp32",
                score_graph: Path | None = None) -> tuple[Outputs, float]:
    """The same through onnxruntime on the exported graphs, chained as the runtime chains them.

    Also runs one image and one class alone and returns the largest difference to the batched
    rows: the graphs were traced at 2 images / 2 classes, so a shape baked in by tracing shows up.
    """
    img_s = create_session(image_graph, providers, precision)
    txt_s = create_session(text_graph, providers, precision)
    score_s = create_session(score_graph, providers, precision) if sig.scored else None

    def run(px: np.ndarray, tok: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        img = dict(zip(sig.image_outputs, img_s.run(list(sig.image_outputs), {IMAGE_INPUT: px}), strict=True))
        feeds = {TEXT_INPUT: np.ascontiguousarray(tok)}
        if sig.scored:
            cls = dict(zip(sig.text_outputs, txt_s.run(list(sig.text_outputs), feeds), strict=True))
            used = {i.name for i in score_s.get_inputs()}
            logits = score_s.run([LOGITS_OUTPUT], {k: v for k, v in {**img, **cls}.items() if k in used})[0]
            return ({k: v.astype(np.float64) for k, v in img.items()},
                    {LOGITS_OUTPUT: logits.astype(np.float64) / sig.logit_scale})
        if sig.conditioned:  # every image output: the main one as TEXT_IMAGE_INPUT, the others under their names
            feeds[TEXT_IMAGE_INPUT] = img[sig.image_outputs[0]]
            feeds.update({n: img[n] for n in sig.image_outputs[1:]})
            used = {i.name for i in txt_s.get_inputs()}  # a graph may not read every image output
            feeds = {k: v for k, v in feeds.items() if k in used}
        text = dict(zip(sig.text_outputs, txt_s.run(list(sig.text_outputs), feeds), strict=True))
        if sig.conditioned:
            text = {k: v.astype(np.float64) / sig.logit_scale for k, v in text.items()}
        return ({k: v.astype(np.float64) for k, v in img.items()}, {k: v.astype(np.float64) for k, v in text.items()})

    img, text = run(pixels, tokens)
    for name, v in img.items():
        if v.shape[0] != len(pixels):
            raise ExportError(f"exported image graph returns {v.shape[0]} rows of {name} for {len(pixels)} images: "
                              "a traced shape is not dynamic")
    for name, v in text.items():
        n_text = v.shape[1] if sig.conditioned else v.shape[0]
        if n_text != tokens.shape[1]:
            raise ExportError(f"exported text graph returns {n_text} class rows of {name} for {tokens.shape[1]}: "
                              "a traced shape is not dynamic")
    # a class's logit depends on the other names when whole_class_list: then one image, every class
    one_img, one_text = run(pixels[-1:], tokens if sig.whole_class_list else tokens[:, -1:])
    gap = max(float(np.abs(one_img[k] - img[k][-1:]).max()) for k in img)
    gap = max(gap, *(float(np.abs(one_text[k] - (text[k][-1:] if sig.whole_class_list else
                                                 text[k][-1:, -1:] if sig.conditioned else text[k][-1:])).max())
                     for k in text))
    return _score(sig, img, text, is_base), gap


def _max_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


def measure_parity(reference: Outputs, candidate: Outputs, batch_gap: float, tolerance: float | None,
                   min_top1: float, providers: Sequence[str]) -> Parity:
    # only meaningful for fp32: int8 quantizes activations with a scale computed over the batch
    if tolerance is not None and not batch_gap <= tolerance:
        raise ExportError(f"the exported graphs give other results for a batch of 1 (difference {batch_gap:.3g}): "
                          "a traced shape is not dynamic")
    ref_cos, cos = reference.cosines, candidate.cosines
    return Parity(
        max_abs_diff_image=_max_diff(candidate.image, reference.image),
        max_abs_diff_text=_max_diff(candidate.text, reference.text),
        top1_agreement=float((cos.argmax(axis=1) == ref_cos.argmax(axis=1)).mean()),
        n_images=ref_cos.shape[0],
        n_classes=ref_cos.shape[1],
        tolerance=tolerance,
        min_top1_agreement=min_top1,
        providers=list(providers),
    )


def _check_parity(parity: Parity, precision: str) -> None:
    if parity.tolerance is not None:
        worst = max(parity.max_abs_diff_image, parity.max_abs_diff_text)
        if not worst <= parity.tolerance:  # also catches NaN
            raise ExportError(
                f"{precision} parity failed: onnxruntime differs from torch by {worst:.3g} on normalised embeddings "
                f"(image {parity.max_abs_diff_image:.3g}, text {parity.max_abs_diff_text:.3g}; tolerance {parity.tolerance:g})"
            )
    if parity.top1_agreement < parity.min_top1_agreement:
        raise ExportError(
            f"{precision} parity failed: top-1 agrees with torch fp32 on {100 * parity.top1_agreement:.1f}% of "
            f"{parity.n_images} images (needs {100 * parity.min_top1_agreement:.0f}%)"
        )


# -- the artifact ---------------------------------------------------------------------------------

def _parity_providers(precision: str) -> list[str]:
    # fp16 graphs are meant for GPUs; the CPU provider lacks fp16 kernels for several ops.
    if precision == "fp16" and "CUDAExecutionProvider" in ort.get_available_providers() and torch.cuda.is_available():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _prepare_out_dir(out: Path, overwrite: bool) -> None:
    if out.exists():
        if not out.is_dir():
            raise ExportError(f"{out} exists and is not a directory")
        if any(out.iterdir()) and not overwrite:
            raise ExportError(f"{out} already exists and is not empty; pass overwrite (--overwrite) to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)


def _install(tmp: Path, out: Path) -> None:
    """Move the finished directory into place; an old one is only removed once the new one is there."""
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / out.name)
        try:
            os.replace(tmp, out)
        except BaseException:
            os.replace(old / out.name, out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def export_artifact(
    out_dir: str | os.PathLike[str],
    *,
    image_encoder: nn.Module,
    text_encoder: nn.Module,
    info: ArtifactInfo,
    vocab_path: str | os.PathLike[str],
    context_length: int,
    reference_tokenize: Callable[[list[str]], Any],
    parity_pixels: np.ndarray,
    parity_classnames: Sequence[str],
    precision: Precision = "fp32",
    opset: int = DEFAULT_OPSET,
    exporter: str = DEFAULT_EXPORTER,
    overwrite: bool = False,
    min_top1: float | None = None,
    score_encoder: nn.Module | None = None,
) -> Manifest:
    """Export, check and write an artifact directory; on any failure nothing is left behind.

    Args:
        out_dir: the artifact directory to create (``ART_DIR``).
        image_encoder: pixels ``[B, 3, S, S]`` float32 -> L2-normalised ``[B, D]``.
        text_encoder: token ids ``[T, C, L]`` int64 -> L2-normalised class embeddings ``[C, D]``,
            learned context inside (the method's ``class_embeddings``). For methods with
            ``text_depends_on_image``: (token ids, image embeddings ``[B, D]`` as the image encoder
            returns them) -> logits ``[B, C]`` (logit scale included).
        info: what the manifest records about the method and run.
        vocab_path: the tokenizer's BPE merges file; copied into the artifact.
        context_length: tokens per prompt (L).
        reference_tokenize: the tokenizer the method was trained with (list of str -> [N, L]); the
            artifact's torch-free tokenizer must produce the same ids on the parity prompts.
        parity_pixels: ``[N, 3, S, S]`` float32 real images, preprocessed as the runtime does.
        parity_classnames: class names for the text parity and top-1 agreement (N, C >= 1).
        precision: ``fp32`` (within 1e-4 of torch), or ``fp16`` / ``int8`` (top-1 agreeing with
            torch fp32 on at least 99% of the parity images; their fp32 source graphs must pass
            the fp32 check first).
        opset: ONNX opset of the graphs.
        exporter: ``torchscript`` (default) or ``dynamo``; see the module docstring.
        overwrite: replace an existing non-empty ``out_dir``.
        score_encoder: for a scored signature (``info.scored``): (every image output, every class
            output of ``text_encoder``) -> logits ``[B, C]``, exported as the third graph.
        min_top1: the fraction of parity images on which fp16 / int8 must agree with torch fp32's top-1
            (default :data:`MIN_TOP1_AGREEMENT`, 0.99; with N images a fraction below 1 tolerates
            ``floor((1 - min_top1) N)`` disagreements: none at 32 images and 0.99, two at 256).

    Raises:
        ExportError: the method cannot be exported, or a check failed.
    """
    if precision not in PRECISIONS:
        raise ExportError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if min_top1 is None:
        min_top1 = MIN_TOP1_AGREEMENT
    elif not (isinstance(min_top1, (int, float)) and 0.0 < min_top1 <= 1.0):
        raise ExportError(f"min_top1 must be a fraction in (0, 1], got {min_top1!r}")
    check_exportable(info.capabilities)
    if info.scored != (score_encoder is not None):
        raise ExportError("a scored signature needs a score encoder, and only it")
    names = list(parity_classnames)
    pixels = np.ascontiguousarray(parity_pixels, dtype=np.float32)
    s = info.preprocess.image_size
    if pixels.ndim != 4 or pixels.shape[1:] != (3, s, s) or len(pixels) < 1 or not names:
        raise ExportError(f"parity inputs need >= 1 image [N, 3, {s}, {s}] and >= 1 class name; got {list(pixels.shape)}, {len(names)} names")
    out = Path(out_dir)
    _prepare_out_dir(out, overwrite)
    for prefix in (f".{out.name}.tmp-", f".{out.name}.fp32-"):  # scratch of killed exports
        for stale in remove_stale_dirs(out.parent, prefix):
            logger.info("removed %s, left by an export that did not finish", stale)

    tmp = make_owned_dir(out.parent, f".{out.name}.tmp-")
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the artifact is meant to be read by services
        shutil.copyfile(vocab_path, tmp / VOCAB_FILENAME)
        tokenizer = Tokenizer(tmp / VOCAB_FILENAME, context_length)
        templates = list(info.prompt_templates)
        described = bool(info.capabilities["needs_class_descriptions"])
        descriptions = dict(info.class_descriptions) if described else None
        layout = info.description_layout
        rows = prompt_rows(templates, names, descriptions, info.description_template, layout)
        prompts = [p for row in rows for p in row]
        tokens = tokenizer(prompts)
        expected = np.asarray(reference_tokenize(prompts), dtype=np.int64)
        if tokens.shape != expected.shape or not np.array_equal(tokens, expected):
            bad = next((p for p, a, b in zip(prompts, tokens, expected) if not np.array_equal(a, b)), prompts[0])
            raise ExportError(f"the artifact tokenizer differs from the training tokenizer on {bad!r}")
        tokens = tokens.reshape(len(rows), len(names), context_length)  # [T, C, L] (or [S, C, L] description rows)
        sig = Signature.of(info)
        conditioned = sig.conditioned
        is_base = base_mask(names, info.base_classnames, "auto")
        reference = torch_outputs(image_encoder, text_encoder, pixels, tokens, sig, is_base, score_encoder)
        graph_files = (IMAGE_GRAPH_FILENAME, TEXT_GRAPH_FILENAME, *((SCORE_GRAPH_FILENAME,) if sig.scored else ()))
        cpu = ["CPUExecutionProvider"]

        with contextlib.ExitStack() as stack:
            # fp16 / int8 are converted from fp32 graphs traced into a scratch directory
            src = tmp if precision == "fp32" else Path(stack.enter_context(
                tempfile.TemporaryDirectory(prefix=f".{out.name}.fp32-{os.getpid()}-", dir=out.parent)))
            # traced at 2 classes (and, with descriptions, a row count other than the parity's): sizes stay dynamic
            n_example = 1 if len(rows) - len(templates) != 1 else 2
            example = {"a photo": ["a photo.", "a second one."][:n_example], "two words": ["two words."]} if described else None
            if described and layout is not None:  # trees: the rows are the layout's whatever the sentences
                example = {n: {layout.attributes[0]: v} for n, v in example.items()}
            example_rows = prompt_rows(templates, ["a photo", "two words"], example, info.description_template, layout)
            example_tokens = torch.from_numpy(tokenizer([p for row in example_rows for p in row]))
            example_tokens = example_tokens.reshape(len(example_rows), 2, context_length)
            example_pixels = torch.from_numpy(pixels[:1]).repeat(2, 1, 1, 1)
            t_img = export_graph(image_encoder, (example_pixels,), src / IMAGE_GRAPH_FILENAME, [IMAGE_INPUT],
                                 sig.image_outputs,
                                 {IMAGE_INPUT: {0: "batch"}, **{o: {0: "batch"} for o in sig.image_outputs}}, opset, exporter)
            if conditioned and not sig.scored:
                with torch.no_grad():
                    example_images = _as_tuple(image_encoder(example_pixels))
                image_inputs = [TEXT_IMAGE_INPUT, *sig.image_outputs[1:]]
                t_txt = export_graph(text_encoder, (example_tokens, *example_images), src / TEXT_GRAPH_FILENAME,
                                     [TEXT_INPUT, *image_inputs], sig.text_outputs,
                                     {TEXT_INPUT: {1: "classes"}, **{n: {0: "batch"} for n in image_inputs},
                                      sig.text_outputs[0]: {0: "batch", 1: "classes"}}, opset, exporter)
            else:
                token_axes = {0: "rows", 1: "classes"} if described else {1: "classes"}
                t_txt = export_graph(text_encoder, (example_tokens,), src / TEXT_GRAPH_FILENAME, [TEXT_INPUT],
                                     sig.text_outputs,
                                     {TEXT_INPUT: token_axes, **{o: {0: "classes"} for o in sig.text_outputs}},
                                     opset, exporter)
            if sig.scored:  # (image outputs, class outputs) -> logits: the per-(image, class) part
                with torch.no_grad():
                    example_images = _as_tuple(image_encoder(example_pixels))
                    example_classes = _as_tuple(text_encoder(example_tokens))
                t_txt += export_graph(score_encoder, (*example_images, *example_classes), src / SCORE_GRAPH_FILENAME,
                                      [*sig.image_outputs, *sig.text_outputs], [LOGITS_OUTPUT],
                                      {**{n: {0: "batch"} for n in sig.image_outputs},
                                       **{n: {0: "classes"} for n in sig.text_outputs},
                                       LOGITS_OUTPUT: {0: "batch", 1: "classes"}}, opset, exporter)
            logger.info("exported graphs with %s in %.1f s (image) and %.1f s (text)", exporter, t_img, t_txt)
            for name in graph_files:
                _check_graph(src / name)
            outputs, gap = ort_outputs(src / IMAGE_GRAPH_FILENAME, src / TEXT_GRAPH_FILENAME, pixels, tokens, sig,
                                       is_base, cpu, score_graph=src / SCORE_GRAPH_FILENAME)
            fp32 = measure_parity(reference, outputs, gap, FP32_TOLERANCE, 0.0, cpu)
            _check_parity(fp32, "fp32")
            parity = fp32
            if precision != "fp32":
                for name in graph_files:
                    _convert_precision(src / name, tmp / name, precision)
                    _check_graph(tmp / name)
                providers = _parity_providers(precision)
                outputs, gap = ort_outputs(tmp / IMAGE_GRAPH_FILENAME, tmp / TEXT_GRAPH_FILENAME, pixels, tokens, sig,
                                           is_base, providers, precision, score_graph=tmp / SCORE_GRAPH_FILENAME)
                parity = measure_parity(reference, outputs, gap, None, min_top1, providers)
                _check_parity(parity, precision)
        logger.info("parity (%s): image %.2e, text %.2e, top-1 agreement %.3f on %d images x %d classes",
                    precision, parity.max_abs_diff_image, parity.max_abs_diff_text, parity.top1_agreement,
                    parity.n_images, parity.n_classes)

        manifest = Manifest(
            method=info.method,
            capabilities=CapabilitiesInfo.model_validate(dict(info.capabilities)),
            backbone=info.backbone,
            run_config=dict(info.run_config),
            base_classnames=list(info.base_classnames),
            preprocess=info.preprocess,
            tokenizer=TokenizerInfo(file=VOCAB_FILENAME, context_length=context_length,
                                    sot_token_id=tokenizer.sot_token_id, eot_token_id=tokenizer.eot_token_id),
            prompt_templates=templates,
            class_descriptions={k: ({a: list(d) for a, d in v.items()} if isinstance(v, Mapping) else list(v))
                                for k, v in (descriptions or {}).items()},
            description_template=info.description_template,
            description_layout=None if layout is None else LayoutInfo(**layout.to_dict()),
            logit_scale=float(info.logit_scale),
            embed_dim=int(info.embed_dim),
            opset=opset,
            exporter=f"torch.onnx.export({'dynamo=True' if exporter == 'dynamo' else 'dynamo=False, TorchScript'}), "
                     f"torch {torch.__version__}, onnx {onnx.__version__}",
            precision=precision,
            graphs=Graphs(image=GraphInfo(file=IMAGE_GRAPH_FILENAME, input_name=IMAGE_INPUT, outputs=list(sig.image_outputs)),
                          text=GraphInfo(file=TEXT_GRAPH_FILENAME, input_name=TEXT_INPUT, outputs=list(sig.text_outputs),
                                         image_input_name=TEXT_IMAGE_INPUT if conditioned and not sig.scored else None,
                                         extra_image_inputs=list(sig.image_outputs[1:]) if conditioned and not sig.scored else []),
                          score=GraphInfo(file=SCORE_GRAPH_FILENAME, input_name=sig.text_outputs[0], outputs=[LOGITS_OUTPUT],
                                          whole_class_list=sig.whole_class_list)
                          if sig.scored else None),
            heads=list(sig.heads),
            files=describe_files(tmp),
            parity=parity,
        )
        with open(tmp / MANIFEST_FILENAME, "w", encoding="utf-8") as f:
            f.write(manifest.to_json())
            f.flush()
            os.fsync(f.fileno())
        load_artifact(tmp)  # the directory as a reader will see it
        _install(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _check_graph(path: Path) -> None:
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"the ONNX checker rejected {path.name}: {e}") from e
