"""The hand-written per-dataset templates of the CoOp code base, for the 11 standard datasets.

CoOp's ``trainers/zsclip.py`` (KaiyangZhou/CoOp at ff61507) defines ``CUSTOM_TEMPLATES``, one
template per dataset; zero-shot CLIP, KgCoOp, TCP and MMRL take their hand-written prompt from the
same table (MMRL's copy in ``trainers/mmrl.py`` is identical). Facts, keyed by promptbake's CoOp
dataset names. Other datasets (the emoji benchmark, ``folder:`` trees) keep "a photo of a {}.".
"""
from __future__ import annotations

COOP_TEMPLATES: dict[str, str] = {
    "oxford_pets": "a photo of a {}, a type of pet.",
    "oxford_flowers": "a photo of a {}, a type of flower.",
    "fgvc_aircraft": "a photo of a {}, a type of aircraft.",
    "dtd": "{} texture.",
    "eurosat": "a centered satellite photo of {}.",
    "stanford_cars": "a photo of a {}.",
    "food101": "a photo of {}, a type of food.",
    "sun397": "a photo of a {}.",
    "caltech101": "a photo of a {}.",
    "ucf101": "a photo of a person doing {}.",
    "imagenet": "a photo of a {}.",
}


def coop_dataset(dataset: str) -> str | None:
    """The CoOp dataset name of a ``coop:NAME:ROOT`` spec (case- and underscore-insensitive), else None."""
    if not dataset.startswith("coop:"):
        return None
    from training.data.coop import get_coop_layout

    try:
        return get_coop_layout(dataset.split(":", 2)[1]).name
    except ValueError:
        return None  # the dataset loader reports the unknown name


def reference_template(dataset: str) -> str | None:
    """The reference's hand-written template for a dataset spec, or None outside the 11 standard datasets."""
    name = coop_dataset(dataset)
    return None if name is None else COOP_TEMPLATES[name]


def template_option(dataset: str, field: str) -> dict[str, str]:
    """``{field: the dataset's reference template}`` on the 11 standard datasets, else ``{}``: the
    ``options_for_dataset`` of a method whose hand-written prompt is the option ``field``."""
    template = reference_template(dataset)
    return {} if template is None else {field: template}


# CLIP's ImageNet prompt-engineering templates as listed in PromptSRC's and SurPL's
# trainers/imagenet_templates.py (IMAGENET_TEMPLATES, 60 entries): their frozen-CLIP text targets.
IMAGENET_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
)
