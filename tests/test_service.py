"""The BentoML service, tested as BentoML documents it: the class called directly, the ASGI app with
a test client, and one real ``bentoml serve`` (through ``promptbake serve``) on 127.0.0.1.

One artifact: test-tiny, CoOp, one epoch on the colour dataset, exported (shared with the export tests). Checked:
served predictions equal ``Predictor.classify`` and ``promptbake predict``; every limit answers
its 4xx JSON error and the next good request succeeds; a bounded concurrent load completes with
no failures other than deliberate 429/503 and batches images across requests; ``import service``
loads no torch; ``bentoml build`` makes a Bento whose Dockerfile installs onnxruntime-gpu only.
"""
from __future__ import annotations

import asyncio
import base64
import concurrent.futures as cf
import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from conftest import build_bento

REPO = Path(__file__).resolve().parents[1]
NAMES = ["red", "green", "blue", "yellow", "cyan", "magenta"]
KEY = "test-key-0123456789abcdef"
# Small limits for the ASGI app, so each one is cheap to hit.
LIMITS = {
    "PROMPTBAKE_MAX_IMAGES": "4",
    "PROMPTBAKE_MAX_REQUEST_BYTES": "300000",
    "PROMPTBAKE_MAX_IMAGE_PIXELS": "1000000",
    "PROMPTBAKE_MAX_CLASS_NAMES": "8",
    "PROMPTBAKE_MAX_NAME_CHARS": "40",
    "PROMPTBAKE_MAX_TOP_K": "5",
    "PROMPTBAKE_API_KEY": KEY,
}


# -- fixtures ------------------------------------------------------------------------------------

pytestmark = pytest.mark.usefixtures("restore_pillow_settings")  # the service hardens Pillow process-wide (conftest)


@pytest.fixture(scope="module")
def artifact(exported) -> Path:
    _, art = exported("coop")  # trained and exported once per session (conftest)
    assert isinstance(art, Path), art
    return art


