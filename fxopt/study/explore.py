"""``fxopt.explore``: propose architecture changes for a model, build them, predict their speed, and
check that they still learn as well.

For every rule of :data:`fxopt.explore_rules.RULES` that matches modules of the model, one
*candidate* is built: a deep copy of the model with every matching module replaced (module
surgery; the user's model is never touched), named ``<rule>@<module paths>``. Each candidate is
costed with :func:`fxopt.analyze` (one training step, on fake tensors: full-size models built on
the ``meta`` device work) and compared with the original: predicted step time, MFU, parameters,
FLOPs, activation memory, and the arithmetic intensity and time of the modules it touched.
Candidates are ranked by predicted saving; slower ones stay in the table, marked slower.

Exact rules (fused SDPA, BN folding, 1x1 conv as GEMM, concat + 1x1 conv as summed per-branch
projections) are verified numerically with :func:`fxopt.verify` on each distinct touched module
(random weights, CPU, batch 1 of the recorded shapes); a candidate that fails is marked so and
never called exact. Every other candidate changes the function and carries no equivalence claim;
with ``ablate={"steps": N, "seeds": k}`` the top ones (and the best compatible pair) are trained
side by side with :func:`fxopt.ablate` from the same initial weights and data, giving a parity
verdict under ablate's rule and the **predicted time to the original's target loss** = steps to
target x predicted step time.
"""
from __future__ import annotations

import copy
import inspect
import json
import logging
import os
import re
import sys
import time
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable

import torch
from tabulate import tabulate
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from ..analyze import UnknownOpWarning, analyze
from ..capture import normalize_inputs
from ..errors import FxoptError
from .explore_rules import RULES, UNCOVERED, Rule, Site, attention_spec
from ..cost_models.hardware import DEFAULT_PRESET

__all__ = ["explore", "propose", "ExploreResult", "Candidate", "ExploreError", "ABLATE_DEFAULTS", "source_line"]

log = logging.getLogger(__name__)
SCHEMA = "fxopt.explore/1"

#: ``ablate=`` keys and their defaults: top non-exact candidates trained, whether the best compatible
#: pair is trained too, the batch of the built-in data and AdamW's learning rate.
ABLATE_DEFAULTS = {"steps": 60, "seeds": 2, "top": 3, "combine": True, "batch": 8, "lr": 1e-3, "data": None,
                   "model_fn": None, "device": None, "target_loss": None, "progress": False, "candidates": None}
VERIFY_SITES = 4  # distinct (module type, input shapes) verified per exact candidate
BASELINE = "original"


class ExploreError(FxoptError, ValueError):
    """Bad arguments to :func:`explore` (rules, ablate options, inputs)."""


@dataclass
class Candidate:
    """One proposed architecture change, its build and its predicted (and, if ablated, trained) effect."""

    name: str
    rule: str
    family: str
    module_path: str          # the touched module paths, numbers globbed ("blocks.*.norm1")
    sites: list[str]          # every touched module path
    exact: bool               # the rule claims the same function (then: verified below)
    description: str          # what changes, where (module path and source line)
    why: str
    risk: str
    meta_model: nn.Module | None = field(default=None, repr=False)  # the candidate on the meta device (costed)
    transform: Callable | None = field(default=None, repr=False)  # model -> candidate model (same rule)
    source: nn.Module | None = field(default=None, repr=False)      # the user's model (never modified)
    status: str = "ok"        # ok | failed | verify failed
    reason: str | None = None
    verified: bool | None = None   # exact rules: fxopt.verify on the touched modules
    verify_detail: str = ""
    step_time_s: float | None = None
    mfu: float | None = None
    params: int | None = None
    flops: int | None = None
    activation_bytes: int | None = None
    touched_time_s: tuple | None = None   # (original, candidate) predicted time of the touched modules
    touched_ai: tuple | None = None       # (original, candidate) FLOP/byte of the touched modules
    saving_s: float | None = None         # original step - candidate step (negative: slower)
    verdict: str | None = None            # ablation: parity | NOT parity | diverged | failed
    verdict_detail: str = ""
    steps_to_target: float | None = None  # steps (count) the smoothed loss needs to reach the target
    time_to_target_s: float | None = None  # predicted: steps_to_target x predicted step time

    @property
    def model(self) -> nn.Module | None:
        """The candidate as a trainable module: built (once, on first use) from a deep copy of the user's
        model with its weights; the meta-device build when the user's model has no real weights."""
        if self.source is None or _on_meta(self.source) or self.meta_model is None:
            return self.meta_model
        if getattr(self, "_real", None) is None:
            self._real = self.transform(copy.deepcopy(self.source))
        return self._real

    @property
    def speedup(self) -> float | None:
        return None if not self.step_time_s or self.saving_s is None else \
            (self.step_time_s + self.saving_s) / self.step_time_s

    @property
    def slower(self) -> bool:
        return self.saving_s is not None and self.saving_s < 0

    def to_dict(self) -> dict:
        keys = ("name", "rule", "family", "module_path", "sites", "exact", "description", "why", "risk", "status",
                "reason", "verified", "verify_detail", "step_time_s", "mfu", "params", "flops", "activation_bytes",
                "touched_time_s", "touched_ai", "saving_s", "verdict", "verdict_detail", "steps_to_target",
                "time_to_target_s")
        return {**{k: _plain(getattr(self, k)) for k in keys}, "speedup": self.speedup, "slower": self.slower}


