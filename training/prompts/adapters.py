"""The adapter hook: replace or wrap modules inside a backbone's blocks, by rule.

Methods that add modules inside CLIP's blocks (LwEIB's depthwise-convolution adapters, DsRA's
shared low-rank ones, CLIP-AST's selected sub-layers) do what peft's ``_create_and_replace`` does:
walk the model, pick modules by name and type, and put a wrapper in their place. This is that
walk, once: the method supplies the rule and the wrapper, and the wrapped module stays inside the
wrapper (frozen, as the backbone is), so the forward code of open_clip's towers is untouched.

open_clip reads a few tensors by attribute outside the forward pass: ``Transformer.get_cast_dtype``
takes ``resblocks[0].mlp.c_fc.weight.dtype``, so a wrapper of ``c_fc`` must expose ``weight``
(e.g. as a property returning the wrapped module's).
"""
from __future__ import annotations

from typing import Callable

from torch import nn


def wrap_modules(root: nn.Module, select: Callable[[str, nn.Module], bool],
                 wrap: Callable[[str, nn.Module], nn.Module]) -> list[str]:
    """Replace every submodule ``m`` of ``root`` (named ``name`` relative to it) for which
    ``select(name, m)`` holds by ``wrap(name, m)``; returns the replaced names, in order.

    Modules are chosen before any is replaced, so a wrapper's own children are never visited, and
    a chosen module inside another chosen one is refused (the outer wrapper would hide it).

    Raises:
        ValueError: nothing matched, or matches nest.
    """
    chosen = [name for name, m in root.named_modules() if name and select(name, m)]
    if not chosen:
        raise ValueError("no module matched the adapter rule")
    for outer in chosen:
        inner = next((n for n in chosen if n != outer and n.startswith(outer + ".")), None)
        if inner is not None:
            raise ValueError(f"adapter rule matches {outer!r} and {inner!r} inside it")
    for name in chosen:
        parent_name, _, leaf = name.rpartition(".")
        parent = root.get_submodule(parent_name)
        setattr(parent, leaf, wrap(name, getattr(parent, leaf)))
    return chosen
