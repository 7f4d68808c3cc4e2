"""Golden-file comparison shared by the pass tests: ``FXOPT_ACCEPT=1 pytest`` rewrites goldens."""
import os
from pathlib import Path

import pytest

from fxopt.graphtext import unified_diff

ACCEPT = os.environ.get("FXOPT_ACCEPT") == "1"


def check(path: Path, text: str) -> None:
    """Compare ``text`` with the golden file at ``path`` (or write it when accepting)."""
    if ACCEPT:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return
    if not path.exists():
        pytest.fail(f"golden file {path} is missing; create it with FXOPT_ACCEPT=1 pytest -k <case> and "
                    f"review it")
    expected = path.read_text()
    if text != expected:
        pytest.fail(f"{path} differs from this run (FXOPT_ACCEPT=1 rewrites it):\n"
                    f"{unified_diff(expected, text, path.name)}")