@dataclass
class ExploreResult:
    """Candidates ranked by predicted saving (failed ones last); ``table()``, ``to_json()``, ``[name]``."""

    model: str
    hardware: str
    baseline: dict            # the original's predicted metrics
    candidates: list[Candidate]
    not_applicable: list[str]  # selected rules that matched nothing
    uncovered: dict            # families of the issue this module does not build, and why
    elapsed_s: float
    ablation: object = None    # fxopt.AblationResult when ablate= was given
    ablation_settings: dict | None = None
    report: object = field(default=None, repr=False)  # the original's GraphReport (for html())

    def __getitem__(self, name: str) -> Candidate:
        for c in self.candidates:
            if c.name == name:
                return c
        raise KeyError(f"no candidate {name!r}; candidates: {[c.name for c in self.candidates]}")

    def table(self, top: int | None = None, tablefmt: str = "simple") -> str:
        b = self.baseline
        head = ["#", "candidate", "exact", "status", "step ms", "saving ms", "speedup", "MFU %", "params M",
                "GFLOP", "act GB", "touched FLOP/B", "verdict", "steps->target", "time->target s"]
        rows = [["", BASELINE, "-", "baseline", _f(b["step_time_s"], 1e3), "", "", _f(b["mfu"], 100),
                 _f(b["params"], 1e-6), _f(b["flops"], 1e-9), _f(b["activation_bytes"], 1e-9), "",
                 "baseline" if self.ablation else "", _f(b.get("steps_to_target"), 1, ".0f"),
                 _f(b.get("time_to_target_s"), 1)]]
        for i, c in enumerate(self.candidates[:top] if top else self.candidates, 1):
            exact = "no" if not c.exact else ("yes, verified" if c.verified else "NOT verified")
            status = c.status if c.status != "ok" else ("slower" if c.slower else "faster" if c.saving_s else "same")
            ai = "" if not c.touched_ai else f"{c.touched_ai[0]:.3g} -> {c.touched_ai[1]:.3g}"
            rows.append([i, c.name, exact, status, _f(c.step_time_s, 1e3), _f(c.saving_s, 1e3),
                         "" if c.speedup is None else f"{c.speedup:.3f}x", _f(c.mfu, 100), _f(c.params, 1e-6),
                         _f(c.flops, 1e-9), _f(c.activation_bytes, 1e-9), ai, c.verdict or "",
                         _f(c.steps_to_target, 1, ".0f"), _f(c.time_to_target_s, 1)])
        lines = [tabulate(rows, headers=head, tablefmt=tablefmt, disable_numparse=True), "",
                 f"{self.model}: PREDICTED by fxopt's cost model on {self.hardware} (one training step); "
                 f"explored in {self.elapsed_s:.1f} s. Exact candidates are verified numerically; every other "
                 f"candidate changes the function"
                 + (" and is judged only by its ablation verdict." if self.ablation else
                    " (run with ablate= for a parity verdict).")]
        if self.ablation is not None:
            s = self.ablation_settings or {}
            lines.append(f"ablation: {self.ablation.steps} steps x {len(self.ablation.seeds)} seeds on "
                         f"{self.ablation.device}, batch {s.get('batch')}; time->target = steps to the original's "
                         f"target loss {_f(self.ablation.target_loss, 1, '.4f')} x predicted step time")
            lines.append(f"rule: {self.ablation.rule}")
        for c in self.candidates[:top] if top else self.candidates:
            lines.append(f"  {c.name}: {c.description}")
            if c.reason:
                lines.append(f"      {c.status}: {c.reason}")
            if c.verdict_detail:
                lines.append(f"      ablation: {c.verdict_detail}")
        if self.not_applicable:
            lines.append(f"rules that matched nothing: {', '.join(self.not_applicable)}")
        if self.uncovered:
            lines.append("not built by any rule: " + "; ".join(f"{k} ({v})" for k, v in self.uncovered.items()))
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"schema": SCHEMA, "model": self.model, "hardware": self.hardware, "baseline": _plain(self.baseline),
                "candidates": [c.to_dict() for c in self.candidates], "not_applicable": self.not_applicable,
                "uncovered": self.uncovered, "elapsed_s": self.elapsed_s,
                "ablation": None if self.ablation is None else self.ablation.to_dict()}

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent, default=str)

    def html_section(self, top: int | None = 10) -> str:
        """An HTML fragment (heading, ranked table, notes) for fxopt's HTML report."""
        import html
        table, notes = self.table(top, tablefmt="html").split("\n\n", 1)
        return (f"<section id='explore'><h2>Architecture candidates of {html.escape(self.model)} (predicted)</h2>\n"
                f"{table}\n<pre>{html.escape(notes)}</pre></section>")

    def html(self, path=None, top: int | None = 10) -> str:
        """fxopt's HTML report of the original (summary, hottest blocks, roofline, ...) with this
        section in it; written to ``path`` when given."""
        from ..render.html import html_report
        return html_report(self.report, path, lint=None, explore=self, top=top or 15,
                           title=f"fxopt explore: {self.model}")

    def __repr__(self) -> str:
        return f"<ExploreResult {self.model}: {len(self.candidates)} candidates>\n{self.table()}"


# ---------------------------------------------------------------------------------------------
# small helpers


def _f(x, scale, spec: str = ".4g") -> str:
    return "" if x is None else format(x * scale, spec)


