"""Tests for training.data: CoOp layouts, folder datasets, few-shot, base/novel, transforms."""
from __future__ import annotations

import io
import json
import os
import pickle
import random
from dataclasses import dataclass, replace

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from training.data import (
    COOP_DATASETS,
    ClassSubset,
    DatasetError,
    ImageDataset,
    Sample,
    SampleDataset,
    build_eval_transform,
    build_train_transform,
    list_dataset_specs,
    load_dataset,
    sample_few_shot,
    split_base_novel,
    subset_classes,
)

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
PER_SPLIT = {"train": 2, "val": 1, "test": 1}


def _jpeg(seed: int = 0, size: tuple[int, int] = (8, 8)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG")
    return buf.getvalue()


JPEG = _jpeg()


def _write(path: str, data: bytes | str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)


# ---------------------------------------------------------------------------------------------
# CoOp layout fixtures: (spec name, dataset dir, image dir, split json, raw names, cleaned names)
# ---------------------------------------------------------------------------------------------
JSON_CASES = [
    ("oxford_pets", "oxford_pets", "images", "split_zhou_OxfordPets.json",
     ["abyssinian", "american_bulldog", "yorkshire_terrier"],
     ["abyssinian", "american bulldog", "yorkshire terrier"]),
    ("caltech101", "caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json",
     ["BACKGROUND_Google", "Faces", "Faces_easy", "Leopards", "accordion", "airplanes"],
     ["face", "leopard", "accordion", "airplane"]),
    ("stanford_cars", "stanford_cars", "", "split_zhou_StanfordCars.json",
     ["AM General Hummer SUV 2000", "2012 Tesla Model S Sedan", "Ram C/V Cargo Van Minivan 2012"],
     ["2000 AM General Hummer SUV", "2012 Tesla Model S Sedan", "2012 Ram C/V Cargo Van Minivan"]),
    ("oxford_flowers", "oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json",
     ["pink primrose", "hard-leaved pocket orchid", "canterbury bells"],
     ["pink primrose", "hard-leaved pocket orchid", "canterbury bells"]),
    ("food101", "food-101", "images", "split_zhou_Food101.json",
     ["apple_pie", "baby_back_ribs", "baklava"], ["apple pie", "baby back ribs", "baklava"]),
    ("sun397", "sun397", "SUN397", "split_zhou_SUN397.json",
     ["abbey", "outdoor apartment_building", "/b/bakery/shop"],
     ["abbey", "outdoor apartment building", "shop bakery"]),
    ("dtd", "dtd", "images", "split_zhou_DescribableTextures.json",
     ["banded", "woven", "zigzagged"], ["banded", "woven", "zigzagged"]),
    ("eurosat", "eurosat", "2750", "split_zhou_EuroSAT.json",
     ["AnnualCrop", "Forest", "Highway or Road", "SeaLake"],
     ["Annual Crop Land", "Forest", "Highway or Road", "Sea or Lake"]),
    ("ucf101", "ucf101", "UCF-101-midframes", "split_zhou_UCF101.json",
     ["Apply_Eye_Makeup", "Basketball", "YoYo"], ["Apply Eye Makeup", "Basketball", "Yo Yo"]),
]


def _rel_path(name: str, label: int, split: str, i: int) -> str:
    if name == "stanford_cars":  # paths are relative to the dataset dir itself
        return f"cars_{'test' if split == 'test' else 'train'}/{label:03d}{split}{i}.jpg"
    if name in ("oxford_pets", "oxford_flowers"):  # flat image folders
        return f"image_{label}_{split}{i}.jpg"
    return f"c{label}/{split}{i}.jpg"


def make_json_dataset(root, name, dir_name, image_dir, split_file, raw_names, images=True) -> str:
    """Write CoOp's layout for one split-json dataset; returns the dataset dir."""
    ds_dir = os.path.join(root, dir_name)
    split = {s: [] for s in PER_SPLIT}
    for label, cname in enumerate(raw_names):
        for s, k in PER_SPLIT.items():
            for i in range(k):
                rel = _rel_path(name, label, s, i)
                split[s].append([rel, label, cname])
                if images:
                    _write(os.path.join(ds_dir, image_dir, rel), JPEG)
    os.makedirs(os.path.join(ds_dir, image_dir), exist_ok=True)
    _write(os.path.join(ds_dir, split_file), json.dumps(split))
    return ds_dir


@pytest.mark.parametrize("case", JSON_CASES, ids=[c[0] for c in JSON_CASES])
def test_coop_split_json_datasets(tmp_path, case):
    name, dir_name, image_dir, split_file, raw, cleaned = case
    ds_dir = make_json_dataset(str(tmp_path), *case[:5])
    ds = load_dataset(f"coop:{name}:{tmp_path}")
    assert ds.name == name
    assert ds.classnames == tuple(cleaned)
    kept = [label for label, c in enumerate(raw) if c not in ("BACKGROUND_Google", "Faces_easy")]
    for s, k in PER_SPLIT.items():
        samples = getattr(ds, s)
        assert len(samples) == k * len(cleaned)
        assert sorted({x.label for x in samples}) == list(range(len(cleaned)))
        for x in samples:
            old = kept[x.label]  # compacted label -> label in the json
            assert x.path == os.path.join(ds_dir, image_dir, _rel_path(name, old, s, int(x.path[-5])))
            assert os.path.isfile(x.path)


def test_coop_caltech_drops_ignored_classes(tmp_path):
    make_json_dataset(str(tmp_path), *JSON_CASES[1][:5])
    ds = load_dataset(f"coop:Caltech101:{tmp_path}")
    assert "BACKGROUND Google" not in ds.classnames and "Faces easy" not in ds.classnames
    assert len(ds.classnames) == 4
    # labels 0 and 2 of the json are gone; no sample of theirs survives.
    assert not any("/c0/" in x.path or "/c2/" in x.path for x in ds.train + ds.val + ds.test)


@pytest.mark.parametrize("spelling", ["oxford_pets", "OxfordPets", "OXFORD-PETS", "oxfordpets"])
def test_coop_name_spellings_and_root_forms(tmp_path, spelling):
    ds_dir = make_json_dataset(str(tmp_path), *JSON_CASES[0][:5])
    parent = load_dataset(f"coop:{spelling}:{tmp_path}")
    direct = load_dataset(f"COOP:{spelling}:{ds_dir}")  # ROOT may be the dataset folder itself
    assert parent == direct and parent.name == "oxford_pets"


def test_coop_imagenet_layout(tmp_path):
    ds_dir = tmp_path / "imagenet"
    wnids = ["n01440764", "n01443537", "n01484850"]
    names = ["tench", "goldfish", "great white shark"]
    _write(str(ds_dir / "classnames.txt"),
           "".join(f"{w} {n}\n" for w, n in zip(wnids, names)) + "n99999999 unused class\n")
    for w in wnids:
        for i in range(2):
            _write(str(ds_dir / "images" / "train" / w / f"{w}_{i}.JPEG"), JPEG)
        _write(str(ds_dir / "images" / "val" / w / f"val_{w}.JPEG"), JPEG)
    _write(str(ds_dir / "images" / "train" / wnids[0] / "notes.txt"), "not an image")
    ds = load_dataset(f"coop:imagenet:{tmp_path}")
    assert ds.classnames == tuple(names)
    assert ds.name == "imagenet"
    assert len(ds.train) == 6 and len(ds.test) == 3 and ds.val == ()
    assert all(x.path.endswith(".JPEG") for x in ds.train)
    assert {os.path.basename(os.path.dirname(x.path)): x.label for x in ds.test} == {w: i for i, w in enumerate(wnids)}


def test_coop_imagenet_duplicate_clip_names(tmp_path):
    # CLIP's (and CoOp's) ImageNet names repeat "missile" and "sunglasses".
    ds_dir = tmp_path / "imagenet"
    wnids = {"n03773504": "missile", "n04008634": "missile", "n04355933": "sunglasses", "n04356056": "sunglasses"}
    _write(str(ds_dir / "classnames.txt"), "".join(f"{w} {n}\n" for w, n in wnids.items()))
    for w in wnids:
        _write(str(ds_dir / "images" / "train" / w / "a.JPEG"), JPEG)
        _write(str(ds_dir / "images" / "val" / w / "b.JPEG"), JPEG)
    ds = load_dataset(f"coop:imagenet:{ds_dir}")
    assert ds.classnames == ("missile", "projectile", "sunglass", "sunglasses")
    _write(str(ds_dir / "classnames.txt"), "n03773504 missile\nn04008634 missile\nn04355933 rocket\nn04356056 rocket\n")
    with pytest.raises(DatasetError, match="imagenet.*class name 'rocket' is used by labels 2 and 3"):
        load_dataset(f"coop:imagenet:{ds_dir}")


def make_fgvc(root) -> str:
    ds_dir = os.path.join(root, "fgvc_aircraft")
    variants = ["707-320", "A300B4", "F-16A/B"]
    _write(os.path.join(ds_dir, "variants.txt"), "\n".join(variants) + "\n")
    for s in PER_SPLIT:
        lines = []
        for label, v in enumerate(variants):
            image_id = f"{label}{s}"
            lines.append(f"{image_id} {v}")
            _write(os.path.join(ds_dir, "images", image_id + ".jpg"), JPEG)
        _write(os.path.join(ds_dir, f"images_variant_{s}.txt"), "\n".join(lines) + "\n")
    return ds_dir


def test_coop_fgvc_aircraft_layout(tmp_path):
    ds_dir = make_fgvc(str(tmp_path))
    ds = load_dataset(f"coop:FGVCAircraft:{tmp_path}")
    assert ds.classnames == ("707-320", "A300B4", "F-16A/B")
    assert [x.label for x in ds.val] == [0, 1, 2]
    assert ds.test[2].path == os.path.join(ds_dir, "images", "2test.jpg")


def test_coop_fgvc_unknown_variant(tmp_path):
    ds_dir = make_fgvc(str(tmp_path))
    _write(os.path.join(ds_dir, "images_variant_val.txt"), "123 707-320\n456 Spitfire\n")
    with pytest.raises(DatasetError, match=r"images_variant_val\.txt:2: variant 'Spitfire'"):
        load_dataset(f"coop:fgvc_aircraft:{tmp_path}")


# ---------------------------------------------------------------------------------------------
# CoOp errors
# ---------------------------------------------------------------------------------------------
def _pets(tmp_path, split: dict | str) -> str:
    ds_dir = tmp_path / "oxford_pets"
    (ds_dir / "images").mkdir(parents=True)
    for rel in ("a.jpg", "b.jpg", "c.jpg"):
        _write(str(ds_dir / "images" / rel), JPEG)
    _write(str(ds_dir / "split_zhou_OxfordPets.json"), split if isinstance(split, str) else json.dumps(split))
    return f"coop:oxford_pets:{tmp_path}"


def test_error_missing_split_file(tmp_path):
    (tmp_path / "oxford_pets" / "images").mkdir(parents=True)
    path = tmp_path / "oxford_pets" / "split_zhou_OxfordPets.json"
    with pytest.raises(DatasetError, match="split file not found") as exc:
        load_dataset(f"coop:oxford_pets:{tmp_path}")
    assert str(path) in str(exc.value)


def test_error_missing_dataset_dir(tmp_path):
    with pytest.raises(DatasetError, match="oxford_pets.*not found"):
        load_dataset(f"coop:oxford_pets:{tmp_path}")
    with pytest.raises(DatasetError, match="data root not found"):
        load_dataset(f"coop:oxford_pets:{tmp_path / 'nope'}")


@pytest.mark.parametrize("content, message", [
    ("{not json", r"split_zhou_OxfordPets\.json: not a readable JSON"),
    ("[1, 2]", "expected an object with 'train'"),
    ({"train": "a.jpg", "test": []}, "'train' must be a list"),
    ({"train": [["a.jpg", 0, "cat"]]}, "'test' must be a list"),
    ({"train": [["a.jpg", 0, "cat"], ["b.jpg", 0]], "val": [], "test": []}, r"train\[1\] must be \[relative_path, label, classname\]"),
    ({"train": [["a.jpg", 0, "cat", "extra"]], "val": [], "test": []}, r"train\[0\] must be"),
    ({"train": [["a.jpg", "0", "cat"]], "val": [], "test": []}, r"train\[0\]: label must be a non-negative integer"),
    ({"train": [["a.jpg", -1, "cat"]], "val": [], "test": []}, "label must be a non-negative integer"),
    ({"train": [["/abs/a.jpg", 0, "cat"]], "val": [], "test": []}, "must be a non-empty relative path"),
    ({"train": [["a.jpg", 0, ""]], "val": [], "test": []}, "class name must be a non-empty string"),
    ({"train": [["a.jpg", 0, "cat"], ["b.jpg", 5, "dog"]], "val": [], "test": []},
     r"label 5 \(at train\[1\]\) is out of range: the file names 2 classes"),
    ({"train": [["a.jpg", 0, "cat"]], "val": [], "test": [["b.jpg", 0, "dog"]]},
     r"label 0 is 'dog' at test\[0\] but 'cat' at train\[0\]"),
    ({"train": [["a.jpg", 0, "cat"], ["b.jpg", 1, "cat"]], "val": [], "test": []}, "class 'cat' has label 1"),
    ({"train": [["missing.jpg", 0, "cat"]], "val": [], "test": []}, "first train image .*missing.jpg does not exist"),
    ({"train": [["a.jpg", 0, "a_b"], ["b.jpg", 1, "a b"]], "val": [], "test": []}, "class name 'a b' is used by labels 0 and 1"),
])
def test_error_malformed_split(tmp_path, content, message):
    spec = _pets(tmp_path, content)
    with pytest.raises(DatasetError, match=message) as exc:
        load_dataset(spec)
    assert str(tmp_path / "oxford_pets") in str(exc.value)


def test_split_without_val_key_is_allowed(tmp_path):
    ds = load_dataset(_pets(tmp_path, {"train": [["a.jpg", 0, "cat"]], "test": [["b.jpg", 0, "cat"]]}))
    assert ds.val == () and ds.classnames == ("cat",)


def test_error_missing_image_dir(tmp_path):
    make_json_dataset(str(tmp_path), *JSON_CASES[7][:5], images=False)
    image_dir = tmp_path / "eurosat" / "2750"
    image_dir.rmdir()
    with pytest.raises(DatasetError, match="image directory not found") as exc:
        load_dataset(f"coop:eurosat:{tmp_path}")
    assert str(image_dir) in str(exc.value)


def test_error_imagenet(tmp_path):
    ds_dir = tmp_path / "imagenet"
    _write(str(ds_dir / "images" / "train" / "n1" / "a.JPEG"), JPEG)
    (ds_dir / "images" / "val").mkdir()
    with pytest.raises(DatasetError, match=r"file not found: .*imagenet/classnames\.txt"):
        load_dataset(f"coop:imagenet:{tmp_path}")
    _write(str(ds_dir / "classnames.txt"), "n1 tench\n")
    _write(str(ds_dir / "images" / "val" / "ILSVRC2012_val_00000001.JPEG"), JPEG)
    with pytest.raises(DatasetError, match="val has no class folders"):
        load_dataset(f"coop:imagenet:{tmp_path}")
    _write(str(ds_dir / "images" / "train" / "n2" / "b.JPEG"), JPEG)
    with pytest.raises(DatasetError, match=r"no class name for 1 train folders, e.g. \['n2'\]"):
        load_dataset(f"coop:imagenet:{tmp_path}")


@pytest.mark.parametrize("spec, message", [
    ("coop:oxford_pet:/data", "unknown CoOp dataset 'oxford_pet'; did you mean oxford_pets"),
    ("coop:eurosatt:/data", "did you mean eurosat"),
    ("coop:dtd", r"expected coop:NAME:ROOT"),
    ("coop::/data", r"expected coop:NAME:ROOT"),
    ("folder:", r"expected folder:ROOT"),
    ("coopp:dtd:/data", "unknown dataset spec prefix 'coopp'.*did you mean 'coop:'"),
    ("foldr:/data", "did you mean 'folder:'"),
    ("s3:/bucket", r"unknown dataset spec prefix 's3'.*valid: coop:NAME:ROOT"),
])
def test_error_unknown_specs(spec, message):
    with pytest.raises(DatasetError, match=message):
        load_dataset(spec)


# ---------------------------------------------------------------------------------------------
# Benchmark delegation and the spec listing
# ---------------------------------------------------------------------------------------------
def _tiny(name="tiny") -> ImageDataset:
    return ImageDataset(name, ("a", "b"), (Sample("/x/a.jpg", 0),), (), (Sample("/x/b.jpg", 1),))


def test_named_datasets_come_from_registered_providers(monkeypatch):
    import training.data as data

    monkeypatch.setattr(data, "_NAMED", [])
    data.register_named_datasets(lambda: [("tiny", "a tiny benchmark")], lambda name: _tiny(name))
    assert load_dataset("tiny") == _tiny()
    with pytest.raises(DatasetError, match="unknown dataset 'tinny'; did you mean tiny"):
        load_dataset("tinny")
    with pytest.raises(DatasetError, match="CoOp datasets need a root: coop:oxford_pets:ROOT"):
        load_dataset("OxfordPets")
    assert ("tiny", "a tiny benchmark") in list_dataset_specs()


def test_no_named_dataset_provider(monkeypatch):
    import training.data as data

    monkeypatch.setattr(data, "_NAMED", [])
    with pytest.raises(DatasetError, match=r"named datasets: none registered.*valid: coop:NAME:ROOT .*folder:ROOT"):
        load_dataset("tiny")
    specs = [s for s, _ in list_dataset_specs()]
    assert specs == ["folder:ROOT"] + [f"coop:{n}:ROOT" for n in COOP_DATASETS]
    assert len(COOP_DATASETS) == 11


def test_data_never_imports_the_benchmark():
    # the emoji benchmark registers its names with training.data, not the other way round
    import re
    from pathlib import Path

    import training.data as data

    for path in Path(data.__file__).parent.glob("*.py"):
        assert not re.search(r"^\s*(from|import) training\.benchmark", path.read_text(), re.M), path.name
    assert any(n.startswith("emoji-") for n, _ in data._named_rows())


# ---------------------------------------------------------------------------------------------
# folder: datasets
# ---------------------------------------------------------------------------------------------
def make_folder(root, layout: dict[str, dict[str, int]]) -> None:
    for split, classes in layout.items():
        for cls, n in classes.items():
            os.makedirs(os.path.join(root, split, cls), exist_ok=True)
            for i in range(n):
                ext = (".jpg", ".PNG", ".jpeg", ".webp", ".bmp")[i % 5]
                _write(os.path.join(root, split, cls, f"{i}{ext}"), JPEG)


def test_folder_dataset(tmp_path):
    make_folder(tmp_path, {"train": {"red_fox": 3, "cat": 2}, "val": {"cat": 1}, "test": {"red_fox": 1, "cat": 5}})
    _write(str(tmp_path / "train" / "cat" / "readme.txt"), "ignored")
    _write(str(tmp_path / "train" / "cat" / ".hidden.jpg"), JPEG)
    ds = load_dataset(f"folder:{tmp_path}")
    assert ds.classnames == ("cat", "red fox")
    assert [x.label for x in ds.train] == [0, 0, 1, 1, 1]
    assert len(ds.val) == 1 and len(ds.test) == 6
    assert all(os.path.isabs(x.path) and os.path.isfile(x.path) for x in ds.train + ds.val + ds.test)


def test_folder_without_val(tmp_path):
    make_folder(tmp_path, {"train": {"a": 1}, "test": {"a": 1}})
    assert load_dataset(f"folder:{tmp_path}").val == ()


@pytest.mark.parametrize("layout, message", [
    ({"test": {"a": 1}}, "train folder .* not found"),
    ({"train": {"a": 1}}, "test folder .* not found"),
    ({"train": {"a": 1}, "test": {"b": 1}}, "class 'b' has no folder in"),
    ({"train": {"a": 1}, "val": {"z": 1}, "test": {"a": 1}}, "val/z: class 'z'"),
    ({"train": {"a": 1, "b": 0}, "test": {"a": 1}}, "train/b holds no images"),
    ({"train": {"a_b": 1, "a b": 1}, "test": {}}, "class name 'a b' is used by labels"),
    ({"train": {}, "test": {}}, "has no class folders"),
])
def test_folder_errors(tmp_path, layout, message):
    for split in layout:
        (tmp_path / split).mkdir()
    make_folder(tmp_path, layout)
    with pytest.raises(DatasetError, match=message):
        load_dataset(f"folder:{tmp_path}")


# ---------------------------------------------------------------------------------------------
# ImageDataset validation
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("classnames, label, message", [
    (("a", "a"), 0, "class name 'a' is used by labels 0 and 1"),
    (("a", " "), 0, "class name 1 is empty"),
    ((), 0, "no classes"),
    (("a", "b"), 2, "label 2, outside 0..1"),
    (("a", "b"), -1, "label -1"),
    (("a", "b"), True, "label True"),
])
def test_image_dataset_validation(classnames, label, message):
    with pytest.raises(DatasetError, match=message):
        ImageDataset("x", classnames, (Sample("/a.jpg", label),), (), ())


# ---------------------------------------------------------------------------------------------
# Few-shot sampling
# ---------------------------------------------------------------------------------------------
def _samples(sizes: list[int]) -> list[Sample]:
    out = [Sample(f"/d/{label}/{i}.jpg", label) for label, n in enumerate(sizes) for i in range(n)]
    random.Random(0).shuffle(out)  # interleaved classes, as real splits may be
    return out


def test_few_shot_k_per_class_and_small_classes_kept():
    samples = _samples([10, 12, 3, 8])
    few = sample_few_shot(samples, 4, seed=1)
    counts = [sum(x.label == c for x in few) for c in range(4)]
    assert counts == [4, 4, 3, 4]
    assert set(few) <= set(samples) and len(set(few)) == len(few)
    assert [x.label for x in few] == sorted(x.label for x in few)
    assert {x for x in few if x.label == 2} == {x for x in samples if x.label == 2}


def test_few_shot_seeded_and_independent_of_global_rng():
    samples = _samples([10, 10, 10])
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    a = sample_few_shot(samples, 2, seed=3)
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    state = random.getstate()
    b = sample_few_shot(samples, 2, seed=3)
    assert a == b
    assert random.getstate() == state  # the global RNG was not consumed
    assert sample_few_shot(samples, 2, seed=4) != a


@pytest.mark.parametrize("shots", [None, 0, -1])
def test_few_shot_all(shots):
    samples = _samples([3, 2])
    assert sample_few_shot(samples, shots, seed=0) == tuple(samples)


# ---------------------------------------------------------------------------------------------
# Base / novel split
# ---------------------------------------------------------------------------------------------
def _dataset(n_classes: int) -> ImageDataset:
    def split(tag: str, k: int) -> tuple[Sample, ...]:
        return tuple(Sample(f"/d/{tag}/{c}_{i}.jpg", c) for i in range(k) for c in range(n_classes))

    return ImageDataset("toy", tuple(f"class{c}" for c in range(n_classes)), split("train", 3), split("val", 1), split("test", 2))


@pytest.mark.parametrize("n, n_base", [(5, 3), (4, 2), (2, 1), (101, 51)])
def test_split_base_novel(n, n_base):
    ds = _dataset(n)
    base, novel = split_base_novel(ds)
    assert (base.name, novel.name) == ("base", "novel")
    assert base.original_labels == tuple(range(n_base))
    assert novel.original_labels == tuple(range(n_base, n))
    assert base.classnames + novel.classnames == ds.classnames
    for sub in (base, novel):
        assert isinstance(sub, ClassSubset)
        for s, k in (("train", 3), ("val", 1), ("test", 2)):
            samples = getattr(sub, s)
            assert len(samples) == k * sub.num_classes
            for x in samples:  # the remapped label names the class the path came from
                assert x.path.rsplit("/", 1)[1].startswith(f"{sub.original_labels[x.label]}_")
                assert sub.classnames[x.label] == ds.classnames[sub.original_labels[x.label]]
    assert subset_classes(ds, "base") == base and subset_classes(ds, "novel") == novel


def test_subset_all_and_errors():
    ds = _dataset(3)
    everything = subset_classes(ds, "all")
    assert everything.classnames == ds.classnames and everything.train == ds.train
    assert everything.original_labels == (0, 1, 2)
    with pytest.raises(DatasetError, match="unknown class subset"):
        subset_classes(ds, "new")  # type: ignore[arg-type]
    with pytest.raises(DatasetError, match="needs at least 2"):
        split_base_novel(replace(ds, classnames=("only",), train=(), val=(), test=()))


# ---------------------------------------------------------------------------------------------
# Transforms and SampleDataset
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Pre:
    image_size: int = 32
    mean: tuple[float, ...] = OPENAI_MEAN
    std: tuple[float, ...] = OPENAI_STD
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"


def _image(mode: str = "RGB", size=(45, 37)) -> Image.Image:
    return Image.open(io.BytesIO(_jpeg(1, size))).convert(mode)


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P"])
def test_train_transform(mode):
    tf = build_train_transform(Pre())
    torch.manual_seed(0)
    x = tf(_image(mode))
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    steps = tf.transforms
    assert [type(s) for s in steps[1:]] == [T.RandomResizedCrop, T.RandomHorizontalFlip, T.ToTensor, T.Normalize]
    assert steps[1].scale == (0.08, 1.0) and steps[1].interpolation == T.InterpolationMode.BICUBIC
    assert tuple(steps[4].mean) == OPENAI_MEAN
    pickle.loads(pickle.dumps(tf))  # DataLoader workers need it picklable


@pytest.mark.parametrize("interpolation, resize_mode", [("bicubic", "shortest"), ("bilinear", "squash"), ("bicubic", "longest")])
@pytest.mark.parametrize("mode", ["RGB", "RGBA"])
def test_eval_transform_equals_open_clip(interpolation, resize_mode, mode):
    pre = Pre(image_size=24, interpolation=interpolation, resize_mode=resize_mode)
    ref = open_clip.image_transform(24, is_train=False, mean=OPENAI_MEAN, std=OPENAI_STD,
                                    interpolation=interpolation, resize_mode=resize_mode)
    img = _image(mode)
    assert torch.equal(build_eval_transform(pre)(img), ref(img))


def test_eval_transform_with_export_preprocess_config():
    from exports.preprocess import PreprocessConfig, preprocess_image

    pre = PreprocessConfig(image_size=24, mean=OPENAI_MEAN, std=OPENAI_STD)
    img = _image()
    x = build_eval_transform(pre)(img)
    np.testing.assert_allclose(x.numpy(), preprocess_image(img, pre), atol=1e-6)


def test_unknown_interpolation():
    with pytest.raises(ValueError, match="unknown interpolation 'lanczos'"):
        build_train_transform(Pre(interpolation="lanczos"))


def test_sample_dataset(tmp_path):
    good = tmp_path / "good.jpg"
    _write(str(good), _jpeg(2, (40, 30)))
    ds = SampleDataset([Sample(str(good), 3)], build_eval_transform(Pre()))
    x, y = ds[0]
    assert len(ds) == 1 and y == 3 and x.shape == (3, 32, 32)
    batch = next(iter(torch.utils.data.DataLoader(SampleDataset([Sample(str(good), 1)] * 2, build_train_transform(Pre())), batch_size=2)))
    assert batch[0].shape == (2, 3, 32, 32) and batch[1].tolist() == [1, 1]


@pytest.mark.parametrize("content", [b"not an image", _jpeg(3, (64, 64))[:200], None])
def test_sample_dataset_unreadable_image(tmp_path, content):
    path = tmp_path / "bad.jpg"
    if content is not None:
        _write(str(path), content)
    ds = SampleDataset([Sample(str(path), 0)], build_eval_transform(Pre()))
    with pytest.raises(DatasetError, match="cannot read image .*bad.jpg"):
        ds[0]
