"""Golden-file comparison shared by the pass tests: ``FXOPT_ACCEPT=1 pytest`` rewrites goldens.

A golden states what a pass did to a graph and why (its decision log), for a reviewer to read.
It does not carry cost figures: those are written by the cost model itself (a golden would only
compare the code with its own earlier output, and every cost-model change would rewrite every
golden). :func:`mask_costs` replaces them by ``#`` before the comparison; cost figures are
asserted against hand-derived formulas in tests/test_references_cost.py instead.

Accepting is refused where ``CI`` is set (a leftover ``FXOPT_ACCEPT=1`` there would turn every
golden check into a file write), and each rewrite is reported (stdout and a pytest warning).
"""
import os
import re
import warnings
from pathlib import Path

import pytest

from fxopt.graphtext import unified_diff

DECISIONS = "# decisions\n"
# a number with a cost unit (time, bytes, rates) or a speed ratio ("1.3x"); shapes, counts, dtypes
# and constants in the graph text carry no unit and are kept
_NUM = r"[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?"
_COST = re.compile(rf"(?:{_NUM} -> )?{_NUM}(?: ?(?:us|ms|MB|GB|kB|KB|TB/s|GB/s|TF/s|TFLOP/s)\b|x(?= ))")


class GoldenRewritten(UserWarning):
    """A golden file was (re)written because FXOPT_ACCEPT=1: review it with ``git diff tests/golden``."""


def accepting() -> bool:
    """FXOPT_ACCEPT=1 outside CI. In CI it is refused: goldens are checked there, never written."""
    if os.environ.get("FXOPT_ACCEPT") != "1":
        return False
    if os.environ.get("CI", "").lower() not in ("", "0", "false", "no"):
        pytest.fail("FXOPT_ACCEPT=1 is refused when CI is set: CI checks goldens, it never rewrites them. "
                    "Unset FXOPT_ACCEPT in the CI environment; accept goldens locally and commit them.",
                    pytrace=False)
    return True


def mask_costs(text: str) -> str:
    """``text`` with the cost figures of its decision log replaced by ``#`` (see the module doc)."""
    head, sep, log = text.partition(DECISIONS)
    if not sep:
        return text
    return head + sep + _COST.sub(lambda m: re.sub(_NUM, "#", m.group(0)), log)


def check(path: Path, text: str) -> None:
    """Compare ``text`` (cost figures masked) with the golden file at ``path``, or write it when accepting."""
    text = mask_costs(text)
    if accepting():
        old = path.read_text() if path.exists() else None
        if old == text:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        what = f"created {path}" if old is None else \
            f"rewrote {path}:\n{unified_diff(old, text, path.name)}"
        print(f"FXOPT_ACCEPT: {what}")
        warnings.warn(GoldenRewritten(f"FXOPT_ACCEPT: {what}"), stacklevel=2)
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
    return diff + DECISIONS + "".join(f"{d}\n" for d in record.decisions), record, gm
