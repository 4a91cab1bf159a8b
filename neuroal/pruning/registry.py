"""The one list of plugins. Configs (the allowed ``method`` and ``top_up`` values and the
``<allocator>_<option>`` keys), the CLI's choices and help, and the pipeline all read it.

Adding a base method: a module ``methods/<name>.py`` defining ``METHOD``, and its name below.
Adding an allocator: a package ``allocators/<name>/`` defining ``ALLOCATOR``, and its name below.
"""

from __future__ import annotations

import importlib

from neuroal.errors import UserError
from neuroal.pruning.plugin import Allocator, BaseMethod

METHOD_NAMES = ("magnitude", "wanda", "multiflow", "sparsegpt", "ria")
ALLOCATOR_NAMES = ("uniform", "owl", "alpha", "dsnot", "neuroal", "dlp", "atp")

BASE_METHODS: dict[str, BaseMethod] = {
    name: importlib.import_module(f"neuroal.pruning.methods.{name}").METHOD for name in METHOD_NAMES
}
ALLOCATORS: dict[str, Allocator] = {
    name: importlib.import_module(f"neuroal.pruning.allocators.{name}").ALLOCATOR for name in ALLOCATOR_NAMES
}


def base_method(name: str) -> BaseMethod:
    """Look up a base method by name."""
    return _lookup("method", name, BASE_METHODS)


def allocator(name: str) -> Allocator:
    """Look up an allocator (a ``--top-up``) by name."""
    return _lookup("top-up", name, ALLOCATORS)


def _lookup(kind: str, name: str, registry: dict):
    """Find ``name`` in a registry, or say in one line what exists."""
    if name in registry:
        return registry[name]
    raise UserError(f"unknown {kind} {name!r}; choose from {', '.join(registry)}")
