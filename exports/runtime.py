"""Torch-free inference on an exported artifact: the code ``promptbake predict`` and the service share.

A :class:`Predictor` checks the artifact (schema version, every file's sha256) before it creates
onnxruntime sessions, then turns PIL images and class names into embeddings and predictions
exactly as the exporter measured them against torch. It holds no per-request state, so one
instance can serve concurrent requests (``InferenceSession.run`` is thread-safe, and with IOBinding
every run makes its own binding); the only shared mutable state, the per-name cache of class
embeddings (:class:`exports.text_cache.TextEmbeddingCache`), is behind a lock. Logits, softmax and
top-k come from :mod:`exports.scoring`, the path evaluation and the service use too.

On CUDA the sessions are created on one device (``device_id``) and run through onnxruntime's
IOBinding by default. Those paths are exercised on CPU by the tests (IOBinding with CPU OrtValues
gives the same numbers as ``run``; the CUDA provider options and device arguments are checked with
a stand-in session); their speed has not yet been measured on a GPU.
"""
from __future__ import annotations

import logging
import os
import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnxruntime as ort
from PIL import Image

from exports import scoring
from exports.manifest import ArtifactError, Manifest, check_digest, load_artifact
from exports.preprocess import preprocess_batch
from exports.prompts import ClassDescriptions, MissingDescriptionError, check_descriptions, prompt_rows
from exports.text_cache import TextEmbeddingCache, normalize_name
from exports.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

Device = Literal["cpu", "cuda"]
_CPU = "CPUExecutionProvider"
_CUDA = "CUDAExecutionProvider"
_MAX_PROMPTS = 1024  # (image, class) prompts per run of an image-conditioned text graph

# an execution provider, optionally with its options: "CPUExecutionProvider" or ("CUDAExecutionProvider", {...})
Provider = str | tuple[str, dict[str, Any]]


def _provider_name(provider: Provider) -> str:
    return provider if isinstance(provider, str) else provider[0]


def _providers(device: str, device_id: int = 0) -> list[Provider]:
    if device == "cpu":
        return [_CPU]
    if device == "cuda":
        available = ort.get_available_providers()
        if _CUDA not in available:
            raise ArtifactError(
                f"device 'cuda' asked for, but this onnxruntime has no {_CUDA} (available: {', '.join(available)}); "
                "install onnxruntime-gpu with a matching CUDA, or use device='cpu'"
            )
        return [(_CUDA, {"device_id": device_id}), _CPU]
    raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")


def check_graph_shapes(path: Path, manifest: Manifest, image: ort.InferenceSession, text: ort.InferenceSession) -> None:
    """The manifest's dimensions against the graphs' own declared shapes: the image input ``[B, 3, S, S]``,
    the text input ``[T, C, L]``, every embedding output ``[., D]`` (a manifest edited to another
    ``embed_dim``, ``image_size`` or context length is refused here, not at the first request)."""
    m = manifest

    def expect(session: ort.InferenceSession, graph: str, name: str, axis: int, want: int, what: str, inputs: bool) -> None:
        values = {v.name: v for v in (session.get_inputs() if inputs else session.get_outputs())}
        if name not in values:
            raise ArtifactError(f"{path / graph}: has no {'input' if inputs else 'output'} {name!r} (the manifest's {what})")
        shape = list(values[name].shape or [])
        dim = shape[axis] if -len(shape) <= axis < len(shape) else None
        if isinstance(dim, int) and dim != want:
            raise ArtifactError(f"{path / graph}: {name} has {dim} at axis {axis}, the manifest's {what} says {want}")

    gi, gt = m.graphs.image, m.graphs.text
    expect(image, gi.file, gi.input_name, 1, 3, "channels", True)
    expect(image, gi.file, gi.input_name, 2, m.preprocess.image_size, "preprocess.image_size", True)
    expect(text, gt.file, gt.input_name, -1, m.tokenizer.context_length, "tokenizer.context_length", True)
    for name in gi.outputs:
        expect(image, gi.file, name, -1, m.embed_dim, "embed_dim", False)
    if not m.capabilities.text_depends_on_image:
        for name in gt.outputs:
            expect(text, gt.file, name, -1, m.embed_dim, "embed_dim", False)


