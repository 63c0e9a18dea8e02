"""The torch-free tokenizer and preprocessing against open_clip 3.3.0, the reference they copy."""

from __future__ import annotations

import dataclasses
import gzip
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import open_clip
import pydantic
import pytest
from PIL import Image

from exports.preprocess import PreprocessConfig, preprocess_batch, preprocess_image
from exports.tokenizer import VOCAB_FILENAME, Tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]

TEXTS = {
    "plain": "a photo of a cat.",
    "accents": "Crème brûlée at the café, naïve façade, Ångström",
    "cjk": "東京タワーの写真 한국어 문장 中文句子",
    "emoji": "😀 a cat 🐈‍⬛ with a flag 🇯🇵 👍🏽",
    "rtl": "שלום עולם مرحبا بالعالم",
    "punctuation": "Wait... what?!? (yes) [no] {maybe} -- a/b\\c; x:y 'quoted' \"double\" @#$%^&*_+=~`|<>",
    "html": "&amp;lt;b&amp;gt;bold&amp;lt;/b&amp;gt; &quot;q&quot; &#39;s &eacute;t&eacute; &nbsp;x",
    # ftfy unescapes entities only in text without "<"; open_clip then unescapes twice more.
    "html_nested": "&amp;amp;amp;lt;i&amp;amp;gt; &amp;amp;quot;",
    "html_with_tag": "<b>&amp;amp;</b> &lt;i&gt;",
    "mixed_case": "A PhOtO oF a DoG, ANOTHER Dog",
    "numbers": "3.14159 1,000,000 2024-01-31 0x1F 1st 22nd ½ ²",
    "contractions": "it's we're they'll I'd you've I'm don't IT'S",
    "mojibake": "cafÃ© donâ€™t",
    "whitespace_inside": "  a\tphoto\n\nof   a\r\ncat  ",
    "control": "nul\x00bell\x07 zero\u200bwidth e\u0301",
    "special_literal": "<start_of_text> hi <end_of_text> <|endoftext|>",
    "empty": "",
    "whitespace_only": " \t\n\u3000 ",
    "long": "a photograph of a very large and extremely fluffy orange tabby cat " * 20,
}


@pytest.fixture(scope="module")
def reference() -> open_clip.tokenizer.SimpleTokenizer:
    return open_clip.get_tokenizer("ViT-B-16")


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_open_clip_vocab()


# --- tokenizer ----------------------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS.values(), ids=TEXTS.keys())
def test_tokens_match_open_clip(tokenizer, reference, text):
    out = tokenizer(text)
    assert out.dtype == np.int64 and out.shape == (1, 77)
    np.testing.assert_array_equal(out, reference(text).numpy())
    assert tokenizer.encode(text) == reference.encode(text)


def test_batch_matches_open_clip(tokenizer, reference):
    texts = list(TEXTS.values())
    out = tokenizer(texts)
    assert out.shape == (len(texts), 77)
    np.testing.assert_array_equal(out, reference(texts).numpy())
    # A tuple is a sequence too, and rows do not depend on their neighbours.
    np.testing.assert_array_equal(tokenizer(tuple(texts[:2])), out[:2])


def test_layout_sot_eot_padding_and_truncation(tokenizer):
    short = tokenizer("a cat")[0]
    n = len(tokenizer.encode("a cat"))
    assert short[0] == tokenizer.sot_token_id and short[n + 1] == tokenizer.eot_token_id
    assert not short[n + 2 :].any()
    assert tokenizer(" ")[0, :2].tolist() == [tokenizer.sot_token_id, tokenizer.eot_token_id]

    long = tokenizer(TEXTS["long"])[0]
    assert len(tokenizer.encode(TEXTS["long"])) > 77
    assert long[-1] == tokenizer.eot_token_id
    assert long[1:-1].tolist() == tokenizer.encode(TEXTS["long"])[:75]


def test_short_context_length_matches_open_clip(reference):
    tokenizer16 = Tokenizer.from_open_clip_vocab(context_length=16)
    reference16 = open_clip.get_tokenizer("ViT-B-16", context_length=16)
    texts = list(TEXTS.values())
    out = tokenizer16(texts)
    assert out.shape == (len(texts), 16) and tokenizer16.context_length == 16
    np.testing.assert_array_equal(out, reference16(texts).numpy())


