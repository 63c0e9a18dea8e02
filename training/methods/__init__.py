"""Registered prompt methods. Each module registers itself on import; this file is the only list."""
from training.protocol import (
    Capabilities,
    MethodConfig,
    MethodSpec,
    PromptMethod,
    create_method,
    get_method,
    list_methods,
    register_method,
)
from training.methods import coop, zeroshot  # noqa: F401  (registration)
from training.methods import ivlp, maple, promptsrc, vpt  # noqa: F401
from training.methods import cocoop, kgcoop, prograd, tcp  # noqa: F401
from training.methods import cupl, dpc, mmrl, protext, skipt  # noqa: F401
from training.methods import atprompt, dekg, textrefiner  # noqa: F401
from training.methods import bip, lweib, surpl, twosfs  # noqa: F401
from training.methods import cpr, hicropl, tac, tap  # noqa: F401

__all__ = [
    "Capabilities",
    "MethodConfig",
    "MethodSpec",
    "PromptMethod",
    "create_method",
    "get_method",
    "list_methods",
    "register_method",
]
