"""The artifact manifest: what an exported directory holds, and the check before anything uses it.

Layout of ``ART_DIR``::

    manifest.json                  this module's :class:`Manifest` (the only file not listed in it)
    image.onnx                     pixels [B, 3, S, S] float32 -> L2-normalised image outputs [B, D] each
    text.onnx                      token ids [T, C, L] int64 -> L2-normalised class outputs [C, D] each
                                   (image-conditioned methods: + image embeddings [B, D] -> logits [B, C])
    bpe_simple_vocab_16e6.txt.gz   the tokenizer's merges file

The graphs' outputs and how they become logits (``heads``, with the base/novel switch) are declared
by the method and recorded here; :mod:`exports.scoring` is the one place that reads them.

:func:`load_artifact` refuses a directory whose schema version is unknown, or whose files differ
from ``files`` in any way: missing, truncated, altered, or an extra file nobody listed. Extra
files are refused because onnxruntime reads files next to a graph (external data), so an
unlisted file could change what runs.

Torch-free: the service imports this with only pydantic and the standard library.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from exports.preprocess import PreprocessConfig
from exports.prompts import DESCRIPTION_TEMPLATE, DescriptionLayout, check_description_template, check_tree

SCHEMA_VERSION = 2
#: versions :func:`read_manifest` reads; older ones are upgraded in memory (:func:`_upgrade`)
READABLE_SCHEMA_VERSIONS = (1, 2)
MANIFEST_FILENAME = "manifest.json"
IMAGE_GRAPH_FILENAME = "image.onnx"
TEXT_GRAPH_FILENAME = "text.onnx"
SCORE_GRAPH_FILENAME = "score.onnx"
Precision = Literal["fp32", "fp16", "int8"]

_CHUNK = 1 << 20


class ArtifactError(ValueError):
    """An artifact directory that cannot be used; the message names the file and what is wrong."""


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class FileEntry(_Strict):
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    bytes: Annotated[int, Field(ge=0)]


class CapabilitiesInfo(_Strict):
    """The method's declared capabilities (``training.methods.Capabilities``), all flags required.

    A new flag in training is a schema change: the runtime must know what it means before it
    loads an artifact that has it.
    """

    changes_image_graph: bool
    text_depends_on_image: bool
    base_novel_switch: bool
    needs_class_descriptions: bool
    open_vocabulary: bool
    trainable: bool


class TokenizerInfo(_Strict):
    file: str
    context_length: Annotated[int, Field(ge=2)]
    sot_token_id: Annotated[int, Field(ge=0)]
    eot_token_id: Annotated[int, Field(ge=0)]


class GraphInfo(_Strict):
    """One graph file and its tensor names.

    Attributes:
        outputs: the graph's outputs, in order; the first is the main one (what ``/embed_image``
            and ``/embed_text`` return).
        image_input_name: text graph only, for methods with ``text_depends_on_image``: the input
            fed with the image graph's first output; the output is then logits ``[B, C]``.
        extra_image_inputs: text graph only: the image graph's other outputs it takes too, each fed
            under its own name (SurPL's local tokens); empty for CoCoOp.
        whole_class_list: score graph only: a class's logit depends on the other names of the
            request (CPR), so the graph runs on all of them at once, never on blocks of names.
    """

    file: str
    input_name: str
    outputs: Annotated[list[str], Field(min_length=1)]
    image_input_name: str | None = None
    # left out of the JSON (and so of the digest) at their defaults: a field added to the schema must
    # not change the digest of artifacts written before it, nor put keys in front of older runtimes
    extra_image_inputs: list[str] = Field(default=[], exclude_if=lambda v: not v)
    whole_class_list: bool = Field(default=False, exclude_if=lambda v: not v)

    @property
    def output_name(self) -> str:
        return self.outputs[0]

    @field_validator("outputs")
    @classmethod
    def _distinct(cls, outputs: list[str]) -> list[str]:
        if len(set(outputs)) != len(outputs):
            raise ValueError(f"outputs repeat a name: {outputs}")
        return outputs


class Head(_Strict):
    """One term of the logits: ``weight * logit_scale * <image output, text output>`` (see :mod:`exports.scoring`).

    ``base_weight`` applies to names treated as base classes, ``novel_weight`` to the others.
    """

    image: str
    text: str
    base_weight: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 1.0
    novel_weight: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 1.0


class Graphs(_Strict):
    """The image and text graphs; ``score`` only for an image-conditioned method whose class outputs
    do not depend on the image (SurPL): it takes every image output and every class output, under
    their names, and returns ``logits`` [B, C]."""

    image: GraphInfo
    text: GraphInfo
    score: GraphInfo | None = None


class Parity(_Strict):
    """onnxruntime against torch (fp32 eager), measured at export time on the given inputs.

    Attributes:
        max_abs_diff_image: largest element difference of the normalised image embeddings.
        max_abs_diff_text: largest element difference of the normalised class embeddings.
        top1_agreement: fraction of images whose top-1 class is the same under both.
        n_images, n_classes: the parity set.
        tolerance: the bound ``max_abs_diff_*`` had to meet (None when precision is judged by
            ``min_top1_agreement`` instead).
        min_top1_agreement: the bound on ``top1_agreement``.
        providers: the onnxruntime execution providers used.
    """

    max_abs_diff_image: Annotated[float, Field(ge=0, allow_inf_nan=False)]
    max_abs_diff_text: Annotated[float, Field(ge=0, allow_inf_nan=False)]
    top1_agreement: Annotated[float, Field(ge=0, le=1)]
    n_images: Annotated[int, Field(ge=1)]
    n_classes: Annotated[int, Field(ge=1)]
    tolerance: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None
    min_top1_agreement: Annotated[float, Field(ge=0, le=1)] = 0.0
    providers: list[str] = Field(default_factory=lambda: ["CPUExecutionProvider"])


class LayoutInfo(_Strict):
    """:class:`exports.prompts.DescriptionLayout` in the manifest."""

    attributes: list[str]
    rows: list[int]

    @model_validator(mode="after")
    def _valid(self) -> "LayoutInfo":
        DescriptionLayout(tuple(self.attributes), tuple(self.rows))  # its checks, as a validation error
        return self


class Manifest(_Strict):
    """Everything the runtime needs to turn images and class names into predictions.

    The runtime tokenizes ``template.format(name)`` for every template in ``prompt_templates``
    and every class name into token ids ``[T, C, L]`` (template-major) and runs the text graph,
    which is the method's whole class-embedding side (template averaging, or whatever roles the
    method gives its templates, is inside the graph). Logits are the sum of ``heads`` over the
    graphs' outputs (:func:`exports.scoring.head_logits`); scores are their softmax. When
    ``capabilities.text_depends_on_image`` the text graph also takes the image embeddings
    (``graphs.text.image_input_name``) and returns the logits ``[B, C]`` itself; ``heads`` is then
    empty.
    """

    schema_version: Literal[2] = SCHEMA_VERSION
    method: str
    capabilities: CapabilitiesInfo
    backbone: str
    run_config: dict[str, Any] = Field(default_factory=dict)
    base_classnames: list[str] = Field(default_factory=list)
    preprocess: PreprocessConfig
    tokenizer: TokenizerInfo
    prompt_templates: list[str]
    #: descriptions of the classes the run knew, for methods that embed classes from them
    #: (``capabilities.needs_class_descriptions``); requests add their own for other names
    class_descriptions: dict[str, list[str] | dict[str, list[str]]] = Field(default_factory=dict)
    #: how each description becomes a prompt (:func:`exports.prompts.prompt_rows`)
    description_template: str = DESCRIPTION_TEMPLATE
    #: for a method that reads attribute trees (TAP): its attributes and sentences per attribute
    #: (:class:`exports.prompts.DescriptionLayout`); descriptions are then trees
    description_layout: LayoutInfo | None = Field(default=None, exclude_if=lambda v: v is None)
    logit_scale: Annotated[float, Field(gt=0, le=1000, allow_inf_nan=False)]  # CLIP clamps its scale at 100
    embed_dim: Annotated[int, Field(ge=1)]
    opset: Annotated[int, Field(ge=7)]
    exporter: str
    precision: Precision
    graphs: Graphs
    heads: list[Head]
    files: dict[str, FileEntry]
    parity: Parity

    @property
    def layout(self) -> DescriptionLayout | None:
        """:attr:`description_layout` as the prompt builder takes it."""
        d = self.description_layout
        return None if d is None else DescriptionLayout(tuple(d.attributes), tuple(d.rows))

    @field_validator("prompt_templates")
    @classmethod
    def _one_slot(cls, templates: list[str]) -> list[str]:
        for t in templates:
            if t.count("{}") != 1:
                raise ValueError(f"template {t!r} must contain exactly one '{{}}'")
        return templates

    @field_validator("description_template")
    @classmethod
    def _description_slots(cls, template: str) -> str:
        check_description_template(template)
        return template

    @field_validator("files")
    @classmethod
    def _plain_names(cls, files: dict[str, FileEntry]) -> dict[str, FileEntry]:
        for name in files:
            if name != Path(name).name or name in ("", ".", "..") or name == MANIFEST_FILENAME:
                raise ValueError(f"files: {name!r} is not a plain file name of the artifact")
        return files

    @model_validator(mode="after")
    def _referenced_files_listed(self) -> "Manifest":
        if not self.prompt_templates and not self.capabilities.needs_class_descriptions:
            raise ValueError("prompt_templates: at least one template is needed (unless the method embeds classes "
                             "from their descriptions)")
        if self.class_descriptions and not self.capabilities.needs_class_descriptions:
            raise ValueError("class_descriptions are only shipped for methods that need class descriptions")
        layout = self.layout
        if layout is not None and not self.capabilities.needs_class_descriptions:
            raise ValueError("description_layout is only for methods that need class descriptions")
        for name, value in self.class_descriptions.items():
            if layout is not None:
                check_tree(name, value, layout)
                sentences = [d for v in value.values() for d in v]
            elif isinstance(value, dict):
                raise ValueError(f"class_descriptions[{name!r}] is an attribute tree, but the manifest has no "
                                 "description_layout")
            else:
                sentences = value
            if not sentences or not all(isinstance(d, str) and d.strip() for d in sentences):
                raise ValueError(f"class_descriptions[{name!r}] must hold non-empty strings")
        conditioned = self.capabilities.text_depends_on_image
        scored = self.graphs.score is not None
        if self.graphs.image.whole_class_list or self.graphs.text.whole_class_list:
            raise ValueError("whole_class_list is a property of graphs.score only")
        if scored and not conditioned:
            raise ValueError("graphs.score is only for methods with capabilities.text_depends_on_image")
        if scored:
            if self.heads or self.graphs.score.outputs != ["logits"] or self.graphs.text.image_input_name is not None:
                raise ValueError("a score graph returns the logits (its one output 'logits'; no heads), "
                                 "and the text graph then takes no image input")
        elif conditioned != (self.graphs.text.image_input_name is not None):
            raise ValueError("graphs.text.image_input_name must be set exactly when capabilities.text_depends_on_image")
        if conditioned and not scored:
            if self.heads or len(self.graphs.text.outputs) != 1:
                raise ValueError("an image-conditioned text graph returns the logits: one text output and no heads")
            if not set(self.graphs.text.extra_image_inputs) <= set(self.graphs.image.outputs[1:]):
                raise ValueError("graphs.text.extra_image_inputs must name outputs of the image graph (after the first)")
        elif self.graphs.text.extra_image_inputs:
            raise ValueError("graphs.text.extra_image_inputs is only for an image-conditioned text graph")
        elif not conditioned and not self.heads:
            raise ValueError("heads: at least one head is needed")
        for i, h in enumerate(self.heads):
            if h.image not in self.graphs.image.outputs or h.text not in self.graphs.text.outputs:
                raise ValueError(f"heads[{i}] uses {h.image!r} / {h.text!r}, which the graphs do not output")
        switch = any(h.base_weight != h.novel_weight for h in self.heads)
        if switch != self.capabilities.base_novel_switch:
            raise ValueError(f"capabilities.base_novel_switch is {self.capabilities.base_novel_switch} but the heads "
                             f"{'do' if switch else 'do not'} score base and novel names differently")
        if switch and not self.base_classnames:
            raise ValueError("a base/novel switch needs base_classnames")
        score = [("graphs.score", self.graphs.score.file)] if self.graphs.score is not None else []
        for what, name in (("graphs.image", self.graphs.image.file), ("graphs.text", self.graphs.text.file), *score,
                           ("tokenizer", self.tokenizer.file)):
            if name not in self.files:
                raise ValueError(f"{what}.file {name!r} is not listed in files")
        return self

    def to_json(self) -> str:
        return self.model_dump_json(indent=2) + "\n"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def describe_files(directory: str | os.PathLike[str], names: list[str] | None = None) -> dict[str, FileEntry]:
    """``{name: FileEntry}`` of ``names`` (default: every file but the manifest) in ``directory``."""
    directory = Path(directory)
    if names is None:
        names = sorted(p.name for p in directory.iterdir() if p.name != MANIFEST_FILENAME)
    return {n: FileEntry(sha256=sha256_file(directory / n), bytes=(directory / n).stat().st_size) for n in names}


def read_manifest(directory: str | os.PathLike[str]) -> Manifest:
    """Parse ``directory/manifest.json`` without checking the files (see :func:`load_artifact`)."""
    path = Path(directory) / MANIFEST_FILENAME
    if not Path(directory).is_dir():
        raise ArtifactError(f"{directory} is not an artifact directory (not a directory)")
    if not path.is_file():
        raise ArtifactError(f"{path}: missing; {directory} is not a promptbake artifact")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ArtifactError(f"{path}: expected a JSON object")
    version = data.get("schema_version")
    if version not in READABLE_SCHEMA_VERSIONS:
        raise ArtifactError(
            f"{path}: schema_version {version!r} is not supported by this promptbake (reads "
            f"{', '.join(map(str, READABLE_SCHEMA_VERSIONS))}); re-export the run or use a matching promptbake"
        )
    try:
        return Manifest.model_validate(_upgrade(data))
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(x) for x in err['loc']) or 'manifest'}: {err['msg']}" for err in e.errors())
        raise ArtifactError(f"{path}: invalid manifest: {problems}") from e


def _upgrade(data: dict[str, Any]) -> dict[str, Any]:
    """A schema-1 manifest as schema 2: one output per graph, one head (or none, image-conditioned)."""
    if data.get("schema_version") != 1:
        return data
    data = json.loads(json.dumps(data))  # a deep copy
    graphs = data.get("graphs")
    if isinstance(graphs, dict):
        for g in graphs.values():
            if isinstance(g, dict) and "output_name" in g:
                g["outputs"] = [g.pop("output_name")]
    conditioned = bool((data.get("capabilities") or {}).get("text_depends_on_image"))
    try:
        heads = [] if conditioned else [{"image": graphs["image"]["outputs"][0], "text": graphs["text"]["outputs"][0]}]
    except (KeyError, TypeError, IndexError):
        heads = []  # malformed: validation names what is missing
    data.setdefault("heads", heads)
    data["schema_version"] = SCHEMA_VERSION
    return data


def verify_files(directory: str | os.PathLike[str], manifest: Manifest) -> None:
    """Raise :class:`ArtifactError` naming the first file that is missing, extra, truncated or altered,
    or that is not a plain file of the folder (a symbolic link, which could point anywhere; a device,
    a pipe, a folder)."""
    directory = Path(directory)
    for entry in sorted(os.scandir(directory), key=lambda e: e.name):
        if entry.is_symlink() or not entry.is_file(follow_symlinks=False):
            kind = "a symbolic link" if entry.is_symlink() else "not a regular file"
            raise ArtifactError(f"{directory / entry.name}: {kind}; an artifact holds plain files only")
    present = {p.name for p in directory.iterdir()} - {MANIFEST_FILENAME}
    extra = sorted(present - set(manifest.files))
    if extra:
        raise ArtifactError(f"{directory / extra[0]}: unexpected file, not listed in the manifest")
    for name, entry in sorted(manifest.files.items()):
        path = directory / name
        if not path.is_file():
            raise ArtifactError(f"{path}: missing (listed in the manifest)")
        size = path.stat().st_size
        if size != entry.bytes:
            kind = "truncated" if size < entry.bytes else "altered"
            raise ArtifactError(f"{path}: {kind}: {size} bytes, the manifest says {entry.bytes}")
        if sha256_file(path) != entry.sha256:
            raise ArtifactError(f"{path}: altered: sha256 differs from the manifest")


DIGEST_PREFIX = "sha256:"


def artifact_digest(manifest: Manifest) -> str:
    """The artifact's content digest: ``sha256:`` + the sha256 of its canonical manifest (sorted keys,
    no whitespace). The manifest lists every file's sha256, so the digest pins the whole artifact,
    the manifest's own fields (logit scale, templates, heads) included; like a container image's
    digest, it is an anchor outside the artifact (``serve --expect-digest``)."""
    canonical = json.dumps(manifest.model_dump(mode="json"), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return DIGEST_PREFIX + hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def check_digest(directory: str | os.PathLike[str], manifest: Manifest, expected: str | None) -> None:
    """Raise :class:`ArtifactError` unless ``expected`` (when given) is the artifact's digest."""
    if expected and artifact_digest(manifest) != expected:
        raise ArtifactError(f"{directory}: content digest {artifact_digest(manifest)} is not the expected {expected}")


def load_artifact(directory: str | os.PathLike[str]) -> Manifest:
    """Read an artifact's manifest and check the schema version and every file's size and sha256.

    Raises:
        ArtifactError: naming the file that is missing, unexpected, truncated or altered, or a
            manifest that is missing, invalid or of another schema version.
    """
    manifest = read_manifest(directory)
    verify_files(directory, manifest)
    return manifest
