"""PEP 562 module attributes imported on first access: how `ctal_hf` and `ctal_hf.export` keep their imports cheap."""

import importlib
from collections.abc import Callable


def lazy_module_attributes(
    package: str, namespace: dict, table: dict[str, str]
) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """`(__getattr__, __dir__)` for `package`, whose public name `n` lives in its submodule `table[n]`; a loaded
    value is cached in the module's `namespace` (its `globals()`)."""

    def __getattr__(name: str):
        module = table.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{module}", package), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(table))

    return __getattr__, __dir__
