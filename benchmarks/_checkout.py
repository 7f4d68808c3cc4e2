"""Import fxopt from a bare checkout (``PYTHONPATH=.``, nothing installed), as on the GPU machine.

The wheel and the editable install map ``fxopt.passes`` to ``passes/`` and ``fxopt.cost_models``
to ``cost_models/`` (pyproject's ``package-dir``); a plain ``sys.path`` entry does not, so
``import fxopt`` fails there. :func:`install` adds that mapping for the checkout this file lives in.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUBPACKAGES = {"fxopt.passes": ROOT / "passes", "fxopt.cost_models": ROOT / "cost_models"}


class _CheckoutFinder(importlib.abc.MetaPathFinder):
    """Finds the two mapped subpackages in this checkout (their own submodules then load normally)."""

    def find_spec(self, fullname, path=None, target=None):
        where = SUBPACKAGES.get(fullname)
        if where is None:
            return None
        return importlib.util.spec_from_file_location(fullname, where / "__init__.py",
                                                      submodule_search_locations=[str(where)])


def install() -> None:
    """Put this checkout first on ``sys.path`` and map its subpackages (idempotent)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    if not any(isinstance(f, _CheckoutFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _CheckoutFinder())
