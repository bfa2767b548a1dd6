"""Every module of the package lists its public names in ``__all__``, completely."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import evalsyncd

MODULES = sorted(
    m.name
    for m in pkgutil.walk_packages(evalsyncd.__path__, "evalsyncd.")
    if m.name != "evalsyncd.__main__"  # running it is the CLI
)


@pytest.mark.parametrize("name", ["evalsyncd", *MODULES])
def test_all_lists_every_public_name(name: str) -> None:
    """__all__ exists, its names exist, and every public function or class the module
    defines is in it."""
    module = importlib.import_module(name)
    assert hasattr(module, "__all__"), f"{name} has no __all__"
    assert all(hasattr(module, n) for n in module.__all__), name
    defined = {
        n
        for n, v in vars(module).items()
        if not n.startswith("_")
        and (inspect.isfunction(v) or inspect.isclass(v))
        and v.__module__ == module.__name__
    }
    assert defined <= set(module.__all__), (name, sorted(defined - set(module.__all__)))
