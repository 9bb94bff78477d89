"""Package attributes that load on first use (PEP 562), so that importing a package, and
the CLI's --help and flag errors with it, does not pay for importing PyTorch."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_attributes(namespace: dict[str, Any], sources: dict[str, str]) -> tuple[Callable, Callable]:
    """`__getattr__` and `__dir__` for a package whose names in `sources` (name -> module)
    are imported when first read, then kept in the package's `namespace`."""

    def __getattr__(name: str) -> Any:
        if name not in sources:
            raise AttributeError(f"module {namespace['__name__']!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(sources[name]), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(sources))

    return __getattr__, __dir__
