"""Import fxopt from a bare checkout (``PYTHONPATH=.``): put the checkout first on ``sys.path``;
``fxopt/_checkout.py`` maps ``fxopt.passes`` / ``fxopt.cost_models`` to the top-level folders."""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def install() -> None:
    """Idempotent: the checkout on ``sys.path``, then fxopt's own mapping."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from fxopt._checkout import install as map_subpackages
    map_subpackages()
