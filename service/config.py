"""Service settings: every limit and knob, read from ``PROMPTBAKE_*`` environment variables.

One frozen pydantic model, validated when the service starts, so a typo in a number fails the
start instead of the first request. ``docs/service.md`` lists the variables; the defaults are
sized for one ViT-B/16 replica with a few GiB of memory.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

ENV_PREFIX = "PROMPTBAKE_"
# What Pillow calls each format we decode; everything else is refused before decoding.
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF")

_Pos = Annotated[int, Field(ge=1)]


class ServiceConfigError(ValueError):
    """A ``PROMPTBAKE_*`` variable that does not parse or is out of range."""


class ServiceConfig(BaseModel):
    """Settings of one service replica.

    Attributes:
        artifact: an artifact directory, or a BentoML model tag (``NAME`` or ``NAME:VERSION``)
            whose ``artifact/`` subdirectory holds it.
        device: ``cpu`` or ``cuda`` (onnxruntime execution provider).
        allow_cpu_fallback: with ``device=cuda`` and no usable CUDA, run on CPU (logged) instead
            of refusing to start.
        cuda_devices: CUDA device ids the worker processes are spread over: each worker creates
            its sessions on ``cuda_device_for_worker(worker_index, cuda_devices)``; ``None`` =
            ``(0,)``. Ignored on CPU.
        intra_op_threads: onnxruntime threads per graph run; 0 = one per physical core.
        max_request_bytes: whole request body; larger bodies get 413 before being read in full.
        max_images: images in one request.
        max_image_pixels: width x height of one image, checked from the header before decoding.
        allowed_formats: Pillow format names accepted (magic bytes decide, not the file name).
        max_class_names: names in one classify or embed_text request.
        max_name_chars: characters in one name.
        max_top_k: the largest ``top_k`` a request may ask for.
        max_descriptions_per_name, max_description_chars: bounds on the class descriptions a
            request sends (methods that embed classes from descriptions run one text pass per sentence).
        max_conditioned_pairs: images x class names in one classify request, for methods whose
            class embeddings depend on the image (CoCoOp): each pair is one text-graph run, so
            this bounds the work a single request can hold a worker for.
        max_batch_size: images per onnxruntime run when requests are batched together.
        max_latency_ms: the longest an image may wait for its batch; one that waited longer when
            its turn comes is shed with 503 ``overloaded``.
        text_cache_names: class-name embeddings kept (LRU over names); memory is
            ``text_cache_names x embed_dim x 4`` bytes (20,000 x 512 x 4 = 41 MB).
        api_key: when set, every route but the health probes needs ``Authorization: Bearer KEY``.
        artifact_digest: when set, the artifact must have this content digest (``sha256:...``, as
            ``promptbake export`` and ``verify`` print it), or the service does not start.
        ready_timeout_s: ``/readyz`` fails when its real inference takes longer.
        max_concurrency: API requests processed at once per worker; beyond it a request is a 429
            ``too_many_requests`` at once, and ``/readyz`` answers 503 while every slot is taken. A
            request takes a slot only once its body has arrived, so slow uploads hold none.
        body_timeout_s, min_body_rate: a request body must arrive within ``body_timeout_s`` plus one
            second per ``min_body_rate`` bytes received so far (a rolling deadline: 10 s, then at least
            64 KiB/s), or it is a 408 ``body_timeout`` and the connection is freed.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    artifact: str | None = None
    device: Literal["cpu", "cuda"] = "cpu"
    allow_cpu_fallback: bool = False
    cuda_devices: tuple[Annotated[int, Field(ge=0)], ...] | None = None
    intra_op_threads: Annotated[int, Field(ge=0)] = 0
    max_request_bytes: _Pos = 32 * 2**20
    max_images: _Pos = 32
    max_image_pixels: _Pos = 40_000_000
    allowed_formats: tuple[str, ...] = ALLOWED_FORMATS
    max_class_names: _Pos = 1000
    max_name_chars: _Pos = 200
    max_top_k: _Pos = 100
    max_descriptions_per_name: _Pos = 64
    max_description_chars: _Pos = 1000
    max_conditioned_pairs: _Pos = 2048
    max_batch_size: Annotated[int, Field(ge=2)] = 32
    max_latency_ms: _Pos = 10_000
    text_cache_names: _Pos = 20_000
    api_key: str | None = None
    ready_timeout_s: Annotated[float, Field(gt=0)] = 30.0
    max_concurrency: _Pos = 64
    body_timeout_s: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 10.0
    min_body_rate: Annotated[int, Field(ge=1)] = 65536
    artifact_digest: Annotated[str, Field(pattern=r"^sha256:[0-9a-f]{64}$")] | None = None

    @field_validator("allowed_formats", mode="before")
    @classmethod
    def _formats(cls, v: object) -> tuple[str, ...]:
        items = v.split(",") if isinstance(v, str) else list(v)  # type: ignore[arg-type]
        formats = tuple(str(f).strip().upper() for f in items if str(f).strip())
        unknown = sorted(set(formats) - set(ALLOWED_FORMATS))
        if unknown or not formats:
            raise ValueError(f"formats must be a non-empty subset of {', '.join(ALLOWED_FORMATS)}; got {unknown or 'none'}")
        return formats

    @field_validator("cuda_devices", mode="before")
    @classmethod
    def _devices(cls, v: object) -> object:
        if v is None or not isinstance(v, str):
            return v
        items = [d.strip() for d in v.split(",")]
        if not all(d.isascii() and d.isdigit() for d in items):  # also refuses "", "-1", "1.5", "0,,1"
            raise ValueError(f"must be CUDA device ids >= 0 separated by commas (e.g. 0,1), got {v!r}")
        return tuple(int(d) for d in items)

    @field_validator("cuda_devices")
    @classmethod
    def _devices_not_empty(cls, v: tuple[int, ...] | None) -> tuple[int, ...] | None:
        if v is not None and not v:
            raise ValueError("must name at least one CUDA device id")
        return v

    @field_validator("api_key")
    @classmethod
    def _key(cls, v: str | None) -> str | None:
        if v is not None and len(v) < 16:
            raise ValueError("api_key must have at least 16 characters")
        return v or None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: object) -> ServiceConfig:
        """Read ``PROMPTBAKE_<FIELD>`` variables (e.g. ``PROMPTBAKE_MAX_IMAGES=8``); ``overrides`` win.

        Raises:
            ServiceConfigError: naming the variable that is wrong.
        """
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for name in cls.model_fields:
            raw = env.get(ENV_PREFIX + name.upper())
            if raw is not None and raw != "":
                values[name] = raw
        values.update(overrides)
        try:
            return cls.model_validate(values)
        except ValidationError as e:
            err = e.errors()[0]
            field = str(err["loc"][0]) if err["loc"] else "?"
            raise ServiceConfigError(f"{ENV_PREFIX}{field.upper()}: {err['msg']}") from None

    def public(self) -> dict[str, object]:
        """The limits a client may see (no key, no paths)."""
        return self.model_dump(exclude={"api_key", "artifact", "artifact_digest", "intra_op_threads", "ready_timeout_s"})