def _plain(x):
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, (int, float, str, bool)) or x is None:
        return x
    try:
        return float(x)
    except (TypeError, ValueError):
        return str(x)


def _select(rules) -> list[Rule]:
    """"all", or rule names / families (a list or a comma-separated string)."""
    if rules in (None, "all"):
        return list(RULES)
    if isinstance(rules, Rule):
        rules = [rules]
    own = [r for r in ([] if isinstance(rules, str) else rules) if isinstance(r, Rule)]
    if own:  # the caller's own Rule objects (and names)
        return own + _select([r for r in rules if not isinstance(r, Rule)]) if len(own) < len(rules) else own
    names = [r.strip() for r in rules.split(",")] if isinstance(rules, str) else list(rules)
    known = {r.name for r in RULES} | {r.family for r in RULES}
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise ExploreError(f"unknown rules {unknown or names}; rules: {', '.join(r.name for r in RULES)}; "
                           f"families: {', '.join(sorted({r.family for r in RULES}))}")
    return [r for r in RULES if r.name in names or r.family in names]


def _check_ablate(ablate) -> dict | None:
    if ablate is None:
        return None
    if not isinstance(ablate, dict):
        raise ExploreError(f"ablate is a dict like {{'steps': 60, 'seeds': 2}}, got {type(ablate).__name__}")
    unknown = set(ablate) - set(ABLATE_DEFAULTS)
    if unknown:
        raise ExploreError(f"unknown ablate keys {sorted(unknown)}; known: {sorted(ABLATE_DEFAULTS)}")
    out = {**ABLATE_DEFAULTS, **ablate}
    for key in ("steps", "top", "batch"):
        if not isinstance(out[key], int) or isinstance(out[key], bool) or out[key] < 1:
            raise ExploreError(f"ablate[{key!r}] must be a positive int, got {out[key]!r}")
    return out


def _on_meta(model: nn.Module) -> bool:
    t = next(iter(model.parameters()), None)
    return t is not None and t.is_meta


def _device_of(model: nn.Module) -> torch.device:
    t = next(iter(model.parameters()), None)
    return t.device if t is not None else torch.device("cpu")


def _meta_copy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model) if _on_meta(model) else copy.deepcopy(model).to("meta")


def _to_meta(x):
    return tree_map(lambda t: t.to("meta") if isinstance(t, torch.Tensor) else t, x)


def _call(model: nn.Module, inputs):
    args, kwargs = normalize_inputs(inputs)
    return model(*args, **kwargs)


def _record(model: nn.Module, inputs) -> dict[str, Site]:
    """Every module's first call (inputs, output: meta tensors) and its call count."""
    sites: dict[str, Site] = {}
    handles = []
    for path, mod in model.named_modules():
        def hook(m, args, kwargs, out, path=path):
            if path in sites:
                sites[path].calls += 1
            else:
                sites[path] = Site(path, m, tuple(args), dict(kwargs), out, training=model.training)
        handles.append(mod.register_forward_hook(hook, with_kwargs=True))
    try:  # with autograd on: each recorded input says whether it requires grad in the model
        _call(model, inputs)
    except Exception as exc:
        raise ExploreError(f"the model does not run on its example inputs (on the meta device): "
                           f"{type(exc).__name__}: {exc}; check the inputs, or build the model so that its forward "
                           f"needs no real values") from exc
    finally:
        for h in handles:
            h.remove()
    return sites


def _shapes(tree) -> list:
    return [tuple(t.shape) if isinstance(t, torch.Tensor) else t for t in tree_flatten(tree)[0]]


