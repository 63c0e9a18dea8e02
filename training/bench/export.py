"""Export benchmark on a real architecture: ``python -m training.bench.export``.

Builds an open_clip architecture with random weights (no download; random weights are enough to
exercise the graph), wraps it in a prompt method, exports it with the full parity check, and
reports export time, file sizes and onnxruntime CPU latency against torch eager, for fp32 and an
int8 (dynamic quantization) copy of the same graphs.

Random weights make class scores nearly tied, so int8's top-1 agreement here says little about
a trained model; the int8 latency is measured on a scratch copy whatever the agreement.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger("promptbake.bench.export")


def _timeit(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def build_random_backbone(arch: str):
    import open_clip

    from exports.preprocess import PreprocessConfig
    from training.backbones import Backbone, _freeze

    torch.manual_seed(0)
    model = open_clip.create_model(arch, pretrained=None).float()
    pre = PreprocessConfig.from_open_clip(open_clip.get_model_preprocess_cfg(model))
    return Backbone(f"{arch} (random init)", _freeze(model), open_clip.get_tokenizer(arch), pre)


def run(arch: str, method_name: str, out: Path, threads: int, repeat: int, n_images: int, exporter: str) -> dict:
    from exports.manifest import load_artifact
    from exports.onnx_export import ExportError, _convert_precision
    from exports.runtime import Predictor
    from training.export import FALLBACK_CLASSNAMES, export_method, synthetic_images
    from training.methods import create_method
    from training.runs import RunInfo

    torch.set_num_threads(threads)
    report: dict = {"arch": arch, "method": method_name, "threads": threads, "exporter": exporter}
    t0 = time.perf_counter()
    bb = build_random_backbone(arch)
    names = list(FALLBACK_CLASSNAMES)
    method = create_method(method_name, bb, None, names[:4]).eval()
    report["build_s"] = round(time.perf_counter() - t0, 1)
    info = RunInfo(method_name, method.config.to_dict(), {}, bb.spec, "synthetic", 0, 0, names[:4],
                   method.capabilities.to_dict())
    images = synthetic_images(n_images, size=256)

    t0 = time.perf_counter()
    manifest = export_method(method, out, info, images=images, classnames=names, overwrite=True, exporter=exporter)
    report["export_s"] = round(time.perf_counter() - t0, 1)
    load_artifact(out)
    report["files_mb"] = {k: round(v.bytes / 1e6, 1) for k, v in manifest.files.items()}
    report["parity_fp32"] = manifest.parity.model_dump(include={"max_abs_diff_image", "max_abs_diff_text", "top1_agreement", "n_images", "n_classes"})

    # latency: torch eager vs onnxruntime CPU, same threads
    from exports.preprocess import preprocess_batch

    px1 = preprocess_batch(images[:1], bb.preprocess)
    px8 = preprocess_batch(images[:8], bb.preprocess)
    tokens = method.tokenize(names)
    with torch.no_grad():
        report["torch_image_b1_ms"] = round(1e3 * _timeit(lambda: method.encode_image(torch.from_numpy(px1)), repeat), 1)
        report["torch_image_b8_ms"] = round(1e3 * _timeit(lambda: method.encode_image(torch.from_numpy(px8)), repeat), 1)
        report["torch_text_c8_ms"] = round(1e3 * _timeit(lambda: method.class_embeddings(tokens), repeat), 1)
    pred = Predictor(out, intra_op_threads=threads)
    report["ort_fp32_image_b1_ms"] = round(1e3 * _timeit(lambda: pred.embed_pixels(px1), repeat), 1)
    report["ort_fp32_image_b8_ms"] = round(1e3 * _timeit(lambda: pred.embed_pixels(px8), repeat), 1)
    report["ort_fp32_text_c8_ms"] = round(1e3 * _timeit(lambda: pred.embed_texts(names), repeat), 1)

    # int8: a scratch copy of the artifact with quantized graphs (latency), then the real export (agreement)
    with tempfile.TemporaryDirectory() as tmp:
        q = Path(tmp) / "int8"
        shutil.copytree(out, q)
        for g in ("image.onnx", "text.onnx"):
            _convert_precision(out / g, q / g, "int8")
        from exports.manifest import MANIFEST_FILENAME, describe_files

        m8 = manifest.model_copy(update={"precision": "int8", "files": describe_files(q)})
        (q / MANIFEST_FILENAME).write_text(m8.to_json())
        pred8 = Predictor(q, intra_op_threads=threads)
        report["int8_files_mb"] = {g: round((q / g).stat().st_size / 1e6, 1) for g in ("image.onnx", "text.onnx")}
        report["ort_int8_image_b1_ms"] = round(1e3 * _timeit(lambda: pred8.embed_pixels(px1), repeat), 1)
        report["ort_int8_image_b8_ms"] = round(1e3 * _timeit(lambda: pred8.embed_pixels(px8), repeat), 1)
        report["ort_int8_text_c8_ms"] = round(1e3 * _timeit(lambda: pred8.embed_texts(names), repeat), 1)
        a, b = pred.embed_pixels(px8), pred8.embed_pixels(px8)
        report["int8_vs_fp32_max_abs_diff_image"] = float(np.abs(a - b).max())
    report["int8_speedup_image_b8"] = round(report["ort_fp32_image_b8_ms"] / report["ort_int8_image_b8_ms"], 2)
    try:
        m = export_method(method, out.with_name(out.name + "-int8"), info, images=images, classnames=names,
                          precision="int8", overwrite=True)
        report["int8_export"] = {"top1_agreement": m.parity.top1_agreement}
    except ExportError as e:
        report["int8_export"] = {"refused": str(e)}
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.bench.export", description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="ViT-B-16")
    p.add_argument("--method", default="coop")
    p.add_argument("--out", type=Path, default=None, help="artifact directory (default: a temporary one)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--images", type=int, default=16, help="synthetic parity images")
    p.add_argument("--exporter", choices=["torchscript", "dynamo"], default="torchscript")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp) / "artifact"
        report = run(args.arch, args.method, out, args.threads, args.repeat, args.images, args.exporter)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
