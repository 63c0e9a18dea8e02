"""The prompts a class list is embedded from: one implementation for training, export and serving.

For most methods a class list becomes ``[T, C]`` prompts, every template filled with every name
(template-major). A method that needs class descriptions (``capabilities.needs_class_descriptions``)
embeds each class from its own rows instead: the templates filled with the name, then the class's
descriptions; classes with fewer rows are padded with the empty prompt ``""`` (start and end of text
only), which the method's text graph leaves out (:func:`is_padding_row` on the token ids).

Descriptions come in two kinds: sentences per class (CuPL's ``{name: [sentence, ...]}``), or an
attribute tree per class (TAP's ``{name: {attribute: [sentence, ...]}}``). A tree method fixes a
:class:`DescriptionLayout` when it trains (its attributes, and how many sentences of each it reads),
so every class has the same rows: the templates, then each attribute's block of sentences.

Torch-free: the runtime and the service import it.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Union

PADDING_PROMPT = ""
#: one class's descriptions: sentences, or an attribute tree ``{attribute: [sentence, ...]}``
ClassDescriptions = Union[Sequence[str], Mapping[str, Sequence[str]]]
#: how a description becomes a prompt: the sentence itself (CuPL); a method may put the class name
#: in (LwEIB: ``"a photo of a {name}, {description}"``)
DESCRIPTION_TEMPLATE = "{description}"


def check_description_template(template: str) -> None:
    """A description template names ``{description}`` once, ``{name}`` at most once, and nothing else."""
    import string

    fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    if fields.count("description") != 1 or fields.count("name") > 1 or set(fields) - {"name", "description"}:
        raise ValueError(f"description template {template!r} must contain {{description}} once and may contain "
                         "{name} once, nothing else")


class MissingDescriptionError(ValueError):
    """A class name without descriptions, for a method that needs them; ``names`` lists them all."""

    def __init__(self, names: Sequence[str]):
        shown = ", ".join(repr(n) for n in list(names)[:5]) + (", ..." if len(names) > 5 else "")
        super().__init__(f"no descriptions for {len(names)} class name(s): {shown}; this method embeds a class from "
                         "its descriptions: send descriptions for every name the artifact does not ship them for")
        self.names = list(names)


@dataclass(frozen=True)
class DescriptionLayout:
    """How a tree method reads attribute trees: its ``attributes`` in order, and ``rows[a]``, how many
    sentences of attribute a each class gets (more are cut to the first ``rows[a]``, fewer padded).

    A class with no sentence for an attribute gets :data:`MISSING_ATTRIBUTE` (its name) there, so
    every attribute block has a prompt to pool.
    """

    attributes: tuple[str, ...]
    rows: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.attributes or len(self.attributes) != len(self.rows):
            raise ValueError(f"a description layout needs one row count per attribute, got {list(self.attributes)} "
                             f"and {list(self.rows)}")
        if len(set(self.attributes)) != len(self.attributes) or not all(a.strip() for a in self.attributes):
            raise ValueError(f"layout attributes must be distinct non-blank names, got {list(self.attributes)}")
        if any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in self.rows):
            raise ValueError(f"layout rows must be integers >= 1, got {list(self.rows)}")

    def to_dict(self) -> dict[str, list]:
        return {"attributes": list(self.attributes), "rows": list(self.rows)}


#: the sentence a class gets for an attribute it has none for: the class name
MISSING_ATTRIBUTE = "{name}."


def check_tree(name: str, tree: object, layout: DescriptionLayout, require_known: bool = False) -> Mapping[str, Sequence[str]]:
    """A class's attribute tree, checked against ``layout``: a non-empty object of attribute -> list of
    non-blank sentences. Attributes the layout does not read are ignored (a tree file may describe more
    than a model was trained with); a class with none of the layout's gets its name in every block,
    unless ``require_known`` (a request's own trees: a tree that names none of them is more likely a
    mistake).

    Raises:
        MissingDescriptionError: an empty tree.
        ValueError: naming the class and what is wrong (a sentence list where a tree is expected, a
            value that is no list of sentences, a blank sentence, with ``require_known`` none of the
            layout's attributes).
    """
    if not isinstance(tree, Mapping):
        raise ValueError(f"descriptions of {name!r}: this method reads an attribute tree per class, "
                         f"{{attribute: [sentence, ...]}} with attributes {list(layout.attributes)}; got a "
                         f"{type(tree).__name__}")
    for attribute, sentences in tree.items():
        if isinstance(sentences, str) or not isinstance(sentences, Sequence) or not all(isinstance(d, str) for d in sentences):
            raise ValueError(f"descriptions of {name!r}: attribute {attribute!r} must be a list of sentences")
        if not all(d.strip() for d in sentences):
            raise ValueError(f"descriptions of {name!r}: attribute {attribute!r} has a blank sentence")
    if not any(tree.values()):
        raise MissingDescriptionError([name])
    if require_known and not any(tree.get(a) for a in layout.attributes):
        raise ValueError(f"descriptions of {name!r}: none of its attributes {sorted(tree)} is one this method reads "
                         f"({list(layout.attributes)})")
    return tree


def check_descriptions(name: str, value: object, layout: DescriptionLayout | None,
                       require_known: bool = False) -> ClassDescriptions:
    """One class's descriptions of the kind the method reads: an attribute tree under ``layout``
    (:func:`check_tree`), else a list of sentences.

    Raises:
        ValueError: the other kind (or what :func:`check_tree` refuses).
    """
    if layout is not None:
        return check_tree(name, value, layout, require_known)
    if isinstance(value, Mapping):
        raise ValueError(f"descriptions of {name!r}: this method reads sentences per class, [sentence, ...], "
                         "not an attribute tree")
    return value  # type: ignore[return-value]


def tree_rows(name: str, tree: Mapping[str, Sequence[str]], layout: DescriptionLayout) -> list[str | None]:
    """One class's description rows under ``layout`` (before the description template): per attribute,
    its first ``rows[a]`` sentences padded with None (the padding prompt), or the name when it has none."""
    out: list[str | None] = []
    for attribute, k in zip(layout.attributes, layout.rows):
        sentences: list[str | None] = [str(d) for d in tree.get(attribute, ())][:k]
        out += (sentences or [MISSING_ATTRIBUTE.format(name=name)]) + [None] * (k - max(len(sentences), 1))
    return out


def prompt_rows(templates: Sequence[str], class_names: Sequence[str],
                descriptions: Mapping[str, ClassDescriptions] | None = None,
                description_template: str = DESCRIPTION_TEMPLATE,
                layout: DescriptionLayout | None = None) -> list[list[str]]:
    """``rows[s][c]``: the s-th prompt of class c.

    Without ``descriptions`` every row is one template filled with every name. With them (a method
    that needs descriptions; every name must have at least one), class c's prompts are the
    templates filled with its name, then its descriptions (each through ``description_template``),
    padded with :data:`PADDING_PROMPT`. With a ``layout`` the descriptions are attribute trees and
    every class has the same rows (:func:`tree_rows`); padding rows stay empty.

    Raises:
        MissingDescriptionError: ``descriptions`` lacks some names.
        ValueError: with a ``layout``, a class whose descriptions are not a tree of its attributes.
    """
    if descriptions is None:
        return [[t.format(n) for n in class_names] for t in templates]
    missing = [n for n in class_names if not descriptions.get(n)]
    if missing:
        raise MissingDescriptionError(missing)

    def prompt(n: str, d: str | None) -> str:
        return PADDING_PROMPT if d is None else description_template.format(name=n, description=d)

    checked = {n: check_descriptions(n, descriptions[n], layout) for n in class_names}
    own: dict[str, list[str | None]] = {
        n: [str(d) for d in v] if layout is None else tree_rows(n, v, layout) for n, v in checked.items()}
    per_class = [[t.format(n) for t in templates] + [prompt(n, d) for d in own[n]] for n in class_names]
    depth = max(len(p) for p in per_class)
    return [[p[s] if s < len(p) else PADDING_PROMPT for p in per_class] for s in range(depth)]


def is_padding_row(token_ids: Sequence[int], eot_token_id: int) -> bool:
    """Whether tokenized prompt ids are those of :data:`PADDING_PROMPT` (end of text right after the start)."""
    return len(token_ids) > 1 and int(token_ids[1]) == eot_token_id
