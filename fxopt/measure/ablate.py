"""``fxopt.ablate``: does an optimized model still *train* like the original, and how much sooner does
it reach the same loss?

Every variant of one seed starts from the same initial weights (the model is built once per seed
under ``torch.manual_seed(seed)`` and deep-copied per variant), sees the same batches in the same
order and, re-seeded before its first step, the same dropout stream. Per step it records the
training loss and the wall time of the step (``torch.cuda.synchronize()`` before each clock
read on CUDA; producing and moving the batch is not timed); at the end, the loss (and accuracy,
for class labels) on held-out batches.

The rules, all stated in :attr:`AblationResult.rule` and :attr:`AblationResult.constants`:

* **final loss** of a run: the mean training loss over its last ``K = min(steps, max(5,
  round(0.1 * steps)))`` steps; a variant's final loss is the mean over seeds, its spread the
  sample standard deviation across seeds (ddof=1).
* **parity** of variant v with the baseline b: ``|mean_v - mean_b| <= max(2 * std_b, 0.05 *
  |mean_b|)``, two-sided (a variant that trains *better* is not at parity either: it computes
  something else). With one seed, ``std_b`` is 0 and only the relative tolerance applies. A
  variant that diverged (non-finite loss) is not at parity; one that failed has no verdict.
* **time to target**: each run's loss curve is smoothed with a trailing moving average of ``W =
  max(1, min(10, steps // 10))`` steps; a run reaches the target at the first step whose smoothed
  loss is <= ``target_loss``; its time is the summed wall time of the steps up to and including
  that one (setup, i.e. ``fxopt.optimize`` and capture, excluded and reported apart). A variant's
  time is the mean over its seeds, defined only when every seed reached the target.
  Default ``target_loss``: the largest, over the baseline's seeds, of the smoothed baseline loss at
  90 % of the steps, so every baseline seed reaches it by then.
* **speedup**: the baseline's time to target divided by the variant's.

The baseline is the variant named ``"eager"`` if there is one, else the first (or ``baseline=``).

Parity is about convergence, not equivalence: training absorbs some wrong rewrites. On the tiny
ViT (AdamW, 2 seeds x 40 steps), a pass scaling the classifier weight by 10 inside the graph stays
within the parity band (it reaches the target 1.7x later and loses 8 points of held-out accuracy);
one scaling the qkv weight by 10 does not. Equivalence is what ``fxopt.verify`` checks; ablate
answers whether the optimized model still trains as well, and how much sooner.
"""
from __future__ import annotations

import copy
import inspect
import json
import math
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Iterable, Mapping
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..workloads.data import accuracy, default_loss
from ..capture import normalize_inputs
from ..errors import FxoptError

__all__ = ["ablate", "AblationResult", "VariantResult", "RunResult", "AblationError", "PRESETS",
           "K_STD", "REL_TOL", "TAIL_FRACTION", "MIN_TAIL", "SMOOTH", "TARGET_FRACTION"]

# The statistical rule's constants (see the module docstring).
K_STD = 2.0            # parity band: this many baseline seed-to-seed standard deviations ...
REL_TOL = 0.05         # ... or this fraction of the baseline's final loss, whichever is larger
TAIL_FRACTION = 0.1    # the final loss is the mean over the last 10 % of the steps ...
MIN_TAIL = 5           # ... but at least 5 steps (all of them, for shorter runs)
SMOOTH = 10            # trailing moving-average window (steps) for time to target, at most steps // 10
TARGET_FRACTION = 0.9  # default target: the baseline's smoothed loss at 90 % of the steps
EVAL_BATCHES = 4       # held-out batches evaluated at the end, when the data offers held_out()

#: Named variant configurations (the CLI's ``--variants``).
PRESETS: dict[str, dict | None] = {
    "eager": None,                                                             # the untouched model
    "fxopt": {},                                                               # fxopt.optimize defaults
    "amp": {"optimize": False, "autocast": "bf16"},                            # eager under autocast
    "amp-cl": {"optimize": False, "autocast": "bf16", "channels_last": True},  # ... and channels-last
    "fxopt-amp-cl": {"autocast": "bf16", "channels_last": True},
}

_OWN_KEYS = {"optimize", "autocast", "channels_last", "lr_scale", "optimizer_fn", "transform"}
_AUTOCAST = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


class AblationError(FxoptError, ValueError):
    """Bad arguments to :func:`ablate` (variants, data, seeds, steps)."""


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------

