"""Plug-ins on host methods: a method that wraps another registered method (``--host coop``).

A plug-in (DPC, and later ATPrompt, DeKg-on-TCP, the FM/SPTR/DiSa regularisers) is written once
against the protocol and works on every host it declares compatible. The host is built through the
registry (never by importing its module) with the options recorded in the plug-in's config, and
its frozen CLIP is the plug-in's. :meth:`HostedMethod.call_host` runs any of the host's protocol
methods with some of its learned tensors replaced (as ``torch.func.functional_call`` would), so a plug-in
can evaluate the host under tensors it derives (DPC's tuned prompt P' and stage-1 prompt P)
without copying the host's code; gradients reach the replacing tensors, and the call traces into
ONNX like any other.
"""
from __future__ import annotations

import contextlib
import json
from typing import Any, ClassVar, Iterator, Mapping, Sequence

import torch
from torch import nn

from training.backbones import Backbone
from training.protocol import Capabilities, MethodConfig, PromptMethod, create_method, get_method


def host_options(config: MethodConfig) -> dict[str, Any]:
    """The host's options recorded in a plug-in config's ``host_options`` (a JSON object string)."""
    try:
        options = json.loads(getattr(config, "host_options"))
    except json.JSONDecodeError as e:
        raise ValueError(f"host_options must be a JSON object, got {getattr(config, 'host_options')!r} ({e})") from None
    if not isinstance(options, dict):
        raise ValueError(f"host_options must be a JSON object, got {options!r}")
    return options


def check_host(config: MethodConfig, compatible: Sequence[str], plugin: str) -> None:
    host = getattr(config, "host")
    if host not in compatible:
        raise ValueError(f"{plugin} works on the hosts {', '.join(compatible)}; got host={host!r}")
    get_method(host)  # registered (with close matches in the error otherwise)
    host_options(config)


class HostedMethod(PromptMethod):
    """A method wrapping a host method (not registered).

    The config must have ``host`` (a registered method name) and ``host_options`` (its options as
    a JSON object string). What of the host trains is the plug-in's choice
    (:meth:`trained_host_tensors`): none by default (DPC learns its own copies), all of them for a
    regulariser plug-in (DeKg) or one that extends the host's prompt (ATPrompt, TextRefiner). Host
    tensors that train are the plug-in's learned state under ``host.<name>``.
    """

    compatible_hosts: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def host_options_for(cls, config: MethodConfig, options: dict[str, Any]) -> dict[str, Any]:
        """The options the host is built with, from those recorded in ``host_options``: a plug-in
        that shapes its host (ATPrompt's context length, DeKg's anchor template) derives them here,
        so a run's record stays the options the user gave."""
        return options

    @classmethod
    def host_config_for(cls, config: MethodConfig) -> MethodConfig:
        """The host's typed config under this plug-in (validated by the host's own config class)."""
        options = cls.host_options_for(config, host_options(config))
        return get_method(getattr(config, "host")).config_cls.from_dict(options)

    @classmethod
    def host_capabilities(cls, config: MethodConfig) -> Capabilities:
        """The capabilities of the host as this plug-in builds it (without building it)."""
        return get_method(getattr(config, "host")).method_cls.capabilities_for(cls.host_config_for(config))

    def __init__(self, backbone: Backbone, config: MethodConfig, train_classnames: Sequence[str]):
        super().__init__(backbone, config, train_classnames)
        check_host(config, self.compatible_hosts, type(self).__name__)
        self.host = create_method(config.host, backbone, self.host_config_for(config), train_classnames)
        self._host_tensors = tuple(sorted(self.host.learned_state()))  # before freezing: what a host run learns
        self.host.requires_grad_(False)
        trained = self.trained_host_tensors()
        unknown = sorted(set(trained) - set(self._host_tensors))
        if unknown:
            raise ValueError(f"{type(self).__name__} trains host tensors {unknown} that {config.host} does not learn")
        params = dict(self.host.named_parameters())
        for name in trained:
            if name in params:
                params[name].requires_grad_(True)

    def trained_host_tensors(self) -> tuple[str, ...]:
        """Names of the host's learned tensors this plug-in trains (default: none; called once the
        host is built, see :meth:`host_tensor_names`)."""
        return ()

    def host_tensor_names(self) -> tuple[str, ...]:
        """Names of the host's learned tensors (what a host run's learned.safetensors holds)."""
        return self._host_tensors

    def host_tensors(self) -> dict[str, torch.Tensor]:
        """The host's own learned tensors (frozen inside the plug-in; its initialisation until loaded)."""
        own = {**dict(self.host.named_parameters()), **dict(self.host.named_buffers())}
        return {n: own[n].detach() for n in self._host_tensors}

    def call_host(self, fn: str, *args: Any, tensors: Mapping[str, torch.Tensor] | None = None, **kwargs: Any) -> Any:
        """``host.fn(*args, **kwargs)`` with the host's tensors named in ``tensors`` replaced."""
        with _swapped(self.host, tensors or {}):
            return getattr(self.host, fn)(*args, **kwargs)

    def prompt_templates(self) -> list[str]:
        """The host's: the plug-in embeds classes through the host, so it tokenizes as the host does."""
        return self.host.prompt_templates()

    def logit_scale(self) -> torch.Tensor:
        return self.host.logit_scale()


@contextlib.contextmanager
def _swapped(module: nn.Module, tensors: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """``module``'s parameters / buffers named in ``tensors`` replaced by those tensors for the block.

    What ``torch.func.functional_call`` does, by hand: that refuses to run under ``torch.jit.trace``,
    which the exporter uses. The replacing tensors are plain tensors in the module's parameter slots
    (attribute access returns them; autograd flows into them). Not thread-safe: one call at a time
    per method, as torch modules are used anyway.
    """
    saved = []
    try:
        for name, tensor in tensors.items():
            path, _, leaf = name.rpartition(".")
            owner = module.get_submodule(path)
            slots = owner._parameters if leaf in owner._parameters else owner._buffers  # noqa: SLF001
            if leaf not in slots:
                raise KeyError(f"{type(module).__name__} has no tensor {name!r}")
            saved.append((slots, leaf, slots[leaf]))
            slots[leaf] = tensor
        yield
    finally:
        for slots, leaf, original in reversed(saved):
            slots[leaf] = original