def test_special_ids_and_vocab_size(tokenizer, reference):
    assert tokenizer.sot_token_id == reference.sot_token_id == 49406
    assert tokenizer.eot_token_id == reference.eot_token_id == 49407
    assert tokenizer.vocab_size == reference.vocab_size == 49408


def test_from_artifact_path(tmp_path, tokenizer):
    # What the service does: the exporter copies the vocabulary next to the ONNX files.
    spec_dir = Path(open_clip.__file__).parent
    shutil.copy(spec_dir / VOCAB_FILENAME, tmp_path / VOCAB_FILENAME)
    from_artifact = Tokenizer(tmp_path / VOCAB_FILENAME, context_length=77)
    texts = list(TEXTS.values())
    np.testing.assert_array_equal(from_artifact(texts), tokenizer(texts))
    assert Tokenizer(str(tmp_path / VOCAB_FILENAME)).context_length == 77


def test_from_open_clip_vocab_without_open_clip(monkeypatch):
    monkeypatch.setattr("exports.tokenizer.importlib.util.find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="open_clip is not installed"):
        Tokenizer.from_open_clip_vocab()


def test_tokenizer_rejects_bad_input(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="context_length"):
        Tokenizer.from_open_clip_vocab(context_length=1)
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        tokenizer(["ok", 3])  # type: ignore[list-item]
    bogus = tmp_path / "bogus.txt.gz"
    with gzip.open(bogus, "wt") as f:
        f.write("#version: 0.2\na b\n")
    with pytest.raises(ValueError, match="not a CLIP BPE merges file"):
        Tokenizer(bogus)


# --- preprocessing ------------------------------------------------------------------------------


def _image(mode: str, width: int, height: int, seed: int = 0) -> Image.Image:
    """Noise image in `mode`; noise is the hardest input for resampling to agree on."""
    rng = np.random.default_rng(seed)
    rgba = rng.integers(0, 256, (height, width, 4), dtype=np.uint8)
    rgb = Image.fromarray(rgba[..., :3], "RGB")
    image = {
        "RGB": lambda: rgb,
        "RGBA": lambda: Image.fromarray(rgba, "RGBA"),
        "L": lambda: Image.fromarray(rgba[..., 0], "L"),
        "LA": lambda: rgb.convert("LA"),
        "P": lambda: rgb.quantize(64),
        "CMYK": lambda: Image.frombytes("CMYK", (width, height), rgba.tobytes()),
        "1": lambda: Image.fromarray(rgba[..., 0], "L").convert("1"),
        "I;16": lambda: Image.fromarray(rgba[..., 0].astype(np.uint16) * 257),
    }[mode]()
    assert image.mode == mode
    return image


def _config(size: int = 32, **kwargs) -> PreprocessConfig:
    return PreprocessConfig(
        image_size=size, mean=open_clip.OPENAI_DATASET_MEAN, std=open_clip.OPENAI_DATASET_STD, **kwargs
    )


def _open_clip_eval(image: Image.Image, cfg: PreprocessConfig) -> np.ndarray:
    transform = open_clip.image_transform(
        cfg.image_size,
        is_train=False,
        mean=cfg.mean,
        std=cfg.std,
        interpolation=cfg.interpolation,
        resize_mode=cfg.resize_mode,
    )
    return transform(image).numpy()


# (width, height): tall, wide, smaller than the target, exactly the target, and odd margins that
# exercise the crop's round-half-to-even offsets.
SIZES = [(40, 60), (60, 40), (20, 13), (32, 32), (33, 32), (32, 35), (7, 90)]


@pytest.mark.parametrize("resize_mode", ["shortest", "squash"])
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P"])
def test_preprocess_matches_open_clip(mode, interpolation, resize_mode):
    cfg = _config(interpolation=interpolation, resize_mode=resize_mode)
    for seed, (width, height) in enumerate(SIZES):
        image = _image(mode, width, height, seed)
        out = preprocess_image(image, cfg)
        assert out.dtype == np.float32 and out.shape == (3, 32, 32)
        np.testing.assert_allclose(out, _open_clip_eval(image, cfg), rtol=0, atol=1e-6, err_msg=str(image.size))


@pytest.mark.parametrize("mode", ["LA", "CMYK", "1", "I;16"])
def test_preprocess_other_modes_match_open_clip(mode):
    cfg = _config()
    image = _image(mode, 45, 38)
    np.testing.assert_allclose(preprocess_image(image, cfg), _open_clip_eval(image, cfg), rtol=0, atol=1e-6)


def test_preprocess_224_from_open_clip_cfg():
    # The cfg a real ViT-B-16 carries: size as a (H, W) tuple, OpenAI mean/std, bicubic, shortest.
    oc_cfg = dataclasses.asdict(open_clip.transform.PreprocessCfg(size=(224, 224)))
    model = SimpleNamespace(visual=SimpleNamespace(preprocess_cfg=oc_cfg))
    cfg = PreprocessConfig.from_open_clip(open_clip.get_model_preprocess_cfg(model))
    assert cfg == _config(224)
    reference = open_clip.transform.image_transform_v2(open_clip.transform.PreprocessCfg(**oc_cfg), is_train=False)
    image = _image("RGB", 300, 240)
    np.testing.assert_allclose(preprocess_image(image, cfg), reference(image).numpy(), rtol=0, atol=1e-6)


def test_preprocess_batch():
    cfg = _config()
    images = [_image("RGB", 40, 60), _image("L", 60, 40, seed=1)]
    batch = preprocess_batch(images, cfg)
    assert batch.shape == (2, 3, 32, 32) and batch.dtype == np.float32
    np.testing.assert_array_equal(batch[1], preprocess_image(images[1], cfg))
    assert preprocess_batch([], cfg).shape == (0, 3, 32, 32)
    with pytest.raises(TypeError, match="PIL image"):
        preprocess_image(np.zeros((32, 32, 3), np.uint8), cfg)  # type: ignore[arg-type]


def test_from_open_clip_conversions():
    cfg = PreprocessConfig.from_open_clip(
        {"size": 64, "mean": 0.5, "std": [0.25, 0.25, 0.25], "interpolation": "random", "resize_mode": "squash"}
    )
    assert cfg == PreprocessConfig(
        image_size=64, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), interpolation="bicubic", resize_mode="squash"
    )
    assert PreprocessConfig.from_open_clip({"size": [16, 16]}).mean == open_clip.OPENAI_DATASET_MEAN


