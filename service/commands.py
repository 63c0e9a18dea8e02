"""``promptbake serve``: check the settings, the port and the artifact, then exec ``bentoml serve``.

Torch-free (only the default artifact, exported once on first use, needs torch); ``training.cli``
adds it to its parser.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Callable

logger = logging.getLogger("training.cli")


def cmd_serve(args: argparse.Namespace) -> int:
    """Run ``bentoml serve`` on service.service:PromptbakeService with PROMPTBAKE_* set (replaces this process)."""
    from pathlib import Path

    from exports.manifest import load_artifact

    # Settings first: one line naming what is wrong, not a server that BentoML restarts over and over.
    from service.config import ServiceConfig

    env = {**os.environ, "PROMPTBAKE_DEVICE": args.device}
    if args.artifact:
        env["PROMPTBAKE_ARTIFACT"] = str(args.artifact)
    if args.expect_digest:
        env["PROMPTBAKE_ARTIFACT_DIGEST"] = args.expect_digest
    ServiceConfig.from_env(env)  # ServiceConfigError (a ValueError) names the variable
    _check_port_free(args.host, args.port)
    if not args.artifact:
        from training.defaults import ensure_default_artifact  # imports torch only for this one-time export

        args.artifact = str(ensure_default_artifact())
    # Check here: a one-line error instead of a server whose worker BentoML restarts over and over.
    from exports.manifest import check_digest

    if Path(args.artifact).is_dir():
        check_digest(args.artifact, load_artifact(args.artifact), args.expect_digest)
    elif os.sep in args.artifact or args.artifact.startswith("."):
        raise FileNotFoundError(f"{args.artifact}: no such artifact directory")
    else:
        import bentoml

        try:
            model = bentoml.models.get(args.artifact)
        except Exception as e:  # NotFound or a malformed tag
            raise ValueError(f"{args.artifact}: neither an artifact directory nor a BentoML model ({e})") from None
        sub = model.path_of((model.info.metadata or {}).get("artifact_subdir", "artifact"))
        check_digest(sub, load_artifact(sub), args.expect_digest)
    env["PROMPTBAKE_ARTIFACT"] = str(args.artifact)
    if args.allow_cpu_fallback:
        env["PROMPTBAKE_ALLOW_CPU_FALLBACK"] = "1"
    repo = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "bentoml", "serve", "service.service:PromptbakeService",
           "--host", args.host, "--port", str(args.port), "--working-dir", str(repo)]
    logger.info("promptbake serve: %s (artifact %s, device %s)", " ".join(cmd), args.artifact, args.device)
    sys.stdout.flush()
    sys.stderr.flush()
    # exec, so SIGTERM/SIGINT reach BentoML directly and its graceful shutdown runs
    os.execve(sys.executable, cmd, env)
    return 0  # not reached


def _port(text: str) -> int:
    """``--port``: an integer in 1..65535 (a larger one would silently wrap around when bound)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer in 1..65535, got {text!r}") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"must be in 1..65535, got {port}")
    return port


def _check_port_free(host: str, port: int) -> None:
    """Bind ``host:port`` once, so a busy port is one line here rather than a traceback from the server."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ValueError(f"--host {host}: not an address this machine can bind ({e.strerror})") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds it
        try:
            sock.bind(address)
        except OSError as e:
            raise ValueError(f"cannot listen on {host}:{port}: {e.strerror} (another server there? pick --port)") from None


def add_command(sub: argparse._SubParsersAction, add_command: Callable[..., argparse.ArgumentParser]) -> None:
    """Add ``serve`` to the ``promptbake`` subcommands (``add_command`` makes one)."""
    s = add_command(sub, "serve", "serve an artifact over HTTP with BentoML (onnxruntime, no torch)",
                     description="Serve an artifact over HTTP with BentoML (limits and keys: PROMPTBAKE_* variables, "
                                 "see docs/service.md).")
    s.set_defaults(handler=cmd_serve)
    s.add_argument("--artifact", default=os.environ.get("PROMPTBAKE_ARTIFACT"), metavar="ART_DIR|MODEL_TAG",
                   help="artifact directory or BentoML model tag (default: $PROMPTBAKE_ARTIFACT, else zero-shot "
                        "CLIP on the embedded emoji-vit-s, exported on first use)")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 exposes it)")
    s.add_argument("--port", type=_port, default=3000, help="1..65535 (default 3000)")
    s.add_argument("--device", choices=["cpu", "cuda"], default=os.environ.get("PROMPTBAKE_DEVICE", "cpu"))
    s.add_argument("--allow-cpu-fallback", action="store_true", help="with --device cuda, run on CPU when CUDA is unusable")
    s.add_argument("--expect-digest", metavar="sha256:HEX", default=os.environ.get("PROMPTBAKE_ARTIFACT_DIGEST"),
                   help="refuse to serve unless the artifact has this content digest (default: $PROMPTBAKE_ARTIFACT_DIGEST)")