@dataclass
class RunResult:
    """One (seed, variant) training run."""

    seed: int
    losses: list[float] = field(default_factory=list)       # finite losses, one per completed step
    step_times_s: list[float] = field(default_factory=list)  # wall time of each step
    setup_s: float = 0.0                                     # fxopt.optimize (capture, passes, verify)
    eval_loss: float | None = None
    eval_acc: float | None = None
    eval_error: str | None = None
    diverged_at: int | None = None                           # step whose loss was not finite

    @property
    def complete(self) -> bool:
        return self.diverged_at is None

    def smoothed(self, window: int) -> list[float]:
        """Trailing moving average: point t is the mean of losses[max(0, t-window+1) : t+1]."""
        out, acc = [], 0.0
        for t, v in enumerate(self.losses):
            acc += v
            if t >= window:
                acc -= self.losses[t - window]
            out.append(acc / min(t + 1, window))
        return out

    def cumulative_time(self) -> list[float]:
        out, acc = [], 0.0
        for dt in self.step_times_s:
            acc += dt
            out.append(acc)
        return out


@dataclass
class VariantResult:
    """One variant over all seeds, with its summary statistics and verdict."""

    name: str
    config: dict | None
    status: str = "ok"                  # ok | failed | diverged
    reason: str | None = None           # why it failed or diverged
    traceback: str | None = None
    runs: list[RunResult] = field(default_factory=list)
    final_loss: float | None = None     # mean over seeds of the last-K-steps mean training loss
    final_std: float | None = None      # sample std across seeds (0 with one seed)
    eval_loss: float | None = None
    eval_acc: float | None = None
    median_step_s: float | None = None
    setup_s: float | None = None        # mean over seeds
    steps_to_target: float | None = None
    time_to_target_s: float | None = None
    reached: int = 0                    # seeds whose smoothed loss reached the target
    speedup: float | None = None        # baseline time to target / this variant's
    parity: bool | None = None
    verdict: str = "-"                  # baseline | parity | NOT parity | diverged | failed | n/a
    detail: str = ""                    # the numbers behind the verdict

    @property
    def optimized(self) -> bool:
        """Whether this variant trains through fxopt.optimize (else the eager model)."""
        return self.config is not None and bool(self.config.get("optimize", True))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["config"] = _jsonable(self.config)
        return d


