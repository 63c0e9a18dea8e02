"""The promptbake BentoML service: open-vocabulary image classification for any class names.

``bentoml serve service.service:PromptbakeService`` (or ``promptbake serve --artifact ART``) with
``PROMPTBAKE_ARTIFACT`` set to an artifact directory or a BentoML model tag. The artifact is
loaded in ``__init__`` (never at import) and checked (schema, every file's sha256) before use.
Routes (OpenAPI at ``/docs.json``):

* ``POST /classify``: images (multipart files ``images`` or base64 strings in JSON), ``class_names``
  (a JSON list), optional ``top_k`` -> softmax probabilities over the given names.
* ``POST /embed_image``, ``POST /embed_text``: L2-normalised embeddings for your own index.
* ``GET|POST /info``: artifact, onnxruntime provider, CUDA device and IOBinding in use, limits,
  batching, cache counters.
* ``/livez`` (process up), ``/readyz`` (a real inference succeeds), ``/metrics`` (Prometheus).

Imports neither torch nor anything from ``training`` (``tests/test_service.py`` checks it).
Settings: :class:`service.config.ServiceConfig` (``PROMPTBAKE_*`` variables). Each BentoML worker
process (``PROMPTBAKE_WORKERS``) holds one session pair; on CUDA worker ``i`` (1-based) uses device
``PROMPTBAKE_CUDA_DEVICES[(i - 1) % n]``, with IOBinding. The multi-GPU and IOBinding paths are
exercised on CPU by the tests and not yet measured on a GPU.
"""
from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import bentoml
import numpy as np
import onnxruntime as ort
from pydantic import BaseModel, Field
from pydantic import ValidationError as PydanticValidationError
from starlette.responses import JSONResponse

from exports import scoring
from exports.manifest import MANIFEST_FILENAME, ArtifactError, artifact_digest, check_digest, read_manifest
from exports.preprocess import preprocess_batch
from exports.prompts import MissingDescriptionError
from exports.runtime import Predictor
from service.batching import ImageBatcher
from service.config import ServiceConfig, ServiceConfigError, cuda_device_for_worker, cuda_driver_problem
from service.errors import IN_HTTP_REQUEST, RequestError, bad_request
from service.http import PromptbakeMiddleware
from service.images import ImageUpload, decode_image, harden_pillow, image_bytes
from service.metrics import get_metrics

logger = logging.getLogger("promptbake.service")

BENTOML_ARTIFACT_SUBDIR = "artifact"  # training.export.save_to_bentoml writes it here (not imported: torch)


# -- response models ---------------------------------------------------------------------------

#: per class name: sentences, or an attribute tree for a method that reads trees (TAP; /info lists its attributes)
Descriptions = dict[str, list[str] | dict[str, list[str]]]


class ArtifactSummary(BaseModel):
    name: str = Field(description="artifact directory name or BentoML model tag")
    method: str
    backbone: str
    precision: str
    embed_dim: int
    manifest_sha256: str
    digest: str = Field(description="the artifact's content digest (sha256 of its canonical manifest), as export prints it")
    descriptions: str = Field(default="none", description="what /classify's descriptions field takes for this "
                              "method: 'none' (ignored), 'sentences' ({name: [sentence, ...]}) or 'attributes' "
                              "({name: {attribute: [sentence, ...]}})")
    # a list, never null: BentoML's client cannot read a null where its schema flattens to an array
    description_attributes: list[str] = Field(
        default_factory=list, description="for a method that reads attribute trees: the attributes a class's "
        "descriptions may have ({name: {attribute: [sentence, ...]}}); empty for others")


class TopEntry(BaseModel):
    class_name: str
    score: float


class Prediction(BaseModel):
    label: str
    score: float = Field(description="softmax probability of label over the given class names")
    top: list[TopEntry]


class ClassifyResponse(BaseModel):
    artifact: ArtifactSummary
    predictions: list[Prediction]


class EmbeddingResponse(BaseModel):
    artifact: ArtifactSummary
    dim: int
    embeddings: list[list[float]] = Field(description="L2-normalised, one row per input")


