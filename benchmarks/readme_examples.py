"""README's printed command outputs, regenerated from real runs so their numbers never drift.

A block README shows as a command's output is marked, on the line before its code fence::

    <!-- example: fxopt report driving --batch 8 --by block --depth 1 -->
    <!-- example lines=9: fxopt lint driving --batch 8 -->     (only the first 9 lines are shown)

    python benchmarks/readme_examples.py           # list the examples; exit 1 if any block is stale
    python benchmarks/readme_examples.py --write   # rerun every example and rewrite its block

The commands run in-process (``fxopt.cli.main``) from the repository root, on the CPU: they are
analytical (report, lint, sweep, scaling), so their output is deterministic. tests/test_readme.py
checks that every block equals what its command prints today; after a cost-model change, run
``--write`` and read the diff.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MARKER = re.compile(r"^<!-- example(?: lines=(?P<lines>\d+))?: (?P<command>fxopt [^\n]*?) -->\n```[^\n]*\n",
                    re.M)


@dataclass
class Example:
    command: str
    lines: int | None
    start: int  # offset of the block's first line (after the opening fence)
    end: int    # offset of the closing fence
    shown: str  # what README shows now

    def argv(self) -> list[str]:
        return shlex.split(self.command)[1:]


def examples(text: str) -> list[Example]:
    found = []
    for m in MARKER.finditer(text):
        end = text.index("```", m.end())
        found.append(Example(m["command"], int(m["lines"]) if m["lines"] else None, m.end(), end,
                             text[m.end():end]))
    return found


def output(example: Example) -> str:
    """What the command prints today, cut to the block's length, with the block's trailing newline."""
    from fxopt.cli import main
    stdout, cwd = io.StringIO(), os.getcwd()
    os.chdir(ROOT)  # example paths (docs/examples/...) are relative to the repository root
    try:
        with contextlib.redirect_stdout(stdout):
            code = main(example.argv())
    finally:
        os.chdir(cwd)
    if code != 0:
        raise RuntimeError(f"`{example.command}` exited with {code}")
    lines = stdout.getvalue().rstrip("\n").split("\n")
    if example.lines is not None:
        lines = lines[:example.lines]
    return "\n".join(lines) + "\n"


def write(text: str, outputs: dict | None = None) -> tuple[str, int]:
    """README text with every block replaced by its command's output (``outputs``: command -> text,
    run here when missing), and how many blocks changed."""
    outputs = dict(outputs or {})
    changed = 0
    for example in reversed(examples(text)):  # from the end: earlier offsets stay valid
        key = (example.command, example.lines)
        new = outputs[key] if key in outputs else output(example)
        if new != example.shown:
            changed += 1
            text = text[:example.start] + new + text[example.end:]
    return text, changed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--write", action="store_true", help="rewrite README's blocks from fresh runs")
    args = p.parse_args(argv)
    text = README.read_text()
    if args.write:
        outputs = {(e.command, e.lines): output(e) for e in examples(text)}  # slow: minutes
        fresh = README.read_text()  # others may have edited README meanwhile: substitute into that
        new, changed = write(fresh, outputs)
        README.write_text(new)
        print(f"{changed} of {len(examples(fresh))} README examples rewritten")
        return 0
    stale = 0
    for example in examples(text):
        ok = output(example) == example.shown
        stale += not ok
        print(f"{'ok   ' if ok else 'STALE'} {example.command}")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