@pytest.fixture(scope="module")
def test_images(colour_root) -> list[Path]:
    return sorted((colour_root / "test").rglob("*.png"))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _encode(im: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt)
    return buf.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` (a decompression bomb's calling card)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reference(artifact: Path, paths: list[Path], top_k: int = 3) -> list[dict]:
    from exports.runtime import Predictor

    return Predictor(artifact).classify([Image.open(p) for p in paths], NAMES, top_k=top_k)


def _assert_same_predictions(got: list[dict], want: list[dict], tol: float = 1e-5) -> None:
    assert [p["label"] for p in got] == [p["label"] for p in want]
    for g, w in zip(got, want):
        assert [t["class_name"] for t in g["top"]] == [t["class_name"] for t in w["top"]]
        assert max(abs(a["score"] - b["score"]) for a, b in zip(g["top"], w["top"])) <= tol


# -- import and configuration ----------------------------------------------------------------------

def test_import_service_loads_no_torch_and_no_model():
    code = ("import sys, service, service.service; "
            "bad = [m for m in ('torch', 'open_clip', 'training') if m in sys.modules]; assert not bad, bad")
    env = {**os.environ, "PYTHONPATH": str(REPO), "PROMPTBAKE_ARTIFACT": "/nonexistent"}  # import must not load it
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_config_from_env_names_the_bad_variable():
    from service.config import ServiceConfig, ServiceConfigError

    cfg = ServiceConfig.from_env({"PROMPTBAKE_MAX_IMAGES": "8", "PROMPTBAKE_ALLOWED_FORMATS": "png, jpeg"})
    assert cfg.max_images == 8 and cfg.allowed_formats == ("PNG", "JPEG")
    for env, var in [({"PROMPTBAKE_MAX_IMAGES": "many"}, "PROMPTBAKE_MAX_IMAGES"),
                     ({"PROMPTBAKE_MAX_IMAGES": "0"}, "PROMPTBAKE_MAX_IMAGES"),
                     ({"PROMPTBAKE_ALLOWED_FORMATS": "PNG,TIFF"}, "PROMPTBAKE_ALLOWED_FORMATS"),
                     ({"PROMPTBAKE_DEVICE": "tpu"}, "PROMPTBAKE_DEVICE"),
                     ({"PROMPTBAKE_API_KEY": "short"}, "PROMPTBAKE_API_KEY")]:
        with pytest.raises(ServiceConfigError, match=var):
            ServiceConfig.from_env(env)


def test_cuda_without_cuda_is_an_error_unless_fallback_allowed(artifact):
    from exports.manifest import ArtifactError
    from exports.runtime import Predictor
    from service.config import ServiceConfig, ServiceConfigError
    from service.service import PromptbakeService

    try:
        Predictor(artifact, device="cuda")
        cuda_works = True
    except ArtifactError:
        cuda_works = False
    if cuda_works:
        svc = PromptbakeService.inner(ServiceConfig(artifact=str(artifact), device="cuda"))
        assert svc.provider == "CUDAExecutionProvider"
        return
    with pytest.raises(ServiceConfigError, match="PROMPTBAKE_ALLOW_CPU_FALLBACK"):
        PromptbakeService.inner(ServiceConfig(artifact=str(artifact), device="cuda"))
    svc = PromptbakeService.inner(ServiceConfig(artifact=str(artifact), device="cuda", allow_cpu_fallback=True))
    assert svc.provider == "CPUExecutionProvider" == svc.providers[0]


def test_cuda_devices_and_workers_from_env(monkeypatch):
    from service.config import ServiceConfig, ServiceConfigError, cuda_device_for_worker
    from service.service import _int_env

    assert ServiceConfig.from_env({}).cuda_devices is None
    assert ServiceConfig.from_env({"PROMPTBAKE_CUDA_DEVICES": "0,1"}).cuda_devices == (0, 1)
    assert ServiceConfig.from_env({"PROMPTBAKE_CUDA_DEVICES": " 3 , 1,1 "}).cuda_devices == (3, 1, 1)
    for bad in ("-1", "a", "1.5", ",", "0,,1", "0;1", "２"):
        with pytest.raises(ServiceConfigError, match="PROMPTBAKE_CUDA_DEVICES"):
            ServiceConfig.from_env({"PROMPTBAKE_CUDA_DEVICES": bad})
    with pytest.raises(ServiceConfigError, match="PROMPTBAKE_CUDA_DEVICES"):
        ServiceConfig.from_env({}, cuda_devices=())

    # round-robin: worker i (1-based) on devices[(i - 1) % n]; outside a worker (None, 0) = worker 1
    assert [cuda_device_for_worker(i, (0, 1)) for i in (1, 2, 3, 4)] == [0, 1, 0, 1]
    assert [cuda_device_for_worker(i, (2, 5, 7)) for i in (None, 0, 1, 2, 3, 4)] == [2, 2, 2, 5, 7, 2]
    assert [cuda_device_for_worker(i, None) for i in (None, 1, 2, 3)] == [0, 0, 0, 0]

    for bad in ("0", "-2", "two", ""):  # one line and exit 2, not a traceback
        monkeypatch.setenv("PROMPTBAKE_WORKERS", bad)
        with pytest.raises(SystemExit) as stop:
            _int_env("PROMPTBAKE_WORKERS", 1, minimum=1)
        assert stop.value.code == 2
    # read at import, into the @bentoml.service decorator
    code = "import service.service as s; print(s.PromptbakeService.config['workers'])"
    env = {**os.environ, "PYTHONPATH": str(REPO), "PROMPTBAKE_WORKERS": "3"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "3", proc.stderr


def test_each_worker_takes_its_cuda_device(artifact, test_images, monkeypatch):
    # No GPU needed: a stand-in Predictor records the device asked for and reports CUDA, so the
    # worker -> device wiring and what /info says are checked (the GPU itself is not).
    import bentoml

    import service.service as svc_module
    from exports.manifest import ArtifactError
    from exports.runtime import Predictor
    from service.config import ServiceConfig, ServiceConfigError
    from service.service import PromptbakeService

    class CudaLike(Predictor):
        providers = property(lambda self: ["CUDAExecutionProvider", "CPUExecutionProvider"])

    asked: list[tuple[str, int]] = []
    cuda_works = [True]

    def stand_in(path, *, device="cpu", device_id=0, **kwargs):
        asked.append((device, device_id))
        if device == "cpu":
            return Predictor(path, **kwargs)
        if not cuda_works[0]:
            raise ArtifactError(f"{path}: onnxruntime could not start CUDAExecutionProvider with {{'device_id': {device_id}}}")
        p = CudaLike(path, io_binding=True, **kwargs)  # the CUDA default, on CPU OrtValues
        p.device_id = device_id
        return p

    monkeypatch.setattr(svc_module, "Predictor", stand_in)
    cfg = ServiceConfig(artifact=str(artifact), device="cuda", cuda_devices=(0, 1))
    for worker, device in [(1, 0), (2, 1), (3, 0), (4, 1)]:
        monkeypatch.setattr(bentoml.server_context, "worker_index", worker)
        svc = PromptbakeService.inner(cfg)
        info = asyncio.run(svc.info())
        assert (info.provider, info.device_id, info.io_binding, info.worker) == ("CUDAExecutionProvider", device, True, worker)
    assert asked == [("cuda", 0), ("cuda", 1), ("cuda", 0), ("cuda", 1)]
    out = asyncio.run(svc.classify(images=[_b64(p.read_bytes()) for p in test_images[:3]], class_names=NAMES, top_k=3))
    _assert_same_predictions(out.model_dump()["predictions"], _reference(artifact, test_images[:3]))

    # the worker's device not starting: refused naming it, or CPU (no device, no IOBinding) when allowed
    cuda_works[0] = False
    monkeypatch.setattr(bentoml.server_context, "worker_index", None)  # the class called directly: worker 1
    with pytest.raises(ServiceConfigError, match=r"'device_id': 0\}.*PROMPTBAKE_ALLOW_CPU_FALLBACK"):
        PromptbakeService.inner(cfg.model_copy(update={"cuda_devices": None}))
    monkeypatch.setattr(bentoml.server_context, "worker_index", 2)
    svc = PromptbakeService.inner(cfg.model_copy(update={"allow_cpu_fallback": True}))
    info = asyncio.run(svc.info())
    assert (info.provider, info.device_id, info.io_binding, info.worker) == ("CPUExecutionProvider", None, False, 2)
    assert asked[-3:] == [("cuda", 0), ("cuda", 1), ("cpu", 0)]


def test_serve_cli_refuses_a_missing_artifact_in_one_line(capsys):
    from training.cli import main

    assert main(["serve", "--artifact", "/nonexistent/artifact"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("promptbake: error:") and err.count("\n") == 1


# -- the class called directly ---------------------------------------------------------------------

def test_class_called_directly(artifact, test_images, monkeypatch):
    from exports.runtime import Predictor
    from service.errors import RequestError
    from service.service import PromptbakeService

    monkeypatch.setenv("PROMPTBAKE_ARTIFACT", str(artifact))
    svc = PromptbakeService()
    paths = test_images[:6]
    out = asyncio.run(svc.classify(images=[_b64(p.read_bytes()) for p in paths], class_names=NAMES, top_k=3))
    _assert_same_predictions(out.model_dump()["predictions"], _reference(artifact, paths))
    assert out.artifact.method == "coop" and out.artifact.backbone == "test-tiny"
    assert svc.provider == "CPUExecutionProvider"

    # the class-name cache: a second request with the same names (any case/spacing) computes nothing
    hits_before = svc.text_cache.hits
    asyncio.run(svc.classify(images=[_b64(paths[0].read_bytes())], class_names=[n.upper() + " " for n in NAMES]))
    assert svc.text_cache.hits - hits_before == len(NAMES)

    emb = asyncio.run(svc.embed_text(texts=NAMES))
    np.testing.assert_allclose(np.array(emb.embeddings), Predictor(artifact).embed_texts(NAMES), atol=1e-6)
    img = asyncio.run(svc.embed_image(images=[_b64(p.read_bytes()) for p in paths]))
    np.testing.assert_allclose(np.array(img.embeddings), Predictor(artifact).embed_images([Image.open(p) for p in paths]),
                               atol=1e-5)
    # a direct caller gets the exception, not an HTTP response
    with pytest.raises(RequestError) as e:
        asyncio.run(svc.classify(images=["https://example.com/cat.jpg"], class_names=NAMES))
    assert e.value.status == 400 and e.value.kind == "image_source"
    assert asyncio.run(svc.__is_ready__()) is True


def test_image_conditioned_method_is_served(exported, test_images, monkeypatch):
    # CoCoOp: class embeddings depend on the image, so no name cache and no /embed_text
    from service.errors import RequestError
    from service.service import PromptbakeService

    _, art = exported("cocoop")
    monkeypatch.setenv("PROMPTBAKE_ARTIFACT", str(art))
    svc = PromptbakeService()
    paths = test_images[::3]
    out = asyncio.run(svc.classify(images=[_b64(p.read_bytes()) for p in paths], class_names=NAMES, top_k=3))
    _assert_same_predictions(out.model_dump()["predictions"], _reference(art, paths))
    assert svc.text_cache.hits == svc.text_cache.misses == 0
    with pytest.raises(RequestError) as e:
        asyncio.run(svc.embed_text(texts=NAMES))
    assert e.value.kind == "text_depends_on_image"
    assert asyncio.run(svc.__is_ready__()) is True

    # every (image, name) pair runs the text graph: a request is bounded by their count
    monkeypatch.setenv("PROMPTBAKE_MAX_CONDITIONED_PAIRS", str(2 * len(NAMES)))
    svc = PromptbakeService()
    ok = asyncio.run(svc.classify(images=[_b64(p.read_bytes()) for p in paths[:2]], class_names=NAMES))
    assert len(ok.predictions) == 2
    with pytest.raises(RequestError) as e:
        asyncio.run(svc.classify(images=[_b64(p.read_bytes()) for p in paths[:3]], class_names=NAMES))
    assert e.value.status == 400 and e.value.kind == "too_many_pairs" and e.value.extra["limit"] == 2 * len(NAMES)
    assert f"3 images x {len(NAMES)} class_names" in e.value.message


# -- the ASGI app with a test client ---------------------------------------------------------------

@pytest.fixture(scope="module")
def client(artifact):
    from starlette.testclient import TestClient

    from service.service import PromptbakeService

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PROMPTBAKE_ARTIFACT", str(artifact))
        for k, v in LIMITS.items():
            mp.setenv(k, v)
        with TestClient(PromptbakeService.to_asgi(), headers={"Authorization": f"Bearer {KEY}"}) as c:
            yield c


def _good(client) -> None:
    r = client.post("/classify", json={"images": [_b64(_encode(Image.new("RGB", (40, 30), (220, 30, 30)), "PNG"))],
                                       "class_names": NAMES, "top_k": 2})
    assert r.status_code == 200, r.text
    assert len(r.json()["predictions"][0]["top"]) == 2


def test_asgi_json_and_multipart_agree_with_the_predictor(client, artifact, test_images):
    paths = test_images[:4]
    j = client.post("/classify", json={"images": [_b64(p.read_bytes()) for p in paths], "class_names": NAMES, "top_k": 3})
    assert j.status_code == 200, j.text
    assert j.headers["x-promptbake-provider"] == "CPUExecutionProvider"
    m = client.post("/classify", files=[("images", (p.name, p.read_bytes(), "image/png")) for p in paths],
                    data={"class_names": json.dumps(NAMES), "top_k": "3"})
    assert m.status_code == 200, m.text
    assert m.json() == j.json()
    # class_names as repeated form fields, what httpx / requests send for data={"class_names": [...]}
    r = client.post("/classify", files=[("images", (p.name, p.read_bytes(), "image/png")) for p in paths],
                    data={"class_names": NAMES, "top_k": "3"})
    assert r.status_code == 200, r.text
    assert r.json() == j.json()
    bad = client.post("/classify", files=[("images", (paths[0].name, paths[0].read_bytes(), "image/png"))],
                      data={"class_names": '["red", '})
    assert bad.status_code == 400 and bad.json()["error"]["kind"] == "class_names_json"
    _assert_same_predictions(j.json()["predictions"], _reference(artifact, paths))
    assert j.json()["artifact"]["method"] == "coop"

    info = client.get("/info").json()
    assert info["provider"] == "CPUExecutionProvider" and info["limits"]["max_images"] == 4
    assert "api_key" not in info["limits"]
    assert client.post("/embed_text", json={"texts": ["red", "blue"]}).json()["dim"] == 32
    r = client.post("/embed_image", files=[("images", ("a.png", paths[0].read_bytes(), "image/png"))])
    assert r.status_code == 200 and len(r.json()["embeddings"]) == 1


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP", "GIF"])
def test_asgi_every_allowed_format_is_accepted(client, fmt):
    im = Image.new("RGB", (50, 40), (30, 40, 220))
    r = client.post("/classify", json={"images": [_b64(_encode(im, fmt))], "class_names": NAMES})
    assert r.status_code == 200, r.text


def test_asgi_probes_need_no_key_and_everything_else_does(client):
    bare = {"Authorization": ""}
    for path in ("/livez", "/readyz", "/healthz"):
        assert client.get(path, headers=bare).status_code == 200
    for wrong in ("", "Bearer nope", f"Basic {KEY}"):
        r = client.post("/classify", json={"images": [], "class_names": NAMES}, headers={"Authorization": wrong})
        assert r.status_code == 401 and r.json()["error"]["kind"] == "unauthorized"
        assert r.headers["www-authenticate"] == "Bearer"
    assert client.get("/info", headers=bare).status_code == 401
    _good(client)


def _bad_requests() -> list[tuple[str, dict, int, str]]:
    """(id, request kwargs, status, error kind)."""
    red = _encode(Image.new("RGB", (40, 30), (220, 30, 30)), "PNG")
    one = [_b64(red)]
    js = lambda **body: {"json": {"images": one, "class_names": NAMES, **body}}  # noqa: E731
    return [
        ("url", js(images=["https://169.254.169.254/latest/meta-data"]), 400, "image_source"),
        ("path", js(images=["/etc/passwd"]), 400, "image_source"),
        ("file-url", js(images=["file:///etc/passwd"]), 400, "image_source"),
        ("multipart-url-field", {"files": [("class_names", (None, json.dumps(NAMES)))], "data": {"images": "http://x/y.png"}},
         400, "image_source"),
        ("not-base64", js(images=["%%% not base64 %%%"]), 400, "image_encoding"),
        ("empty-image", js(images=[""]), 400, "image_empty"),
        ("tiff", js(images=[_b64(_encode(Image.new("RGB", (8, 8)), "TIFF"))]), 415, "image_format"),
        ("text-as-image", js(images=[_b64(b"hello, I am not an image at all")]), 415, "image_format"),
        ("truncated", js(images=[_b64(red[: len(red) // 2])]), 400, "image_corrupt"),
        ("pixels-over-limit", js(images=[_b64(_encode(Image.new("L", (1200, 1000)), "PNG"))]), 413, "image_pixels"),
        ("bomb-header", js(images=[_b64(_png_header_only(40000, 40000))]), 413, "image_pixels"),
        ("too-many-images", js(images=one * 5), 400, "too_many_images"),
        ("too-many-files", {"files": [("images", (f"{i}.png", red, "image/png")) for i in range(5)],
                            "data": {"class_names": json.dumps(NAMES)}}, 400, "too_many_images"),
        ("no-images", js(images=[]), 400, "images_empty"),
        ("body-too-large", {"json": {"images": ["A" * 400_000], "class_names": NAMES}}, 413, "request_bytes"),
        ("chunked-too-large", {"content": iter([b"{" + b" " * 200_000, b" " * 200_000 + b"}"]),
                               "headers": {"content-type": "application/json"}}, 413, "request_bytes"),
        ("no-names", js(class_names=[]), 400, "class_names_empty"),
        ("too-many-names", js(class_names=[f"c{i}" for i in range(9)]), 400, "too_many_class_names"),
        ("long-name", js(class_names=["red", "x" * 41]), 400, "name_length"),
        ("blank-name", js(class_names=["red", "   "]), 400, "name_empty"),
        ("duplicate-name", js(class_names=["red", "Red "]), 400, "name_duplicate"),
        ("top-k-zero", js(top_k=0), 400, "top_k"),
        ("top-k-bool", js(top_k=True), 400, "invalid_input"),
        ("top-k-string", js(top_k="3"), 400, "invalid_input"),
        ("invisible-name", js(class_names=["red", "\u200b"]), 400, "name_empty"),
        ("unknown-json-field", js(topk=3), 400, "unknown_field"),
        ("top-k-over-limit", js(top_k=6), 400, "top_k"),
        ("wrong-type", js(images="not a list"), 400, "invalid_input"),
        ("names-not-json", {"files": [("images", ("a.png", red, "image/png"))], "data": {"class_names": "red, green"}},
         400, "class_names_json"),
        ("unknown-field", {"files": [("images", ("a.png", red, "image/png"))], "data": {"class_names": '["a"]', "url": "x"}},
         400, "unknown_field"),
        ("content-type", {"content": b"red", "headers": {"content-type": "text/plain"}}, 415, "content_type"),
    ]


@pytest.mark.parametrize("case", _bad_requests(), ids=lambda c: c[0])
def test_asgi_bad_input_gets_its_4xx_json_and_the_next_request_succeeds(client, case):
    _, kwargs, status, kind = case
    r = client.post("/classify", **kwargs)
    assert r.status_code == status, r.text
    body = r.json()
    assert body["error"]["kind"] == kind and body["error"]["message"]
    assert "Traceback" not in r.text
    _good(client)


def test_asgi_embed_text_limits(client):
    r = client.post("/embed_text", json={"texts": [f"t{i}" for i in range(9)]})
    assert r.status_code == 400 and r.json()["error"]["kind"] == "too_many_texts"
    r = client.post("/embed_text", json={"texts": ["red", "red"]})  # duplicates are fine for embeddings
    assert r.status_code == 200 and len(r.json()["embeddings"]) == 2


# -- a real `bentoml serve` through `promptbake serve` ---------------------------------------------

@pytest.fixture(scope="module")
def server(artifact, tmp_path_factory):
    from training.bench.serve import wait_until_ready

    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "serve.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROMPTBAKE_")}  # default limits, no key
    env.update(PYTHONPATH=str(REPO), BENTOML_DO_NOT_TRACK="True", PROMPTBAKE_MAX_CLASS_NAMES="4000")
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "training.cli", "serve", "--artifact", str(artifact), "--host", "127.0.0.1",
             "--port", str(port)],
            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}"

    def stop() -> int | None:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # BentoML's graceful shutdown
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        return proc.returncode

    try:
        try:
            wait_until_ready(proc, base, timeout_s=90, request_timeout_s=5)
        except RuntimeError as e:
            pytest.fail(f"{e}:\n{log.read_text()[-3000:]}")
        yield base, log, stop
    finally:
        stop()


def test_served_predictions_equal_predictor_and_promptbake_predict(server, artifact, test_images, capsys):
    from training.cli import main

    base, log, _ = server
    paths = test_images  # 24 images, one request
    r = httpx.post(base + "/classify", files=[("images", (p.name, p.read_bytes(), "image/png")) for p in paths],
                   data={"class_names": json.dumps(NAMES), "top_k": "3"}, timeout=60)
    assert r.status_code == 200, r.text
    served = r.json()["predictions"]
    _assert_same_predictions(served, _reference(artifact, paths))
    assert main(["predict", "--artifact", str(artifact), "--class-names", json.dumps(NAMES), "--top-k", "3",
                 *map(str, paths)]) == 0
    _assert_same_predictions(served, json.loads(capsys.readouterr().out)["predictions"])
    assert r.headers["x-promptbake-provider"] == "CPUExecutionProvider"
    started = [line for line in log.read_text().splitlines() if "promptbake: serving" in line]
    assert len(started) == 1 and "on CPUExecutionProvider" in started[0]  # the provider, logged at start
    assert "IOBinding off, worker 1;" in started[0]


def test_bentoml_client_uploads_files_and_its_urls_are_refused(server, artifact, test_images):
    """BentoML's own client, as its users write it: Paths, path strings and PIL images are uploaded as a
    multipart form (``images`` is a typed file field in /schema.json); a URL it would send as text for
    the server to fetch is a 400 image_source."""
    import bentoml
    from bentoml.exceptions import BentoMLException

    base, _, _ = server
    paths = test_images[:4]
    with bentoml.SyncHTTPClient(base, timeout=60) as client:
        out = client.classify(images=list(paths), class_names=NAMES, top_k=3, mode="auto")
        _assert_same_predictions(out["predictions"], _reference(artifact, paths))
        with Image.open(paths[0]) as im:
            mixed = client.classify(images=[im, str(paths[1])], class_names=NAMES, top_k=3)
        _assert_same_predictions(mixed["predictions"], _reference(artifact, paths[:2]))
        emb = client.embed_image(images=[paths[0]])
        assert len(emb["embeddings"]) == 1 and emb["dim"] == len(emb["embeddings"][0])
        with pytest.raises(BentoMLException) as e:
            client.classify(images=["http://127.0.0.1:1/x.png"], class_names=NAMES)
        assert "image_source" in str(e.value)


def test_served_bad_inputs_then_good(server):
    base, _, _ = server
    red = _encode(Image.new("RGB", (40, 30), (220, 30, 30)), "PNG")
    bad = [
        ({"json": {"images": ["http://127.0.0.1:1/x.png"], "class_names": NAMES}}, 400, "image_source"),
        ({"files": [("images", ("bomb.png", _png_header_only(60000, 60000), "image/png"))],
          "data": {"class_names": json.dumps(NAMES)}}, 413, "image_pixels"),
        ({"json": {"images": [_b64(red)], "class_names": [f"c{i}" for i in range(4001)]}}, 400, "too_many_class_names"),
        ({"content": b"x" * (33 * 2**20), "headers": {"content-type": "application/json"}}, 413, "request_bytes"),
    ]
    with httpx.Client(base_url=base, timeout=60) as c:
        for kwargs, status, kind in bad:
            r = c.post("/classify", **kwargs)
            assert (r.status_code, r.json()["error"]["kind"]) == (status, kind), r.text
            ok = c.post("/classify", json={"images": [_b64(red)], "class_names": NAMES})
            assert ok.status_code == 200, ok.text


def test_served_concurrent_load_batches_across_requests(server, test_images):
    base, _, _ = server
    clients, per_client, limit_s = 16, 25, 90
    payloads = [p.read_bytes() for p in test_images]

    def run(i: int) -> list[int]:
        codes = []
        with httpx.Client(base_url=base, timeout=30) as c:
            for j in range(per_client):
                data = payloads[(i * per_client + j) % len(payloads)]
                r = c.post("/classify", files=[("images", ("x.png", data, "image/png"))],
                           data={"class_names": json.dumps(NAMES), "top_k": "1"})
                codes.append(r.status_code)
                if r.status_code == 200:
                    assert r.json()["predictions"][0]["label"] in NAMES
        return codes

    before = _metric(httpx.get(base + "/metrics").text, "promptbake_image_batch_size_count")
    t0 = time.monotonic()
    with cf.ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(run, i) for i in range(clients)]
        codes = Counter(c for f in cf.as_completed(futures, timeout=limit_s) for c in f.result())
    elapsed = time.monotonic() - t0
    assert set(codes) <= {200, 429, 503}, codes  # only deliberate shedding (concurrency limit, latency budget)
    assert codes[200] >= 0.9 * clients * per_client, codes
    batches = _metric(httpx.get(base + "/metrics").text, "promptbake_image_batch_size_count") - before
    # one image per request: fewer model runs than requests means requests were batched together
    assert batches < codes[200], (batches, codes)
    print(f"\n{clients}x{per_client} requests in {elapsed:.1f} s, {codes}, {int(batches)} image batches")


def test_schemathesis_finds_no_server_error_and_every_error_has_the_documented_shape(server):
    """Property-based requests generated from /docs.json (schemathesis), sent to the served process: no
    5xx, and every 4xx is the documented ``{"error": {"kind", "message"}}`` (BentoML's own 429 aside).
    Bounded: 12 examples per operation, generation only (no shrinking or replays), one request at a time."""
    import httpx
    import requests
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings

    base, _, _ = server
    schema = schemathesis.openapi.from_dict(httpx.get(base + "/docs.json", timeout=30).json())
    seen: dict[tuple[str, str], set[int]] = {}
    with requests.Session() as http:  # the transport schemathesis shapes its requests for
        for result in schema.get_all_operations():
            op = result.ok()

            @settings(max_examples=12, deadline=None, database=None, phases=[Phase.generate],
                      suppress_health_check=list(HealthCheck))
            @given(op.as_strategy())
            def check(case):
                r = http.request(**case.as_transport_kwargs(base_url=base), timeout=60)
                seen.setdefault((op.method, op.path), set()).add(r.status_code)
                assert r.status_code < 500, (op.method, op.path, r.status_code, r.text[:300])
                if r.status_code >= 400 and r.status_code != 429:
                    error = r.json().get("error")
                    assert isinstance(error, dict) and {"kind", "message"} <= set(error), (op.path, r.text[:300])

            check()
    assert ("post", "/classify") in seen and ("post", "/embed_text") in seen, seen


def test_served_metrics_and_info(server):
    base, _, _ = server
    text = httpx.get(base + "/metrics").text
    for name in ("promptbake_text_cache_total{result=\"hit\"}", "promptbake_errors_total{kind=\"image_source\"}",
                 "promptbake_image_batch_size_bucket", "promptbake_stage_seconds_bucket", "bentoml_service_request_total"):
        assert name in text, name
    info = httpx.get(base + "/info").json()
    assert info["provider"] == "CPUExecutionProvider" and info["limits"]["max_batch_size"] == 32
    assert info["device_id"] is None and info["io_binding"] is False and info["worker"] == 1


def test_served_slow_uploads_hold_no_slot_and_time_out(server, test_images):
    """64 clients that send the headers of a large POST and one body byte, then stall (loopback, bounded):
    a good request is still answered at once, /readyz stays honest, and the stalled ones get a 408."""
    import socket

    base, _, _ = server
    host, port = "127.0.0.1", int(base.rsplit(":", 1)[1])
    stalled = []
    try:
        for _ in range(64):
            s = socket.create_connection((host, port), timeout=30)
            s.sendall(b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 1000000\r\n\r\n{")
            stalled.append(s)
        time.sleep(0.5)
        t0 = time.monotonic()
        r = httpx.post(base + "/classify", files=[("images", ("a.png", test_images[0].read_bytes(), "image/png"))],
                       data={"class_names": json.dumps(NAMES)}, timeout=30)
        assert r.status_code == 200, r.text
        assert time.monotonic() - t0 <= 2.0
        assert httpx.get(base + "/readyz", timeout=30).status_code == 200  # not saturated: no slot is held
        # the stalled ones are cut off after the body deadline (10 s by default)
        answers = []
        for s in stalled[:4]:  # the status line and the JSON body may come in separate segments
            s.settimeout(30)
            data = b""
            while b"body_timeout" not in data and (chunk := s.recv(4096)):
                data += chunk
            answers.append(data)
        assert all(a.startswith(b"HTTP/1.1 408") and b"body_timeout" in a for a in answers), answers[:1]
    finally:
        for s in stalled:
            s.close()


# -- the demo page, in a real headless browser (Debian's chromium + chromedriver, driven by selenium) --

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture
def browser(tmp_path, monkeypatch):
    """Headless Chromium with the flags a closed network needs (no background connections). Not
    skipped when missing: .ci/run installs Debian's chromium and chromium-driver."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    monkeypatch.setenv("SE_OFFLINE", "true")  # selenium never looks for a driver online
    opts = Options()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1000,620", f"--user-data-dir={tmp_path / 'profile'}"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def test_demo_page_classifies_in_a_real_browser_and_shows_errors(server, artifact, test_images, browser, tmp_path):
    """GET / in Chromium: the artifact's method and backbone shown; choose an image, type names,
    Classify: the bars are the Predictor's top-k; a file that is not an image: the error is shown."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    base, _, _ = server
    wait = WebDriverWait(browser, 60)
    browser.get(base + "/")
    wait.until(lambda d: "coop on" in d.find_element(By.ID, "artifact").text)
    assert "CPUExecutionProvider" in browser.find_element(By.ID, "artifact").text
    assert not browser.find_element(By.ID, "descriptions-block").is_displayed()  # CoOp reads no descriptions

    browser.find_element(By.ID, "file").send_keys(str(test_images[0]))
    names = browser.find_element(By.ID, "names")
    names.send_keys("\n".join(NAMES))
    top_k = browser.find_element(By.ID, "top-k")
    top_k.clear()
    top_k.send_keys("3")
    browser.find_element(By.ID, "go").click()
    rows = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#prediction .bar"))
    shown = [(r.find_element(By.CLASS_NAME, "name").text, r.find_element(By.CLASS_NAME, "score").text) for r in rows]
    want = _reference(artifact, test_images[:1])[0]["top"]
    assert shown == [(t["class_name"], f"{100 * t['score']:.1f}%") for t in want], shown
    assert browser.find_element(By.ID, "error").text == ""
    if os.environ.get("PROMPTBAKE_DEMO_SCREENSHOT"):  # how docs/img/demo.png is made
        browser.save_screenshot(os.environ["PROMPTBAKE_DEMO_SCREENSHOT"])

    bad = tmp_path / "not-an-image.png"
    bad.write_bytes(b"this is text, not a PNG")
    browser.find_element(By.ID, "file").send_keys(str(bad))
    browser.find_element(By.ID, "go").click()
    error = wait.until(lambda d: d.find_element(By.ID, "error").text)
    assert error.startswith("image_format:") and "allowed format" in error, error
    assert browser.find_elements(By.ID, "prediction") == []


def test_served_graceful_shutdown_finishes_the_request_in_flight(server, test_images):
    base, log, stop = server
    names = [f"thing number {i}" for i in range(4000)]  # never seen: seconds of text graph even on test-tiny
    with cf.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(httpx.post, base + "/classify", timeout=60,
                              files=[("images", ("a.png", test_images[0].read_bytes(), "image/png"))],
                              data={"class_names": json.dumps(names)})
        time.sleep(0.3)
        assert not pending.done(), "the request finished before SIGTERM; the test proves nothing"
        t0 = time.monotonic()
        assert stop() is not None and time.monotonic() - t0 < 20  # SIGTERM: BentoML drains and exits
        r = pending.result(timeout=30)
    assert r.status_code == 200 and len(r.json()["predictions"][0]["top"]) == 5
    assert "promptbake: shut down" in log.read_text()  # the service's shutdown hook ran


def _metric(text: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ") or line.startswith(name + "{"))


# -- bentoml build ---------------------------------------------------------------------------------

def test_bentoml_build_makes_a_torch_free_gpu_bento(artifact, tmp_path):
    tag, env = build_bento(artifact, tmp_path / "bentoml", timeout=180)
    bentos = list((tmp_path / "bentoml" / "bentos" / "promptbake").glob("*/bento.yaml"))
    assert len(bentos) == 1
    bento = bentos[0].parent
    dockerfile = (bento / "env" / "docker" / "Dockerfile").read_text()
    requirements = (bento / "env" / "python" / "requirements.txt").read_text().splitlines()
    assert "FROM python:3.11-slim" in dockerfile
    assert "ENV PROMPTBAKE_ARTIFACT=$PROMPTBAKE_ARTIFACT" in dockerfile and "ARG PROMPTBAKE_DEVICE=cuda" in dockerfile
    assert "requirements.txt" in dockerfile
    pkgs = [r.split("[")[0].split("=")[0].split(">")[0].strip().lower() for r in requirements if r and not r.startswith("#")]
    assert "onnxruntime-gpu" in pkgs and "onnxruntime" not in pkgs
    assert not {"torch", "torchvision", "open-clip-torch", "open_clip_torch"} & set(pkgs)
    src = {p.relative_to(bento / "src").as_posix() for p in (bento / "src").rglob("*.py")}
    assert "service/service.py" in src and "exports/tokenizer.py" in src
    assert not any(p.startswith("training/") or p == "exports/onnx_export.py" for p in src), src
    assert "promptbake-default" in (bento / "bento.yaml").read_text()

    # the built Bento serves its own artifact with no PROMPTBAKE_* variable (the editable install keeps
    # the repository importable here, so the Bento's file list is checked by the next test instead)
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    clean = {k: v for k, v in env.items() if not k.startswith("PROMPTBAKE_") and k != "PYTHONPATH"}
    server = subprocess.Popen([sys.executable, "-m", "bentoml", "serve", tag, "--host", "127.0.0.1", "--port", str(port)],
                              cwd=tmp_path, env=clean, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline, ready = time.monotonic() + 120, None
        while time.monotonic() < deadline and server.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as r:
                    ready = r.status
                    break
            except OSError:
                time.sleep(1)
        assert ready == 200, server.stdout.read().decode()[-3000:] if server.poll() is not None else "not ready in 120 s"
        req = urllib.request.Request(f"http://127.0.0.1:{port}/info", data=b"{}", headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            assert json.loads(r.read())["artifact"]["name"].startswith("promptbake-default")
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)


def test_the_bento_includes_every_module_the_service_imports():
    """bentofile.yaml lists files one by one (nothing of training/ may go in): the service's own import
    closure within the repository must be exactly what it includes."""
    import ast

    import yaml

    included = set(yaml.safe_load((REPO / "bentofile.yaml").read_text())["include"])
    todo, seen = ["service/service.py"], set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        pkg = path.split("/")[0] + "/__init__.py"
        todo.append(pkg)
        for node in ast.walk(ast.parse((REPO / path).read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for name in names:
                if name.split(".")[0] in ("exports", "service"):
                    for candidate in (name.replace(".", "/") + ".py", name.replace(".", "/") + "/__init__.py"):
                        if (REPO / candidate).is_file():
                            todo.append(candidate)
    seen.add("service/demo.html")  # not an import: the page service/http.py serves at /
    from service.http import DEMO_PAGE

    assert DEMO_PAGE == REPO / "service/demo.html"
    assert seen == included, f"missing from the Bento: {sorted(seen - included)}; not imported: {sorted(included - seen)}"


def test_bench_serve_table_formats_every_row():
    from training.bench.serve import format_serve_table

    http = {"images_per_s": 40.0, "p50_ms": 20.0, "p99_ms": 50.0, "requests": 64, "failed": 0}
    res = {"gflop_per_image": 35.13, "matmul_gflops": 100.0, "backbone": "ViT-B-16", "device": "cpu",
           "provider": "CPUExecutionProvider", "cpu_count": 2,
           "in_process": {"torch eager, batch 1": 2.0, "onnxruntime, batch 32": 2.5},
           "http": {"1 client x 1 image/request": http,
                    "16 clients x 1 image/request": {**http, "images_per_s": 90.0, "mean_batch": 3.5}},
           "bare": {"1 client x 1 image/request": {**http, "images_per_s": 50.0},
                    "16 clients x 1 image/request": {**http, "images_per_s": 60.0}},
           "names": {"n": 1000, "cold_s": 2.0, "cached_s": 0.1}, "clients": 16}
    table = format_serve_table(res)
    assert "| in-process onnxruntime, batch 32 | 2.5 | 1.25x | | | 87.8% |" in table
    assert "(mean batch 3.5)" in table and "2000 ms cold, 100 ms cached (20x)" in table
    assert "| bare ASGI (Starlette + uvicorn, no batching) 16 clients x 1 image/request | 60.0 | 30.00x |" in table
    assert "per-request cost, promptbake / bare ASGI (1 client x 1 image): 1.25x (goal <= 1.5x)" in table
    assert "16 single-image clients / 1 client, promptbake: 2.25x (goal >= 2x; bare ASGI without batching: 1.20x)" in table


def test_bench_serve_bare_baseline_answers_what_the_predictor_does(artifact, test_images):
    """The baseline `bench serve` compares the service with is the same Predictor, answering the same form."""
    from starlette.testclient import TestClient

    from training.bench.bare import bare_app

    paths = test_images[:5]
    with TestClient(bare_app(str(artifact))) as c:
        assert c.get("/readyz").status_code == 200
        r = c.post("/classify", files=[("images", (p.name, p.read_bytes(), "image/png")) for p in paths],
                   data={"class_names": json.dumps(NAMES), "top_k": "3"})
    assert r.status_code == 200, r.text
    _assert_same_predictions(r.json()["predictions"], _reference(artifact, paths))


@pytest.mark.parametrize("var,value", [("PROMPTBAKE_API_KEY", "short"), ("PROMPTBAKE_MAX_IMAGES", "abc"),
                                       ("PROMPTBAKE_WORKERS", "0"), ("PROMPTBAKE_DEVICE", "cuda")])
def test_bentoml_serve_stops_once_on_a_bad_setting(var, value):
    """`bentoml serve` (a built Bento runs this) imports the service in its main process: a bad setting
    is one line and a non-zero exit there, not a worker that fails and restarts in a loop. CUDA asked
    for, without fallback, where the driver has no such device: the GPU image run without a GPU."""
    import socket

    from service.config import cuda_driver_problem

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(REPO), var: value, "PROMPTBAKE_ARTIFACT": "/nonexistent"}
    if var == "PROMPTBAKE_DEVICE" and cuda_driver_problem() is None:  # a GPU machine: ask for a device it lacks
        env["PROMPTBAKE_CUDA_DEVICES"] = "63"
    proc = subprocess.run([sys.executable, "-m", "bentoml", "serve", "service.service:PromptbakeService", "--host",
                           "127.0.0.1", "--port", str(port)], capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("promptbake: error:")]
    assert len(lines) == 1 and var in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "Application startup failed" not in proc.stderr


class _FakeDriver:
    def __init__(self, init_rc: int = 0, count: int = 1):
        self.init_rc, self.count = init_rc, count

    def cuInit(self, flags):  # noqa: N802 - the driver API's names
        return self.init_rc

    def cuDeviceGetCount(self, ref):  # noqa: N802
        ref._obj.value = self.count
        return 0


def test_cuda_driver_problem_names_what_is_missing(monkeypatch):
    import ctypes

    from service.config import cuda_driver_problem

    def no_library(name):
        raise OSError(name)

    monkeypatch.setattr(ctypes, "CDLL", no_library)
    assert "libcuda.so.1 not found" in cuda_driver_problem() and "--gpus all" in cuda_driver_problem()
    for driver, devices, want in [(_FakeDriver(init_rc=100), None, "cuInit error 100"),
                                  (_FakeDriver(count=0), None, "sees no CUDA device"),
                                  (_FakeDriver(count=2), (0, 1, 3), "[3] asked for, but the driver sees 2"),
                                  (_FakeDriver(count=2), (0, 1), None), (_FakeDriver(count=1), None, None)]:
        monkeypatch.setattr(ctypes, "CDLL", lambda name, d=driver: d)
        got = cuda_driver_problem(devices)
        assert (got is None) if want is None else (want in got), (devices, got)


def test_asgi_unknown_paths_and_methods_answer_in_the_json_error_shape(client):
    for method, path, status, kind in (("GET", "/nope", 404, "not_found"), ("POST", "/no/such/route", 404, "not_found"),
                                       ("GET", "/classify", 405, "method_not_allowed"),
                                       ("DELETE", "/embed_text", 405, "method_not_allowed")):
        r = client.request(method, path)
        assert r.status_code == status, (method, path, r.text)
        assert r.headers["content-type"] == "application/json"
        assert r.json()["error"]["kind"] == kind and path in r.json()["error"]["message"]
    assert client.get("/livez").status_code == 200  # the probes are untouched
    _good(client)


def test_a_refused_request_is_not_logged_as_a_server_error(client, caplog):
    import logging

    caplog.clear()
    with caplog.at_level(logging.DEBUG):
        r = client.post("/classify", json={"images": "not a list", "class_names": NAMES})
    assert r.status_code == 400 and r.json()["error"]["kind"] == "invalid_input"
    assert not [rec for rec in caplog.records if rec.levelno >= logging.WARNING or rec.exc_info], \
        [(rec.levelname, rec.getMessage()[:80]) for rec in caplog.records]
    assert any("client error 400" in rec.getMessage() for rec in caplog.records)
    _good(client)


def test_asgi_saturated_slots_answer_429_and_readyz_says_so(client):
    import asyncio

    from service.http import _service

    svc = _service()
    held = svc.config.max_concurrency
    loop = asyncio.new_event_loop()
    try:
        for _ in range(held):  # every slot taken, as by requests in flight
            loop.run_until_complete(svc.slots.acquire())
        r = client.post("/classify", json={"images": [_b64(_encode(Image.new("RGB", (8, 8)), "PNG"))], "class_names": NAMES})
        assert r.status_code == 429 and r.json()["error"]["kind"] == "too_many_requests", r.text
        assert client.get("/readyz").status_code == 503
        assert client.get("/livez").status_code == 200
    finally:
        for _ in range(held):
            svc.slots.release()
        loop.close()
    assert client.get("/readyz").status_code == 200
    _good(client)


def test_openapi_describes_what_the_middleware_does(client):
    """/docs.json as the service behaves: multipart on /classify, the error shape and statuses, the key."""
    r = client.get("/docs.json")
    assert r.status_code == 200 and int(r.headers["content-length"]) == len(r.content)
    doc = r.json()
    assert doc["info"]["title"] == "promptbake" and doc["info"]["version"] not in ("None", "")
    assert doc["components"]["securitySchemes"]["bearer"] == {
        "type": "http", "scheme": "bearer", "description": "the service's PROMPTBAKE_API_KEY"}
    error = doc["components"]["schemas"]["ErrorResponse"]
    assert error["properties"]["error"]["required"] == ["kind", "message"]
    classify = doc["paths"]["/classify"]["post"]
    assert classify["security"] == [{"bearer": []}]
    form = classify["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert set(form["properties"]) == {"images", "class_names", "top_k", "mode", "descriptions"}
    assert form["properties"]["images"]["items"]["format"] == "binary"
    assert "multipart/form-data" not in doc["paths"]["/embed_text"]["post"]["requestBody"]["content"]
    for path in ("/classify", "/embed_image", "/embed_text"):
        for status in ("400", "401", "413", "415", "429", "503"):
            ref = doc["paths"][path]["post"]["responses"][status]["content"]["application/json"]["schema"]["$ref"]
            assert ref == "#/components/schemas/ErrorResponse", (path, status)

    def refs(node):  # every $ref in the document resolves
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "$ref":
                    yield v
                else:
                    yield from refs(v)
        elif isinstance(node, list):
            for v in node:
                yield from refs(v)

    for ref in refs(doc):
        target = doc
        for part in ref.removeprefix("#/").split("/"):
            target = target[part]
    # and what it documents is what the service answers: a wrong key is the documented 401 shape
    r = client.post("/classify", json={"images": [], "class_names": ["a"]}, headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401 and set(r.json()["error"]) >= {"kind", "message"}


def test_image_batcher_merges_waiting_requests_and_keeps_their_errors_apart():
    """What queues while the model runs is one batch; a request's bad image fails that request only;
    a request larger than max_batch_size is split and reassembled; waiting past the budget is a 503."""
    import threading

    from service.batching import ImageBatcher
    from service.errors import RequestError

    gate = threading.Event()
    calls: list[int] = []

    def model(pixels: np.ndarray) -> np.ndarray:
        gate.wait(5)  # the first batch holds the model until every request has queued
        calls.append(len(pixels))
        return pixels * 10

    def images(first: float, n: int):
        def prepare(lo: int, hi: int) -> np.ndarray:
            if first < 0:
                raise RequestError(400, "image_corrupt", "images[0] cannot be read")
            return np.arange(first + lo, first + hi, dtype=np.float32).reshape(-1, 1)
        return n, prepare

    async def scenario():
        b = ImageBatcher(model, max_batch_size=4, max_latency_ms=60_000)
        first = asyncio.create_task(b.embed(*images(0, 1)))
        await asyncio.sleep(0.05)  # the consumer has taken it and waits on the gate
        rest = [asyncio.create_task(b.embed(*images(100 * k, n))) for k, n in ((1, 2), (2, 1), (3, 6))]
        bad = asyncio.create_task(b.embed(*images(-1, 1)))
        await asyncio.sleep(0.05)
        gate.set()
        outs = await asyncio.gather(first, *rest)
        with pytest.raises(RequestError) as e:
            await bad
        b.close()
        return outs, e.value

    outs, err = asyncio.run(scenario())
    assert err.kind == "image_corrupt"
    assert [o.ravel().tolist() for o in outs] == [[0.0], [1000.0, 1010.0], [2000.0], [3000.0 + 10 * i for i in range(6)]]
    assert calls[0] == 1 and max(calls) == 4 and sum(calls) == 10  # merged up to max_batch_size, split beyond

    async def shed():
        slow = threading.Event()
        b = ImageBatcher(lambda p: (slow.wait(0.3), p)[1], max_batch_size=1, max_latency_ms=100)
        tasks = [asyncio.create_task(b.embed(*images(k, 1))) for k in range(3)]
        results = await asyncio.gather(*tasks, return_exceptions=True)
        b.close()
        return results

    results = asyncio.run(shed())
    assert isinstance(results[0], np.ndarray)
    assert any(isinstance(r, RequestError) and r.status == 503 and r.kind == "overloaded" for r in results[1:])


def test_asgi_demo_page_needs_no_key_and_swagger_moves_to_docs(client):
    page = client.get("/", headers={"Authorization": ""})
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert b"<title>promptbake</title>" in page.content and b"http" not in page.content.split(b"<script>")[1]
    assert client.get("/docs", headers={"Authorization": ""}).status_code == 401  # the API docs keep the key
    docs = client.get("/docs")
    assert docs.status_code == 200 and b"swagger" in docs.content.lower()
    info = client.get("/info").json()["artifact"]
    assert info["descriptions"] == "none" and info["description_attributes"] == []


def test_image_batcher_survives_whatever_a_batch_raises():
    """A model or decoder raising StopIteration (which asyncio refuses to put into a future) or an
    exception fails that batch's requests with a RuntimeError; the next request is served."""
    from service.batching import ImageBatcher

    def model(pixels: np.ndarray) -> np.ndarray:
        if pixels[0, 0] < 0:
            raise StopIteration("from the model")
        return pixels + 1

    def prepare_with(value: float):
        def prepare(lo: int, hi: int) -> np.ndarray:
            if value == 99:
                raise StopIteration("from a decoder")
            return np.full((hi - lo, 1), value, np.float32)
        return prepare

    async def scenario():
        b = ImageBatcher(model, max_batch_size=4, max_latency_ms=60_000)
        errors = []
        for bad in (-1.0, 99.0):
            with pytest.raises(RuntimeError) as e:
                await asyncio.wait_for(b.embed(1, prepare_with(bad)), 5)
            errors.append(str(e.value))
        ok = await asyncio.wait_for(b.embed(2, prepare_with(1.0)), 5)
        b.close()
        return errors, ok

    errors, ok = asyncio.run(scenario())
    assert all("StopIteration" in e for e in errors), errors
    assert ok.ravel().tolist() == [2.0, 2.0]


def test_bench_serve_load_generator_counts_broken_responses_and_goes_on():
    """bench serve's raw HTTP/1.1 client: a response without Content-Length or a closed connection is a
    failed request (status 0), and the next request opens a new connection."""
    from training.bench.serve import _client

    answers = iter([b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
                    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
                    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
                    b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n"])

    async def handle(reader, writer):
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(next(l for l in head.split(b"\r\n") if l.lower().startswith(b"content-length")).split(b":")[1])
                await reader.readexactly(length)
                answer = next(answers)
                writer.write(answer)
                await writer.drain()
                if b"chunked" in answer or b"close" in answer:
                    break
        except (asyncio.IncompleteReadError, StopIteration):
            pass
        writer.close()

    async def scenario():
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        req = b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nx"
        lat, codes = [], []
        await asyncio.wait_for(_client("127.0.0.1", port, [req] * 4, lat, codes), 10)
        server.close()
        return codes

    assert asyncio.run(scenario()) == [200, 0, 200, 503]
