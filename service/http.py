"""ASGI middleware in front of the service's routes: auth, body limits, multipart, error shape.

What it does, per HTTP request:

* ``Authorization: Bearer KEY`` on every route but the health probes, when a key is configured.
* the request body is counted while it streams in; over ``max_request_bytes`` is 413 before the
  rest is read (a declared ``Content-Length`` over the limit is refused without reading at all).
* the API routes accept ``application/json`` and, for images, ``multipart/form-data`` (and its
  file-less sibling ``application/x-www-form-urlencoded``, whose images are all refused); the
  multipart form (files ``images``, fields ``class_names`` as a JSON list or repeated once per name,
  ``top_k``, ``mode`` and
  ``descriptions`` as a JSON object) is
  parsed here with bounded part counts and turned into the JSON form the typed API takes, so
  BentoML's own file handling (which would fetch a URL sent in place of a file) never sees it.
* ``GET /`` is the demo page (``service/demo.html``; no key needed, it holds no data: its requests
  carry the key the user types); BentoML's Swagger UI moves to ``GET /docs``.
* ``GET /info`` is answered like ``POST /info``.
* every response carries ``X-Promptbake-Provider``: the onnxruntime provider doing the work.
"""
from __future__ import annotations

import asyncio
import base64
import functools
import hmac
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import anyio.to_thread

from service.errors import IN_HTTP_REQUEST, RequestError, bad_request

logger = logging.getLogger(__name__)

HEALTH_PATHS = frozenset({"/livez", "/healthz", "/readyz"})
JSON_ROUTES = frozenset({"/classify", "/embed_image", "/embed_text", "/info"})
MULTIPART_ROUTES = frozenset({"/classify", "/embed_image"})
_MULTIPART_FIELDS = {"/classify": {"images", "class_names", "top_k", "mode", "descriptions"}, "/embed_image": {"images"}}
#: the fields each JSON API takes; anything else is a 400 unknown_field, as in multipart forms
_JSON_FIELDS = {**_MULTIPART_FIELDS, "/embed_text": {"texts", "descriptions"}, "/info": set()}
#: form encodings: a file needs multipart; a urlencoded form (what BentoML's client sends when every
#: image is a URL string) is parsed too, so that it gets the same 400 image_source as a text part
_FORM_MEDIA = frozenset({"multipart/form-data", "application/x-www-form-urlencoded"})
_THREAD_BYTES = 1 << 20  # JSON bodies larger than this are checked off the event loop
_FORM_ON_LOOP_BYTES = 128 << 10  # forms up to this are parsed on the loop (~1 ms); larger ones in a thread
PROVIDER_HEADER = "x-promptbake-provider"


def _service() -> Any | None:
    import bentoml

    try:
        return bentoml.get_current_service()
    except Exception:  # not instantiated yet (lifespan not run)
        return None


async def _send_json(send: Any, status: int, body: dict[str, Any], headers: list[tuple[bytes, bytes]] = ()) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()), *headers]})
    await send({"type": "http.response.body", "body": data})


class _TooLarge(Exception):
    pass


