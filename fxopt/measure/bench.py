"""``fxopt bench``: time one training step of a model in several variants, in one process.

Every variant starts from a fresh deepcopy of the same model (same initial weights) and runs the
same full step on fresh random inputs each step: forward, loss (cross-entropy for a [B, C]
classifier output, else the sum of the float outputs' means), backward, SGD-momentum step.
GPU: CUDA events around each step after warm-up (inputs are made outside the timed range), peak
memory from ``torch.cuda.max_memory_allocated``. CPU: ``time.perf_counter``, no memory figure.
FLOPs are the matrix FLOPs (forward + backward) of ``fxopt.analyze`` for the same step, so
TFLOP/s and MFU are comparable across variants. A variant that fails is reported with its reason.
"""
from __future__ import annotations

import copy
import datetime
import json
import logging
import time
import traceback
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from tabulate import tabulate
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

from ..capture import normalize_inputs
from ..errors import FxoptError, InputError


@dataclass(frozen=True)
class Variant:
    """How to build one variant's step: autocast dtype, channels-last model and inputs, and a wrapper."""

    description: str
    autocast: bool = False
    channels_last: bool = False
    wrap: str = "none"   # none | compile | fxopt | fxopt-inductor | fxopt-triton


VARIANTS: dict[str, Variant] = {
    "eager-fp32": Variant("eager PyTorch, fp32"),
    "autocast": Variant("torch.autocast(bfloat16)", autocast=True),
    "autocast-cl": Variant("autocast bf16 + channels-last model and inputs", autocast=True, channels_last=True),
    "compile": Variant("torch.compile of autocast-cl", autocast=True, channels_last=True, wrap="compile"),
    "fxopt": Variant("fxopt.optimize(model, inputs), default pipeline, eager backend", wrap="fxopt"),
    "fxopt-inductor": Variant("fxopt.optimize(..., backend='inductor')", wrap="fxopt-inductor"),
    "fxopt-triton": Variant("fxopt.optimize(..., backend='triton'): fxopt's own fused Triton kernels",
                            wrap="fxopt-triton"),
}
DEFAULT_VARIANTS = tuple(VARIANTS)
# A step-time ratio is only as good as the runs behind it: above this p90/p10 - 1 (in the variant or
# the baseline) the table marks the ratio "?" and says why (a busy machine, clock ramp, recompiles).
SPREAD_LIMIT = 0.10


def _wrap(model: nn.Module, variant: Variant, inputs) -> nn.Module:
    if variant.wrap == "compile":
        return torch.compile(model)
    if variant.wrap.startswith("fxopt"):
        from ..optimize import optimize
        return optimize(model, inputs, backend=variant.wrap.partition("-")[2] or "eager")
    return model


@dataclass
class VariantResult:
    name: str
    description: str
    status: str = "ok"                   # ok | failed
    reason: str = ""
    steps: int = 0
    median_s: float | None = None
    p10_s: float | None = None
    p90_s: float | None = None
    images_per_s: float | None = None
    tflops: float | None = None          # achieved matrix TFLOP/s
    mfu: float | None = None             # vs the hardware's dense bf16 peak
    peak_memory_bytes: int | None = None  # GPU only
    first_step_s: float | None = None    # build (capture, passes, compile) + first step
    step_times_s: list = field(default_factory=list, repr=False)

    @property
    def spread(self) -> float | None:
        """p90/p10 - 1: how much the step time wandered (0.1 = the slow steps were 10 % slower)."""
        if not self.p10_s or self.p90_s is None:
            return None
        return self.p90_s / self.p10_s - 1

    @property
    def noisy(self) -> bool:
        return self.spread is not None and self.spread > SPREAD_LIMIT


