"""The ``promptbake`` command line.

Method options and training options are derived from the typed config dataclasses, so a new
method's options appear here without touching this file. Errors a user can cause (bad spec, bad
option, missing file) print one line and exit with status 2; no traceback.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import types
import typing
from typing import Any, Literal, Sequence, get_args, get_origin, get_type_hints

logger = logging.getLogger("promptbake")


# -- options from dataclasses ------------------------------------------------------------------

def _add_dataclass_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type, skip: Sequence[str] = ()) -> list[str]:
    """Add ``--field-name`` for every field of ``cls``; only options given on the line are set."""
    hints = get_type_hints(cls)
    names = []
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        tp = hints[f.name]
        flag = "--" + f.name.replace("_", "-")
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS}
        origin, args = get_origin(tp), get_args(tp)
        if origin in (typing.Union, types.UnionType):  # Optional[X]
            non_none = [a for a in args if a is not type(None)]
            tp, origin, args = non_none[0], get_origin(non_none[0]), get_args(non_none[0])
        default = f.default if f.default is not dataclasses.MISSING else None
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif origin is Literal:
            kwargs["choices"] = list(args)
        elif origin is tuple:
            kwargs.update(nargs="+", type=args[0])
        else:
            kwargs["type"] = tp
        parser.add_argument(flag, help=f"default: {default!r}", **kwargs)
        names.append(f.name)
    return names


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


# -- commands ---------------------------------------------------------------------------------

def cmd_methods(args: argparse.Namespace) -> int:
    from training.methods import list_methods

    rows = []
    for spec in list_methods():
        caps = spec.method_cls.capabilities_for(spec.config_cls())
        rows.append({"name": spec.name, "description": spec.description, "capabilities": caps.to_dict()})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    flags = list(rows[0]["capabilities"]) if rows else []
    print("method      " + "  ".join(flags))
    for r in rows:
        cells = "  ".join(("yes" if r["capabilities"][f] else "-").center(len(f)) for f in flags)
        print(f"{r['name']:<11} {cells}   {r['description']}")
    return 0


def cmd_datasets(args: argparse.Namespace) -> int:
    from training.data import list_dataset_specs

    for spec, desc in list_dataset_specs():
        print(f"{spec:<34} {desc}")
    return 0


def cmd_backbones(args: argparse.Namespace) -> int:
    from training.backbones import list_backbones

    for name, desc in list_backbones():
        print(f"{name:<16} {desc}")
    print(f"{'MODEL:TAG':<16} an open_clip model with a pretrained tag, e.g. ViT-B-16:openai (needs internet)")
    print(f"{'MODEL:PATH':<16} an open_clip model with local weights (.safetensors, or .pt/.bin read with weights_only=True)")
    return 0


def _parse_method_options(method: str, argv: Sequence[str]) -> dict[str, Any]:
    from training.methods import get_method

    spec = get_method(method)
    p = argparse.ArgumentParser(prog=f"promptbake train --method {method}", add_help=False, allow_abbrev=False)
    _add_dataclass_options(p, spec.config_cls)
    ns, rest = p.parse_known_args(argv)
    if rest:
        raise ValueError(f"unknown option(s) for method {method}: {' '.join(rest)} (see promptbake train --method {method} --help)")
    return vars(ns)


def cmd_train(args: argparse.Namespace, extra: Sequence[str]) -> int:
    from training.jobs import train_job
    from training.loop import TrainConfig

    method_options = _parse_method_options(args.method, extra)
    train_options = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    run = train_job(
        args.method, args.backbone, args.dataset, args.shots, args.seed, args.out,
        method_options=method_options, train_options=train_options, overwrite=args.overwrite, progress=not args.no_progress,
    )
    print(f"trained run: {run.path}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from training.jobs import eval_job, format_metrics_table

    rows = [eval_job(r, batch_size=args.batch_size, device=args.device, workers=args.workers, progress=not args.no_progress) for r in args.run]
    print(format_metrics_table(rows))
    return 0


# -- export, verify, predict ------------------------------------------------------------------
# verify and predict run without torch (like the service): they are parsed and dispatched before
# main() imports anything from training, and import only exports.* inside the handlers.

def cmd_export(args: argparse.Namespace) -> int:
    from training.export import export_run, save_to_bentoml

    manifest = export_run(args.run, args.out, precision=args.precision, overwrite=args.overwrite)
    p = manifest.parity
    print(
        f"exported {manifest.method} ({manifest.precision}) to {args.out}: parity image {p.max_abs_diff_image:.2e}, "
        f"text {p.max_abs_diff_text:.2e}, top-1 agreement {100 * p.top1_agreement:.1f}% "
        f"({p.n_images} images x {p.n_classes} classes)"
    )
    if args.bentoml:
        tag = save_to_bentoml(args.out, args.bentoml, manifest)
        print(f"saved to the BentoML model store as {tag}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from exports.manifest import load_artifact

    m = load_artifact(args.artifact)
    p = m.parity
    size = sum(f.bytes for f in m.files.values())
    print(f"OK {args.artifact}: {m.method} on {m.backbone}, {m.precision}, schema {m.schema_version}, "
          f"{len(m.files)} files ({size / 2**20:.1f} MiB) match their sha256")
    print(f"   parity at export: image {p.max_abs_diff_image:.2e}, text {p.max_abs_diff_text:.2e}, "
          f"top-1 agreement {100 * p.top1_agreement:.1f}% ({p.n_images} images x {p.n_classes} classes)")
    return 0


def _read_images(paths: Sequence[str]) -> list:
    from PIL import Image

    images = []
    for path in paths:
        try:
            with Image.open(path) as im:
                im.load()
                images.append(im)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise ValueError(f"cannot read image {path}: {e}") from e
    return images


def cmd_predict(args: argparse.Namespace) -> int:
    from exports.runtime import Predictor

    try:
        names = json.loads(args.class_names)
    except json.JSONDecodeError as e:
        raise ValueError(f"--class-names is not valid JSON ({e}); expected a list such as '[\"cat\", \"dog\"]'") from e
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError("--class-names must be a JSON list of strings")
    predictor = Predictor(args.artifact, device=args.device)
    predictions = predictor.classify(_read_images(args.images), names, top_k=args.top_k)
    print(json.dumps({"predictions": predictions}, ensure_ascii=False))
    return 0


def _add_artifact_commands(sub: argparse._SubParsersAction, with_export: bool = True) -> None:
    if with_export:
        s = sub.add_parser("export", help="bake a trained run into a verified ONNX artifact directory")
        s.add_argument("--run", required=True, help="a finished run directory")
        s.add_argument("--out", required=True, help="artifact directory to write (ART_DIR)")
        s.add_argument("--precision", choices=["fp32", "fp16", "int8"], default="fp32",
                       help="fp32: within 1e-4 of torch; fp16 (GPUs) / int8 (CPUs): top-1 agrees on >= 99%% of test images")
        s.add_argument("--bentoml", metavar="NAME", help="also save the artifact to the BentoML model store as NAME")
        s.add_argument("--overwrite", action="store_true", help="replace an existing artifact in --out")
    s = sub.add_parser("verify", help="check an artifact's schema version and every file's sha256")
    s.add_argument("artifact", metavar="ART_DIR")
    s = sub.add_parser("predict", help="classify images with an artifact (onnxruntime, no torch)")
    s.add_argument("--artifact", required=True, metavar="ART_DIR")
    s.add_argument("--class-names", required=True, metavar="JSON_LIST", help='e.g. \'["cat", "dog"]\'')
    s.add_argument("--top-k", type=int, default=5)
    s.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    s.add_argument("images", nargs="+", metavar="IMAGE")


def _main_torch_free(argv: Sequence[str]) -> int:
    """verify and predict: parsed and run without importing torch or training code."""
    p = argparse.ArgumentParser(prog="promptbake")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    _add_artifact_commands(p.add_subparsers(dest="command", required=True), with_export=False)
    args = p.parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return {"verify": cmd_verify, "predict": cmd_predict}[args.command](args)
    except (ValueError, FileNotFoundError) as e:  # ArtifactError is a ValueError
        print(f"promptbake: error: {e}", file=sys.stderr)
        return 2


# -- serve ------------------------------------------------------------------------------------
# Torch-free like verify/predict: parsed and run before main() imports anything from training.

def cmd_serve(args: argparse.Namespace) -> int:
    """Run ``bentoml serve`` on service.service:PromptbakeService with PROMPTBAKE_* set (replaces this process)."""
    import os
    from pathlib import Path

    from exports.manifest import load_artifact

    # Check here: a one-line error instead of a server whose worker BentoML restarts over and over.
    if Path(args.artifact).is_dir():
        load_artifact(args.artifact)
    elif os.sep in args.artifact or args.artifact.startswith("."):
        raise FileNotFoundError(f"{args.artifact}: no such artifact directory")
    else:
        import bentoml

        try:
            model = bentoml.models.get(args.artifact)
        except Exception as e:  # NotFound or a malformed tag
            raise ValueError(f"{args.artifact}: neither an artifact directory nor a BentoML model ({e})") from None
        load_artifact(model.path_of((model.info.metadata or {}).get("artifact_subdir", "artifact")))
    env = {**os.environ, "PROMPTBAKE_ARTIFACT": str(args.artifact), "PROMPTBAKE_DEVICE": args.device}
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


def _main_serve(argv: Sequence[str]) -> int:
    import os

    p = argparse.ArgumentParser(prog="promptbake serve", description="Serve an artifact over HTTP with BentoML "
                                "(limits and keys: PROMPTBAKE_* variables, see docs/service.md).")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--artifact", default=os.environ.get("PROMPTBAKE_ARTIFACT"), metavar="ART_DIR|MODEL_TAG",
                   help="artifact directory or BentoML model tag (default: $PROMPTBAKE_ARTIFACT, else zero-shot "
                        "CLIP on the embedded emoji-vit-s, exported on first use)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 exposes it)")
    p.add_argument("--port", type=int, default=3000)
    p.add_argument("--device", choices=["cpu", "cuda"], default=os.environ.get("PROMPTBAKE_DEVICE", "cpu"))
    p.add_argument("--allow-cpu-fallback", action="store_true", help="with --device cuda, run on CPU when CUDA is unusable")
    args = p.parse_args(argv[1:] if argv[:1] == ["serve"] else argv)
    _setup_logging(args.verbose)
    try:
        if not args.artifact:
            from training.defaults import ensure_default_artifact  # imports torch only for this one-time export

            args.artifact = str(ensure_default_artifact())
        return cmd_serve(args)
    except (ValueError, FileNotFoundError) as e:  # ArtifactError is a ValueError
        print(f"promptbake: error: {e}", file=sys.stderr)
        return 2


def _main_bench_serve(argv: Sequence[str]) -> int:
    """`promptbake bench serve`: HTTP throughput and latency of a served artifact vs open_clip torch eager."""
    p = argparse.ArgumentParser(prog="promptbake bench serve", description=_main_bench_serve.__doc__)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--artifact", required=True, metavar="ART_DIR")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--clients", type=int, default=16, help="concurrent clients for the batched rows (default 16)")
    p.add_argument("--requests", type=int, default=64, help="requests per row (default 64)")
    p.add_argument("--batch-images", type=int, default=8, help="images per request in the client-batch row (default 8)")
    p.add_argument("--names", type=int, default=1000, help="class names for the cold vs cached row (default 1000)")
    p.add_argument("--seconds", type=float, default=3.0, help="time per in-process measurement (default 3)")
    p.add_argument("--json", action="store_true", help="print the raw figures as JSON too")
    args = p.parse_args(argv)
    _setup_logging(args.verbose)
    from training.bench_serve import bench_serve, format_serve_table

    try:
        res = bench_serve(args.artifact, device=args.device, clients=args.clients, requests=args.requests,
                          batch_images=args.batch_images, n_names=args.names, seconds=args.seconds)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"promptbake: error: {e}", file=sys.stderr)
        return 2
    print(format_serve_table(res))
    if args.json:
        print(json.dumps(res, indent=2))
    return 0


# -- parser -----------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    from training.loop import TrainConfig

    p = argparse.ArgumentParser(prog="promptbake", allow_abbrev=False, description="Train, evaluate, export and serve CLIP prompt-learning methods.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("methods", help="registered prompt methods and their capabilities")
    s.add_argument("--json", action="store_true")
    sub.add_parser("datasets", help="dataset spec forms and known dataset names")
    sub.add_parser("backbones", help="backbone spec forms and named backbones")

    s = sub.add_parser(
        "train", help="train a method on the base classes of a dataset", allow_abbrev=False,
        epilog="Method options (e.g. --n-ctx, --ctx-init for coop) are listed by `promptbake train --method NAME --help`.",
    )
    s.add_argument("--method", required=True)
    s.add_argument("--backbone", required=True, help="test-tiny | MODEL:TAG | MODEL:/path/weights")
    s.add_argument("--dataset", required=True, help="coop:NAME:ROOT | folder:ROOT | a benchmark name")
    s.add_argument("--shots", type=int, default=16, help="images per base class (default 16)")
    s.add_argument("--seed", type=int, default=1)
    s.add_argument("--out", required=True, help="run directory (resumed if it holds the same interrupted run)")
    s.add_argument("--overwrite", action="store_true", help="replace a different run in --out")
    s.add_argument("--no-progress", action="store_true")
    g = s.add_argument_group(
        "training options",
        "Unset options take the method's reference values (its train_defaults, e.g. coop: 200 epochs, batch 32, "
        "lr 0.002; see docs/methods.md), then the TrainConfig defaults shown here.",
    )
    _add_dataclass_options(g, TrainConfig)

    s = sub.add_parser("eval", allow_abbrev=False, help="base / novel / HM accuracy of trained runs; writes RUN/metrics.json")
    s.add_argument("--run", required=True, nargs="+", help="one or more run directories (several seeds: mean ± std)")
    s.add_argument("--batch-size", type=int, default=100)
    s.add_argument("--device", default="auto")
    s.add_argument("--workers", type=int, default=0)
    s.add_argument("--no-progress", action="store_true")

    s = sub.add_parser("quickstart", allow_abbrev=False, help="train, evaluate, export and classify novel names once, offline (the main job)")
    s.add_argument("--out", default="runs/quickstart")
    s.add_argument("--method", default="coop")
    s.add_argument("--backbone", default="emoji-vit-s")
    s.add_argument("--dataset", default="emoji-nature",
                   help="default emoji-nature: the styles emoji-vit-s v1 has learned (line art not yet)")
    s.add_argument("--epochs", type=int, default=10, help="short by default; the reference config trains longer")
    s.add_argument("--seed", type=int, default=1)
    s.add_argument("--no-progress", action="store_true")

    s = sub.add_parser("benchmark", allow_abbrev=False, help="the base-to-novel protocol over methods x datasets x seeds (resumable)")
    s.add_argument("--methods", required=True, help="comma-separated method names")
    s.add_argument("--datasets", required=True, help="comma-separated dataset specs, or 'all' benchmark datasets")
    s.add_argument("--seeds", default="1,2,3")
    s.add_argument("--out", required=True)
    s.add_argument("--backbone", default="emoji-vit-s")
    s.add_argument("--shots", type=int, default=16)
    s.add_argument("--epochs", type=int, help="override every method's reference epochs (quick checks)")
    s.add_argument("--feature-cache-views", type=int, help="cache image features (methods that allow it)")
    s.add_argument("--test-per-class", type=int, help="evaluate on the first N test images per class (quick checks)")
    s.add_argument("--no-progress", action="store_true")

    sub.add_parser("pretrain", help="pretrain the embedded emoji-vit-s backbone (resumable); options: promptbake pretrain --help",
                   add_help=False)

    s = sub.add_parser("bench", help="measurements: `bench cache` (image-feature cache), `bench serve` (HTTP service)")
    bench = s.add_subparsers(dest="bench", required=True)
    c = bench.add_parser("cache", help="train twice, feature cache off and on, and compare time and accuracy")
    c.add_argument("--method", default="coop")
    c.add_argument("--backbone", default="emoji-vit-s")
    c.add_argument("--dataset", default="emoji-nature")
    c.add_argument("--epochs", type=int, default=10)
    c.add_argument("--views", type=int, default=10)
    c.add_argument("--seed", type=int, default=1)
    c.add_argument("--test-per-class", type=int)

    _add_artifact_commands(sub)
    return p


def cmd_quickstart(args: argparse.Namespace) -> int:
    from training.quickstart import quickstart

    result = quickstart(args.out, method=args.method, backbone=args.backbone, dataset=args.dataset, epochs=args.epochs,
                        seed=args.seed, progress=not args.no_progress)
    print(json.dumps(result, indent=2))
    return 0


def cmd_benchmark(args: argparse.Namespace) -> int:
    from training.grid import results_table, run_grid

    if args.datasets == "all":
        from training.benchmark import list_benchmarks

        datasets = [name for name, _ in list_benchmarks()]
    else:
        datasets = [d for d in args.datasets.split(",") if d]
    methods = [m for m in args.methods.split(",") if m]
    from training.methods import get_method

    for m in methods:
        get_method(m)  # fail before any training on a typo
    seeds = [int(x) for x in args.seeds.split(",") if x]
    train_options = {k: v for k, v in (("epochs", args.epochs), ("feature_cache_views", args.feature_cache_views)) if v is not None}
    rows = run_grid(methods, datasets, seeds, args.out, args.backbone, args.shots, train_options,
                    test_per_class=args.test_per_class, progress=not args.no_progress)
    print(results_table(rows, methods, datasets))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from training.bench_cache import bench_cache, format_cache_table

    rows = bench_cache(args.method, args.backbone, args.dataset, seed=args.seed, views=args.views,
                       train_options={"epochs": args.epochs}, test_per_class=args.test_per_class)
    print(format_cache_table(rows))
    return 0


def _train_method_help(argv: Sequence[str]) -> bool:
    """`promptbake train --method NAME --help`: show that method's options."""
    if "--method" not in argv or not ({"-h", "--help"} & set(argv)):
        return False
    from training.methods import get_method

    name = argv[argv.index("--method") + 1]
    spec = get_method(name)
    p = argparse.ArgumentParser(prog=f"promptbake train --method {name}", description=spec.description)
    _add_dataclass_options(p, spec.config_cls)
    print((spec.config_cls.__doc__ or "").strip())
    p.print_help()
    return True


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if [a for a in argv if a not in ("-v", "--verbose")][:2] == ["bench", "serve"]:
        rest = [a for a in argv if a not in ("-v", "--verbose")][2:]
        return _main_bench_serve(rest + (["-v"] if {"-v", "--verbose"} & set(argv) else []))
    if next((a for a in argv if a not in ("-v", "--verbose")), None) == "serve":
        return _main_serve([a for a in argv if a not in ("-v", "--verbose")] + (["-v"] if {"-v", "--verbose"} & set(argv) else []))
    if next((a for a in argv if a not in ("-v", "--verbose")), None) in ("verify", "predict"):
        return _main_torch_free(argv)
    from training.backbones import BackboneError
    from training.data import DatasetError
    from training.runs import RunError

    try:
        if argv[:1] == ["train"] and _train_method_help(argv):
            return 0
        if argv[:1] == ["pretrain"]:  # its own parser, in training.benchmark.pretrain
            from training.benchmark.pretrain import main as pretrain_main

            pretrain_main(argv[1:])
            return 0
        parser = build_parser()
        if argv[:1] == ["train"]:
            args, extra = parser.parse_known_args(argv)
        else:
            args, extra = parser.parse_args(argv), []
        _setup_logging(args.verbose)
        if args.command == "train":
            return cmd_train(args, extra)
        return {"methods": cmd_methods, "datasets": cmd_datasets, "backbones": cmd_backbones, "eval": cmd_eval,
                "export": cmd_export, "quickstart": cmd_quickstart, "benchmark": cmd_benchmark,
                "bench": cmd_bench}[args.command](args)
    except (BackboneError, DatasetError, RunError, KeyError, ValueError, FileNotFoundError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"promptbake: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("promptbake: interrupted; a train command resumes from its last finished epoch", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