@dataclass
class AblationResult:
    """What :func:`ablate` measured; ``table()``, ``plot(path)``, ``to_json()``; index by variant name."""

    variants: list[VariantResult]
    baseline: str
    steps: int
    seeds: list[int]
    device: str
    target_loss: float | None
    target_source: str                  # "given" or how the default was derived
    rule: str
    constants: dict

    def __getitem__(self, name: str) -> VariantResult:
        for v in self.variants:
            if v.name == name:
                return v
        raise KeyError(f"no variant {name!r}; variants: {[v.name for v in self.variants]}")

    @property
    def verdicts(self) -> dict[str, str]:
        return {v.name: v.verdict for v in self.variants}

    def table(self, tablefmt: str = "simple") -> str:
        from tabulate import tabulate
        rows = []
        for v in self.variants:
            final = "-" if v.final_loss is None else (
                f"{v.final_loss:.4f}" + ("" if len(v.runs) < 2 or v.final_std is None else f" ± {v.final_std:.4f}"))
            if v.status == "ok" and v.time_to_target_s is None and self.target_loss is not None:
                to_target = f"not reached ({v.reached}/{len(v.runs)})"
            else:
                to_target = _fmt(v.time_to_target_s, ".3g")
            rows.append([v.name, v.status, final,
                         _fmt(v.eval_loss, ".4f"), _fmt(v.eval_acc, ".3f"),
                         _fmt(None if v.median_step_s is None else v.median_step_s * 1e3, ".3g"),
                         _fmt(v.setup_s if v.optimized else None, ".3g"), _fmt(v.steps_to_target, ".0f"), to_target,
                         "-" if v.speedup is None else f"{v.speedup:.2f}x", v.verdict])
        head = ["variant", "status", "final loss", "eval loss", "eval acc", "step ms", "setup s",
                "steps to target", "time to target s", "speedup", "verdict"]
        target = "-" if self.target_loss is None else f"{self.target_loss:.4f} ({self.target_source})"
        lines = [tabulate(rows, headers=head, tablefmt=tablefmt, disable_numparse=True), "",
                 f"baseline: {self.baseline}; {self.steps} steps x {len(self.seeds)} seeds {self.seeds} on "
                 f"{self.device}; target loss {target}", f"rule: {self.rule}"]
        for v in self.variants:
            if v.detail:
                lines.append(f"  {v.name}: {v.detail}")
            if v.reason:
                lines.append(f"  {v.name}: {v.status}: {v.reason}")
        return "\n".join(lines)

    def to_markdown(self) -> str:
        return self.table(tablefmt="github")

    def to_dict(self) -> dict:
        return {"schema": "fxopt.ablation/1", "baseline": self.baseline, "steps": self.steps,
                "seeds": self.seeds, "device": self.device, "target_loss": self.target_loss,
                "target_source": self.target_source, "rule": self.rule, "constants": self.constants,
                "variants": [v.to_dict() for v in self.variants]}

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def plot(self, path) -> Path:
        """Loss against step and against training wall time, one line per variant (the mean over seeds
        of the smoothed curves), the seeds' min..max shaded, the target dashed. PNG, SVG or PDF by
        the file's suffix."""
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np

        path = Path(path)
        window = self.constants["smooth_window"]
        fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(12, 4.5))
        styles = ("-", "--", "-.", ":")
        kept = []  # (min, max, first point) of the variants that trained normally: they set the y range
        for i, v in enumerate(self.variants):
            runs = [r for r in v.runs if r.losses]
            if not runs:
                continue
            n = max(len(r.losses) for r in runs)
            pad = lambda xs: np.array(list(xs) + [np.nan] * (n - len(xs)), dtype=float)  # noqa: E731
            curves = np.stack([pad(r.smoothed(window)) for r in runs])
            times = np.stack([pad(r.cumulative_time()) for r in runs])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns after a divergence
                mean, lo, hi = np.nanmean(curves, 0), np.nanmin(curves, 0), np.nanmax(curves, 0)
                t = np.nanmean(times, 0)
            if v.status == "ok":
                kept.append((np.nanmin(lo), np.nanmax(hi), np.nanmax(curves[:, 0])))
            label = v.name + ("" if v.status == "ok" else f" ({v.status})")
            style = dict(color=f"C{i % 10}", ls=styles[i % len(styles)], lw=1.5)
            for ax, x in ((by_step, np.arange(n)), (by_time, t)):
                ax.plot(x, mean, label=label, **style)
                if len(runs) > 1:
                    ax.fill_between(x, lo, hi, color=style["color"], alpha=0.15, lw=0)
        low = min((k[0] for k in kept), default=None)
        high = max((max(k[1] if np.isfinite(k[1]) else k[2], k[2]) for k in kept), default=None)
        log = low is not None and low > 0 and high / low > 10
        for ax, xlabel in ((by_step, "step"), (by_time, "training wall time (s, setup excluded)")):
            if self.target_loss is not None:
                ax.axhline(self.target_loss, color="grey", ls="--", lw=1, label="target")
            if log:
                ax.set_yscale("log")
            if low is not None and high > low:  # diverging variants leave the frame instead of flattening it
                pad = (high / low) ** 0.05 if log else 0.05 * (high - low)
                ax.set_ylim(*((low / pad, high * pad) if log else (low - pad, high + pad)))
            ax.set_xlabel(xlabel)
            ax.set_ylabel(f"training loss (moving average of {window})")
            ax.grid(alpha=0.3)
        by_step.legend()
        fig.suptitle(f"{self.steps} steps x {len(self.seeds)} seeds on {self.device}; shaded: min..max over seeds")
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
        plt.close(fig)
        return path

    def __str__(self) -> str:
        return self.table()


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _jsonable(obj):
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return repr(obj)


# ---------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------

def _optimize_keys() -> set[str]:
    from ..optimize import optimize
    return set(inspect.signature(optimize).parameters) - {"model", "example_inputs"}


def _check_variants(variants) -> dict[str, dict]:
    """Validate every configuration up front (a typo should not cost a training run); returns
    name -> normalized config (``optimize`` always present)."""
    if not isinstance(variants, Mapping) or not variants:
        raise AblationError("variants must be a non-empty dict: name -> None (the eager model) or a dict of "
                            "fxopt.optimize keyword arguments, e.g. {'eager': None, 'fxopt': {}}")
    allowed = _optimize_keys()
    out = {}
    for name, cfg in variants.items():
        if not isinstance(name, str) or not name:
            raise AblationError(f"variant names must be non-empty strings, got {name!r}")
        if cfg is None:
            out[name] = {"optimize": False}
            continue
        if not isinstance(cfg, Mapping):
            raise AblationError(f"variant {name!r}: a config is None or a dict, got {type(cfg).__name__}")
        cfg = dict(cfg)
        cfg.setdefault("optimize", True)
        unknown = set(cfg) - allowed - _OWN_KEYS
        if unknown:
            raise AblationError(f"variant {name!r}: unknown keys {sorted(unknown)}; fxopt.optimize takes "
                                f"{sorted(allowed)}, ablate itself {sorted(_OWN_KEYS)}")
        if not cfg["optimize"] and set(cfg) & allowed:
            raise AblationError(f"variant {name!r} has optimize=False but fxopt.optimize options "
                                f"{sorted(set(cfg) & allowed)}")
        if cfg.get("autocast") is not None and cfg["autocast"] not in _AUTOCAST:
            raise AblationError(f"variant {name!r}: autocast must be one of {sorted(_AUTOCAST)} or None, "
                                f"got {cfg['autocast']!r}")
        lr_scale = cfg.get("lr_scale", 1.0)
        if not isinstance(lr_scale, (int, float)) or not lr_scale > 0:
            raise AblationError(f"variant {name!r}: lr_scale must be a positive number, got {lr_scale!r}")
        if cfg.get("optimizer_fn") is not None and not callable(cfg["optimizer_fn"]):
            raise AblationError(f"variant {name!r}: optimizer_fn must be callable(params) -> Optimizer")
        if cfg.get("transform") is not None and not callable(cfg["transform"]):
            raise AblationError(f"variant {name!r}: transform must be callable(model) -> model")
        out[name] = cfg
    return out


