"""The prompts a class list is embedded from: one implementation for training, export and serving.

For most methods a class list becomes ``[T, C]`` prompts, every template filled with every name
(template-major). A method that needs class descriptions (``capabilities.needs_class_descriptions``)
embeds each class from its own rows instead: the templates filled with the name, then the class's
descriptions; classes with fewer rows are padded with the empty prompt ``""`` (start and end of text
only), which the method's text graph leaves out (:func:`is_padding_row` on the token ids).

Torch-free: the runtime and the service import it.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

PADDING_PROMPT = ""
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


def prompt_rows(templates: Sequence[str], class_names: Sequence[str],
                descriptions: Mapping[str, Sequence[str]] | None = None,
                description_template: str = DESCRIPTION_TEMPLATE) -> list[list[str]]:
    """``rows[s][c]``: the s-th prompt of class c.

    Without ``descriptions`` every row is one template filled with every name. With them (a method
    that needs descriptions; every name must have at least one), class c's prompts are the
    templates filled with its name, then its descriptions (each through ``description_template``),
    padded with :data:`PADDING_PROMPT`.

    Raises:
        MissingDescriptionError: ``descriptions`` lacks some names.
    """
    if descriptions is None:
        return [[t.format(n) for n in class_names] for t in templates]
    missing = [n for n in class_names if not descriptions.get(n)]
    if missing:
        raise MissingDescriptionError(missing)
    per_class = [[t.format(n) for t in templates]
                 + [description_template.format(name=n, description=str(d)) for d in descriptions[n]] for n in class_names]
    depth = max(len(p) for p in per_class)
    return [[p[s] if s < len(p) else PADDING_PROMPT for p in per_class] for s in range(depth)]


def is_padding_row(token_ids: Sequence[int], eot_token_id: int) -> bool:
    """Whether tokenized prompt ids are those of :data:`PADDING_PROMPT` (end of text right after the start)."""
    return len(token_ids) > 1 and int(token_ids[1]) == eot_token_id