@pytest.mark.parametrize(
    ("cfg", "match"),
    [
        ({"size": (224, 192)}, "square"),
        ({"size": (224, 224, 224)}, "square"),
        ({"size": 224, "resize_mode": "longest"}, "resize_mode"),
        ({"size": 224, "mode": "L"}, "mode"),
        ({"size": 224, "crop_pct": 0.9}, "unknown"),
        ({"mean": (0.5, 0.5, 0.5)}, "size"),
    ],
)
def test_from_open_clip_rejects(cfg, match):
    with pytest.raises(ValueError, match=match):
        PreprocessConfig.from_open_clip(cfg)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"mean": (0.5, 0.5)},
        {"mean": (0.5, 0.5, 0.5, 0.5)},
        {"image_size": 0},
        {"image_size": -3},
        {"image_size": 32.5},
        {"image_size": True},
        {"std": (0.5, 0.0, 0.5)},
        {"std": (0.5, -0.1, 0.5)},
        {"mean": (float("nan"), 0.5, 0.5)},
        {"interpolation": "nearest"},
        {"resize_mode": "longest"},
        {"crop_pct": 0.9},
    ],
)
def test_config_validation(kwargs):
    base = {"image_size": 32, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
    with pytest.raises(pydantic.ValidationError):
        PreprocessConfig(**(base | kwargs))


def test_config_is_frozen_and_round_trips():
    cfg = _config(interpolation="bilinear")
    with pytest.raises(pydantic.ValidationError):
        cfg.image_size = 64  # type: ignore[misc]
    assert PreprocessConfig.model_validate_json(cfg.model_dump_json()) == cfg


# --- torch-free -----------------------------------------------------------------------------------


def test_imports_stay_torch_free():
    code = (
        "import sys\n"
        "import exports.tokenizer, exports.preprocess\n"
        "tok = exports.tokenizer.Tokenizer.from_open_clip_vocab()\n"
        "assert tok('a cat').shape == (1, 77)\n"
        "leaked = sorted({'torch', 'torchvision', 'open_clip'} & set(sys.modules))\n"
        "assert not leaked, leaked\n"
    )
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