def _glob(paths: list[str]) -> str:
    """Touched paths with block indices globbed: ``blocks.*.norm1,norm``."""
    if paths == [""]:
        return "(model)"
    groups: dict[str, list[str]] = {}
    for p in paths:
        groups.setdefault(re.sub(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.|$)", "*", p), []).append(p)
    globs = [g if len(ps) > 1 else ps[0] for g, ps in groups.items()]
    return ",".join(globs) if len(globs) <= 3 else ",".join(globs[:2]) + f",+{len(globs) - 2} more"


@lru_cache(maxsize=256)
def _class_source(cls: type):
    try:
        lines, start = inspect.getsourcelines(cls)
        return inspect.getsourcefile(cls), lines, start
    except (OSError, TypeError):
        return None


def _short(path: str) -> str:
    try:
        rel = os.path.relpath(path)
        return rel if not rel.startswith("..") else os.path.join(*path.split(os.sep)[-2:])
    except ValueError:
        return path


def source_line(root: nn.Module, path: str) -> str:
    """``file.py:line: code`` where the user's code creates the module at ``path`` (the innermost
    non-torch class that assigns it), or the model class's definition for the whole model."""
    parts = path.split(".") if path else []
    while True:
        owner = root.get_submodule(".".join(parts[:-1])) if parts else root
        cls = type(owner)
        src = None if cls.__module__.startswith("torch.") else _class_source(cls)
        if src is not None:
            file, lines, start = src
            if parts:
                pat = re.compile(rf"self\.{re.escape(parts[-1])}\s*(:[^=]*)?=(?!=)")
                for i, line in enumerate(lines):
                    if pat.search(line):
                        return f"{_short(file)}:{start + i}: {line.strip()}"
            return f"{_short(file)}:{start}: class {cls.__name__}"
        if not parts:
            return ""
        parts = parts[:-1]


def _brief(m: nn.Module) -> str:
    inner = m.extra_repr()
    if not inner and len(m._modules):
        kinds = [type(c).__name__ for c in m.children()]
        runs = [(k, sum(1 for _ in g)) for k, g in __import__("itertools").groupby(kinds)]
        inner = ", ".join(f"{n} x {k}" if n > 1 else k for k, n in runs)
    text = f"{type(m).__name__}({inner})"
    return text if len(text) <= 70 else text[:67] + "..."


def _set(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, attr = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, new)


def _apply(model: nn.Module, rule: Rule, recorded: dict[str, Site], paths: list[str]) -> nn.Module:
    """``model`` (modified in place, returned) with every module at ``paths`` rebuilt by ``rule``."""
    device = _device_of(model)
    for path in paths:
        rec = recorded[path]
        old = model.get_submodule(path) if path else model
        site = Site(path, old, rec.args, rec.kwargs, rec.output, rec.calls, rec.training, device)
        new = rule.build(old, site)
        if not path:
            return new
        _set(model, path, new)
    return model


def _transform(rule: Rule, recorded: dict[str, Site], paths: list[str]) -> Callable:
    return lambda model: _apply(model, rule, recorded, paths)


def _sites(rule: Rule, recorded: dict[str, Site], training: bool) -> list[str]:
    """Paths of the modules ``rule`` matches (none inside another match; the root only for model-level rules)."""
    out: list[str] = []
    for path, site in recorded.items():
        if (path == "") != rule.model_level:
            continue
        if any(path.startswith(p + ".") for p in out):
            continue
        site.training = training
        try:
            if rule.match(site):
                out.append(path)
        except Exception as exc:  # a matcher must not take the whole exploration down
            log.warning("explore: rule %s could not inspect %s: %s", rule.name, path or "(model)", exc)
    return out


def _check_outputs(rule: Rule, recorded: dict[str, Site], paths: list[str], cand: nn.Module) -> str | None:
    """Why the rebuilt modules do not fit (different output shapes), or None."""
    for path in paths:
        rec = recorded[path]
        new = cand.get_submodule(path) if path else cand
        try:
            with torch.no_grad():
                out = new(*rec.args, **(rec.kwargs or {}))
        except Exception as exc:
            return f"the rebuilt {path or 'model'} does not run: {type(exc).__name__}: {exc}"
        if _shapes(out) != _shapes(rec.output):
            return f"the rebuilt {path or 'model'} changes the output shapes {_shapes(rec.output)} -> {_shapes(out)}"
    return None


# ---------------------------------------------------------------------------------------------
# costing


def _metrics(report) -> dict:
    t = report.totals
    return {"step_time_s": float(t["step_time_s"]), "mfu": float(t["mfu"]), "params": int(t["params"]),
            "flops": int(sum(c.flops for c in report.calls)), "bytes": int(t["bytes"]),
            "activation_bytes": int(t["activation_bytes"]),
            "matrix_flops": float(t["matrix_flops_fwd"] + t["matrix_flops_bwd"])}


def _touched(report, paths: list[str]) -> tuple[float, float, float]:
    """(FLOPs, bytes, predicted seconds) of the calls of the modules at ``paths`` (and below)."""
    flops = nbytes = secs = 0.0
    for c, t in zip(report.calls, report.call_times):
        mod = report.nodes[c.node].module
        if any(p == "" or mod == p or mod.startswith(p + ".") for p in paths):
            flops += c.flops
            nbytes += c.bytes_read + c.bytes_written
            secs += float(t.total_s)
    return flops, nbytes, secs


class _Probe(nn.Module):
    """One module alone, called with its recorded inputs; inputs that required grad in the model are
    multiplied by a scalar parameter so that the module's input gradients are costed too (the
    multiply is the same in the original's and the candidate's probe, and cancels)."""

    def __init__(self, block: nn.Module, args: tuple, kwargs: dict):
        super().__init__()
        self.block = block
        flat, spec = tree_flatten((tuple(args), dict(kwargs)))  # tensors inside lists count too
        self.unflatten = lambda vals: tree_unflatten(vals, spec)  # a function: deep copies share it
        self.tensor = [isinstance(t, torch.Tensor) for t in flat]
        self.consts = [None if is_t else t for t, is_t in zip(flat, self.tensor)]
        self.grad = [is_t and t.requires_grad for t, is_t in zip(flat, self.tensor)]
        dev = next((t.device for t in flat if isinstance(t, torch.Tensor)), torch.device("meta"))
        self.scale = nn.Parameter(torch.ones((), device=dev))

    def inputs(self, args: tuple, kwargs: dict) -> tuple:
        return tuple(t.detach() for t in tree_flatten((tuple(args), dict(kwargs)))[0] if isinstance(t, torch.Tensor))

    def forward(self, *tensors):
        it = iter(tensors)
        vals = [(next(it) * self.scale if g else next(it)) if is_t else c
                for is_t, g, c in zip(self.tensor, self.grad, self.consts)]
        args, kwargs = self.unflatten(vals)
        return self.block(*args, **kwargs)


def _site_key(module: nn.Module, rec: Site) -> tuple:
    """Modules with this key cost the same: structure (repr), input shapes/dtypes, which inputs need grad."""
    sig = [(tuple(t.shape), t.dtype, t.requires_grad) if isinstance(t, torch.Tensor) else repr(t)
           for t in tree_flatten((rec.args, rec.kwargs))[0]]
    return type(module), repr(module), tuple(sig), module.training


def _probe_report(module: nn.Module, rec: Site, cache: dict, hardware, training, dtype, optimizer):
    """The report of one module costed alone (cached by :func:`_site_key`)."""
    key = _site_key(module, rec)
    if key not in cache:
        probe = _Probe(module, rec.args, rec.kwargs or {})
        cache[key] = _cost(probe, probe.inputs(rec.args, rec.kwargs or {}), hardware, training, dtype, optimizer)
    return cache[key]


def _cost_units(path: str, recorded: dict[str, Site], model: nn.Module) -> list[tuple]:
    """(path, recorded call, rebuilt module) units to cost for a touched path. A rebuilt container of
    blocks (depth-width) is costed block by block, each with the recorded call of the original block
    at its index (such blocks keep the stream's shape), so identical blocks are analyzed once."""
    rec, new = recorded[path], model.get_submodule(path)
    blocks = (nn.Sequential, nn.ModuleList)
    if isinstance(new, blocks) and isinstance(rec.module, blocks) and len(new) <= len(rec.module) \
            and all(f"{path}.{i}" in recorded for i in range(len(new))):
        return [(f"{path}.{i}", recorded[f"{path}.{i}"], b) for i, b in enumerate(new)]
    return [(path, rec, new)]


def _site_of(module: str, roots: list[str]) -> str | None:
    return next((p for p in roots if module == p or module.startswith(p + ".")), None)


def _spliced(c: Candidate, recorded: dict[str, Site], cache: dict, base_report, cost_args: tuple):
    """The candidate's report without analyzing it whole: the original's calls, with each touched
    module's calls replaced (in place, per phase) by those of the rebuilt module costed alone, and the
    optimizer's traffic scaled to the new parameter count; the report's own rules then give the step
    (kernel times, host dispatch, critical path)."""
    from dataclasses import replace

    from ..report import GraphReport
    units = [u for p in c.sites for u in _cost_units(p, recorded, c.meta_model)]
    new_calls: dict[tuple, list] = {}
    nodes, saved = dict(base_report.nodes), {}
    for path, rec, module in units:
        rep = _probe_report(module, rec, cache, *cost_args)
        for call in rep.calls:
            info = rep.nodes[call.node]
            if _site_of(info.module, ["block"]) is None:
                continue  # the probe's input scaling and optimizer
            name = f"{path}/{call.node}"
            nodes[name] = replace(info, name=name, module=path + info.module[len("block"):])
            new_calls.setdefault((path, call.phase), []).append(replace(call, node=name))
        saved.update({f"{path}/{n}": b for n, b in rep.saved_bytes.items()
                      if _site_of(rep.nodes[n].module, ["block"]) is not None})
    params = sum(p.numel() for p in c.meta_model.parameters())
    ratio = params / base_report.params if base_report.params else 1.0
    unit_paths = [u[0] for u in units]
    calls, done = [], set()
    for call in base_report.calls:
        root = _site_of(base_report.nodes[call.node].module, c.sites)
        if root is None:
            calls.append(call if call.phase != "opt" else
                         replace(call, flops=call.flops * ratio, bytes_read=call.bytes_read * ratio,
                                 bytes_written=call.bytes_written * ratio))
        elif (root, call.phase) not in done:
            done.add((root, call.phase))
            for p in unit_paths if call.phase == "fwd" else reversed(unit_paths):
                if _site_of(p, [root]) is not None:
                    calls.extend(new_calls.get((p, call.phase), []))
    saved.update({n: b for n, b in base_report.saved_bytes.items()
                  if n not in base_report.nodes or _site_of(base_report.nodes[n].module, c.sites) is None})
    return GraphReport(model=base_report.model, calls=calls, nodes=nodes, hardware=base_report.hardware,
                       precision=base_report.precision, params=params, saved_bytes=saved,
                       training=base_report.training, inputs=base_report.inputs)


def _cost(model: nn.Module, inputs, hardware, training: bool, dtype, optimizer):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnknownOpWarning)
        return analyze(model, inputs, hardware=hardware, training=training, dtype=dtype, optimizer=optimizer)


