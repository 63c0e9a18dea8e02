"""The bare baseline of ``promptbake bench serve``: the same Predictor behind a minimal ASGI app.

Starlette + uvicorn, one process, no BentoML: ``POST /classify`` takes the multipart form the
service takes (files ``images``, ``class_names`` as a JSON list, ``top_k``), decodes the images
with Pillow and answers :meth:`exports.runtime.Predictor.classify` as JSON, decoded and computed in one
worker-thread hop; ``GET /readyz`` answers 200 once the artifact is loaded. No limits, no authentication, no
batching across requests, no metrics: what a hand-written server around the runtime costs, so the
bench can say what promptbake's serving stack adds per request. Never a server to deploy.

``python -m training.bench.bare --artifact ART --port N`` (binds 127.0.0.1 only).
"""
from __future__ import annotations

import argparse
import io
import json
from typing import Any


def bare_app(artifact: str, device: str = "cpu") -> Any:
    import anyio.to_thread
    from PIL import Image
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, PlainTextResponse
    from starlette.routing import Route

    from exports.runtime import Predictor

    predictor = Predictor(artifact, device=device)

    async def classify(request: Request) -> JSONResponse:
        form = await request.form()
        data = [await f.read() for f in form.getlist("images")]
        names = json.loads(form["class_names"])
        top_k = int(form.get("top_k", 5))

        def work() -> list[dict[str, Any]]:  # decoding and the model, off the event loop, one hop
            images = [Image.open(io.BytesIO(d)).convert("RGB") for d in data]
            return predictor.classify(images, names, top_k=top_k)

        out = await anyio.to_thread.run_sync(work)
        return JSONResponse({"predictions": out})

    async def readyz(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    return Starlette(routes=[Route("/classify", classify, methods=["POST"]), Route("/readyz", readyz)])


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    p = argparse.ArgumentParser(prog="python -m training.bench.bare", description=__doc__.splitlines()[0])
    p.add_argument("--artifact", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = p.parse_args(argv)
    uvicorn.run(bare_app(args.artifact, args.device), host="127.0.0.1", port=args.port, log_level="warning",
                access_log=False)


if __name__ == "__main__":
    main()
