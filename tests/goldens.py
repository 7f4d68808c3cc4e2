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


def run_with_decisions(model, inputs, pipeline: str, **manager_kwargs):
    """Capture, run a one-pass pipeline (uncosted unless asked); returns (golden text: the canonical
    diff followed by the pass's decision log, the pass record, the rewritten graph)."""
    import fxopt
    from fxopt.graphtext import canonical_text
    from fxopt.passes import PassManager

    captured = fxopt.capture(model, inputs)
    manager_kwargs.setdefault("cost", False)
    gm, (record,) = PassManager(pipeline, **manager_kwargs).run(captured)
    diff = unified_diff(canonical_text(captured.graph_module), canonical_text(gm), pipeline)
    return diff + "# decisions\n" + "".join(f"{d}\n" for d in record.decisions), record, gm