def _seeds(seeds) -> list[int]:
    if isinstance(seeds, bool):
        raise AblationError(f"seeds is a count or a list of ints, got {seeds!r}")
    if isinstance(seeds, int):
        if seeds < 1:
            raise AblationError(f"seeds must be >= 1, got {seeds}")
        return list(range(seeds))
    try:
        out = [int(s) for s in seeds]
    except (TypeError, ValueError):
        raise AblationError(f"seeds is a count or a list of ints, got {seeds!r}") from None
    if not out or len(set(out)) != len(out):
        raise AblationError(f"seeds must be a non-empty list of distinct ints, got {seeds!r}")
    return out


def _is_per_seed(data) -> bool:
    return callable(data) and not isinstance(data, Iterable)


def _replayable(data):
    """Re-iterables pass through; a one-shot iterator (a generator) is materialized once."""
    if not isinstance(data, Iterable) or isinstance(data, (torch.Tensor, str, bytes, Mapping)):
        raise AblationError(f"data must be an iterable of (inputs, target) batches (a list, a DataLoader, "
                            f"fxopt.data.teacher_images(...)) or a function seed -> such an iterable; "
                            f"got {type(data).__name__}")
    return list(data) if iter(data) is data else data


def _batches(data, steps: int):
    """``steps`` batches from ``data``, starting again from its first batch when it runs out."""
    n = 0
    while n < steps:
        empty = True
        for batch in data:
            empty = False
            if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
                raise AblationError(f"each batch must be a pair (inputs, target), got {type(batch).__name__}"
                                    + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else ""))
            yield batch
            n += 1
            if n == steps:
                return
        if empty:
            raise AblationError("data yielded no batches")


def _to(obj, device, channels_last: bool = False):
    if isinstance(obj, torch.Tensor):
        obj = obj.to(device, non_blocking=True)
        if channels_last and obj.dim() == 4 and obj.is_floating_point():
            obj = obj.contiguous(memory_format=torch.channels_last)
        return obj
    if isinstance(obj, dict):
        return {k: _to(v, device, channels_last) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(v, device, channels_last) for v in obj)
    return obj


def _default_optimizer(params):
    """AdamW, lr 1e-3, torch's other defaults: robust across conv nets and transformers without tuning."""
    return torch.optim.AdamW(params, lr=1e-3)


# ---------------------------------------------------------------------------------------------
# Progress
# ---------------------------------------------------------------------------------------------

class _Progress:
    """One status line on stderr: rewritten in place on a terminal, one line per run otherwise."""

    def __init__(self, enabled: bool, steps: int, stream=None):
        self.stream = stream or sys.stderr
        self.enabled, self.steps = enabled, steps
        self.tty = enabled and getattr(self.stream, "isatty", lambda: False)()
        self.last = 0.0
        self.prefix = ""

    def start(self, prefix: str) -> None:
        self.prefix = prefix

    def step(self, step: int, loss: float, step_s: float) -> None:
        if not self.tty:
            return
        now = time.monotonic()
        if now - self.last < 0.1 and step + 1 < self.steps:
            return
        self.last = now
        self.stream.write(f"\r{self.prefix}  step {step + 1:>{len(str(self.steps))}}/{self.steps}  "
                          f"loss {loss:.4f}  {step_s * 1e3:.3g} ms/step\x1b[K")
        self.stream.flush()

    def end(self, message: str) -> None:
        if self.enabled:
            self.stream.write(("\r" if self.tty else "") + f"{self.prefix}  {message}" + ("\x1b[K" if self.tty else "")
                              + "\n")
            self.stream.flush()