def _fill_cost(c: Candidate, report, base_report, base: dict) -> None:
    m = _metrics(report)
    c.step_time_s, c.mfu, c.params = m["step_time_s"], m["mfu"], m["params"]
    c.flops, c.activation_bytes = m["flops"], m["activation_bytes"]
    c.saving_s = base["step_time_s"] - m["step_time_s"]
    f0, b0, t0 = _touched(base_report, c.sites)
    f1, b1, t1 = _touched(report, c.sites)
    c.touched_time_s = (t0, t1)
    c.touched_ai = (f0 / b0 if b0 else 0.0, f1 / b1 if b1 else 0.0)


# ---------------------------------------------------------------------------------------------
# verification of exact rules


def _randomize(m: nn.Module, seed: int) -> nn.Module:
    """A CPU copy of ``m`` with seeded random values (variances positive)."""
    m = copy.deepcopy(m)
    if _on_meta(m) or any(b.is_meta for b in m.buffers()):
        m = m.to_empty(device="cpu")
    else:
        m = m.to("cpu")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(m.named_parameters()) + list(m.named_buffers()):
            if not t.is_floating_point():
                t.zero_()
            elif name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            else:
                fan_in = t[0].numel() if t.dim() > 1 else 4  # torch-default-like scale: outputs of O(1)
                t.copy_(torch.randn(t.shape, generator=g) / fan_in ** 0.5)
    return m


