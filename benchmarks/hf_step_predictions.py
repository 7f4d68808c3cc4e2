"""Predicted fp32 (TF32 off) training steps of large HF language models on the H100 preset.

The configuration published per-model H100 measurements use (fp32, TF32 off, forward +
backward); those measurements are kept apart to judge the model and are not used here. Models
are built from their configs on the meta device (no weights, no network).

    python benchmarks/hf_step_predictions.py [--batch 8] [--seq 512]
"""
from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fxopt  # noqa: E402
from fxopt.cost_models.roofline import Precision  # noqa: E402

MODELS = {"bert-large": ("BertForMaskedLM", dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                                 intermediate_size=4096)),
          "gpt2-large": ("GPT2LMHeadModel", dict(n_embd=1280, n_layer=36, n_head=20))}


def build(name: str):
    import transformers
    cls_name, kw = MODELS[name]
    cls = getattr(transformers, cls_name)
    config = cls.config_class(**kw)
    with torch.device("meta"):
        return cls(config), config


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--hw", default="h100")
    args = ap.parse_args(argv)
    print(f"Command: `python benchmarks/hf_step_predictions.py --batch {args.batch} --seq {args.seq}` (CPU, "
          f"{datetime.date.today().isoformat()}, torch {torch.__version__}); predictions on {args.hw}, fp32, "
          f"TF32 off, forward + backward (optimizer step listed apart).\n")
    print("| model | params | fwd ms | bwd ms | fwd+bwd ms | optimizer ms | compute / memory / latency / host ms | analysis s |")
    print("|---|---|---|---|---|---|---|---|")
    for name in MODELS:
        model, config = build(name)
        ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), device="meta")
        t0 = time.time()
        r = fxopt.analyze(model, {"input_ids": ids, "labels": ids}, hardware=args.hw,
                          precision=Precision(tf32_matmul=False, tf32_conv=False))
        t = {k: float(v) * 1e3 for k, v in r.totals.items() if k.endswith("_s")}
        split = " / ".join(f"{t[k]:.1f}" for k in ("compute_bound_s", "memory_bound_s", "latency_s", "host_bound_s"))
        print(f"| {name} | {r.params / 1e6:.0f} M | {t['fwd_time_s']:.1f} | {t['bwd_time_s']:.1f} | "
              f"{t['fwd_time_s'] + t['bwd_time_s']:.1f} | {t['optimizer_time_s']:.1f} | {split} | {time.time() - t0:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