class InfoResponse(BaseModel):
    artifact: ArtifactSummary
    provider: str = Field(description="the onnxruntime execution provider running the graphs")
    providers: list[str]
    device_id: int | None = Field(description="the CUDA device the graphs run on; null on CPU")
    io_binding: bool = Field(description="whether the graphs run through onnxruntime IOBinding (default on CUDA)")
    worker: int = Field(description="the BentoML worker process (1-based) that answered")
    onnxruntime: str
    limits: dict[str, Any]
    text_cache: dict[str, int]
    recent_batch_sizes: list[int]


# -- loading -----------------------------------------------------------------------------------

#: the BentoML model a Bento ships its artifact as (bentofile.yaml), served when PROMPTBAKE_ARTIFACT is unset
DEFAULT_MODEL = "promptbake-default"


def resolve_artifact(spec: str | None) -> tuple[Path, str]:
    """``PROMPTBAKE_ARTIFACT`` -> (artifact directory, display name): a directory or a model tag; unset,
    the Bento's own model :data:`DEFAULT_MODEL` (so ``bentoml serve promptbake:latest`` needs no variable)."""
    if not spec:
        try:
            bentoml.models.get(DEFAULT_MODEL)
        except Exception:  # bentoml.exceptions.NotFound: not inside a Bento, nor in the model store
            raise ServiceConfigError("PROMPTBAKE_ARTIFACT is not set: give an artifact directory (promptbake export "
                                     "--out) or a BentoML model tag (promptbake export --bentoml NAME)") from None
        spec = DEFAULT_MODEL
    path = Path(spec).expanduser()
    if path.is_dir():
        return path.resolve(), path.name
    if os.sep in spec or spec.startswith("."):
        raise ServiceConfigError(f"PROMPTBAKE_ARTIFACT={spec}: no such directory")
    try:
        model = bentoml.models.get(spec)
    except Exception as e:  # bentoml.exceptions.NotFound, or a malformed tag
        raise ServiceConfigError(f"PROMPTBAKE_ARTIFACT={spec}: neither a directory nor a BentoML model ({e})") from None
    sub = (model.info.metadata or {}).get("artifact_subdir", BENTOML_ARTIFACT_SUBDIR)
    return Path(model.path_of(sub)), str(model.tag)


def create_predictor(path: Path, cfg: ServiceConfig, worker_index: int | None = None) -> Predictor:
    """A :class:`Predictor` on the configured device; CUDA missing is an error unless fallback is allowed.

    On CUDA the sessions go on device :func:`cuda_device_for_worker` ``(worker_index, cfg.cuda_devices)``
    with IOBinding (the Predictor's CUDA default).
    """
    kwargs: dict[str, Any] = dict(intra_op_threads=cfg.intra_op_threads, batch_size=cfg.max_batch_size,
                                  text_cache_names=cfg.text_cache_names)
    if cfg.device == "cuda":
        if hasattr(ort, "preload_dlls"):
            try:  # CUDA/cuDNN from the nvidia-* wheels of onnxruntime-gpu[cuda,cudnn] (the Bento's image)
                ort.preload_dlls()
            except Exception as e:  # noqa: BLE001 - system CUDA libraries may still work
                logger.debug("onnxruntime.preload_dlls: %r", e)
        device_id = cuda_device_for_worker(worker_index, cfg.cuda_devices)
        try:
            return Predictor(path, device="cuda", device_id=device_id, **kwargs)
        except ArtifactError as e:
            if "CUDA" not in str(e) or not cfg.allow_cpu_fallback:
                raise ServiceConfigError(f"{e}. Set PROMPTBAKE_ALLOW_CPU_FALLBACK=1 to run on CPU instead") from None
            logger.warning("CUDA is not usable (%s); PROMPTBAKE_ALLOW_CPU_FALLBACK=1, running on CPU", e)
    return Predictor(path, device="cpu", **kwargs)


# -- the service -------------------------------------------------------------------------------