def _probe(x):
    """A real CPU tensor of ``x``'s shape with batch 1."""
    if not isinstance(x, torch.Tensor):
        return x
    shape = (1, *x.shape[1:]) if x.dim() else ()
    return torch.randn(shape, dtype=x.dtype) if x.is_floating_point() else torch.zeros(shape, dtype=x.dtype)


def _verify(rule: Rule, recorded: dict[str, Site], paths: list[str]) -> tuple[bool, str]:
    """fxopt.verify on each distinct (type, input shapes) touched module, rebuilt by the rule from random weights."""
    from ..verify import verify
    seen, notes = set(), []
    for path in paths:
        rec = recorded[path]
        key = (type(rec.module), tuple(map(str, _shapes((rec.args, rec.kwargs)))))
        if key in seen or len(seen) >= VERIFY_SITES:
            continue
        seen.add(key)
        original = _randomize(rec.module, seed=len(seen))  # a deep copy: every submodule keeps its mode
        site = Site(path, original, rec.args, rec.kwargs, rec.output, rec.calls, rec.training, torch.device("cpu"))
        try:
            cand = rule.build(original, site)
        except Exception as exc:
            return False, f"{path}: building on the CPU failed: {type(exc).__name__}: {exc}"
        cand = copy.deepcopy(cand)  # the rule may share submodules with the original
        args, kwargs = tree_map(_probe, (tuple(rec.args), dict(rec.kwargs or {})))
        if args and kwargs:
            return False, f"{path}: called with positional and keyword inputs, which fxopt.verify cannot replay"
        # fxopt.verify puts every module in one mode: a site with a frozen (eval) submodule inside a
        # training model is verified in eval mode (forward), where the frozen module behaves as in training
        mixed = len({m.training for m in original.modules()}) > 1
        training = rec.module.training and not mixed
        try:
            res = verify(original, cand, kwargs or args, training=training, device="cpu")
        except FxoptError as exc:
            return False, f"{path}: {exc}"
        if not res.ok:
            bad = next((c for c in res.checks if not c.ok), None)
            return False, f"{path}: {bad.name if bad else '?'} differs beyond the rule ({res.rule})"
        notes.append(f"{path} (outputs in eval mode: it holds frozen submodules)" if mixed else
                     f"{path} (outputs, input/param grads, params after an SGD step)")
    return True, f"fxopt.verify passed on {'; '.join(notes)}"


# ---------------------------------------------------------------------------------------------
# ablation


def _ablate(model, inputs, picked: list[Candidate], settings: dict):
    from ..measure.ablate import ablate as run_ablation
    from ..workloads.data import auto_data
    model_fn = settings["model_fn"]
    if model_fn is None:
        if _on_meta(model):
            raise ExploreError("ablate= trains the candidates, and this model has no real weights (meta device); "
                               "pass ablate={'model_fn': <function building it on the CPU/GPU>, ...}")
        model_fn = lambda: copy.deepcopy(model)  # noqa: E731  every seed starts from the user's weights
    data = settings["data"]
    if data is None:
        args, kwargs = normalize_inputs(inputs)
        if kwargs or len(args) != 1 or not isinstance(args[0], torch.Tensor) or not args[0].is_floating_point():
            raise ExploreError("the built-in ablation data are images (one float tensor input); pass "
                               "ablate={'data': iterable of (inputs, target) batches, ...}")
        data = auto_data(model_fn, args[0].shape[1:], settings["steps"], settings["batch"], seed=0,
                         device=settings["device"])
    variants = {BASELINE: None, **{c.name: {"optimize": False, "transform": c.transform} for c in picked}}
    lr = settings["lr"]
    return run_ablation(model_fn, variants, data, steps=settings["steps"], seeds=settings["seeds"],
                        optimizer_fn=lambda p: torch.optim.AdamW(p, lr=lr), device=settings["device"],
                        target_loss=settings["target_loss"], baseline=BASELINE, progress=settings["progress"])


def _needs_model_fn(model: nn.Module, ablate) -> bool:
    return isinstance(ablate, dict) and ablate.get("model_fn") is None and _on_meta(model)


def _disjoint(a: Candidate, b: Candidate) -> bool:
    def overlaps(p, q):
        return p == q or p == "" or q == "" or p.startswith(q + ".") or q.startswith(p + ".")
    return not any(overlaps(p, q) for p in a.sites for q in b.sites)


# ---------------------------------------------------------------------------------------------
# the entry point


