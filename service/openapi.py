"""The OpenAPI document (``GET /docs.json``) as the service really behaves.

BentoML generates the document from the typed API methods; it cannot know what the HTTP middleware
(:mod:`service.http`) adds: JSON bodies with base64 images beside the multipart forms that the typed
file field ``images`` gives ``/classify`` and ``/embed_image`` (and what those forms accept), the error shape
``{"error": {"kind", "message", "limit"?}}`` with its statuses (400, 401, 413, 415, 429, 503), the
bearer API key, and the package's version. :func:`complete_openapi` adds them to BentoML's document,
so the Swagger page at ``/docs`` can send every request the README's curl sends.
"""
from __future__ import annotations

import copy
from typing import Any

#: the API routes the middleware guards, and those that also take multipart forms
API_ROUTES = ("/classify", "/embed_image", "/embed_text", "/info")
MULTIPART = ("/classify", "/embed_image")

ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {
        "type": "object",
        "required": ["kind", "message"],
        "properties": {
            "kind": {"type": "string", "description": "stable machine-readable name, e.g. too_many_images, "
                                                       "descriptions_missing, unauthorized"},
            "message": {"type": "string", "description": "one sentence for a human, naming the limit"},
            "limit": {"type": "integer", "description": "the limit that was exceeded, where there is one"},
        },
    }},
}

_ERRORS = {
    "400": "the request is invalid (a field, an image, a limit); `error.kind` says which",
    "401": "missing or wrong API key (`Authorization: Bearer KEY`), when the service has one",
    "413": "the body is larger than PROMPTBAKE_MAX_REQUEST_BYTES",
    "415": "a content type other than application/json (or multipart/form-data where accepted)",
    "429": "every request slot is taken (PROMPTBAKE_MAX_CONCURRENCY); retry shortly",
    "503": "the service is starting, or shedding load",
}

_MULTIPART_FIELDS: dict[str, dict[str, Any]] = {
    "/classify": {
        "images": {"type": "array", "items": {"type": "string", "format": "binary"},
                   "description": "image files (JPEG, PNG, WebP, BMP, GIF), one part each"},
        "class_names": {"type": "array", "items": {"type": "string"},
                        "description": "repeated once per name, or one field holding a JSON list"},
        "top_k": {"type": "integer", "default": 5},
        "mode": {"type": "string", "enum": ["auto", "base", "novel"], "default": "auto"},
        "descriptions": {"type": "string", "description": "a JSON object {name: [sentence, ...]} (or attribute "
                                                          "trees for methods that read them)"},
    },
    "/embed_image": {
        "images": {"type": "array", "items": {"type": "string", "format": "binary"}},
    },
}

_EXAMPLES = {
    "/classify": {"images": ["<base64-encoded PNG>"], "class_names": ["cat", "dog", "a red apple"], "top_k": 2},
    "/embed_text": {"texts": ["cat", "dog"]},
}


def complete_openapi(spec: dict[str, Any], version: str, api_key: bool) -> dict[str, Any]:
    """BentoML's document ``spec`` with the middleware's behaviour added (a new dict; ``spec`` is unchanged).

    Args:
        version: the package version for ``info.version`` (BentoML writes "None" outside a Bento).
        api_key: whether the service requires ``Authorization: Bearer KEY`` on the API routes.
    """
    out = copy.deepcopy(spec)
    info = out.setdefault("info", {})
    info.update(title="promptbake", version=version,
                description="Open-vocabulary image classification with a prompt-learned CLIP exported by promptbake: "
                            "send images and any class names, get softmax scores over those names. Errors are "
                            '`{"error": {"kind", "message"}}` with the status they name.')
    info.pop("contact", None)
    components = out.setdefault("components", {})
    components.setdefault("schemas", {})["ErrorResponse"] = ERROR_SCHEMA
    if api_key:
        components.setdefault("securitySchemes", {})["bearer"] = {
            "type": "http", "scheme": "bearer", "description": "the service's PROMPTBAKE_API_KEY"}
    for path in API_ROUTES:
        for method, op in out.get("paths", {}).get(path, {}).items():
            if not isinstance(op, dict) or method not in ("get", "post"):
                continue
            responses = op.setdefault("responses", {})
            for status, text in _ERRORS.items():
                if status == "401" and not api_key:
                    continue
                responses[status] = {"description": text,
                                     "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
            if api_key:
                op["security"] = [{"bearer": []}]
            content = op.get("requestBody", {}).get("content", {})
            if method == "post" and path in MULTIPART and "multipart/form-data" in content:
                # BentoML describes a typed file field as a form only; the middleware takes JSON with
                # base64 strings too (the form is rewritten below with what the middleware accepts)
                body = copy.deepcopy(content["multipart/form-data"]["schema"])
                body["properties"]["images"]["items"] = {"type": "string", "format": "byte",
                                                         "description": "base64-encoded image bytes"}
                content["application/json"] = {"schema": body}
            if path in _EXAMPLES and "application/json" in content:
                content["application/json"]["example"] = _EXAMPLES[path]
            if method == "post" and path in MULTIPART and "application/json" in content:
                fields = _MULTIPART_FIELDS[path]
                required = ["images", "class_names"] if path == "/classify" else ["images"]
                content["multipart/form-data"] = {
                    "schema": {"type": "object", "required": required, "properties": fields},
                    "encoding": {"images": {"contentType": "image/*"}},
                }
    return out
