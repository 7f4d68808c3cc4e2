"""Training-step benchmark for docs/BENCHMARKS.md (GPU): ``fxopt.bench`` of the zoo and timm models
at batch 128, 224x224, every variant (eager-fp32, autocast, autocast-cl, compile, fxopt,
fxopt-inductor), one training step with SGD momentum, median of ``--steps`` steps.

    python benchmarks/train_step.py                              # all models -> Markdown on stdout
    python benchmarks/train_step.py --models zoo:resnet50 timm:resnet50 --out bench.md --json bench.json
    python benchmarks/train_step.py --cpu-smoke                  # tiny models, few steps, CPU ok

Refuses on a machine without CUDA unless ``--cpu-smoke`` (CPU numbers say nothing about a GPU).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from _cli import add_output_options, provenance, refuses_cpu, write_outputs  # noqa: E402  (benchmarks/_cli.py)
from fxopt.measure.bench import DEFAULT_VARIANTS, bench  # noqa: E402

MODELS = ["resnet50", "convnext_t", "vit_b16", "driving",
          "timm:resnet50", "timm:convnext_tiny", "timm:vit_base_patch16_224"]
SMOKE_MODELS = ["resnet50", "vit_b16"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=None, help=f"default: {' '.join(MODELS)}")
    p.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS))
    p.add_argument("--batch", type=int, default=None, help="default 128 (2 with --cpu-smoke)")
    p.add_argument("--steps", type=int, default=None, help="default 50 (2 with --cpu-smoke)")
    p.add_argument("--warmup", type=int, default=None, help="default 5 (1 with --cpu-smoke)")
    add_output_options(p, "tiny models, few steps; runs without a GPU")
    args = p.parse_args(argv)
    if refuses_cpu(args, "train_step.py"):
        return 2
    smoke = args.cpu_smoke
    models = args.models or (SMOKE_MODELS if smoke else MODELS)
    batch = args.batch or (2 if smoke else 128)
    steps = args.steps or (2 if smoke else 50)
    warmup = args.warmup if args.warmup is not None else (1 if smoke else 5)
    variants = [v for v in args.variants if not (smoke and v in ("compile", "fxopt-inductor"))] \
        if smoke and args.variants == list(DEFAULT_VARIANTS) else args.variants
    device = "cuda" if torch.cuda.is_available() and not smoke else "cpu"

    results = []
    for spec in models:
        try:
            res = bench(spec, variants=variants, steps=steps, warmup=warmup, device=device, batch=batch,
                        tiny=smoke, log=lambda m: print(m, file=sys.stderr, flush=True))
        except Exception as exc:  # a model that does not build (timm missing) is reported, not fatal
            print(f"{spec}: skipped ({type(exc).__name__}: {exc})", file=sys.stderr)
            results.append({"model": spec, "error": f"{type(exc).__name__}: {exc}"})
            continue
        print(res.table(), file=sys.stderr)
        results.append(res)

    dev, date, cmd = provenance("train_step.py", argv, device == "cuda")
    lines = [f"## Training step: {dev}, torch {torch.__version__}, {date}", "",
             f"Batch {batch}, one training step (forward, loss, backward, SGD momentum), fresh random inputs "
             f"each step, median of {steps} steps after {warmup} warm-up (CUDA events); p10–p90 spread; "
             f"MFU vs the dense bf16 peak; first step = capture + passes + compile + one step.", "",
             f"Command: `{cmd}`", ""]
    for res in results:
        if isinstance(res, dict):
            lines += [f"### {res['model']}", "", f"not run: {res['error']}", ""]
        else:
            lines += [f"### {res.model}", "", res.to_markdown(), ""]
    write_outputs(args, "\n".join(lines), [r if isinstance(r, dict) else r.to_dict() for r in results])
    return 0


if __name__ == "__main__":
    sys.exit(main())