def explore(model: nn.Module, inputs, hardware=DEFAULT_PRESET, rules="all", ablate: dict | None = None, *,
            dtype=None, training: bool | None = None, optimizer: str | None = "sgd",
            verify: bool = True, full_cost: bool = False, name: str | None = None) -> ExploreResult:
    """Propose, build and cost architecture changes of ``model`` (see the module doc).

    ``inputs``: example inputs (a tensor, tuple or dict); the model may live on the ``meta`` device.
    ``rules``: "all", or rule names / families (list or comma-separated; see
    :data:`fxopt.explore_rules.RULES`). ``dtype``/``optimizer``/``hardware``: as :func:`fxopt.analyze`.
    ``training``: cost a training step (default: the model's mode).
    ``full_cost``: analyze every candidate whole; by default only the touched modules are analyzed
    (each distinct one once, alone, with its recorded inputs and their gradients) and their change is
    added to the original's step: the same numbers while the step is a sum of per-kernel times, and
    seconds instead of minutes on full-size models.
    ``rules`` may also hold your own :class:`fxopt.explore_rules.Rule` objects.
    ``ablate``: ``{"steps", "seeds", "top", "combine", "batch", "lr", "data", "model_fn", "device",
    "target_loss", "progress", "candidates"}`` (defaults :data:`ABLATE_DEFAULTS`): train the ``top``
    predicted-faster non-exact candidates (or the ``candidates`` named: candidate or rule names) and,
    with ``combine``, the best pair of them touching different modules, against
    the original with :func:`fxopt.ablate`. ``model_fn`` builds the model per seed (needed for meta
    models; default: copies of ``model``'s weights); ``data`` defaults to the built-in learnable data.
    """
    t0 = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise ExploreError(f"explore() needs an nn.Module, got {type(model).__name__}")
    if _needs_model_fn(model, ablate):
        raise ExploreError("ablate= trains the candidates, and this model has no real weights (meta device); "
                           "pass ablate={'model_fn': <function building it on the CPU/GPU>, ...}")
    settings = _check_ablate(ablate)
    training = model.training if training is None else bool(training)
    label = name or type(model).__name__
    meta, meta_inputs, recorded, candidates, not_applicable = _propose(model, inputs, rules, training)
    base_report = _cost(meta, meta_inputs, hardware, training, dtype, optimizer)
    base = _metrics(base_report)
    cache: dict = {}

    def cost(cand: Candidate, whole: bool) -> None:
        if whole:
            _fill_cost(cand, _cost(cand.meta_model, meta_inputs, hardware, training, dtype, optimizer), base_report, base)
        else:
            report = _spliced(cand, recorded, cache, base_report, (hardware, training, dtype, optimizer))
            _fill_cost(cand, report, base_report, base)

    for cand, rule in candidates:
        if cand.status != "ok":
            continue
        if rule.exact and verify:
            cand.verified, cand.verify_detail = _verify(rule, recorded, cand.sites)
            if not cand.verified:
                cand.status, cand.reason = "verify failed", cand.verify_detail
                continue
        try:
            cost(cand, full_cost or rule.model_level)
        except FxoptError as exc:
            cand.status, cand.reason = "failed", f"costing failed: {exc}"
        log.info("explore %s: %s", cand.name, cand.status if cand.saving_s is None else
                 f"{cand.saving_s * 1e3:+.3f} ms predicted saving")
    candidates = [c for c, _ in candidates]

    result = ExploreResult(label, str(getattr(base_report.hardware, "name", hardware)), base, [], not_applicable,
                           dict(UNCOVERED), 0.0, report=base_report)
    if settings is not None:
        picked = _pick(candidates, settings)
        if settings["combine"]:
            pair = next(((a, b) for i, a in enumerate(picked) for b in picked[i + 1:] if _disjoint(a, b)), None)
            if pair is not None:
                combo = _combine(pair, recorded, meta)
                cost(combo, full_cost or "" in combo.sites)
                candidates.append(combo)
                picked.append(combo)
        if picked:
            res = _ablate(model, inputs, picked, settings)
            result.ablation, result.ablation_settings = res, {k: v for k, v in settings.items()
                                                               if k in ("steps", "seeds", "top", "batch", "lr")}
            b = res[BASELINE]
            if b.steps_to_target is not None:
                base["steps_to_target"] = b.steps_to_target + 1
                base["time_to_target_s"] = base["steps_to_target"] * base["step_time_s"]
            for c in picked:
                v = res[c.name]
                c.verdict, c.verdict_detail = v.verdict, v.detail or (v.reason or "")
                if v.steps_to_target is not None:
                    c.steps_to_target = v.steps_to_target + 1
                    c.time_to_target_s = c.steps_to_target * c.step_time_s
    result.candidates = _ranked(candidates)
    result.elapsed_s = time.perf_counter() - t0
    return result


def _propose(model: nn.Module, inputs, rules, training: bool):
    """(meta copy, meta inputs, recorded calls, [(candidate, rule)], rules that matched nothing)."""
    if not isinstance(model, nn.Module):
        raise ExploreError(f"explore() needs an nn.Module, got {type(model).__name__}")
    selected = _select(rules)
    normalize_inputs(inputs)  # InputError early for a malformed input
    meta = _meta_copy(model)
    if training != model.training:  # else keep each module's own mode (a frozen BN stays in eval)
        meta.train(training)
    meta_inputs = _to_meta(inputs)
    recorded = _record(meta, meta_inputs)
    recorded.setdefault("", Site("", meta, training=training))
    out, none = [], []
    for rule in selected:
        paths = _sites(rule, recorded, training)
        if paths:
            out.append((_candidate(rule, recorded, paths, meta, model), rule))
        else:
            none.append(rule.name)
    return meta, meta_inputs, recorded, out, none


def propose(model: nn.Module, inputs, rules="all", *, training: bool | None = None) -> list[Candidate]:
    """The candidates of :func:`explore`, built (on the meta device) but neither costed nor verified:
    which rules match where, and ``candidate.transform(model_copy)`` to build one with real weights."""
    training = model.training if training is None else bool(training)
    return [c for c, _ in _propose(model, inputs, rules, training)[3]]


