"""``promptbake bench serve``: the served artifact over HTTP against plain open_clip torch eager.

One run measures, on this machine:

* the single-precision matmul rate (torch ``mm``, fp32, TF32 off), the yardstick for "fraction of
  peak": images/s x GFLOP per image / matmul GFLOP/s. GFLOP per image is counted by torch's
  ``FlopCounterMode`` on the backbone's image tower with the attention fast path off, which the
  counter cannot see (35.1 for ViT-B-16 at 224 px; :mod:`training.bench.flops`);
* the backbone's image tower in open_clip torch eager, in-process (the baseline), and the
  artifact's image graph in onnxruntime in-process, at batch 1 and ``max_batch_size``;
* a real ``bentoml serve`` of the artifact on 127.0.0.1: one client sending one image at a time
  (no batching possible), ``clients`` concurrent clients sending one image each (batching
  across requests), and clients sending ``batch_images`` per request; images/s and p50/p99 latency;
* the same artifact's Predictor behind a bare Starlette + uvicorn app (:mod:`training.bench.bare`),
  with the same one-client and ``clients``-client traffic, and the two ratios :func:`serve_ratios`
  prints: promptbake's per-request cost against it, and what cross-request batching buys;
* ``/classify`` with ``n_names`` names never seen (cold: the text graph runs for each) and the
  same names again (cached).

Images are synthetic JPEGs (320x240 colour fields with shapes), so decoding costs what a photo
of that size costs.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np

logger = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[2]  # the repository root (training/bench/serve.py)


def synthetic_jpegs(n: int, seed: int = 0) -> list[bytes]:
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        im = Image.new("RGB", (320, 240), tuple(int(c) for c in rng.integers(0, 256, 3)))
        d = ImageDraw.Draw(im)
        for _ in range(6):
            x, y = rng.integers(0, 300), rng.integers(0, 220)
            d.ellipse((x, y, x + rng.integers(10, 120), y + rng.integers(10, 120)), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def matmul_gflops(device: str = "cpu", seconds: float = 2.0) -> float:
    """Sustained fp32 matmul rate of torch on ``device`` (TF32 disabled on CUDA)."""
    import torch

    n = 2048 if device == "cpu" else 8192
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    torch.mm(a, b)  # warm-up
    reps, t0 = 0, time.perf_counter()
    while True:
        torch.mm(a, b)
        reps += 1
        if device == "cuda":
            torch.cuda.synchronize()
        if time.perf_counter() - t0 >= seconds:
            break
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9


def _rate(fn, images_per_call: int, seconds: float) -> float:
    fn()  # warm-up
    calls, t0 = 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - t0 < seconds:
        fn()
        calls += 1
    return calls * images_per_call / (time.perf_counter() - t0)


def bench_in_process(artifact: str | os.PathLike[str], batch: int, device: str, seconds: float) -> dict[str, Any]:
    """open_clip torch eager vs onnxruntime, image tower only, batch 1 and ``batch``."""
    import torch
    from exports.manifest import load_artifact
    from exports.runtime import Predictor
    from training.backbones import create_backbone, recorded_backbone_spec
    from training.bench.flops import image_gflop

    manifest = load_artifact(artifact)
    bb = create_backbone(recorded_backbone_spec(manifest.backbone))
    model = bb.model.to(device)
    s = manifest.preprocess.image_size
    gflop = image_gflop(model, s, device)  # attention included (training.bench.flops)
    predictor = Predictor(artifact, device=device, batch_size=batch)
    rows = {}
    for n in (1, batch):
        x = torch.randn(n, 3, s, s, device=device)
        xn = x.cpu().numpy()

        def torch_run() -> None:
            with torch.no_grad():
                model.encode_image(x)
            if device == "cuda":
                torch.cuda.synchronize()

        rows[f"torch eager, batch {n}"] = _rate(torch_run, n, seconds)
        rows[f"onnxruntime, batch {n}"] = _rate(lambda: predictor.embed_pixels(xn), n, seconds)
    return {"gflop_per_image": gflop, "backbone": manifest.backbone, "in_process": rows}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _percentiles(lat: list[float]) -> tuple[float, float]:
    a = np.sort(np.asarray(lat)) * 1e3
    return float(np.percentile(a, 50)), float(np.percentile(a, 99))


def _form(images: list[bytes], names: list[str], host: str) -> bytes:
    """One whole ``POST /classify`` request (multipart form, keep-alive), encoded once up front."""
    boundary = "promptbake-bench-boundary"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="images"; filename="{i}.jpg"\r\n'
             f"Content-Type: image/jpeg\r\n\r\n".encode() + im + b"\r\n" for i, im in enumerate(images)]
    for name, value in (("class_names", json.dumps(names)), ("top_k", "1")):
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    head = (f"POST /classify HTTP/1.1\r\nHost: {host}\r\nContent-Type: multipart/form-data; boundary={boundary}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    return head + body


async def _client(host: str, port: int, requests: list[bytes], lat: list[float], codes: list[int]) -> None:
    """One keep-alive HTTP/1.1 connection sending ``requests`` one after another."""
    import asyncio

    reader = writer = None
    try:
        for req in requests:
            t = time.perf_counter()
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection(host, port)
                writer.write(req)
                await writer.drain()
                status = int((await reader.readline()).split()[1])
                length, close = None, False
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    key, _, value = line.decode("latin-1").partition(":")
                    key, value = key.strip().lower(), value.strip().lower()
                    if key == "content-length":
                        length = int(value)
                    elif key == "connection" and value == "close":
                        close = True
                if length is None:  # the servers measured always send one; anything else is a failure
                    raise ConnectionError("a response without Content-Length")
                await reader.readexactly(length)
            except (OSError, ValueError, IndexError, asyncio.IncompleteReadError):
                status, close = 0, True  # counted as failed; the next request opens a new connection
            lat.append(time.perf_counter() - t)
            codes.append(status)
            if close and writer is not None:
                writer.close()
                reader = writer = None
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


def _traffic(base: str, images: list[bytes], names: list[str], clients: int, requests: int, per_request: int) -> dict[str, Any]:
    """``clients`` connections each sending ``requests`` requests of ``per_request`` images, as fast as
    answers come. The load generator is one asyncio loop writing requests encoded beforehand (what
    wrk does): on a 2-core machine, 16 threads building forms with httpx took CPU from the server
    and measured the client more than the server."""
    import asyncio
    from urllib.parse import urlsplit

    url = urlsplit(base)
    plan = [[_form([images[((i * requests + j) * per_request + m) % len(images)] for m in range(per_request)],
                   names, url.netloc) for j in range(requests)] for i in range(clients)]
    lat: list[float] = []
    codes: list[int] = []

    async def run() -> None:
        await asyncio.gather(*(_client(url.hostname, url.port, reqs, lat, codes) for reqs in plan))

    t0 = time.perf_counter()
    asyncio.run(run())
    elapsed = time.perf_counter() - t0
    ok = sum(c == 200 for c in codes)
    p50, p99 = _percentiles(lat)
    return {"images_per_s": ok * per_request / elapsed, "p50_ms": p50, "p99_ms": p99, "requests": len(codes),
            "failed": len(codes) - ok}


def _batch_count(base: str) -> tuple[float, float]:
    import httpx

    text = httpx.get(base + "/metrics", timeout=30).text
    vals = {"count": 0.0, "sum": 0.0}
    for line in text.splitlines():
        for k in vals:
            if line.startswith(f"promptbake_image_batch_size_{k}"):
                vals[k] += float(line.split()[-1])
    return vals["count"], vals["sum"]


def wait_until_ready(proc: subprocess.Popen, base: str, timeout_s: float, request_timeout_s: float = 30.0) -> None:
    """Poll ``BASE/readyz`` until it answers 200.

    Raises:
        RuntimeError: the server process exited, or ``timeout_s`` passed first.
    """
    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited (code {proc.returncode}) before it was ready")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the server was not ready in {timeout_s:.0f} s")
        try:
            if httpx.get(base + "/readyz", timeout=request_timeout_s).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)


def _server_env(**settings: str) -> dict[str, str]:
    """This process's environment without its PROMPTBAKE_* settings (the bench sets its own), the
    repository importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROMPTBAKE_")}
    env.update(PYTHONPATH=str(REPO), BENTOML_DO_NOT_TRACK="True", **settings)
    return env


