"""What the GPU benchmark scripts share: their output options and the refusal to time on a CPU."""
from __future__ import annotations

import sys

import torch


def add_output_options(p, smoke_help: str) -> None:
    p.add_argument("--out", default=None, help="write the Markdown here (default: stdout)")
    p.add_argument("--json", default=None, help="also write every result as JSON")
    p.add_argument("--cpu-smoke", action="store_true", help=smoke_help)


def refuses_cpu(args, script: str) -> bool:
    """True (after saying why) when there is no GPU and this is not a --cpu-smoke run: CPU
    timings say nothing about a GPU."""
    if args.cpu_smoke or torch.cuda.is_available():
        return False
    print(f"{script}: no CUDA device; this benchmark is for the GPU machine "
          "(use --cpu-smoke to check the script on a CPU)", file=sys.stderr)
    return True


def provenance(script: str, argv, cuda: bool) -> tuple[str, str, str]:
    """(device, UTC date, the command) for a results header."""
    import datetime
    import shlex
    dev = torch.cuda.get_device_name() if cuda else "cpu (smoke run, not a benchmark)"
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    cmd = f"python benchmarks/{script} " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    return dev, date, cmd.strip()


def write_outputs(args, text: str, records) -> None:
    """The Markdown to ``--out`` (or stdout), the records as JSON to ``--json``."""
    import json
    from pathlib import Path
    if args.out:
        Path(args.out).write_text(text)
    else:
        print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=1))
