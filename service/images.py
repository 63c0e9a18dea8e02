"""Untrusted bytes -> PIL image, refusing anything outside the limits before it costs memory.

Only bytes are accepted: never a URL or a path (the server fetching or opening what a client
names is an SSRF / file-disclosure hole). The checks, in order:

1. base64 (JSON clients): strict alphabet; an optional ``data:image/...;base64,`` prefix.
2. the format from the magic bytes (Pillow's ``Image.open`` reads only the header) must be in
   the allow-list; the file name and declared content type are ignored.
3. width x height from the header must be <= ``max_image_pixels``; Pillow's own
   ``DecompressionBombWarning`` is turned into an error process-wide by :func:`harden_pillow`.
4. decoding the first frame (animated GIF/WebP: the first frame only); a truncated or corrupt
   file is an error, not a partly grey image.
"""
from __future__ import annotations

import base64
import binascii
import io
import re
import warnings
from pathlib import PurePosixPath
from typing import Any

from PIL import Image, ImageFile
from pydantic_core import core_schema

from service.errors import RequestError, bad_request

_DATA_URL = re.compile(r"^data:image/[a-z0-9.+-]+;base64,", re.IGNORECASE)
_SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*://", re.IGNORECASE)


class ImageUpload(PurePosixPath):
    """The type of an API's ``images`` items: a file upload for BentoML, the image's bytes for the API.

    Declared as a path type, BentoML counts the field among its file fields: ``/schema.json`` calls
    it ``{"type": "file", "format": "image"}``, so ``bentoml.SyncHTTPClient(url).classify(images=[Path(
    "x.png")], ...)`` uploads the files as a multipart form (path strings and PIL images too), and the
    OpenAPI document shows a file picker. No path ever reaches the API: the HTTP middleware turns a
    form's file parts into base64 (refusing a part that is text, e.g. the URL a client sent for
    BentoML to fetch), and validation keeps what a request holds, a base64 string (JSON) or bytes (a
    Python caller), for :func:`image_bytes` to decode. Never instantiated.
    """

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: Any) -> core_schema.CoreSchema:
        def keep(value: Any) -> str | bytes:
            if isinstance(value, (str, bytes)):
                return value
            raise ValueError("an image is a file part (multipart) or a base64 string (JSON)")

        return core_schema.no_info_plain_validator_function(keep)

    @classmethod
    def __get_pydantic_json_schema__(cls, schema: Any, handler: Any) -> dict[str, Any]:
        # validation mode feeds BentoML's /schema.json (its clients upload "file" fields);
        # serialization mode its OpenAPI document (a binary part of a multipart form)
        if handler.mode == "validation":
            return {"type": "file", "format": "image"}
        return {"type": "string", "format": "binary"}


def image_bytes(value: str | bytes, index: int) -> bytes:
    """One ``images`` item -> raw bytes: bytes as given, a string through :func:`decode_base64`."""
    return value if isinstance(value, bytes) else decode_base64(value, index)


def harden_pillow(max_image_pixels: int) -> None:
    """Process-wide Pillow settings for untrusted input (the service owns its worker process)."""
    # Pillow warns above MAX_IMAGE_PIXELS and raises above twice that; make both an error.
    Image.MAX_IMAGE_PIXELS = max_image_pixels
    warnings.simplefilter("error", Image.DecompressionBombWarning)
    ImageFile.LOAD_TRUNCATED_IMAGES = False


def decode_base64(value: str, index: int) -> bytes:
    """A JSON image field -> raw bytes. Nothing is ever fetched or opened: a string that is not
    base64 is an error, named ``image_source`` when it looks like a URL or a path."""
    if not isinstance(value, str):
        raise bad_request("image_encoding", f"images[{index}] must be a base64 string")
    text = _DATA_URL.sub("", value.strip(), count=1)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        pass
    if _SCHEME.match(text) or text.startswith(("/", "~", ".", "file:")) or "\\" in text:
        raise bad_request("image_source", f"images[{index}] looks like a URL or a path; send the image bytes "
                          "(multipart file or base64), the server never fetches or opens anything")
    raise bad_request("image_encoding", f"images[{index}] is not valid base64")


def decode_image(data: bytes, index: int, *, allowed_formats: tuple[str, ...], max_image_pixels: int) -> Image.Image:
    """Bytes -> a loaded RGB-convertible PIL image (first frame), or a :class:`RequestError`."""
    if not data:
        raise bad_request("image_empty", f"images[{index}] is empty")
    try:
        # harden_pillow made DecompressionBombWarning an error; a warnings.catch_warnings()
        # block here would not be thread-safe (it swaps the process-wide filter list).
        im = Image.open(io.BytesIO(data), formats=list(allowed_formats))
    except Image.UnidentifiedImageError:
        raise RequestError(415, "image_format", f"images[{index}] is not an image in an allowed format "
                           f"({', '.join(allowed_formats)})", allowed=list(allowed_formats)) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise RequestError(413, "image_pixels", f"images[{index}] has more than {max_image_pixels} pixels",
                           limit=max_image_pixels) from None
    except (OSError, SyntaxError, ValueError) as e:
        raise bad_request("image_corrupt", f"images[{index}] cannot be read: {e}") from None
    w, h = im.size
    if w < 1 or h < 1:
        raise bad_request("image_size", f"images[{index}] has an empty side ({w}x{h})")
    if w * h > max_image_pixels:
        raise RequestError(413, "image_pixels", f"images[{index}] is {w}x{h} = {w * h} pixels, more than the "
                           f"limit {max_image_pixels}", limit=max_image_pixels)
    try:
        im.load()  # the first frame only
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise RequestError(413, "image_pixels", f"images[{index}] has more than {max_image_pixels} pixels",
                           limit=max_image_pixels) from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise bad_request("image_corrupt", f"images[{index}] cannot be decoded: {e}") from None
    return im
