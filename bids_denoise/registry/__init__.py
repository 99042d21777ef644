"""The registry of methods.

Each module of this package registers one method: it declares the method's
:class:`~bids_denoise.contract.MethodSpec` (parameters, modalities, references,
citation sentence) and its ``run``, which calls the pure function of its
``bids_denoise/methods/`` module. Adding a method is a ``methods/`` module plus
one module here; the command line, the graph, the provenance, the report and
the citation read everything else from the spec.
"""

from __future__ import annotations

import importlib
import pkgutil

from bids_denoise.contract import MethodSpec

_REGISTRY: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    """Add a method; a name may be registered once."""
    if spec.name in _REGISTRY and _REGISTRY[spec.name] is not spec:
        raise ValueError(f"method {spec.name!r} registered twice")
    _REGISTRY[spec.name] = spec
    return spec


def load_all() -> dict[str, MethodSpec]:
    """Import every registration module of this package and return the registry, by name."""
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")
    return dict(sorted(_REGISTRY.items()))


def by_role(role: str) -> dict[str, MethodSpec]:
    """The registered methods of one role (``denoise`` or ``superres``)."""
    return {name: spec for name, spec in load_all().items() if spec.role == role}


def default_methods() -> list[str]:
    """The methods the app runs when ``--methods`` is not given."""
    return [name for name, spec in by_role("denoise").items() if spec.default]