def _exit_on_bad_settings() -> None:
    """Validate every ``PROMPTBAKE_*`` setting when the module is imported: ``bentoml serve`` imports it
    in its main process, so a bad one stops the server once, in one line, instead of failing every
    worker start in a restart loop. With ``PROMPTBAKE_DEVICE=cuda`` and no CPU fallback, the NVIDIA
    driver must be there (:func:`~service.config.cuda_driver_problem`). (Whether the artifact is given
    and loads, and whether onnxruntime can start CUDA, is checked per worker.)"""
    try:
        cfg = ServiceConfig.from_env()
        if cfg.artifact_digest and cfg.artifact and Path(cfg.artifact).is_dir():  # the pin: the manifest alone, cheap
            check_digest(cfg.artifact, read_manifest(cfg.artifact), cfg.artifact_digest)
        if cfg.device == "cuda" and not cfg.allow_cpu_fallback:  # the driver alone: no CUDA context here
            problem = cuda_driver_problem(cfg.cuda_devices)
            if problem:
                raise ServiceConfigError(f"PROMPTBAKE_DEVICE=cuda: {problem}. Set PROMPTBAKE_DEVICE=cpu, or "
                                         "PROMPTBAKE_ALLOW_CPU_FALLBACK=1 to run on CPU when CUDA is missing")
    except (ServiceConfigError, ArtifactError) as e:
        sys.stderr.write(f"promptbake: error: {e}\n")
        raise SystemExit(2) from None


_exit_on_bad_settings()