def verify_artifact(directory: str | os.PathLike[str], expected_digest: str | None = None) -> Manifest:
    """Everything checked before an artifact is used: the manifest, every file's size and sha256,
    the content digest when one is expected, and the graphs' shapes against the manifest (CPU
    sessions; what ``promptbake verify`` runs)."""
    path = Path(directory)
    manifest = load_artifact(path)
    check_digest(path, manifest, expected_digest)
    cpu = ["CPUExecutionProvider"]
    check_graph_shapes(path, manifest, create_session(path / manifest.graphs.image.file, cpu, manifest.precision),
                       create_session(path / manifest.graphs.text.file, cpu, manifest.precision))
    if manifest.graphs.score is not None:
        score = create_session(path / manifest.graphs.score.file, cpu, manifest.precision)
        _check_score_inputs(path, manifest, score)
    return manifest


def _pairwise(n_images: int, n_names: int, run: Callable[[slice, slice], np.ndarray],
              whole_class_list: bool = False) -> np.ndarray:
    """``[B, C]`` float64 from ``run(image rows, name columns)`` over blocks of at most ``_MAX_PROMPTS``
    (image, name) pairs: an image-conditioned graph runs on every pair, so its runs are bounded.
    ``whole_class_list``: every name in each run (a class's logit depends on the others), the rows
    in blocks of ``_MAX_PROMPTS // n_names`` (at least one)."""
    c_step = max(n_names, 1) if whole_class_list else min(n_names, _MAX_PROMPTS)
    b_step = max(1, _MAX_PROMPTS // max(c_step, 1))
    out = np.empty((n_images, n_names), dtype=np.float64)
    for i in range(0, n_images, b_step):
        for j in range(0, n_names, c_step):
            rows, cols = slice(i, i + b_step), slice(j, j + c_step)
            out[rows, cols] = run(rows, cols)
    return out


def _check_score_inputs(path: Path, manifest: Manifest, score: ort.InferenceSession) -> None:
    """A score graph reads only outputs of the image and text graphs (under their names)."""
    known = set(manifest.graphs.image.outputs) | set(manifest.graphs.text.outputs)
    unknown = sorted(i.name for i in score.get_inputs() if i.name not in known)
    if unknown:
        raise ArtifactError(f"{path / manifest.graphs.score.file}: inputs {unknown} are no image or text graph output")


def create_session(path: Path, providers: Sequence[Provider], precision: str = "fp32",
                   intra_op_threads: int = 0, allow_spinning: bool = False) -> ort.InferenceSession:
    """An onnxruntime session with the settings the exporter's parity check also uses.

    Args:
        providers: execution providers, preferred first, each a name or ``(name, options)`` (e.g.
            ``("CUDAExecutionProvider", {"device_id": 1})``); the first must actually start.
        precision: the artifact's precision. fp16 graphs on the CPU provider get only basic graph
            optimisations: onnxruntime 1.31's extended CPU fusions crash (segfault) on the fp16
            graphs of open_clip towers.
        intra_op_threads: threads per run; 0 lets onnxruntime use one per physical core.
        allow_spinning: let idle intra-op threads busy-wait for work. Off by default: the image and
            text sessions (and a server's other threads) share the cores, and spinning threads
            steal them (measured on the 2-core build machine with emoji-vit-s under load: batch 1 / 32
            ran 98 / 216 images/s spinning vs 190 / 314 not spinning).
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow_spinning else "0")
    options.inter_op_num_threads = 1  # the graphs are sequential; parallel requests come from callers
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    first = _provider_name(providers[0])
    cpu_only = first == _CPU
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_BASIC if precision == "fp16" and cpu_only
                                        else ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    session = ort.InferenceSession(str(path), sess_options=options, providers=list(providers))
    if first not in session.get_providers():
        # onnxruntime falls back to CPU silently when the CUDA libraries do not load (or the device does not exist)
        where = f" with {providers[0][1]}" if not isinstance(providers[0], str) and providers[0][1] else ""
        raise ArtifactError(f"{path}: onnxruntime could not start {first}{where} (got {session.get_providers()})")
    return session


def description_key(name: str, descriptions: ClassDescriptions) -> str:
    """The text-cache key of a class embedded from descriptions (sentences or an attribute tree): its
    normalised name and a digest of them."""
    value = dict(descriptions) if isinstance(descriptions, Mapping) else list(descriptions)
    digest = hashlib.sha256(json.dumps(value, ensure_ascii=False, sort_keys=True).encode()).hexdigest()[:32]
    return f"{normalize_name(name)}\x1f{digest}"


class Predictor:
    """Open-vocabulary classification with an exported artifact.

    Args:
        artifact_dir: the directory ``promptbake export`` wrote.
        device: ``"cpu"`` (default) or ``"cuda"``; cuda fails loudly when onnxruntime cannot use it.
        device_id: the CUDA device the sessions run on (onnxruntime's ``device_id`` provider
            option, counted among the devices ``CUDA_VISIBLE_DEVICES`` leaves visible). Only 0 is
            accepted on CPU.
        io_binding: run the graphs through onnxruntime's IOBinding: each run's inputs are copied to
            the device as ``OrtValue``s, its output is allocated on the device and copied to host
            after the run, with a fresh binding per run. ``None`` (default): on for CUDA, off for
            CPU (no host-device copy to manage there; on CPU it gives the same numbers as plain
            runs, which the tests check). Not yet measured on a GPU.
        intra_op_threads: threads per graph run; 0 lets onnxruntime use one per physical core.
        batch_size: images (or prompts) per graph run, bounding memory for long inputs.
        text_cache_names: class names whose embeddings are kept (per normalised name, least
            recently used dropped first); 0 turns the cache off.

    Raises:
        ArtifactError: the artifact fails its checks, or asks for something this runtime lacks.
    """

    def __init__(
        self,
        artifact_dir: str | os.PathLike[str],
        *,
        device: Device = "cpu",
        device_id: int = 0,
        io_binding: bool | None = None,
        intra_op_threads: int = 0,
        batch_size: int = 32,
        text_cache_names: int = 4096,
    ):
        if isinstance(device_id, bool) or not isinstance(device_id, int) or device_id < 0:
            raise ValueError(f"device_id must be an integer >= 0, got {device_id!r}")
        if device == "cpu" and device_id != 0:
            raise ValueError(f"device_id={device_id} asked for on CPU; device ids number CUDA devices")
        self.path = Path(artifact_dir)
        self.manifest: Manifest = load_artifact(self.path)
        m = self.manifest
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.device = device
        self.device_id = device_id
        self.io_binding = device == "cuda" if io_binding is None else bool(io_binding)
        # where IOBinding puts inputs and outputs: onnxruntime's OrtDevice names
        self._ort_device = "cuda" if device == "cuda" else "cpu"
        self.batch_size = batch_size
        self.tokenizer = Tokenizer(self.path / m.tokenizer.file, m.tokenizer.context_length)
        if (self.tokenizer.sot_token_id, self.tokenizer.eot_token_id) != (m.tokenizer.sot_token_id, m.tokenizer.eot_token_id):
            raise ArtifactError(f"{self.path / m.tokenizer.file}: special token ids differ from the manifest")

        providers = _providers(device, device_id)
        self._image = create_session(self.path / m.graphs.image.file, providers, m.precision, intra_op_threads)
        self._text = create_session(self.path / m.graphs.text.file, providers, m.precision, intra_op_threads)
        # the image outputs an image-conditioned text graph reads (the exporter drops inputs a graph never uses)
        self._text_inputs = {i.name for i in self._text.get_inputs()}
        check_graph_shapes(self.path, m, self._image, self._text)
        self._score = None
        if m.graphs.score is not None:  # scored: cached class outputs + (image, class) pairs through this graph
            self._score = create_session(self.path / m.graphs.score.file, providers, m.precision, intra_op_threads)
            _check_score_inputs(self.path, m, self._score)
            self._score_inputs = {i.name for i in self._score.get_inputs()}
        self._logit_scale = float(m.logit_scale)
        if text_cache_names < 0:
            raise ValueError("text_cache_names must be >= 0")
        self.text_cache = TextEmbeddingCache(self._stacked_text_outputs, text_cache_names) if text_cache_names else None
        logger.debug("Predictor %s: %s device %d, io_binding=%s", self.path, self.providers[0], device_id, self.io_binding)

    def _run(self, session: ort.InferenceSession, output_names: Sequence[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """One graph run -> its outputs on the host. Every graph run of the Predictor goes here."""
        if not self.io_binding:
            return session.run(list(output_names), feeds)
        # one binding per run: an IOBinding is mutable state, so sharing one would race between threads
        binding = session.io_binding()
        # held until the run ends: on CPU an OrtValue borrows the numpy array's memory
        inputs = {name: ort.OrtValue.ortvalue_from_numpy(arr, self._ort_device, self.device_id) for name, arr in feeds.items()}
        for name, value in inputs.items():
            binding.bind_ortvalue_input(name, value)
        for name in output_names:
            binding.bind_output(name, self._ort_device, self.device_id)
        session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()

    # -- embeddings ------------------------------------------------------------------------------
    @property
    def providers(self) -> list[str]:
        """The execution providers the sessions run on, preferred first."""
        return list(self._image.get_providers())

    @property
    def class_names_trained_on(self) -> list[str]:
        return list(self.manifest.base_classnames)

    def image_outputs(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        """Preprocessed pixels ``[B, 3, S, S]`` float32 -> every declared image output, L2-normalised ``[B, D]`` float32."""
        s = self.manifest.preprocess.image_size
        if pixels.ndim != 4 or pixels.shape[1:] != (3, s, s):
            raise ValueError(f"pixels must be [B, 3, {s}, {s}], got {list(pixels.shape)}")
        g = self.manifest.graphs.image
        runs = [self._run(self._image, g.outputs,
                          {g.input_name: np.ascontiguousarray(pixels[i : i + self.batch_size], dtype=np.float32)})
                for i in range(0, len(pixels), self.batch_size)]
        if not runs:
            return {name: np.zeros((0, self.manifest.embed_dim), np.float32) for name in g.outputs}
        return {name: np.concatenate([r[j] for r in runs]) for j, name in enumerate(g.outputs)}

    def embed_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """Preprocessed pixels ``[B, 3, S, S]`` float32 -> the main (first) image output ``[B, D]`` float32."""
        return self.image_outputs(pixels)[self.manifest.graphs.image.outputs[0]]

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """PIL images -> L2-normalised image embeddings ``[B, D]`` float32."""
        return self.embed_pixels(preprocess_batch(list(images), self.manifest.preprocess))

    @property
    def conditioned(self) -> bool:
        """Whether class embeddings depend on the image (``capabilities.text_depends_on_image``).

        Then there are no per-name embeddings to cache: :meth:`embed_texts` refuses, and
        :meth:`scores` / :meth:`logits` run the text graph on every (image, name) pair.
        """
        return self.manifest.capabilities.text_depends_on_image

    @property
    def described(self) -> bool:
        """Whether classes are embedded from their descriptions (``capabilities.needs_class_descriptions``):
        every name needs some, from the request or shipped in the artifact (``class_descriptions``)."""
        return self.manifest.capabilities.needs_class_descriptions

    def class_descriptions(self, names: Sequence[str], descriptions: Mapping[str, ClassDescriptions] | None = None
                           ) -> dict[str, ClassDescriptions] | None:
        """Each name's descriptions, the request's (matched by normalised name) over the artifact's; None
        for methods that do not use them. An artifact with a ``description_layout`` reads attribute
        trees ``{attribute: [sentence, ...]}`` (:func:`exports.prompts.check_tree`), others sentences.

        Raises:
            exports.prompts.MissingDescriptionError: names with neither.
            ValueError: descriptions of the wrong kind (a list for a tree method, an unknown attribute).
        """
        if not self.described:
            return None
        layout = self.manifest.layout
        given: dict[str, ClassDescriptions] = {}
        for k, v in (descriptions or {}).items():
            checked = check_descriptions(k, v, layout, require_known=True)
            given[normalize_name(k)] = ({a: list(d) for a, d in checked.items()} if isinstance(checked, Mapping)
                                        else list(checked))
        shipped = {normalize_name(k): v for k, v in self.manifest.class_descriptions.items()}
        out = {n: given.get(normalize_name(n)) or shipped.get(normalize_name(n)) or [] for n in names}
        missing = [n for n, d in out.items() if not d]
        if missing:
            raise MissingDescriptionError(missing)
        return out

    def _tokens(self, names: list[str], descriptions: Mapping[str, ClassDescriptions] | None = None) -> np.ndarray:
        """``[T, C, L]`` token ids, template-major as the exporter traced the text graph (``[S, C, L]``
        description rows for methods that embed classes from them; :func:`exports.prompts.prompt_rows`)."""
        rows = prompt_rows(self.manifest.prompt_templates, names, descriptions, self.manifest.description_template,
                           self.manifest.layout)
        L = self.manifest.tokenizer.context_length
        return self.tokenizer([p for row in rows for p in row]).reshape(len(rows), len(names), L)

    def text_outputs(self, class_names: Sequence[str], descriptions: Mapping[str, ClassDescriptions] | None = None
                     ) -> dict[str, np.ndarray]:
        """Class names -> every declared class output, L2-normalised ``[C, D]`` float32 (cached per name).

        Every prompt template is filled with every name (``[T, C, L]`` token ids); the text graph
        is the method's whole class-embedding side, so nothing is averaged here. Methods that embed
        classes from descriptions take them from ``descriptions`` or the artifact's
        (:meth:`class_descriptions`); others ignore ``descriptions``.

        Raises:
            ValueError: the method's class embeddings depend on the image (:attr:`conditioned`).
            exports.prompts.MissingDescriptionError: a name without descriptions, for such methods.
        """
        return self.counted_text_outputs(class_names, descriptions=descriptions)[0]

    def embed_texts(self, class_names: Sequence[str], descriptions: Mapping[str, ClassDescriptions] | None = None) -> np.ndarray:
        """Class names -> the main (first) class output ``[C, D]`` float32 (see :meth:`text_outputs`)."""
        return self.text_outputs(class_names, descriptions)[self.manifest.graphs.text.outputs[0]]

    def counted_text_outputs(self, class_names: Sequence[str], cache: bool = True,
                             descriptions: Mapping[str, ClassDescriptions] | None = None) -> tuple[dict[str, np.ndarray], int, int]:
        """:meth:`text_outputs`, and how many names this call found in the cache and how many it computed.

        ``cache=False`` runs the text graph and leaves the cache alone (readiness probes).
        """
        if self.conditioned:
            raise ValueError(f"method {self.manifest.method!r}: class embeddings depend on the image; use scores() or classify()")
        return self._cached_text_outputs(class_names, cache, descriptions)

    def cached_text_outputs(self, class_names: Sequence[str]) -> dict[str, np.ndarray] | None:
        """:meth:`counted_text_outputs` if every name is already cached, else ``None`` (runs no graph:
        cheap enough for a caller to try on its event loop before sending the work to a thread)."""
        if self.conditioned or self.described or self.text_cache is None:
            return None
        names = scoring.check_class_names(class_names, unique=False)
        stacked, _, _ = self.text_cache.get([normalize_name(n) for n in names], compute=False)
        return None if stacked is None else self._by_text_output(stacked)

    def _by_text_output(self, stacked: np.ndarray) -> dict[str, np.ndarray]:
        """``[C, n_outputs, ...]`` cache rows -> ``{output name: [C, ...]}``."""
        return {name: stacked[:, j] for j, name in enumerate(self.manifest.graphs.text.outputs)}

    def _cached_text_outputs(self, class_names: Sequence[str], cache: bool = True,
                             descriptions: Mapping[str, ClassDescriptions] | None = None) -> tuple[dict[str, np.ndarray], int, int]:
        """The text graph's outputs through the per-name cache (class embeddings; a scored artifact's class outputs)."""
        names = scoring.check_class_names(class_names, unique=False)
        per_name = self.class_descriptions(names, descriptions)
        if self.text_cache is None or not cache:
            stacked, hits, misses = self._stacked_text_outputs(names, per_name), 0, len(names)
        elif per_name is None:
            stacked, hits, misses = self.text_cache.get([normalize_name(n) for n in names])
        else:  # a class's embedding is a function of its name and its descriptions: both are in the key
            keys = [description_key(n, per_name[n]) for n in names]
            by_key = dict(zip(keys, names))
            stacked, hits, misses = self.text_cache.get(
                keys, embed=lambda ks: self._stacked_text_outputs([by_key[k] for k in ks], per_name))
        return self._by_text_output(stacked), hits, misses

    def _stacked_text_outputs(self, names: Sequence[str], descriptions: Mapping[str, ClassDescriptions] | None = None) -> np.ndarray:
        """``[C, n_outputs, D]``: the text graph's outputs for ``names``, one row per name (what the cache keeps)."""
        g = self.manifest.graphs.text
        step = self.batch_size * 8  # class names per run
        runs = []
        for i in range(0, len(names), step):
            chunk = list(names[i : i + step])
            tokens = self._tokens(chunk, None if descriptions is None else {n: descriptions[n] for n in chunk})
            runs.append(self._run(self._text, g.outputs, {g.input_name: np.ascontiguousarray(tokens)}))
        return np.stack([np.concatenate([r[j] for r in runs]) for j in range(len(g.outputs))], axis=1).astype(np.float32, copy=False)

    def conditioned_logits(self, image_embeddings: np.ndarray | Mapping[str, np.ndarray], names: Sequence[str],
                           descriptions: Mapping[str, ClassDescriptions] | None = None) -> np.ndarray:
        """Image outputs and names -> ``[B, C]`` float64 logits through the image-conditioned text graph
        (:attr:`conditioned` artifacts only): the text graph runs on every (image, name) pair, at most
        ``_MAX_PROMPTS`` prompts per graph run. ``image_embeddings``: the ``[B, D]`` main output (from
        :meth:`embed_images`), or :meth:`image_outputs`' dict, which a graph that reads other image
        outputs too (``graphs.text.extra_image_inputs``) needs."""
        if not self.conditioned:
            raise ValueError(f"method {self.manifest.method!r}: class embeddings do not depend on the image; use logits()")
        if self._score is not None:
            return self._scored_logits(image_embeddings, names, descriptions)
        g = self.manifest.graphs.text
        if isinstance(image_embeddings, Mapping):
            outputs = image_embeddings
            image_embeddings = outputs[self.manifest.graphs.image.outputs[0]]
            extra = {n: outputs[n] for n in g.extra_image_inputs}
        elif g.extra_image_inputs:
            raise ValueError(f"method {self.manifest.method!r}: its text graph also reads the image outputs "
                             f"{g.extra_image_inputs}; pass image_outputs(), not the embeddings alone")
        else:
            extra = {}
        names = scoring.check_class_names(names)
        tokens = self._tokens(names, self.class_descriptions(names, descriptions))
        images = {n: v for n, v in {g.image_input_name: image_embeddings, **extra}.items() if n in self._text_inputs}

        def run(rows: slice, cols: slice) -> np.ndarray:  # the text tower on rows x cols prompts
            feeds = {g.input_name: np.ascontiguousarray(tokens[:, cols]),
                     **{n: np.ascontiguousarray(v[rows], dtype=np.float32) for n, v in images.items()}}
            return self._run(self._text, g.outputs, feeds)[0]

        return _pairwise(len(image_embeddings), len(names), run)

    def _scored_logits(self, image_outputs: np.ndarray | Mapping[str, np.ndarray], names: Sequence[str],
                       descriptions: Mapping[str, ClassDescriptions] | None = None) -> np.ndarray:
        """A scored artifact: the names' class outputs from the per-name cache, then the score graph on
        every (image, name) pair, at most ``_MAX_PROMPTS`` pairs per run (with ``whole_class_list``:
        all the names and at least one image per run, so more pairs when there are more names)."""
        if not isinstance(image_outputs, Mapping):
            raise ValueError(f"method {self.manifest.method!r}: its score graph reads every image output; "
                             "pass image_outputs(), not the embeddings alone")
        names = scoring.check_class_names(names)
        classes = self._cached_text_outputs(names, descriptions=descriptions)[0]
        images = {n: v for n, v in image_outputs.items() if n in self._score_inputs}
        classes = {n: v for n, v in classes.items() if n in self._score_inputs}

        def run(rows: slice, cols: slice) -> np.ndarray:  # the score graph on rows x cols pairs
            feeds = {**{n: np.ascontiguousarray(v[rows], dtype=np.float32) for n, v in images.items()},
                     **{n: np.ascontiguousarray(v[cols], dtype=np.float32) for n, v in classes.items()}}
            return self._run(self._score, self.manifest.graphs.score.outputs, feeds)[0]

        return _pairwise(len(next(iter(image_outputs.values()))), len(names), run,
                         self.manifest.graphs.score.whole_class_list)

    # -- classification ----------------------------------------------------------------------------
    def logits_from_outputs(self, image_outputs: dict[str, np.ndarray], text_outputs: dict[str, np.ndarray],
                            class_names: Sequence[str], mode: str = "auto") -> np.ndarray:
        """``[B, C]`` float64 logits of image outputs against the names' class outputs, through the
        manifest's heads (:func:`exports.scoring.head_logits`); ``mode`` picks the base/novel heads."""
        is_base = scoring.base_mask(class_names, self.manifest.base_classnames, mode)
        return scoring.head_logits(image_outputs, text_outputs, self.manifest.heads, is_base, self._logit_scale)

    def logits(self, images: Sequence[Image.Image], class_names: Sequence[str], mode: str = "auto",
               descriptions: Mapping[str, ClassDescriptions] | None = None) -> np.ndarray:
        """``[B, C]`` float64 logits of the images against the names (``logit_scale * cosine`` for one head).

        Args:
            mode: ``auto`` scores the names the method was trained on with its base heads and
                other names with its novel heads; ``base`` / ``novel`` force one set for all names.
                Only methods with ``capabilities.base_novel_switch`` score differently.
            descriptions: ``{name: [sentence, ...]}`` for methods that embed classes from them
                (:meth:`text_outputs`); ignored by the others.
        """
        names = scoring.check_class_names(class_names)
        scoring.check_mode(mode)
        pixels = preprocess_batch(list(images), self.manifest.preprocess)
        if self.conditioned:
            return self.conditioned_logits(self.image_outputs(pixels), names, descriptions)
        return self.logits_from_outputs(self.image_outputs(pixels), self.text_outputs(names, descriptions), names, mode)

    def scores(self, images: Sequence[Image.Image], class_names: Sequence[str], mode: str = "auto",
               descriptions: Mapping[str, ClassDescriptions] | None = None) -> np.ndarray:
        """``[B, C]`` probabilities: softmax over the names of :meth:`logits`."""
        return scoring.softmax(self.logits(images, class_names, mode, descriptions))

    def classify(self, images: Sequence[Image.Image], class_names: Sequence[str], top_k: int = 5,
                 mode: str = "auto", descriptions: Mapping[str, ClassDescriptions] | None = None) -> list[dict[str, Any]]:
        """One prediction per image: ``{"label", "score", "top": [{"class_name", "score"}, ...]}``.

        ``top`` holds the ``top_k`` best names (at most all of them), best first; ``label`` and
        ``score`` are its first entry.
        """
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError("top_k must be >= 1")
        names = scoring.check_class_names(class_names)
        return scoring.top_k(self.scores(images, names, mode, descriptions), names, top_k)
