"""How fast and how lean is `fxopt.analyze`? (CPU; no GPU needed)

1. wall time of capture + analyze for the zoo ViT-B/16 at batch 128 (median of 3 runs);
2. peak RSS of analyzing a 7B-parameter Llama-style decoder (HF LlamaConfig, seq 2048, batch 1),
   built on the meta device: fake tensors allocate nothing, so RSS stays far below the 28 GB the
   fp32 weights would take.
Each measurement runs in its own process so that RSS is that job's alone.

    python benchmarks/analysis_speed.py            # prints a Markdown table for docs/BENCHMARKS.md
"""
from __future__ import annotations

import json
import platform
import statistics
import subprocess
import sys
import time

VIT = r"""
import json, resource, time, torch, fxopt
from fxopt import zoo
with torch.device("meta"):
    model = zoo.build("vit_b16"); x = zoo.example_inputs("vit_b16", 128)
fxopt.analyze(zoo.build("vit_b16", tiny=True), zoo.example_inputs("vit_b16", 2, tiny=True))  # warm imports
times = []
for _ in range(3):
    t0 = time.perf_counter(); r = fxopt.analyze(model, x); times.append(time.perf_counter() - t0)
print(json.dumps({"times": times, "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "step_ms": r.totals["step_time_s"] * 1e3}))
"""

LLAMA_7B = r"""
import json, resource, time, torch, warnings, fxopt
from transformers import LlamaConfig, LlamaForCausalLM
cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=32, vocab_size=32000, max_position_embeddings=2048, use_cache=False)
t0 = time.perf_counter()
with torch.device("meta"):
    model = LlamaForCausalLM(cfg)
    ids = torch.randint(0, 32000, (1, 2048))
r = fxopt.analyze(model, {"input_ids": ids}, dtype="bf16")
print(json.dumps({"time": time.perf_counter() - t0, "params": r.totals["params"],
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "step_ms": r.totals["step_time_s"] * 1e3, "unknown": r.unknown_ops}))
"""


def run(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    import torch
    vit = run(VIT)
    llama = run(LLAMA_7B)
    print(f"CPU: {platform.processor() or platform.machine()}, {__import__('os').cpu_count()} cores; "
          f"torch {torch.__version__}; python {platform.python_version()}; {time.strftime('%Y-%m-%d')}\n")
    print("| job | wall time | peak RSS | target |")
    print("|---|---|---|---|")
    print(f"| analyze ViT-B/16, batch 128, training step (median of 3) | {statistics.median(vit['times']):.2f} s "
          f"| {vit['rss_mb']:.0f} MB | < 3 s |")
    print(f"| build on meta + capture + analyze a {llama['params'] / 1e9:.2f}B Llama decoder, seq 2048, bf16 "
          f"| {llama['time']:.1f} s | {llama['rss_mb']:.0f} MB | < 2 GB RSS |")
    print(f"\npredicted H100 step: ViT-B/16 fp32 b128 {vit['step_ms']:.0f} ms; "
          f"Llama-7B bf16 b1x2048 {llama['step_ms']:.0f} ms; unknown ops in Llama: {llama['unknown'] or 'none'}")


if __name__ == "__main__":
    main()