class _ClientErrorsAreNotServerErrors(logging.Filter):
    """BentoML logs a request its typed API refuses (a 400 ``invalid_input``) as ``ERROR Exception on
    /classify`` with the whole traceback; a client's mistake is one INFO line here, and server errors
    keep their ERROR and traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        status = getattr(exc, "error_code", None)
        if status is None and isinstance(exc, PydanticValidationError) and exc.title == "Input":
            status = 400  # the typed API's own input model (BentoML names it "Input"); the client gets a 400
        if status is not None and 400 <= int(status) < 500:
            record.msg, record.args = f"{record.getMessage()}: client error {int(status)}: {str(exc).splitlines()[0][:200]}", ()
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.exc_info, record.exc_text = None, None
        return True


logging.getLogger("bentoml._internal.server.http_app").addFilter(_ClientErrorsAreNotServerErrors())


def _int_env(name: str, default: int, minimum: int | None = None) -> int:
    # read at import for the decorator below: process and traffic settings, not the model
    try:
        value = int(os.environ.get(name, default))
    except ValueError:
        value = None
    if value is None or (minimum is not None and value < minimum):
        bound = "" if minimum is None else f" >= {minimum}"
        sys.stderr.write(f"promptbake: error: {name} must be an integer{bound}, got {os.environ.get(name)!r}\n")
        raise SystemExit(2)
    return value


@bentoml.service(
    name="promptbake",
    # one onnxruntime session pair per worker process; on CUDA the workers are spread over
    # PROMPTBAKE_CUDA_DEVICES (one session set per GPU with as many workers as GPUs)
    workers=_int_env("PROMPTBAKE_WORKERS", 1, minimum=1),
    # no BentoML max_concurrency: its slot is taken before the body is read, so 64 slow uploads would
    # lock everyone out; the service's own slots (PROMPTBAKE_MAX_CONCURRENCY, service/http.py) are
    # taken once a body has arrived
    traffic={"timeout": _int_env("PROMPTBAKE_TIMEOUT_S", 60)},
)
class PromptbakeService:
    def __init__(self, config: ServiceConfig | None = None) -> None:
        if logging.getLogger("promptbake").level == logging.NOTSET:
            logging.getLogger("promptbake").setLevel(logging.INFO)  # BentoML leaves user loggers at WARNING
        self.config = cfg = config or ServiceConfig.from_env()
        harden_pillow(cfg.max_image_pixels)
        self.slots = asyncio.Semaphore(cfg.max_concurrency)  # API requests processed at once (service/http.py)
        path, name = resolve_artifact(cfg.artifact)
        self.worker = bentoml.server_context.worker_index or 1  # None outside a BentoML worker process
        self.predictor = create_predictor(path, cfg, self.worker)
        m = self.predictor.manifest
        check_digest(path, m, cfg.artifact_digest)
        self.artifact = ArtifactSummary(
            name=name, method=m.method, backbone=m.backbone, precision=m.precision, embed_dim=m.embed_dim,
            manifest_sha256=hashlib.sha256((path / MANIFEST_FILENAME).read_bytes()).hexdigest(),
            digest=artifact_digest(m),
            description_attributes=[] if m.layout is None else list(m.layout.attributes),
            descriptions="none" if not m.capabilities.needs_class_descriptions else
            "sentences" if m.layout is None else "attributes",
        )
        self.providers = list(self.predictor.providers)
        self.provider = self.providers[0]
        on_cuda = self.provider == "CUDAExecutionProvider"
        self.device_id: int | None = self.predictor.device_id if on_cuda else None
        self.io_binding = self.predictor.io_binding
        self.metrics = get_metrics()
        self.text_cache = self.predictor.text_cache  # per normalised name; the Predictor's own
        self.image_output_names = list(m.graphs.image.outputs)
        self._image_rows = [(1, False)] * len(self.image_output_names)  # set by the first image batch
        # the batcher splits [n, ...] arrays by rows: every image output stacked on axis 1
        self.batcher = ImageBatcher(self._stacked_image_outputs, cfg.max_batch_size, cfg.max_latency_ms,
                                    on_batch=self.metrics.batch_size.observe)
        logger.info("promptbake: serving %s (%s on %s, %s) with onnxruntime %s on %s%s (providers %s), IOBinding %s, "
                    "worker %d; batching max_batch_size=%d max_latency_ms=%d", name, m.method, m.backbone, m.precision,
                    ort.__version__, self.provider, f" device {self.device_id}" if on_cuda else "", self.providers,
                    "on" if self.io_binding else "off", self.worker, cfg.max_batch_size, cfg.max_latency_ms)

    # -- validation (cheap, on the event loop) ---------------------------------------------------
    def _check_names(self, names: list[str], what: str = "class_names") -> list[str]:
        """The service's limits, then the shared check (:func:`exports.scoring.check_class_names`); normalised keys."""
        cfg = self.config
        if len(names) > cfg.max_class_names:
            raise bad_request(f"too_many_{what}", f"{len(names)} {what}; at most {cfg.max_class_names}",
                              limit=cfg.max_class_names)
        for i, n in enumerate(names):
            if len(n) > cfg.max_name_chars:
                raise bad_request("name_length", f"{what}[{i}] has {len(n)} characters; at most {cfg.max_name_chars}",
                                  limit=cfg.max_name_chars)
        try:
            scoring.check_class_names(names, what, unique=what == "class_names")
        except scoring.ClassNameError as e:
            kind = f"{what}_empty" if e.kind == "names_empty" else e.kind
            raise bad_request(kind, str(e)) from None
        return [scoring.normalize_name(n) for n in names]

    def _check_images(self, images: list[str | bytes]) -> None:
        if not images:
            raise bad_request("images_empty", "send at least one image")
        if len(images) > self.config.max_images:
            raise bad_request("too_many_images", f"{len(images)} images; at most {self.config.max_images} per request",
                              limit=self.config.max_images)

    # -- work (off the event loop) ------------------------------------------------------------------
    def _pixels(self, images: list[str | bytes], lo: int = 0, hi: int | None = None) -> np.ndarray:
        """Images ``lo:hi`` (base64 strings or bytes) -> preprocessed ``[n, 3, S, S]`` float32 (runs in
        the image batch's worker thread; errors name each image by its index in the request)."""
        cfg = self.config
        t0 = time.perf_counter()
        hi = len(images) if hi is None else hi
        decoded = [decode_image(image_bytes(images[i], i), i, allowed_formats=cfg.allowed_formats,
                                max_image_pixels=cfg.max_image_pixels) for i in range(lo, hi)]
        pixels = preprocess_batch(decoded, self.predictor.manifest.preprocess)
        self.metrics.stage_seconds.labels("decode").observe(time.perf_counter() - t0)
        return pixels

    def _stacked_image_outputs(self, pixels: np.ndarray) -> np.ndarray:
        """Every image output side by side, ``[n, rows, D]``: a ``[n, D]`` output is one row, a ``[n, K, D]``
        token output (read by an image-conditioned text graph) K rows; :meth:`_image_outputs` splits them."""
        outputs = self.predictor.image_outputs(pixels)
        parts = [outputs[n].reshape(len(pixels), -1, outputs[n].shape[-1]) for n in self.image_output_names]
        self._image_rows = [(p.shape[1], outputs[n].ndim == 3) for p, n in zip(parts, self.image_output_names)]
        return np.concatenate(parts, axis=1)

    async def _image_outputs(self, images: list[str | bytes]) -> dict[str, np.ndarray]:
        """Every declared image output ``{name: [n, D]}``, decoded and embedded in batches across requests."""
        t0 = time.perf_counter()
        stacked = await self.batcher.embed(len(images), functools.partial(self._pixels, images))
        # decoding is timed on its own in the batch; this is the request's wait for its embeddings
        self.metrics.stage_seconds.labels("image_embed").observe(time.perf_counter() - t0)
        self.metrics.images.inc(len(images))
        return self._split_image_outputs(stacked)

    def _split_image_outputs(self, stacked: np.ndarray) -> dict[str, np.ndarray]:
        out, start = {}, 0
        for n, (rows, tokens) in zip(self.image_output_names, self._image_rows):
            out[n] = stacked[:, start : start + rows] if tokens else stacked[:, start]
            start += rows
        return out

    async def _text_outputs(self, keys: list[str], descriptions: Descriptions | None = None) -> dict[str, np.ndarray]:
        """Every declared class output ``{name: [C, D]}`` of normalised names, through the per-name cache."""
        t0 = time.perf_counter()
        # every name cached (the common case): answered here; a hop to a thread costs more than the lookup
        cached = self.predictor.cached_text_outputs(keys) if descriptions is None and len(keys) <= 1024 else None
        if cached is not None:
            out, hits, misses = cached, len(keys), 0
        else:
            out, hits, misses = await anyio.to_thread.run_sync(
                lambda: self.predictor.counted_text_outputs(keys, descriptions=descriptions))
        self.metrics.text_cache.labels("hit").inc(hits)
        self.metrics.text_cache.labels("miss").inc(misses)
        self.metrics.stage_seconds.labels("text_embed").observe(time.perf_counter() - t0)
        return out

    async def _conditioned_logits(self, img: dict[str, np.ndarray], keys: list[str],
                                  descriptions: Descriptions | None = None) -> np.ndarray:
        t0 = time.perf_counter()
        # the Predictor's image-conditioned path, fed with the batched image embeddings
        logits = await anyio.to_thread.run_sync(self.predictor.conditioned_logits, img, keys, descriptions)
        self.metrics.stage_seconds.labels("text_embed").observe(time.perf_counter() - t0)
        return np.asarray(logits, dtype=np.float64)

    def count_error(self, kind: str) -> None:
        self.metrics.errors.labels(kind).inc()

    async def _respond(self, work: Any) -> Any:
        """Run an API body; a :class:`RequestError` becomes its JSON response over HTTP, else propagates."""
        try:
            return await work
        except RequestError as e:
            self.count_error(e.kind)
            if IN_HTTP_REQUEST.get():
                return JSONResponse(e.body(), status_code=e.status)
            raise

    # -- APIs -----------------------------------------------------------------------------------
    @bentoml.api(route="/classify")
    async def classify(
        self,
        images: list[ImageUpload] = Field(description="image files (JPEG, PNG, WebP, BMP, GIF): multipart parts named "
                                                      "'images', or base64 strings in JSON"),
        class_names: list[str] = Field(description="the candidate names, any language the backbone knows"),
        top_k: int = Field(default=5, strict=True, description="names listed in each prediction's 'top', best first "
                           "(an integer: true or \"3\" are refused)"),
        mode: str = Field(default="auto", description="which heads score the names, for methods with a base/novel "
                          "switch: 'auto' (names the method was trained on use its base heads, others its novel "
                          "heads), 'base' or 'novel' (one set for every name); other methods ignore it"),
        descriptions: Descriptions | None = Field(
            default=None, description="descriptions per class name ({name: [sentence, ...]}, or {name: {attribute: "
            "[sentence, ...]}} for methods that read attribute trees), for methods that embed classes from them (the artifact ships them for the classes it knows; a name with neither is a 400 "
            "descriptions_missing); other methods ignore them"),
    ) -> ClassifyResponse:
        """Classify each image among ``class_names``; scores are softmax probabilities over those names."""
        return await self._respond(self._classify(images, class_names, top_k, mode, descriptions))

    def _check_descriptions(self, descriptions: Descriptions | None, keys: list[str]) -> dict[str, Any] | None:
        """The request's descriptions (bounded), then every name's from the request or the artifact."""
        cfg = self.config
        for name, value in (descriptions or {}).items():
            # sentences, or an attribute tree (bounded on its sentences in all)
            where = [(f"[{name!r}][{a!r}]", d) for a, v in value.items() for d in v] if isinstance(value, dict) \
                else [(f"[{name!r}]", d) for d in value]
            if not where or len(where) > cfg.max_descriptions_per_name or len(value) > cfg.max_descriptions_per_name:
                raise bad_request("descriptions", f"descriptions[{name!r}] needs 1 to {cfg.max_descriptions_per_name} "
                                  f"sentences, got {len(where)}", limit=cfg.max_descriptions_per_name)
            for i, (at, d) in enumerate(where):
                if not d.strip() or len(d) > cfg.max_description_chars:
                    raise bad_request("descriptions", f"descriptions{at}: sentence {i} must be non-blank and at most "
                                      f"{cfg.max_description_chars} characters", limit=cfg.max_description_chars)
        try:
            return self.predictor.class_descriptions(keys, descriptions)
        except MissingDescriptionError as e:
            raise bad_request("descriptions_missing", str(e)) from None
        except ValueError as e:  # the wrong kind for this artifact (sentences vs attribute trees)
            raise bad_request("descriptions", str(e)) from None

    async def _classify(self, images: list[str | bytes], class_names: list[str], top_k: int, mode: str,
                        descriptions: Descriptions | None = None) -> ClassifyResponse:
        if not 1 <= top_k <= self.config.max_top_k:
            raise bad_request("top_k", f"top_k must be between 1 and {self.config.max_top_k}, got {top_k}")
        if mode not in scoring.MODES:
            raise bad_request("mode", f"mode must be one of {', '.join(scoring.MODES)}, got {mode!r}")
        keys = self._check_names(class_names)
        per_name = self._check_descriptions(descriptions, keys)
        self._check_images(images)
        if self.predictor.conditioned:
            # class embeddings depend on the image (CoCoOp-like): nothing per name to cache; the
            # text graph runs on every (image, name) pair
            pairs, limit = len(images) * len(keys), self.config.max_conditioned_pairs
            if pairs > limit:
                raise bad_request("too_many_pairs", f"{len(images)} images x {len(keys)} class_names = {pairs} pairs; "
                                  f"method {self.predictor.manifest.method!r} runs its text graph on every (image, name) "
                                  f"pair, at most {limit} per request: send fewer images or names per request",
                                  limit=limit)
            img = await self._image_outputs(images)
            logits = await self._conditioned_logits(img, keys, per_name)
        else:
            img, txt = await asyncio.gather(self._image_outputs(images), self._text_outputs(keys, per_name))
            logits = self.predictor.logits_from_outputs(img, txt, keys, mode)
        top = scoring.top_k(scoring.softmax(logits), class_names, top_k)
        return ClassifyResponse(artifact=self.artifact, predictions=[Prediction.model_validate(p) for p in top])

    @bentoml.api(route="/embed_image")
    async def embed_image(
        self,
        images: list[ImageUpload] = Field(description="image files: multipart parts named 'images', or base64 "
                                                      "strings in JSON"),
    ) -> EmbeddingResponse:
        """L2-normalised image embeddings, one row per image (cosine similarity = dot product)."""
        return await self._respond(self._embed_image(images))

    async def _embed_image(self, images: list[str | bytes]) -> EmbeddingResponse:
        self._check_images(images)
        emb = (await self._image_outputs(images))[self.image_output_names[0]]
        return EmbeddingResponse(artifact=self.artifact, dim=emb.shape[1], embeddings=emb.tolist())

    @bentoml.api(route="/embed_text")
    async def embed_text(
        self,
        texts: list[str] = Field(description="class names; each goes through the artifact's prompt templates"),
        descriptions: Descriptions | None = Field(
            default=None, description="descriptions per name, for methods that embed classes from them (as /classify)"),
    ) -> EmbeddingResponse:
        """L2-normalised class embeddings (templated and averaged as in classification), one row per text."""
        return await self._respond(self._embed_text(texts, descriptions))

    async def _embed_text(self, texts: list[str], descriptions: Descriptions | None = None) -> EmbeddingResponse:
        if self.predictor.conditioned:
            raise bad_request("text_depends_on_image", f"method {self.artifact.method!r} has no image-independent "
                              "class embeddings (they depend on the image); use /classify")
        keys = self._check_names(texts, what="texts")
        per_name = self._check_descriptions(descriptions, keys)
        emb = (await self._text_outputs(keys, per_name))[self.predictor.manifest.graphs.text.outputs[0]]
        return EmbeddingResponse(artifact=self.artifact, dim=emb.shape[1], embeddings=emb.tolist())

    @bentoml.api(route="/info")
    async def info(self) -> InfoResponse:
        """The artifact, the onnxruntime provider, CUDA device and IOBinding in use, the limits and cache counters."""
        return InfoResponse(
            artifact=self.artifact, provider=self.provider, providers=self.providers, device_id=self.device_id,
            io_binding=self.io_binding, worker=self.worker, onnxruntime=ort.__version__,
            limits=self.config.public(),
            text_cache={"names": len(self.text_cache), "max_names": self.text_cache.max_names,
                        "hits": self.text_cache.hits, "misses": self.text_cache.misses},
            recent_batch_sizes=self.batcher.batch_sizes[-32:],
        )

    # -- probes and lifecycle ----------------------------------------------------------------------
    async def __is_ready__(self) -> bool:
        """``/readyz``: a real image and text inference through the serving path, within a time limit;
        not ready while every request slot is taken (a saturated replica)."""
        if self.slots.locked():
            logger.warning("not ready: all %d request slots are taken", self.config.max_concurrency)
            return False
        try:
            with anyio.fail_after(self.config.ready_timeout_s):
                s = self.predictor.manifest.preprocess.image_size
                pixels = np.zeros((1, 3, s, s), np.float32)
                img = await self.batcher.embed(1, lambda lo, hi: pixels)  # [1, outputs, D]
                layout = self.predictor.manifest.layout
                probe = None if not self.predictor.described else \
                    {"ready": ["ready."] if layout is None else {layout.attributes[0]: ["ready."]}}
                if self.predictor.conditioned:
                    txt = await self._conditioned_logits(self._split_image_outputs(img), ["ready"], probe)
                else:
                    outputs, _, _ = await anyio.to_thread.run_sync(
                        lambda: self.predictor.counted_text_outputs(["ready"], False, probe))
                    txt = np.stack(list(outputs.values()))
            ok = bool(np.isfinite(img).all() and np.isfinite(txt).all() and img.shape[-1] == self.artifact.embed_dim)
        except Exception as e:  # noqa: BLE001 - any failure means not ready
            logger.warning("readiness check failed: %r", e)
            ok = False
        return ok

    @bentoml.on_shutdown
    def _shutdown(self) -> None:
        # BentoML stops accepting connections and lets in-flight requests finish before this runs
        self.batcher.close()
        logger.info("promptbake: shut down")


PromptbakeService.add_asgi_middleware(PromptbakeMiddleware)
