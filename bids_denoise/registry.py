"""The registry of denoising methods.

Each method's interface module declares a :class:`MethodSpec` and calls
:func:`register`: its name, the modalities it takes, its parameters (which
become ``--<method>-<parameter>`` options) and whether it can use a GPU. Adding
a method touches its own ``methods/`` module, its interface module and nothing
else: the CLI and the workflow read everything from here.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass(frozen=True)
class Param:
    """One user-facing parameter of a method."""

    name: str
    type: Callable = str
    default: Any = None
    help: str = ""
    choices: tuple | None = None
    nargs: str | None = None
    aliases: tuple = ()  # extra option strings, e.g. ("--sr-scale",)

    @property
    def option(self) -> str:
        return self.name.replace("_", "-")


@dataclass(frozen=True)
class MethodSpec:
    """What the app needs to know to offer and run a method."""

    name: str
    interface: type
    description: str
    modalities: tuple = ("dwi",)
    params: tuple = ()
    uses_gpu: bool = False
    extra_outputs: dict = field(default_factory=dict)
    citation: str = ""
    mem_gb: float = 1.0

    def defaults(self) -> dict:
        return {param.name: param.default for param in self.params}


_REGISTRY: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    if spec.name in _REGISTRY and _REGISTRY[spec.name] is not spec:
        raise ValueError(f"method {spec.name!r} registered twice")
    _REGISTRY[spec.name] = spec
    return spec


def load_all() -> dict[str, MethodSpec]:
    """Import every interface module (each registers its method) and return the registry."""
    from bids_denoise import interfaces

    for module in pkgutil.iter_modules(interfaces.__path__):
        importlib.import_module(f"{interfaces.__name__}.{module.name}")
    return dict(sorted(_REGISTRY.items()))


def get(name: str) -> MethodSpec:
    methods = load_all()
    if name not in methods:
        raise KeyError(f"unknown method {name!r}; available: {', '.join(methods)}")
    return methods[name]