# ---------------------------------------------------------------------------------------------
# One run
# ---------------------------------------------------------------------------------------------

class _Failed(Exception):
    """A variant could not be set up or trained; carries the reason shown in the report."""


def _reason(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text if len(text) <= 2000 else text[:2000] + " ..."


def _run(base: nn.Module, cfg: dict, seed: int, data, eval_data, steps: int, device: torch.device,
         optimizer_fn, loss_fn, progress: _Progress) -> RunResult:
    from ..optimize import optimize

    run = RunResult(seed)
    cuda = device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    channels_last = bool(cfg.get("channels_last"))
    amp = _AUTOCAST.get(cfg.get("autocast"))
    autocast = (lambda: torch.autocast(device.type, dtype=amp)) if amp is not None else nullcontext
    batches = _batches(data, steps)
    first = _to(next(batches), device, channels_last)

    model = copy.deepcopy(base).to(device)
    if cfg.get("transform") is not None:  # an architecture change (fxopt.explore): new modules seeded per seed
        torch.manual_seed(seed)
        try:
            model = cfg["transform"](model)
        except Exception as exc:
            raise _Failed(f"transform failed: {_reason(exc)}") from exc
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    if cfg["optimize"]:
        options = {k: v for k, v in cfg.items() if k not in _OWN_KEYS}
        args, kwargs = normalize_inputs(first[0])
        sync()
        t0 = time.perf_counter()
        try:
            model = optimize(model, kwargs or args, **options)
        except Exception as exc:
            raise _Failed(f"fxopt.optimize failed: {_reason(exc)}") from exc
        sync()
        run.setup_s = time.perf_counter() - t0

    make_optimizer = cfg.get("optimizer_fn") or optimizer_fn or _default_optimizer
    try:
        opt = make_optimizer(model.parameters())
    except Exception as exc:
        raise _Failed(f"optimizer_fn failed: {_reason(exc)}") from exc
    for group in opt.param_groups:
        group["lr"] = group["lr"] * cfg.get("lr_scale", 1.0)
    scaler = torch.amp.GradScaler(device.type) if amp is torch.float16 else None

    torch.manual_seed(seed)  # the same dropout stream for every variant of this seed
    batch = first
    for step in range(steps):
        if step:
            batch = _to(next(batches), device, channels_last)
        x, y = batch
        args, kwargs = normalize_inputs(x)
        try:
            sync()
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            with autocast():
                loss = loss_fn(model(*args, **kwargs), y)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()
            sync()
            dt = time.perf_counter() - t0
            value = float(loss.detach().float().item())
        except Exception as exc:
            raise _Failed(f"training step {step} failed: {_reason(exc)}") from exc
        if not math.isfinite(value):
            run.diverged_at = step
            return run
        run.losses.append(value)
        run.step_times_s.append(dt)
        progress.step(step, value, dt)

    if eval_data is not None:
        try:
            model.eval()
            losses, accs = [], []
            with torch.no_grad(), autocast():
                for x, y in eval_data:
                    x, y = _to(x, device, channels_last), _to(y, device)
                    args, kwargs = normalize_inputs(x)
                    out = model(*args, **kwargs)
                    losses.append(float(loss_fn(out, y).float().item()))
                    accs.append(accuracy(out, y))
            run.eval_loss = statistics.fmean(losses) if losses else None
            run.eval_acc = statistics.fmean(accs) if accs and None not in accs else None
        except Exception as exc:
            run.eval_error = _reason(exc)
    return run


def _warm_up(base: nn.Module, data, steps: int, device: torch.device, optimizer_fn, loss_fn) -> None:
    """A few untimed eager training steps on a throwaway copy (errors are left to the real runs)."""
    try:
        model = copy.deepcopy(base).to(device).train()
        opt = (optimizer_fn or _default_optimizer)(model.parameters())
        for x, y in _batches(data, steps):
            args, kwargs = normalize_inputs(_to(x, device))
            opt.zero_grad(set_to_none=True)
            loss_fn(model(*args, **kwargs), _to(y, device)).backward()
            opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except AblationError:
        raise
    except Exception:
        pass


# ---------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------

def _tail(steps: int) -> int:
    return min(steps, max(MIN_TAIL, round(TAIL_FRACTION * steps)))


def _window(steps: int) -> int:
    return max(1, min(SMOOTH, steps // 10))


def _std(xs: list[float]) -> float:
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def _summarize(v: VariantResult, steps: int) -> None:
    done = [r for r in v.runs if r.complete]
    if v.status != "failed" and done and len(done) == len(v.runs):
        finals = [statistics.fmean(r.losses[-_tail(steps):]) for r in done]
        v.final_loss, v.final_std = statistics.fmean(finals), _std(finals)
    evals = [r.eval_loss for r in done if r.eval_loss is not None]
    accs = [r.eval_acc for r in done if r.eval_acc is not None]
    v.eval_loss = statistics.fmean(evals) if evals and len(evals) == len(done) else None
    v.eval_acc = statistics.fmean(accs) if accs and len(accs) == len(done) else None
    times = [t for r in v.runs for t in r.step_times_s]
    v.median_step_s = statistics.median(times) if times else None
    v.setup_s = statistics.fmean(r.setup_s for r in v.runs) if v.runs else None
    bad = [f"step {r.diverged_at} (seed {r.seed})" for r in v.runs if not r.complete]
    if bad and v.status == "ok":
        v.status = "diverged"
        v.reason = "non-finite loss at " + ", ".join(bad)
    errors = [f"seed {r.seed}: {r.eval_error}" for r in v.runs if r.eval_error]
    if errors:
        v.detail = (v.detail + "; " if v.detail else "") + "evaluation failed: " + "; ".join(errors)


def _time_to_target(v: VariantResult, target: float, window: int) -> None:
    hits = []
    for r in v.runs:
        smoothed = r.smoothed(window)
        hit = next((t for t, s in enumerate(smoothed) if s <= target), None)
        if hit is not None:
            hits.append((hit, sum(r.step_times_s[:hit + 1])))
    v.reached = len(hits)
    if v.runs and len(hits) == len(v.runs) and v.status == "ok":
        v.steps_to_target = statistics.fmean(h for h, _ in hits)
        v.time_to_target_s = statistics.fmean(t for _, t in hits)


def _default_target(b: VariantResult, steps: int, window: int) -> float | None:
    if b.status != "ok" or not b.runs:
        return None
    at = max(0, math.ceil(TARGET_FRACTION * steps) - 1)
    return max(r.smoothed(window)[at] for r in b.runs)


def _verdicts(variants: list[VariantResult], b: VariantResult) -> None:
    for v in variants:
        if v is b:
            v.verdict, v.parity = ("baseline", True) if v.status == "ok" else (v.status, None)
            continue
        if v.status == "failed":
            v.verdict, v.parity = "failed", None
        elif b.final_loss is None:
            v.verdict, v.parity = "n/a", None
            v.detail = f"no verdict: the baseline {b.status}"
        elif v.status == "diverged":
            v.verdict, v.parity = "diverged", False
        else:
            diff = abs(v.final_loss - b.final_loss)
            tol = max(K_STD * b.final_std, REL_TOL * abs(b.final_loss))
            v.parity = diff <= tol
            v.verdict = "parity" if v.parity else "NOT parity"
            v.detail = (f"|{v.final_loss:.4g} - {b.final_loss:.4g}| = {diff:.3g} {'<=' if v.parity else '>'} "
                        f"tol {tol:.3g} = max({K_STD:g} * {b.final_std:.3g}, {REL_TOL:g} * {abs(b.final_loss):.4g})")


def _rule(steps: int) -> str:
    return (f"parity iff |mean_v - mean_b| <= max({K_STD:g} * std_b, {REL_TOL:g} * |mean_b|), where mean is the mean "
            f"over seeds of each run's mean training loss over its last {_tail(steps)} steps and std_b the "
            f"baseline's sample std (ddof=1) of that across seeds; time to target: first step whose trailing "
            f"{_window(steps)}-step moving average is <= the target, summed step wall time, mean over seeds")


# ---------------------------------------------------------------------------------------------
# The entry point
# ---------------------------------------------------------------------------------------------

def ablate(model_fn: Callable[[], nn.Module], variants: Mapping[str, dict | None], data, *, steps: int,
           seeds=3, optimizer_fn: Callable | None = None, target_loss: float | None = None, device=None,
           loss_fn: Callable | None = None, eval_data=None, baseline: str | None = None,
           warmup: int = 3, progress: bool = True) -> AblationResult:
    """Train every variant of ``model_fn()``'s model for ``steps`` steps on each seed and compare.

    ``model_fn()`` builds a fresh model (called once per seed, under ``torch.manual_seed(seed)``).
    ``variants``: name -> ``None`` (the untouched eager model) or a dict of ``fxopt.optimize``
    keyword arguments (pipeline, backend, hardware, verify, ...) plus ablate's own keys:
    ``optimize`` (False: train the eager model, e.g. with only autocast), ``autocast`` ("bf16" or
    "fp16": forward and loss under ``torch.autocast``; fp16 with a GradScaler), ``channels_last``
    (model and 4-D inputs), ``lr_scale`` (multiplies every param group's lr), ``optimizer_fn``
    (this variant's own) and ``transform`` (``model -> model`` applied to the variant's copy of the
    initial model under ``torch.manual_seed(seed)``: an architecture change, as fxopt.explore makes).
    See :data:`PRESETS`.
    ``data``: an iterable of ``(inputs, target)`` batches that yields the same batches each time it
    is iterated (a list, a DataLoader without shuffling, :func:`fxopt.data.teacher_images`), cycled
    when shorter than ``steps``; a generator is read once and kept; or a function ``seed -> such an
    iterable``. ``inputs`` is a tensor, a tuple of positional inputs or a dict of keyword inputs.
    ``loss_fn(output, target)``: default :func:`fxopt.data.default_loss` (cross-entropy for integer
    targets, MSE for float ones, summed over dict heads).
    ``eval_data``: held-out batches for the final eval loss/accuracy; default
    ``data.held_out(4)`` when the data has one (the built-in data does), else no evaluation.
    ``optimizer_fn(params) -> Optimizer``: default AdamW(lr=1e-3).
    ``target_loss``: default, the baseline's smoothed loss at 90 % of the steps (see the module doc).
    ``device``: default CUDA when available, else CPU. ``seeds``: a count or a list of ints.
    ``warmup``: untimed training steps of a throwaway eager copy before the first run, so that the
    first variant timed does not pay for the process's one-time start-up (library handles, kernel
    caches, the allocator); each variant's own first steps are timed as part of its run.

    A variant that fails (in fxopt.optimize or in training) is reported as failed with the reason;
    the others still run. A non-finite loss stops that run; the step is reported. The caller's
    global RNG state is left as it was.
    """
    if isinstance(model_fn, nn.Module) or not callable(model_fn):
        raise AblationError("model_fn must be a function that builds a fresh model (it is called once per seed), "
                            "e.g. lambda: fxopt.zoo.build('resnet50', tiny=True)")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise AblationError(f"steps must be a positive int, got {steps!r}")
    configs = _check_variants(variants)
    seed_list = _seeds(seeds)
    if baseline is None:
        baseline = "eager" if "eager" in configs else next(iter(configs))
    if baseline not in configs:
        raise AblationError(f"baseline {baseline!r} is not a variant: {list(configs)}")
    if target_loss is not None and not math.isfinite(float(target_loss)):
        raise AblationError(f"target_loss must be a finite number, got {target_loss!r}")
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise AblationError("device is cuda but torch sees no CUDA device")
    loss_fn = loss_fn or default_loss
    fixed = None if _is_per_seed(data) else _replayable(data)
    if eval_data is not None:
        eval_data = _replayable(eval_data)

    results = {name: VariantResult(name, None if variants[name] is None else dict(variants[name]))
               for name in configs}
    bar = _Progress(progress, steps)
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        for si, seed in enumerate(seed_list):
            source = _replayable(data(seed)) if fixed is None else fixed
            held = eval_data
            if held is None and callable(getattr(source, "held_out", None)):
                held = source.held_out(EVAL_BATCHES)
            torch.manual_seed(seed)
            base = model_fn()
            if not isinstance(base, nn.Module):
                raise AblationError(f"model_fn returned {type(base).__name__}, not an nn.Module")
            if si == 0 and warmup > 0:
                _warm_up(base, source, warmup, device, optimizer_fn, loss_fn)
            for vi, (name, cfg) in enumerate(configs.items()):
                v = results[name]
                if v.status == "failed":
                    continue
                bar.start(f"ablate seed {seed} ({si + 1}/{len(seed_list)}) {name} ({vi + 1}/{len(configs)})")
                try:
                    run = _run(base, cfg, seed, source, held, steps, device, optimizer_fn, loss_fn, bar)
                except _Failed as exc:
                    v.status, v.reason = "failed", f"seed {seed}: {exc}"
                    v.traceback = "".join(traceback.format_exception(exc.__cause__ or exc))
                    bar.end(f"FAILED: {str(exc).splitlines()[0][:200]}")
                    continue
                v.runs.append(run)
                if run.complete:
                    med = statistics.median(run.step_times_s) * 1e3
                    bar.end(f"done: final loss {run.losses[-1]:.4f}, {med:.3g} ms/step"
                            + (f", setup {run.setup_s:.2f} s" if run.setup_s else ""))
                else:
                    bar.end(f"DIVERGED: non-finite loss at step {run.diverged_at}")
                if device.type == "cuda":
                    torch.cuda.empty_cache()

    ordered = list(results.values())
    for v in ordered:
        _summarize(v, steps)
    b = results[baseline]
    window = _window(steps)
    if target_loss is not None:
        target, source_text = float(target_loss), "given"
    else:
        target = _default_target(b, steps, window)
        source_text = (f"max over seeds of the baseline's smoothed loss at step "
                       f"{max(0, math.ceil(TARGET_FRACTION * steps) - 1)}") if target is not None else "no baseline"
    if target is not None:
        for v in ordered:
            _time_to_target(v, target, window)
        if b.time_to_target_s:
            for v in ordered:
                if v.time_to_target_s:
                    v.speedup = b.time_to_target_s / v.time_to_target_s
    _verdicts(ordered, b)
    constants = {"k_std": K_STD, "rel_tol": REL_TOL, "tail_steps": _tail(steps), "smooth_window": window,
                 "target_fraction": TARGET_FRACTION}
    return AblationResult(ordered, baseline, steps, seed_list, str(device), target, source_text, _rule(steps),
                          constants)


# ---------------------------------------------------------------------------------------------
# Command line: ``fxopt ablate MODEL --variants eager,fxopt --steps 300 --seeds 3 --plot out.png``
# ---------------------------------------------------------------------------------------------

def add_cli(sub) -> None:
    """Register the ``ablate`` subcommand on an argparse subparsers object."""
    a = sub.add_parser("ablate", help="train variants of MODEL side by side: convergence parity and time to target")
    a.add_argument("model", help="zoo name (see `fxopt models`) or path/to/file.py:factory; images in, "
                                 "class logits or a dict of heads out")
    a.add_argument("--variants", default="eager,fxopt",
                   help=f"comma-separated presets: {', '.join(PRESETS)} (default: eager,fxopt)")
    a.add_argument("--pipeline", default=None, help="pipeline of the fxopt* variants (default: fxopt's)")
    a.add_argument("--steps", type=int, default=300)
    a.add_argument("--seeds", type=int, default=3)
    a.add_argument("--batch", type=int, default=16)
    a.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    a.add_argument("--tiny", action="store_true", help="the model's tiny test variant")
    a.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when available)")
    a.add_argument("--target-loss", type=float, default=None)
    a.add_argument("--no-verify", dest="verify", action="store_false", help="skip fxopt.optimize's verification")
    a.add_argument("--plot", default=None, help="write the loss curves to this .png/.svg")
    a.add_argument("--json", default=None, help="also write the --format json document (curves included) here")
    a.add_argument("--format", choices=["table", "md", "json"], default="table",
                   help="json: the fxopt.ablation document on stdout (the same as --json FILE writes)")
    a.set_defaults(func=cmd_ablate)


def cmd_ablate(args) -> int:
    """``fxopt ablate``: exit status 0 when every variant is at parity, 1 otherwise."""
    from ..workloads.data import auto_data
    from ..workloads.models import resolve
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in PRESETS]
    if unknown:
        raise AblationError(f"unknown variants {unknown}; presets: {', '.join(PRESETS)}")
    variants = {}
    for n in names:
        cfg = None if PRESETS[n] is None else dict(PRESETS[n])
        if cfg is not None and cfg.get("optimize", True):
            cfg["verify"] = args.verify
            if args.pipeline:
                cfg["pipeline"] = args.pipeline
        variants[n] = cfg
    spec = resolve(args.model, batch=args.batch, tiny=args.tiny)
    if not isinstance(spec.inputs, tuple) or len(spec.inputs) != 1 or not spec.inputs[0].is_floating_point():
        raise AblationError(f"{spec.name}: the built-in data are images (one float tensor input); for other "
                            f"inputs call fxopt.ablate(...) with your own data and loss_fn")
    model_fn = lambda: resolve(args.model, batch=args.batch, tiny=args.tiny).model  # noqa: E731
    device = torch.device(args.device) if args.device else None
    data = auto_data(model_fn, spec.inputs[0].shape[1:], args.steps, args.batch, seed=0, device=device)
    result = ablate(model_fn, variants, data, steps=args.steps, seeds=args.seeds, device=device,
                    optimizer_fn=lambda p: torch.optim.AdamW(p, lr=args.lr), target_loss=args.target_loss)
    notes = sys.stderr if args.format == "json" else sys.stdout  # stdout stays one JSON document
    if args.format == "json":
        print(result.to_json())
    else:
        print(f"{spec.name}, data: {data!r}")
        print(result.to_markdown() if args.format == "md" else result.table())
    if args.plot:
        print(f"plot written to {result.plot(args.plot)}", file=notes)
    if args.json:
        Path(args.json).write_text(result.to_json())
        print(f"result written to {args.json}", file=notes)
    return 0 if all(v.verdict in ("baseline", "parity") for v in result.variants) else 1