@dataclass
class BenchResult:
    model: str
    device: str
    batch: int
    steps: int
    warmup: int
    matrix_flops: int | None
    hardware: str | None
    torch_version: str
    date: str
    results: list[VariantResult]

    def __getitem__(self, name: str) -> VariantResult:
        for r in self.results:
            if r.name == name:
                return r
        raise KeyError(f"no variant {name!r}; have {[r.name for r in self.results]}")

    def table(self, tablefmt: str = "simple") -> str:
        def f(x, scale=1.0, fmt=".3g"):
            return "—" if x is None else format(x * scale, fmt)
        first = next((r for r in self.results if r.status == "ok"), None)
        base = first.median_s if first else None
        rows, noisy = [], []
        for r in self.results:
            if r.status != "ok":
                rows.append([r.name, "FAILED: " + r.reason[:100]] + ["—"] * 7)
                continue
            doubt = r.noisy or first.noisy
            if r.noisy:
                noisy.append(f"{r.name} {r.spread * 100:.0f} %")
            rows.append([r.name, f(r.median_s, 1e3, ".2f"), f"{r.p10_s * 1e3:.2f}–{r.p90_s * 1e3:.2f}",
                         (f"{base / r.median_s:.2f}x" + (" ?" if doubt else "")) if base else "—",
                         f(r.images_per_s, 1, ",.0f"),
                         f(r.tflops, 1, ".2f"), f(r.mfu, 100, ".1f"),
                         f(r.peak_memory_bytes, 2 ** -30, ".2f"), f(r.first_step_s, 1, ".1f")])
        head = ["variant", "step ms (median)", "p10–p90 ms", f"vs {self.results[0].name}", "images/s",
                "TFLOP/s", "MFU %", "peak GiB", "first step s"]
        title = (f"{self.model}, batch {self.batch}, {self.device}, torch {self.torch_version}, "
                 f"median of {self.steps} steps after {self.warmup} warm-up")
        text = title + "\n" + tabulate(rows, headers=head, tablefmt=tablefmt, disable_numparse=True)
        if noisy:
            text += (f"\n? p90/p10 spread above {SPREAD_LIMIT * 100:.0f} % ({', '.join(noisy)}): the ratio "
                     f"is not to be trusted; run more --steps, on an idle machine, with fixed clocks")
        return text

    def to_markdown(self) -> str:
        return self.table(tablefmt="github")

    def to_dict(self) -> dict:
        return {"schema": "fxopt.bench/1", **{k: v for k, v in asdict(self).items() if k != "results"},
                "results": [{**asdict(r), "spread": r.spread, "noisy": r.noisy} for r in self.results]}

    def to_json(self, indent: int = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def __repr__(self) -> str:
        return self.table()


# ---- models ------------------------------------------------------------------------------------
def resolve_bench_model(spec: str, batch: int, tiny: bool = False, image_size: int | None = None):
    """``(name, module, inputs)`` for any MODEL spec (zoo, hf:, timm:, torchvision:, file.py:factory)."""
    from ..workloads.models import resolve
    ms = resolve(spec, batch=batch, tiny=tiny, image_size=image_size)
    return ms.name, ms.model, ms.inputs


# ---- one step ----------------------------------------------------------------------------------
def fresh_inputs(example, device, channels_last: bool = False, generator=None):
    """New random tensors shaped like ``example``: normal floats, ints in the example's range."""
    def make(t):
        if not isinstance(t, torch.Tensor):
            return t
        if t.is_floating_point():
            out = torch.randn(t.shape, dtype=t.dtype, device=device, generator=generator)
            return out.contiguous(memory_format=torch.channels_last) if channels_last and out.dim() == 4 else out
        if t.dtype == torch.bool:
            return t.to(device)
        hi = int(t.max()) + 1 if t.numel() else 1
        return torch.randint(int(t.min()) if t.numel() else 0, max(hi, 1), t.shape, dtype=t.dtype, device=device,
                             generator=generator)
    return tree_map(make, example)


def _batch(inputs) -> int:
    leaves = [t for t in tree_flatten(inputs)[0] if isinstance(t, torch.Tensor) and t.dim()]
    return int(leaves[0].shape[0]) if leaves else 1


def step_loss(out, batch: int) -> torch.Tensor:
    """Cross-entropy on random labels for a single [B, C] output, else sum of the float outputs' means."""
    logits = getattr(out, "logits", None)
    single = logits if isinstance(logits, torch.Tensor) else out
    if isinstance(single, torch.Tensor) and single.dim() == 2 and single.shape[0] == batch and single.shape[1] > 1 \
            and single.is_floating_point():
        labels = torch.randint(0, single.shape[1], (batch,), device=single.device)
        return F.cross_entropy(single.float(), labels)
    if not isinstance(out, (torch.Tensor, dict, tuple, list)) and hasattr(out, "to_tuple"):
        out = out.to_tuple()
    floats = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor) and t.is_floating_point()
              and t.requires_grad]
    if not floats:
        raise InputError("the model's outputs have no float tensor that requires grad: nothing to train")
    return sum(t.float().mean() for t in floats)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _quantile(xs: list[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default)."""
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _run_variant(name: str, variant: Variant, model: nn.Module, example, device: torch.device, steps: int,
                 warmup: int, matrix_flops, peak_flops) -> VariantResult:
    res = VariantResult(name, variant.description)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if variant.autocast else nullcontext())
    batch = _batch(example)
    _sync(device)
    t0 = time.perf_counter()
    m = copy.deepcopy(model).to(device).train()
    if variant.channels_last:
        m = m.to(memory_format=torch.channels_last)
    first = fresh_inputs(example, device, variant.channels_last)
    m = _wrap(m, variant, first)
    opt = torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9)

    def step(inputs):
        args, kwargs = normalize_inputs(inputs)
        with autocast:
            out = m(*args, **kwargs)
            loss = step_loss(out, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(first)
    _sync(device)
    res.first_step_s = time.perf_counter() - t0
    for _ in range(warmup):
        step(fresh_inputs(example, device, variant.channels_last))
    _sync(device)
    times = []
    if device.type == "cuda":
        pairs = []
        for _ in range(steps):
            inputs = fresh_inputs(example, device, variant.channels_last)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step(inputs)
            end.record()
            pairs.append((start, end))
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) * 1e-3 for s, e in pairs]
        res.peak_memory_bytes = int(torch.cuda.max_memory_allocated(device))
    else:
        for _ in range(steps):
            inputs = fresh_inputs(example, device, variant.channels_last)
            t = time.perf_counter()
            step(inputs)
            times.append(time.perf_counter() - t)
    res.steps, res.step_times_s = steps, times
    res.median_s, res.p10_s, res.p90_s = _quantile(times, 0.5), _quantile(times, 0.1), _quantile(times, 0.9)
    res.images_per_s = batch / res.median_s
    if matrix_flops:
        res.tflops = matrix_flops / res.median_s / 1e12
        if peak_flops:
            res.mfu = matrix_flops / res.median_s / peak_flops
    return res


def _matrix_flops(model: nn.Module, example) -> int | None:
    """Matrix FLOPs (forward + backward) of one training step, from the cost model."""
    import warnings

    from ..analyze import UnknownOpWarning, analyze
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnknownOpWarning)
        t = analyze(copy.deepcopy(model).cpu(), tree_map(lambda x: x.cpu() if isinstance(x, torch.Tensor) else x,
                                                          example)).totals
    return int(t["matrix_flops_fwd"] + t["matrix_flops_bwd"])


def bench(model_spec_or_module: "str | nn.Module", inputs=None, variants=DEFAULT_VARIANTS, steps: int = 50,
          warmup: int = 5, device=None, *, batch: int = 128, tiny: bool = False, hardware=None,
          log: Callable[[str], None] | None = None) -> BenchResult:
    """Time a full training step of the model in each of ``variants`` (names in ``VARIANTS``).

    ``device``: default the CUDA GPU when there is one, else the CPU (CPU numbers are wall clock
    and only say the mechanics work). ``hardware``: the preset whose bf16 peak MFU is taken
    against (default: the GPU's preset; none on the CPU, so MFU is then not reported).
    """
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise FxoptError(f"unknown bench variant(s) {unknown}; known: {list(VARIANTS)}")
    if steps < 1 or warmup < 0:
        raise InputError(f"steps must be >= 1 and warmup >= 0, got steps={steps}, warmup={warmup}")
    device = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FxoptError("bench(device='cuda') but no CUDA device is available; pass device='cpu'")
    if isinstance(model_spec_or_module, str):
        name, model, example = resolve_bench_model(model_spec_or_module, batch, tiny)
        example = inputs if inputs is not None else example
    else:
        if inputs is None:
            raise InputError("bench(module) needs example inputs (a tensor, tuple or dict)")
        name, model, example = type(model_spec_or_module).__name__, model_spec_or_module, inputs
    try:
        matrix_flops = _matrix_flops(model, example)
    except Exception as exc:  # a model the cost model cannot trace still gets timed
        if log:
            log(f"no FLOP count ({type(exc).__name__}: {exc}); TFLOP/s and MFU left out")
        matrix_flops = None
    hw_name, peak = None, None
    if hardware is not None or device.type == "cuda":
        from ..cost_models.hardware import load_hardware, preset_for_gpu
        if hardware is None:
            hardware = preset_for_gpu(torch.cuda.get_device_name(device), None)
        if hardware is not None:
            hw = load_hardware(hardware)
            hw_name, peak = hw.name, hw.bf16_peak
    results = []
    from ..progress import progress
    for v in progress(list(variants), desc=f"bench {name}", unit="variant"):
        if log:
            log(f"{name}: {v} ...")
        try:
            results.append(_run_variant(v, VARIANTS[v], model, example, device, steps, warmup, matrix_flops, peak))
        except Exception as exc:  # one failing variant must not stop the others
            tb = traceback.extract_tb(exc.__traceback__)
            where = f" at {tb[-1].filename.rsplit('/', 1)[-1]}:{tb[-1].lineno}" if tb else ""
            results.append(VariantResult(v, VARIANTS[v].description, status="failed",
                                         reason=f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}{where}"))
            if device.type == "cuda":
                torch.cuda.empty_cache()
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result = BenchResult(name, dev_name, _batch(example), steps, warmup, matrix_flops, hw_name, torch.__version__,
                         datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), results)
    noisy = [f"{r.name} ({r.spread * 100:.0f} %)" for r in results if r.status == "ok" and r.noisy]
    if noisy:
        logging.getLogger(__name__).warning(
            "p90/p10 step-time spread above %d %% in %s: ratios against them are not to be trusted",
            SPREAD_LIMIT * 100, ", ".join(noisy))
    return result
