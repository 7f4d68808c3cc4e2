"""README's printed outputs equal what their commands print today (benchmarks/readme_examples.py).

After a cost-model change these fail until `python benchmarks/readme_examples.py --write` rewrites
the blocks from fresh runs (then read the README diff). The demo's report is checked in every run;
the other examples analyze several full-size models and are marked slow.
"""
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("readme_examples", ROOT / "benchmarks" / "readme_examples.py")
readme_examples = importlib.util.module_from_spec(_spec)
sys.modules["readme_examples"] = readme_examples  # dataclasses look their module up there
_spec.loader.exec_module(readme_examples)

EXAMPLES = readme_examples.examples((ROOT / "README.md").read_text())
FAST = {"fxopt report driving --batch 8 --by block --depth 1"}  # the demo's own command (make demo)


def test_markers_parse_and_name_real_commands():
    commands = [e.command for e in EXAMPLES]
    assert FAST <= set(commands), "the demo's report block lost its <!-- example: ... --> marker"
    from fxopt.cli import _parser
    for e in EXAMPLES:
        _parser().parse_args(e.argv())  # argparse exits (SystemExit) on a stale option
        assert e.shown.endswith("\n") and e.shown.strip(), e.command


def test_write_replaces_only_the_marked_blocks(monkeypatch):
    text = ("intro\n<!-- example lines=2: fxopt models -->\n```\nstale\n```\n"
            "```\nunmarked block\n```\n")
    monkeypatch.setattr(readme_examples, "output", lambda e: f"<{e.command} {e.lines}>\n")
    new, changed = readme_examples.write(text)
    assert changed == 1
    assert new == ("intro\n<!-- example lines=2: fxopt models -->\n```\n<fxopt models 2>\n```\n"
                   "```\nunmarked block\n```\n")
    assert readme_examples.write(new) == (new, 0)


def test_lines_option_cuts_real_output():
    example = readme_examples.Example("fxopt models", 2, 0, 0, "")
    full = readme_examples.Example("fxopt models", None, 0, 0, "")
    assert readme_examples.output(example).splitlines() == readme_examples.output(full).splitlines()[:2]


def _check(example):
    assert readme_examples.output(example) == example.shown, (
        f"README's output of `{example.command}` is stale: run python benchmarks/readme_examples.py --write")


@pytest.mark.parametrize("example", [e for e in EXAMPLES if e.command in FAST], ids=lambda e: e.command)
def test_demo_block_is_current(example):
    _check(example)


@pytest.mark.slow
@pytest.mark.parametrize("example", [e for e in EXAMPLES if e.command not in FAST], ids=lambda e: e.command)
def test_other_blocks_are_current(example):
    _check(example)
