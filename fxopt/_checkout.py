"""Import fxopt from a bare checkout (``PYTHONPATH=.``, nothing installed), as on the GPU machine.

The wheel and the editable install map ``fxopt.passes`` to ``passes/`` and ``fxopt.cost_models``
to ``cost_models/`` (pyproject's ``package-dir``); a plain ``sys.path`` entry does not. When
``fxopt/`` sits in a checkout next to those folders and nothing maps them, :func:`install` adds the
mapping (``fxopt/__init__`` calls it first thing, so every script works from the tree).
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUBPACKAGES = {"fxopt.passes": ROOT / "passes", "fxopt.cost_models": ROOT / "cost_models"}


def needed() -> bool:
    """A checkout (``cost_models/`` beside ``fxopt/``) whose subpackages nothing maps yet."""
    here = Path(__file__).resolve().parent
    return (ROOT / "cost_models" / "__init__.py").exists() and not (here / "cost_models").exists() and \
        importlib.util.find_spec("fxopt.cost_models") is None


class _CheckoutFinder(importlib.abc.MetaPathFinder):
    """Finds the two mapped subpackages in this checkout (their own submodules then load normally)."""

    def find_spec(self, fullname, path=None, target=None):
        where = SUBPACKAGES.get(fullname)
        if where is None:
            return None
        return importlib.util.spec_from_file_location(fullname, where / "__init__.py",
                                                      submodule_search_locations=[str(where)])


def install() -> None:
    """Map this checkout's subpackages (idempotent)."""
    if not any(isinstance(f, _CheckoutFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _CheckoutFinder())