def _pick(candidates: list[Candidate], settings: dict) -> list[Candidate]:
    """The candidates to train: those named in settings["candidates"] (names or rule names), else the
    ``top`` non-exact ones predicted faster."""
    ok = [c for c in _ranked(candidates) if c.status == "ok"]
    wanted = settings["candidates"]
    if wanted is None:
        return [c for c in ok if not c.exact and c.saving_s and c.saving_s > 0][:settings["top"]]
    names = [wanted] if isinstance(wanted, str) else list(wanted)
    picked = [c for c in ok if c.name in names or c.rule in names]
    missing = [n for n in names if not any(c.name == n or c.rule == n for c in picked)]
    if missing:
        raise ExploreError(f"ablate candidates {missing} are not among the built candidates "
                           f"{[c.name for c in ok]}")
    return picked


def _candidate(rule: Rule, recorded: dict[str, Site], paths: list[str], meta: nn.Module,
               source: nn.Module) -> Candidate:
    where = [f"{p or '(model)'} ({source_line(meta, p) or 'no source'})" for p in paths[:2]]
    more = f" and {len(paths) - 2} more" if len(paths) > 2 else ""
    first = recorded[paths[0]].module
    cand = Candidate(f"{rule.name}@{_glob(paths)}", rule.name, rule.family, _glob(paths), list(paths), rule.exact,
                     "", rule.why, rule.risk, transform=_transform(rule, recorded, paths), source=source)
    try:
        model = cand.transform(copy.deepcopy(meta))
        new = model.get_submodule(paths[0]) if paths[0] else model
        note = ""
        spec = attention_spec(first) if rule.family == "attention" and rule.name != "sdpa" else None
        if spec is not None and not spec.uses_sdpa:
            note = " (the original's hand-written attention becomes SDPA too: see the sdpa candidate for that part)"
        cand.description = f"{'; '.join(where)}{more}: {_brief(first)} -> {_brief(new)}: {rule.builds}{note}"
        cand.meta_model = model
        problem = _check_outputs(rule, recorded, paths, model)
        if problem:
            cand.status, cand.reason = "failed", problem
    except Exception as exc:
        cand.description = f"{'; '.join(where)}{more}: {rule.builds}"
        cand.status, cand.reason = "failed", f"building failed: {type(exc).__name__}: {exc}"
    return cand


def _combine(pair: tuple[Candidate, Candidate], recorded: dict[str, Site], meta: nn.Module) -> Candidate:
    a, b = pair

    def transform(model, a=a, b=b):
        return b.transform(a.transform(model))
    model = transform(copy.deepcopy(meta))
    return Candidate(f"{a.name}+{b.name}", f"{a.rule}+{b.rule}", f"{a.family}+{b.family}",
                     f"{a.module_path}+{b.module_path}", a.sites + b.sites, False,
                     f"both: [{a.description}] and [{b.description}]", f"{a.why}; {b.why}", f"{a.risk}; {b.risk}",
                     meta_model=model, transform=transform, source=a.source)


def _ranked(cands: list[Candidate]) -> list[Candidate]:
    """Highest predicted saving first; failed candidates last."""
    return sorted(cands, key=lambda c: (c.status != "ok", -(c.saving_s if c.saving_s is not None else -1e9)))


# ---------------------------------------------------------------------------------------------
# command line: fxopt explore MODEL [--rules ...] [--ablate-steps N --seeds k] [--top 10]


def add_cli(sub) -> None:
    """Register the ``explore`` subcommand on an argparse subparsers object."""
    from ..cli import add_hw, add_model
    e = sub.add_parser("explore", help="propose architecture changes, build and cost them, optionally ablate them")
    add_model(e, 32, "batch of the costed step")
    e.add_argument("--rules", default="all", help="comma-separated rule names or families (default all): "
                                                   + ", ".join(r.name for r in RULES))
    add_hw(e)
    e.add_argument("--dtype", default=None, help="cost as if weights and inputs were cast: bf16, fp16, fp32")
    e.add_argument("--eval", action="store_true", help="cost inference (forward only)")
    e.add_argument("--ablate-steps", type=int, default=0, help="train the top candidates this many steps (0: don't)")
    e.add_argument("--seeds", type=int, default=2)
    e.add_argument("--ablate-top", type=int, default=3, help="how many candidates to ablate")
    e.add_argument("--ablate-batch", type=int, default=8)
    e.add_argument("--top", type=int, default=10, help="rows of the table")
    e.add_argument("--format", choices=["table", "md", "json"], default="table")
    e.add_argument("--html", metavar="PATH", help="also write fxopt's HTML report of the model with the candidates")
    e.set_defaults(func=cmd_explore)


def cmd_explore(args) -> int:
    from ..cli import _build
    from ..workloads.models import resolve
    spec = _build(args.model, args.batch, args.tiny)
    ablate = None
    if args.ablate_steps:
        ablate = {"steps": args.ablate_steps, "seeds": args.seeds, "top": args.ablate_top, "batch": args.ablate_batch,
                  "model_fn": lambda: resolve(args.model, batch=args.ablate_batch, tiny=args.tiny).model,
                  "progress": True}
    res = explore(spec.model, spec.inputs, hardware=args.hw, rules=args.rules, ablate=ablate, dtype=args.dtype,
                  training=not args.eval, name=spec.name)
    if args.format == "json":
        print(res.to_json())
    else:
        print(res.table(args.top, tablefmt="github" if args.format == "md" else "simple"))
    if args.html:
        res.html(args.html, top=args.top)
        print(f"wrote {args.html}", file=sys.stderr)
    return 0