class PromptbakeMiddleware:
    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        svc = _service()
        if svc is None:
            await _send_json(send, 503, {"error": {"kind": "starting", "message": "the service is starting"}})
            return
        token = IN_HTTP_REQUEST.set(True)
        provider = svc.provider.encode()

        async def send_with_header(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (PROVIDER_HEADER.encode(), provider)]}
            await send(message)

        try:
            await self._handle(svc, scope, receive, send_with_header)
        except RequestError as e:
            svc.count_error(e.kind)
            extra = [(b"www-authenticate", b"Bearer")] if e.status == 401 else []
            await _send_json(send_with_header, e.status, e.body(), extra)
        finally:
            IN_HTTP_REQUEST.reset(token)

    async def _handle(self, svc: Any, scope: dict[str, Any], receive: Any, send: Any) -> None:
        cfg = svc.config
        path, method = scope.get("path", ""), scope.get("method", "GET")
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if path == "/" and method in ("GET", "HEAD"):  # the demo page: static, no data, so no key
            await _send_page(send, DEMO_PAGE, head=method == "HEAD")
            return
        if path == "/docs" and method in ("GET", "HEAD"):  # BentoML's Swagger UI, moved from / (key as before)
            scope = {**scope, "path": "/", "raw_path": b"/"}
        if cfg.api_key and path not in HEALTH_PATHS:
            auth = headers.get("authorization", "")
            scheme, _, given = auth.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), cfg.api_key.encode()):
                raise RequestError(401, "unauthorized", "missing or wrong API key (send 'Authorization: Bearer KEY')")
        if path == "/info" and method == "GET":
            scope = {**scope, "method": "POST",
                     "headers": [*(h for h in scope.get("headers", []) if h[0].lower() not in (b"content-type", b"content-length")),
                                 (b"content-type", b"application/json"), (b"content-length", b"2")]}
            await self.app(scope, _replay(b"{}"), send)
            return
        if path == "/docs.json" and method == "GET":
            await self.app(scope, receive, _completed_openapi(send, bool(cfg.api_key)))
            return
        if path not in JSON_ROUTES or method != "POST":
            await self.app(scope, receive, _errors_as_json(send, path, method))
            return

        media = headers.get("content-type", "application/json").split(";")[0].strip().lower()
        form = media in _FORM_MEDIA
        if not (media == "application/json" or form and path in MULTIPART_ROUTES):
            allowed = "application/json or multipart/form-data" if path in MULTIPART_ROUTES else "application/json"
            raise RequestError(415, "content_type", f"{path} accepts {allowed}, not {media!r}")
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > cfg.max_request_bytes:
            raise _too_large(cfg.max_request_bytes)
        try:  # before a slot is taken: a slow upload holds none
            body = await _read_body(receive, cfg.max_request_bytes, cfg.body_timeout_s, cfg.min_body_rate)
        except _TooLarge:
            raise _too_large(cfg.max_request_bytes) from None
        if media == "application/json":
            if len(body) > _THREAD_BYTES:
                await anyio.to_thread.run_sync(_check_json_fields, body, path)
            else:
                _check_json_fields(body, path)
        if form:
            # parsing and re-encoding a large form takes ~10 ms per MB: keep it off the event loop; a
            # small one costs less than the hop (a thread and an event loop of its own: ~1 ms a request)
            if len(body) > _FORM_ON_LOOP_BYTES:
                body = await anyio.to_thread.run_sync(_multipart_to_json_sync, scope, body, path, cfg)
            else:
                body = json.dumps(await _multipart_to_json(scope, body, path, cfg)).encode()
            scope = {**scope, "headers": [*(h for h in scope.get("headers", []) if h[0].lower() not in (b"content-type", b"content-length")),
                                          (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]}
        if svc.slots.locked():
            raise RequestError(429, "too_many_requests", f"{cfg.max_concurrency} requests are being processed; "
                               "retry shortly", limit=cfg.max_concurrency)
        async with svc.slots:
            await self.app(scope, _replay(body), _reshape_validation_errors(send, svc))


#: the demo page at ``/`` (one self-contained file: no external assets, works offline)
DEMO_PAGE = Path(__file__).with_name("demo.html")


@functools.cache
def _page_bytes(page: Path) -> bytes:
    return page.read_bytes()  # once per process: the page is part of the installed code


async def _send_page(send: Any, page: Path, head: bool = False) -> None:
    data = _page_bytes(page)
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/html; charset=utf-8"), (b"content-length", str(len(data)).encode()),
                            (b"cache-control", b"no-cache")]})
    await send({"type": "http.response.body", "body": b"" if head else data})


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("promptbake")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _completed_openapi(send: Any, api_key: bool) -> Any:
    """BentoML's ``/docs.json`` with what this middleware adds (:func:`service.openapi.complete_openapi`)."""
    from service.openapi import complete_openapi

    state: dict[str, Any] = {"body": b""}

    async def wrapped(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            if message["status"] != 200:
                state["passthrough"] = True
                await send(message)
            else:
                state["start"] = message
            return
        if state.get("passthrough"):
            await send(message)
            return
        state["body"] += message.get("body", b"")
        if message.get("more_body"):
            return
        spec = complete_openapi(json.loads(state["body"]), _package_version(), api_key)
        data = json.dumps(spec).encode()
        start = state["start"]
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
        await send({**start, "headers": [*headers, (b"content-length", str(len(data)).encode())]})
        await send({"type": "http.response.body", "body": data})

    return wrapped


_PLAIN_ERRORS = {404: "not_found", 405: "method_not_allowed"}


def _errors_as_json(send: Any, path: str, method: str) -> Any:
    """Starlette answers an unknown path or method in text/plain; give them the service's JSON error
    shape (``{"error": {"kind", "message"}}``) like every other error."""
    state: dict[str, Any] = {}

    async def wrapped(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            media = dict(message.get("headers", [])).get(b"content-type", b"").split(b";")[0]
            if message["status"] in _PLAIN_ERRORS and media in (b"text/plain", b""):
                state["start"] = message
                return
        elif "start" in state:
            if message.get("more_body"):
                return
            start = state.pop("start")
            kind = _PLAIN_ERRORS[start["status"]]
            text = f"no route {path}" if kind == "not_found" else f"{method} is not allowed on {path}"
            extra = [(k, v) for k, v in start.get("headers", []) if k.lower() == b"allow"]
            await _send_json(send, start["status"], {"error": {"kind": kind, "message": text}}, extra)
            return
        await send(message)

    return wrapped


def _check_json_fields(body: bytes, path: str) -> None:
    """A JSON object with a field the API does not take is a 400 (a misspelt ``top_k`` would otherwise
    be silently ignored); a body that is not a JSON object is left to the API's own validation."""
    try:
        data = json.loads(body or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError):
        return
    if isinstance(data, dict):
        unknown = sorted(set(data) - _JSON_FIELDS[path])
        if unknown:
            raise bad_request("unknown_field", f"unknown field(s) {unknown}; expected {sorted(_JSON_FIELDS[path])}")


def _reshape_validation_errors(send: Any, svc: Any) -> Any:
    """BentoML answers a body that does not fit the typed API with 400 ``{"error": str, "detail": [...]}``;
    give it the service's error shape (``{"error": {"kind": "invalid_input", ...}}``)."""
    start: dict[str, Any] | None = None
    chunks: list[bytes] = []

    async def wrapped(message: dict[str, Any]) -> None:
        nonlocal start
        if message["type"] == "http.response.start" and message["status"] == 400:
            start = message
            return
        if start is None or message["type"] != "http.response.body":
            await send(message)
            return
        chunks.append(message.get("body", b""))
        if message.get("more_body", False):
            return
        data = b"".join(chunks)
        try:
            body = json.loads(data)
        except ValueError:
            body = None
        if isinstance(body, dict) and isinstance(body.get("error"), str):
            fields = [".".join(str(x) for x in d.get("loc", ())) + ": " + str(d.get("msg", "")) for d in body.get("detail") or []]
            body = {"error": {"kind": "invalid_input", "message": "; ".join(fields) or body["error"],
                              "detail": body.get("detail") or []}}
            svc.count_error("invalid_input")
            data = json.dumps(body).encode()
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
        await send({**start, "headers": [*headers, (b"content-length", str(len(data)).encode())]})
        await send({"type": "http.response.body", "body": data})

    return wrapped


def _too_large(limit: int) -> RequestError:
    return RequestError(413, "request_bytes", f"the request body is larger than {limit} bytes", limit=limit)


async def _read_body(receive: Any, limit: int, timeout_s: float = math.inf, min_rate: int = 1) -> bytes:
    """The whole body, at most ``limit`` bytes, arriving within ``timeout_s + received / min_rate``
    seconds of the first read (408 ``body_timeout`` otherwise: a stalled or trickling client)."""
    chunks, size = [], 0
    start = time.monotonic()
    while True:
        remaining = start + timeout_s + size / min_rate - time.monotonic()
        message = None
        with anyio.move_on_after(max(remaining, 0.0)):
            message = await receive()
        if message is None:
            raise RequestError(408, "body_timeout", f"the request body arrived too slowly ({size} bytes in "
                               f"{time.monotonic() - start:.1f} s; at least {min_rate} bytes/s after {timeout_s:g} s)")
        if message["type"] == "http.disconnect":
            raise bad_request("disconnected", "the client disconnected")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _TooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes) -> Any:
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return {"type": "http.disconnect"}

    return receive


def _is_json_string(text: str) -> bool:
    try:
        return isinstance(json.loads(text), str)
    except json.JSONDecodeError:
        return False


def _multipart_to_json_sync(scope: dict[str, Any], body: bytes, path: str, cfg: Any) -> bytes:
    """The JSON body equivalent to a multipart form (run in a worker thread, on its own event loop)."""
    return json.dumps(asyncio.run(_multipart_to_json(scope, body, path, cfg))).encode()


async def _multipart_to_json(scope: dict[str, Any], body: bytes, path: str, cfg: Any) -> dict[str, Any]:
    from starlette.datastructures import UploadFile
    from starlette.formparsers import MultiPartException
    from starlette.requests import Request

    scope = {k: v for k, v in scope.items() if k != "app"}  # so starlette raises MultiPartException, not HTTPException
    request = Request(scope, _replay(body))
    try:
        # class_names may come as one field per name (what httpx and requests send for a list)
        form = await request.form(max_files=cfg.max_images, max_fields=len(_MULTIPART_FIELDS[path]) + cfg.max_class_names + 1,
                                  max_part_size=cfg.max_request_bytes)
    except MultiPartException as e:
        kind = "too_many_images" if "files" in e.message.lower() else "multipart"
        raise bad_request(kind, f"bad multipart form: {e.message} (at most {cfg.max_images} images)") from None
    try:
        unknown = sorted(set(form.keys()) - _MULTIPART_FIELDS[path])
        if unknown:
            raise bad_request("unknown_field", f"unknown form field(s) {unknown}; expected {sorted(_MULTIPART_FIELDS[path])}")
        files = form.getlist("images")
        if any(not isinstance(f, UploadFile) for f in files):
            raise bad_request("image_source", "every 'images' part must be an uploaded file (the server never fetches "
                              "URLs or opens paths)")
        payload: dict[str, Any] = {"images": [base64.b64encode(await f.read()).decode() for f in files]}  # type: ignore[union-attr]
        if "mode" in form:
            mode = form["mode"]
            mode = (await mode.read()).decode("utf-8", "replace") if isinstance(mode, UploadFile) else mode
            # plain (curl -F mode=novel) or JSON-encoded (BentoML's client JSON-encodes every non-file field)
            payload["mode"] = json.loads(mode) if mode.startswith('"') and _is_json_string(mode) else mode
        names = [(await v.read()).decode("utf-8", "replace") if isinstance(v, UploadFile) else v
                 for v in form.getlist("class_names")]
        if len(names) > 1:  # repeated fields: one name each (a single field stays a JSON list: "red, green" is a 400)
            payload["class_names"] = names
        for field in ("class_names", "top_k", "descriptions"):
            if field in form and field not in payload:
                value = form[field]
                if isinstance(value, UploadFile):
                    value = (await value.read()).decode("utf-8", "replace")
                try:
                    payload[field] = json.loads(value)
                except json.JSONDecodeError:
                    expected = {"class_names": 'a JSON list such as ["cat", "dog"]', "top_k": "an integer",
                                "descriptions": 'a JSON object such as {"cat": ["a small pet."]}'}[field]
                    raise bad_request(f"{field}_json", f"form field '{field}' must be {expected}") from None
        return payload
    finally:
        await form.close()