def cuda_device_for_worker(worker_index: int | None, cuda_devices: Sequence[int] | None) -> int:
    """The CUDA device a BentoML worker process creates its sessions on: round-robin over the devices.

    Args:
        worker_index: ``bentoml.server_context.worker_index``, 1-based; ``None`` or 0 (not inside a
            BentoML worker, e.g. the class called directly) counts as worker 1.
        cuda_devices: the configured device ids; ``None`` = ``(0,)``.

    Returns:
        ``cuda_devices[(worker_index - 1) % len(cuda_devices)]``: workers 1..4 over ``(0, 1)`` get
        devices 0, 1, 0, 1.
    """
    devices = tuple(cuda_devices) if cuda_devices else (0,)
    index = worker_index if worker_index and worker_index > 0 else 1
    return devices[(index - 1) % len(devices)]


def cuda_driver_problem(cuda_devices: Sequence[int] | None = None) -> str | None:
    """Why CUDA cannot be used on this machine, asked of the NVIDIA driver alone: ``None`` when
    ``libcuda`` loads, initialises and sees every device in ``cuda_devices`` (``None`` = ``(0,)``).

    Cheap enough for the server's main process (no CUDA context, no onnxruntime session): a GPU image
    started without a GPU (``docker run`` without ``--gpus``) then stops in one line instead of in a
    worker's traceback. Other CUDA problems (cuDNN, a driver too old for the CUDA wheels) still surface
    when a worker creates its sessions. Not checked off Linux (``None``).
    """
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return None
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return "no NVIDIA driver on this machine (libcuda.so.1 not found; a container needs the GPU passed in, e.g. docker run --gpus all)"
    rc = lib.cuInit(0)
    if rc != 0:
        return f"the NVIDIA driver did not initialise (cuInit error {rc})"
    count = ctypes.c_int(0)
    if lib.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value == 0:
        return "the NVIDIA driver sees no CUDA device"
    missing = sorted({d for d in (tuple(cuda_devices) if cuda_devices else (0,)) if d >= count.value})
    if missing:
        return f"CUDA device(s) {missing} asked for, but the driver sees {count.value} (ids 0..{count.value - 1})"
    return None
