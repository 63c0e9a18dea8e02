"""The artifact commands that need no torch: ``promptbake verify`` and ``promptbake predict``.

They run on the ONNX artifact alone (onnxruntime, Pillow, the standard library), so a serving
image without torch can run them; ``training.cli`` adds them to its parser.
"""
from __future__ import annotations

import argparse
import json
from typing import Callable, Sequence


def cmd_verify(args: argparse.Namespace) -> int:
    from exports.manifest import artifact_digest
    from exports.runtime import verify_artifact

    m = verify_artifact(args.artifact, args.expect_digest)
    p = m.parity
    size = sum(f.bytes for f in m.files.values())
    print(f"OK {args.artifact}: {m.method} on {m.backbone}, {m.precision}, schema {m.schema_version}, "
          f"{len(m.files)} files ({size / 2**20:.1f} MiB) match their sha256, graphs match the manifest")
    print(f"   digest {artifact_digest(m)}")
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
    descriptions = None
    if args.descriptions:
        from training.data.descriptions import load_any_descriptions  # torch-free

        descriptions = load_any_descriptions(args.descriptions)
    predictor = Predictor(args.artifact, device=args.device)
    predictions = predictor.classify(_read_images(args.images), names, top_k=args.top_k, mode=args.mode,
                                     descriptions=descriptions)
    print(json.dumps({"predictions": predictions}, ensure_ascii=False))
    return 0


def add_commands(sub: argparse._SubParsersAction, add_command: Callable[..., argparse.ArgumentParser]) -> None:
    """Add ``verify`` and ``predict`` to the ``promptbake`` subcommands (``add_command`` makes one)."""
    s = add_command(sub, "verify", "check an artifact: schema, every file's sha256, the graphs' shapes; print its digest")
    s.set_defaults(handler=cmd_verify)
    s.add_argument("artifact", metavar="ART_DIR")
    s.add_argument("--expect-digest", metavar="sha256:HEX", help="also require this content digest (as printed by export)")

    s = add_command(sub, "predict", "classify images with an artifact (onnxruntime, no torch)")
    s.set_defaults(handler=cmd_predict)
    s.add_argument("--artifact", required=True, metavar="ART_DIR")
    s.add_argument("--class-names", required=True, metavar="JSON_LIST", help='e.g. \'["cat", "dog"]\'')
    s.add_argument("--top-k", type=int, default=5)
    s.add_argument("--mode", choices=["auto", "base", "novel"], default="auto",
                   help="heads of methods with a base/novel switch: auto (trained names base, others novel), or one for all")
    s.add_argument("--descriptions", metavar="FILE", help="class descriptions (CuPL JSON, or attribute trees for TAP) for methods that embed classes "
                   "from them; the artifact ships those of its known classes")
    s.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    s.add_argument("images", nargs="+", metavar="IMAGE")