@contextlib.contextmanager
def _server(argv: list[str], env: dict[str, str], what: str) -> Iterator[str]:
    """Start ``python ARGV --port P`` (a server on 127.0.0.1), yield its base URL once ``/readyz``
    answers, stop it (SIGTERM, then SIGKILL) however the block ends."""
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"promptbake-bench-{what}-{port}.log", "wb")
    proc = subprocess.Popen([sys.executable, *argv, "--port", str(port)], stdout=log, stderr=subprocess.STDOUT,
                            env=env, cwd=REPO, start_new_session=True)
    try:
        try:
            wait_until_ready(proc, base, timeout_s=180)
        except RuntimeError as e:
            raise RuntimeError(f"{e}; see {log.name}") from None
        yield base
    finally:
        # the whole process group, even when the parent has exited: its workers may still run
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        log.close()


#: the rows both servers answer, and the names every request classifies among
ONE_CLIENT = "1 client x 1 image/request"
_NAMES = ["cat", "dog", "car", "tree", "house", "person", "bird", "boat"]


def _per_client(requests: int, clients: int) -> int:
    """Requests per client in a concurrent row: four times ``requests`` in all, so the row lasts long
    enough to measure a steady state (64 requests over 16 clients was over in half a second)."""
    return max(1, 4 * requests // clients)


def _clients_row(clients: int) -> str:
    return f"{clients} clients x 1 image/request"


def bench_http(artifact: str | os.PathLike[str], *, device: str, clients: int, requests: int, batch_images: int,
               n_names: int, max_batch_size: int, max_latency_ms: int) -> dict[str, Any]:
    import httpx

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise
    env = _server_env(PROMPTBAKE_MAX_BATCH_SIZE=str(max_batch_size), PROMPTBAKE_MAX_LATENCY_MS=str(max_latency_ms),
                      PROMPTBAKE_MAX_CLASS_NAMES=str(max(n_names, 1000)))
    argv = ["-m", "training.cli", "serve", "--artifact", str(artifact), "--host", "127.0.0.1", "--device", device]
    images = synthetic_jpegs(64)
    with _server(argv, env, "serve") as base:
        info = httpx.get(base + "/info", timeout=30).json()
        _traffic(base, images, _NAMES, 2, 5, 1)  # warm-up: sessions, cache, dispatcher training
        rows = {}
        rows[ONE_CLIENT] = _traffic(base, images, _NAMES, 1, requests, 1)
        c0, s0 = _batch_count(base)
        rows[_clients_row(clients)] = r = _traffic(base, images, _NAMES, clients, _per_client(requests, clients), 1)
        c1, s1 = _batch_count(base)
        r["mean_batch"] = (s1 - s0) / max(c1 - c0, 1)
        rows[f"{max(1, clients // 4)} clients x {batch_images} images/request"] = _traffic(
            base, images, _NAMES, max(1, clients // 4), max(1, requests // clients), batch_images)
        fresh = [f"object number {i}" for i in range(n_names)]
        timings = []
        with httpx.Client(base_url=base, timeout=600) as c:  # one connection, as a real client keeps
            c.get("/livez")
            for _ in range(3):  # cold, then cached (best of two)
                t = time.perf_counter()
                r = c.post("/classify", files=[("images", ("a.jpg", images[0], "image/jpeg"))],
                           data={"class_names": json.dumps(fresh), "top_k": "1"})
                timings.append(time.perf_counter() - t)
                r.raise_for_status()
        timings = [timings[0], min(timings[1:])]
    return {"provider": info["provider"], "http": rows, "names": {"n": n_names, "cold_s": timings[0], "cached_s": timings[1]}}


def bench_bare(artifact: str | os.PathLike[str], *, device: str, clients: int, requests: int) -> dict[str, Any]:
    """The same Predictor behind a bare Starlette + uvicorn app (:mod:`training.bench.bare`), the same
    clients and requests as the service's first two rows."""
    env = _server_env()
    images = synthetic_jpegs(64)
    with _server(["-m", "training.bench.bare", "--artifact", str(artifact), "--device", device], env, "bare") as base:
        _traffic(base, images, _NAMES, 2, 5, 1)  # warm-up
        return {ONE_CLIENT: _traffic(base, images, _NAMES, 1, requests, 1),
                _clients_row(clients): _traffic(base, images, _NAMES, clients, _per_client(requests, clients), 1)}


def bench_serve(artifact: str | os.PathLike[str], *, device: str = "cpu", clients: int = 16, requests: int = 64,
                batch_images: int = 8, n_names: int = 1000, seconds: float = 3.0, max_batch_size: int = 32,
                max_latency_ms: int = 5000) -> dict[str, Any]:
    artifact = Path(artifact).resolve()  # the servers run from the repository root
    peak = matmul_gflops(device)
    res = bench_in_process(artifact, max_batch_size, device, seconds)
    res.update(bench_http(artifact, device=device, clients=clients, requests=requests, batch_images=batch_images,
                          n_names=n_names, max_batch_size=max_batch_size, max_latency_ms=max_latency_ms))
    res["bare"] = bench_bare(artifact, device=device, clients=clients, requests=requests)
    res.update(matmul_gflops=peak, device=device, cpu_count=os.cpu_count(), clients=clients)
    return res


def serve_ratios(res: dict[str, Any]) -> list[str]:
    """The two ratios issue 20 set goals for, from one run's figures: per-request cost against the bare
    app (one client, one image per request: bare images/s over promptbake's; goal <= 1.5x), and
    what cross-request batching buys (``clients`` single-image clients over one; goal >= 2x)."""
    if "bare" not in res:
        return []
    one = res["http"][ONE_CLIENT]["images_per_s"]
    many = res["http"][_clients_row(res["clients"])]["images_per_s"]
    cost = res["bare"][ONE_CLIENT]["images_per_s"] / max(one, 1e-9)
    bare_many = res["bare"][_clients_row(res["clients"])]["images_per_s"] / max(res["bare"][ONE_CLIENT]["images_per_s"], 1e-9)
    return [f"per-request cost, promptbake / bare ASGI (1 client x 1 image): {cost:.2f}x (goal <= 1.5x)",
            f"{res['clients']} single-image clients / 1 client, promptbake: {many / max(one, 1e-9):.2f}x (goal >= 2x; "
            f"bare ASGI without batching: {bare_many:.2f}x)"]


def format_serve_table(res: dict[str, Any]) -> str:
    g, peak = res["gflop_per_image"], res["matmul_gflops"]
    base = res["in_process"]["torch eager, batch 1"]
    lines = [
        f"backbone {res['backbone']} ({g:.3g} GFLOP/image), device {res['device']} (served on {res['provider']}), "
        f"fp32 matmul {peak:.1f} GFLOP/s, {res['cpu_count']} CPUs",
        "",
        "| path | images/s | vs torch eager b1 | p50 ms | p99 ms | fraction of peak |",
        "|---|---|---|---|---|---|",
    ]
    for name, ips in res["in_process"].items():
        lines.append(f"| in-process {name} | {ips:.1f} | {ips / base:.2f}x | | | {100 * ips * g / peak:.1f}% |")
    for name, r in res["http"].items():
        extra = f" (mean batch {r['mean_batch']:.1f})" if "mean_batch" in r else ""
        failed = f", {r['failed']} failed" if r["failed"] else ""
        lines.append(f"| HTTP {name}{extra}{failed} | {r['images_per_s']:.1f} | {r['images_per_s'] / base:.2f}x | "
                     f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {100 * r['images_per_s'] * g / peak:.1f}% |")
    for name, r in res.get("bare", {}).items():
        lines.append(f"| bare ASGI (Starlette + uvicorn, no batching) {name} | {r['images_per_s']:.1f} | "
                     f"{r['images_per_s'] / base:.2f}x | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
                     f"{100 * r['images_per_s'] * g / peak:.1f}% |")
    lines += ["", *serve_ratios(res)]
    n = res["names"]
    lines += ["", f"/classify with {n['n']} new class names: {n['cold_s'] * 1e3:.0f} ms cold, "
              f"{n['cached_s'] * 1e3:.0f} ms cached ({n['cold_s'] / max(n['cached_s'], 1e-9):.0f}x)"]
    return "\n".join(lines)
