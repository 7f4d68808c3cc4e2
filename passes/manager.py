"""The pass manager: runs a pipeline and owns all bookkeeping around each pass.

For each pass, on a deep copy of the current graph module (so a rejected pass can be rolled
back and the captured module is never touched):

1. ``requires`` check, then ``run`` (timed: ``time_s`` is the pass alone);
2. ``graph.lint()``, ``recompile()``, and fresh ``meta["val"]`` for every node
   (:func:`propagate_meta`: the graph is interpreted on the placeholders' fake tensors);
3. the canonical text (:mod:`fxopt.graphtext`) is diffed against the previous one; a pass that
   changed the text but reported ``modified=False`` is an error; then ``ensures``;
4. if modified: the step time is re-predicted with :func:`fxopt.analyze` (``cost=True``);
5. if modified and ``verify=True``: the candidate is checked against the *captured* module on
   the example inputs (:func:`fxopt.verify.verify`, or an output comparison where that module
   does not exist). A failing pass is rolled back, recorded with its failures and the first
   diverging node (:func:`find_divergence`), and the pipeline goes on.

Precision. A pass that lowers the precision the graph computes in (``mixed-precision``) declares
it on the graph module it returns: ``gm.meta["fxopt.precision"] = "bfloat16"``
(:data:`fxopt.verify.PRECISION_KEY`). The declaration travels with the graph (deep copies keep
``meta``), so it holds for every later pass too; the manager then verifies with
``verify(..., reference_precision=<that dtype>)``: the captured model under ``torch.autocast`` at
that dtype sets ``e_ref`` and the 16-bit floor applies (see :mod:`fxopt.verify`), and the
divergence search tolerates that dtype's rounding. :func:`graph_precision` reads it back.

Any exception in steps 1-3 becomes a :class:`PassError` naming the pass and the passes that ran
before it, chained to the original exception. With ``on_error="rollback"`` (the default) that pass
is rolled back like one that fails verification: its record says ``rolled_back`` with the error
in ``error``/``note``, a warning is logged, and the pipeline goes on with the graph before it (a
bug in one pass, or a graph it does not understand, such as a ``torch.cond`` body, costs that
pass's gain, not the whole optimize). ``on_error="raise"`` raises the PassError (debugging a pass).
A candidate whose verification cannot run at all is rolled back too, with the cause.

Configuration is checked when the manager is built, before anything is captured or run
(:func:`check_config`): the pipeline's pass names and option values against each pass's declared
:class:`~fxopt.passes.base.Option`, and the hardware name or profile (a HardwareError listing the
known presets; an unknown name never silently turns costing off).
"""
from __future__ import annotations

import logging
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
from tabulate import tabulate
from torch import fx, nn

from fxopt.capture import Captured
from fxopt.graphtext import canonical_text, unified_diff
from fxopt.progress import progress

from .base import (Decision, Pass, PassContext, PassError, PassResult, PipelineError, check_options, check_order,
                   defaults, format_pipeline, get, parse_pipeline, undeclared)
from .graph_utils import no_new_guards, propagate_meta, quiet_deepcopy, run_graph  # noqa: F401
from .verification import Divergence, failure_text, find_divergence, verify_graphs  # noqa: F401

__all__ = ["PassManager", "PassRecord", "check_config", "ON_ERROR", "timing_table", "propagate_meta", "find_divergence", "Divergence",
           "run_graph", "no_new_guards", "verify_graphs", "graph_precision", "PRECISION_KEY"]

log = logging.getLogger(__name__)

#: What the manager does with a pass that raises (or breaks the graph): roll it back and go on, or raise.
ON_ERROR = ("rollback", "raise")

#: ``GraphModule.meta`` key of the precision a pass lowered the graph to (same as fxopt.verify's).
from fxopt.cost_models.names import PRECISION_KEY, dtype_name  # noqa: E402  (one definition)
from fxopt.cost_models.hardware import DEFAULT_PRESET


def graph_precision(gm) -> torch.dtype | None:
    """The precision ``gm`` declares (``gm.meta[PRECISION_KEY]``: "bfloat16"/"float16"), else None."""
    value = getattr(gm, "meta", {}).get(PRECISION_KEY)
    if value is None or isinstance(value, torch.dtype):
        return value
    return getattr(torch, dtype_name(value), None)


@dataclass
class PassRecord:
    """What happened in one pass of a pipeline."""

    name: str
    modified: bool
    stats: dict
    decisions: list[Decision]
    diff: str
    time_s: float
    step_time_before_s: Any  # float, a sympy expression (symbolic batch), or None (cost=False)
    step_time_after_s: Any
    verification: Any = None      # a VerificationResult, None if not verified
    rolled_back: bool = False
    diverging_node: str | None = None
    options: dict = field(default_factory=dict)
    note: str = ""                # the manager's explanation (rollback reason, divergence details)
    error: str = ""               # the PassError's message, when the pass raised or broke the graph
    details: Any = None           # the pass's structured output (PassResult.details)

    def details_text(self) -> str:
        """The pass's own rendering of its details ("" when none, or rolled back)."""
        if self.details is None or self.rolled_back:
            return ""
        return get(self.name).render_details(self.details)

    @property
    def kept(self) -> bool:
        return self.modified and not self.rolled_back


# ---------------------------------------------------------------------------------------------
# the manager


PassSpec = Any  # "a,b{k=v}", a name, a Pass subclass or instance, or (name/class/instance, options)


def _resolve(passes: PassSpec | Iterable[PassSpec]) -> list[tuple[Pass, dict]]:
    """Normalize every accepted way of naming passes to (instance, full options) pairs."""
    if isinstance(passes, str):
        out = [(get(n)(), check_options(get(n), o)) for n, o in parse_pipeline(passes)]
        check_order([p.name for p, _ in out])
        return out
    if isinstance(passes, Pass) or (isinstance(passes, type) and issubclass(passes, Pass)):
        passes = [passes]
    if not isinstance(passes, (list, tuple)):
        raise PipelineError(f"a pipeline is a string like 'dce,normalize' or a list of passes, got "
                            f"{type(passes).__name__}")
    out = []
    for item in passes:
        options: dict = {}
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], dict):
            item, options = item
        if isinstance(item, str):
            if "," in item or "{" in item:
                if options:
                    raise PipelineError(f"options given both in {item!r} and as a dict")
                out += _resolve(item)
                continue
            item = get(item.strip())
        if isinstance(item, type) and issubclass(item, Pass):
            item = item()
        if not isinstance(item, Pass):
            raise PipelineError(f"cannot use {item!r} as a pass; give a pipeline string, a pass name, "
                                f"a Pass subclass or instance, or (pass, options)")
        out.append((item, check_options(type(item), options)))
    if not out:
        raise PipelineError("the pipeline is empty; name at least one pass, e.g. 'dce'")
    check_order([p.name for p, _ in out])
    return out


def check_config(pipeline, hardware=None, *, default: str | None = "default") -> None:
    """Raise before anything runs when ``pipeline`` or ``hardware`` is wrong.

    ``pipeline``: anything :class:`PassManager` accepts (each option value checked against the
    pass's schema), or ``default`` (a pipeline chosen after capture); a PipelineError otherwise.
    ``hardware``: None, a preset name, a profile JSON path or a Hardware; a HardwareError listing
    the known presets otherwise (:func:`fxopt.cost_models.hardware.load_hardware`).
    """
    if pipeline is None:
        raise PipelineError("pipeline=None: give a pipeline string like 'dce,normalize', a list of passes, "
                            "or 'default' (fxopt chooses from the captured graph)")
    if not (default is not None and isinstance(pipeline, str) and pipeline.strip() == default):
        _resolve(pipeline)
    _check_hardware(hardware)


def _check_hardware(hardware) -> None:
    from fxopt.cost_models.hardware import load_hardware
    load_hardware(hardware)  # HardwareError naming the known presets


class PassManager:
    """Run passes over a captured graph, with the bookkeeping described in the module docstring.

    ``passes``: a pipeline string (``"dce,normalize{div_exact_only=true}"``), or a list of pass
    names, Pass classes/instances, or ``(pass, options)`` pairs. ``on_error``: ``"rollback"`` (a
    pass that raises is rolled back and recorded, the pipeline goes on) or ``"raise"``.
    """

    def __init__(self, passes, *, verify: bool = False, print_after_change: bool = False,
                 dump_dir: str | os.PathLike | None = None, cost: bool = True, hardware: str = DEFAULT_PRESET,
                 on_error: str = "rollback"):
        if on_error not in ON_ERROR:
            raise PipelineError(f"on_error={on_error!r}: use one of {', '.join(ON_ERROR)}")
        self.passes = _resolve(passes)
        _check_hardware(hardware)
        self.on_error = on_error
        self.verify = verify
        self.print_after_change = print_after_change
        self.dump_dir = Path(dump_dir) if dump_dir is not None else None
        self.cost = cost
        self.hardware = hardware

    @classmethod
    def from_pipeline(cls, pipeline: str, **kwargs) -> "PassManager":
        return cls(pipeline, **kwargs)

    @property
    def pipeline(self) -> str:
        return format_pipeline([(p.name, {k: v for k, v in o.items() if defaults(type(p)).get(k) != v})
                                for p, o in self.passes])

    # -- bookkeeping helpers -------------------------------------------------------------------
    def _cost(self, gm: fx.GraphModule, captured: Captured) -> tuple[Any, dict]:
        if not self.cost:
            return None, {}
        from fxopt.analyze import analyze
        wrapped = Captured(gm, captured.example_args, captured.example_kwargs, captured.training,
                           captured.dynamic_batch, captured.source_name, captured.symbols)
        try:
            with warnings.catch_warnings(), no_new_guards(gm):
                warnings.simplefilter("ignore")  # unknown-op warnings: the user's own analyze reports them
                report = analyze(wrapped, hardware=self.hardware, training=captured.training)
        except Exception as exc:  # a graph the cost model cannot price is still a valid graph
            warnings.warn(f"fxopt.analyze failed on the graph ({type(exc).__name__}: {exc}); its step time "
                          f"is recorded as None", RuntimeWarning, stacklevel=3)
            return None, {}
        return report.totals["step_time_s"], {r["node"]: r["time_s"] for r in report.rows("node")}

    def _dump(self, filename: str, text: str) -> None:
        if self.dump_dir is not None:
            self.dump_dir.mkdir(parents=True, exist_ok=True)
            (self.dump_dir / filename).write_text(text)

    # -- the pipeline --------------------------------------------------------------------------
    def run(self, captured: Captured, reference: nn.Module | None = None
            ) -> tuple[fx.GraphModule, list[PassRecord]]:
        """Run the pipeline; returns the final graph module (a new one) and one record per pass.

        ``captured.graph_module`` is never modified. ``reference``: the model verification
        compares against (default: the captured graph module itself); its parameter and buffer
        names must be the captured ones, e.g. the model that was captured.
        """
        if not isinstance(captured, Captured):
            raise PipelineError(f"PassManager.run takes a Captured (fxopt.capture(model, inputs)), "
                                f"got {type(captured).__name__}")
        args, kwargs = captured.example_args, captured.example_kwargs
        current = quiet_deepcopy(captured.graph_module)
        propagate_meta(current, args, kwargs)  # the baseline text uses the same propagation as each pass
        text = canonical_text(current)
        self._dump("00_capture.txt", text)
        step, node_times = self._cost(current, captured)
        ctx = PassContext(hardware=self.hardware, training=captured.training, example_args=args,
                          example_kwargs=kwargs)
        records: list[PassRecord] = []
        for i, (p, options) in enumerate(progress(self.passes, desc="optimize", unit="pass"), 1):
            label = f"{i:02d}_{p.name}"
            previous = [r.name for r in records]
            candidate = quiet_deepcopy(current)
            ctx.begin(p.name, options, node_times)
            try:
                gm, result, dt, new_text = self._run_one(p, candidate, ctx, previous, args, kwargs, text)
            except PassError as exc:
                if self.on_error == "raise":
                    raise
                records.append(self._raised(p, options, ctx, exc, step, label, text))
                continue
            changed = new_text != text
            modified = bool(result.modified) or changed
            record = PassRecord(p.name, modified, dict(result.stats), list(ctx.decisions),
                                unified_diff(text, new_text, label) if changed else "", dt, step, step,
                                options=dict(options), details=result.details)
            if modified:
                record.step_time_after_s, new_times = self._cost(gm, captured)
                if options.get("only_if_faster") and _slower(record.step_time_after_s, step):
                    # the manager's policy: the whole step re-costed (host dispatch, casts, every
                    # kernel) has the last word over the pass's own per-node estimate
                    record.rolled_back = True
                    record.note = (f"only_if_faster: the re-costed step is slower ({float(step) * 1e3:.3f} -> "
                                   f"{float(record.step_time_after_s) * 1e3:.3f} ms), rolled back")
                elif self.verify:
                    self._verify(record, captured, reference, current, gm)
            if record.diff and self.print_after_change:
                print(record.diff, end="")
                if record.rolled_back:
                    print(f"# {label}: rolled back: {record.note}")
            if record.rolled_back:
                record.step_time_after_s = step
                self._dump(f"{label}.txt", text)
                self._dump(f"{label}.rolled_back.txt", record.note + "\n")
            else:
                self._dump(f"{label}.txt", new_text)
                if modified:
                    current, text = gm, new_text
                    step, node_times = record.step_time_after_s, (new_times if self.cost else {})
            if record.diff:
                self._dump(f"{label}.diff", record.diff)
            records.append(record)
        return current, records

    def _raised(self, p: Pass, options: dict, ctx: PassContext, exc: PassError, step, label: str,
                text: str) -> PassRecord:
        """The record of a pass that raised or broke the graph: rolled back, the error kept."""
        log.warning("%s; rolled back, the pipeline goes on without it", exc)
        record = PassRecord(p.name, False, {}, list(ctx.decisions), "", 0.0, step, step, rolled_back=True,
                            options=dict(options), error=str(exc),
                            note=f"raised, rolled back: {str(exc).splitlines()[0]}")
        self._dump(f"{label}.txt", text)
        self._dump(f"{label}.rolled_back.txt", record.note + "\n" + str(exc) + "\n")
        return record

    def _run_one(self, p: Pass, gm: fx.GraphModule, ctx: PassContext, previous: list[str],
                 args, kwargs, text_before: str):
        after = f" after {', '.join(previous)}" if previous else " (the first pass)"

        def fail(what: str, exc: BaseException) -> PassError:
            err = PassError(f"pass {p.name!r}{after} {what}: {type(exc).__name__}: {exc}", p.name, previous)
            err.__cause__ = exc
            return err

        try:
            p.requires(gm, ctx)
        except Exception as exc:
            raise fail("refused the graph (requires)", exc) from exc
        t0 = time.perf_counter()
        try:
            result = p.run(gm, ctx)
        except Exception as exc:
            raise fail("raised", exc) from exc
        dt = time.perf_counter() - t0
        if not isinstance(result, PassResult):
            raise PassError(f"pass {p.name!r}{after} returned {type(result).__name__}, not a PassResult",
                            p.name, previous)
        unknown = undeclared(type(p), result.stats)
        if unknown:
            raise PassError(f"pass {p.name!r}{after} reported statistics it does not declare: {', '.join(unknown)} "
                            f"(add them to {type(p).__name__}.statistics)", p.name, previous)
        out = result.graph_module
        try:
            out.graph.lint()
            out.recompile()
        except Exception as exc:
            raise fail("left an invalid graph", exc) from exc
        try:
            propagate_meta(out, args, kwargs)
        except Exception as exc:
            raise fail("left a graph that does not run on fake tensors", exc) from exc
        new_text = canonical_text(out)
        if new_text != text_before and not result.modified:
            raise PassError(f"pass {p.name!r}{after} changed the graph but returned modified=False",
                            p.name, previous)
        if result.modified or new_text != text_before:
            try:
                p.ensures(out, ctx)
            except Exception as exc:
                raise fail("broke its guarantee (ensures)", exc) from exc
        return out, result, dt, new_text

    def _verify(self, record: PassRecord, captured: Captured, reference: nn.Module | None,
                before: fx.GraphModule, after: fx.GraphModule) -> None:
        args, kwargs = captured.example_args, captured.example_kwargs
        ref = reference if reference is not None else captured.graph_module
        precision = graph_precision(after)  # declared by a precision-lowering pass (module doc)
        try:
            result = verify_graphs(ref, after, args, kwargs, captured.training, reference_precision=precision)
        except Exception as exc:  # a pass is kept only when it was verified
            record.rolled_back = True
            record.error = f"{type(exc).__name__}: {exc}"
            record.note = f"verification could not run, rolled back: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
            log.warning("pass %r: %s", record.name, record.note)
            return
        record.verification = result
        if result:
            return
        record.rolled_back = True
        div = find_divergence(before, after, args, kwargs, precision=precision)
        record.diverging_node = div.node if div else None
        failures = "; ".join(failure_text(f) for f in result.failures()[:3])
        if len(result.failures()) > 3:
            failures += f"; ... {len(result.failures()) - 3} more"
        where = f"first diverging node {div}" if div else \
            "no forward value differs: the difference is in gradients or the optimizer step"
        record.note = f"verification failed ({failures}); {where}"


def format_ms(t) -> str:
    """Seconds as milliseconds for tables; "-" when unknown, the formula when symbolic."""
    if t is None:
        return "-"
    try:
        return f"{float(t) * 1e3:.3f}"
    except TypeError:
        return str(t)


def timing_table(records: list[PassRecord]) -> str:
    """One row per pass: changed?, pass time, predicted step time before/after, decisions, status."""
    ms = format_ms

    def delta(r):
        try:
            a, b = float(r.step_time_before_s), float(r.step_time_after_s)
        except (TypeError, ValueError):
            return "-"
        return f"{(b - a) / a * 100:+.1f}" if a else "-"

    rows = []
    for i, r in enumerate(records, 1):
        status = "rolled back" if r.rolled_back else ("changed" if r.modified else "no change")
        verified = "-" if r.verification is None else ("ok" if r.verification else "FAILED")
        rows.append([i, r.name, status, f"{r.time_s * 1e3:.1f}", ms(r.step_time_before_s),
                     ms(r.step_time_after_s), delta(r), len(r.decisions), verified])
    headers = ["#", "pass", "status", "pass ms", "step ms before", "step ms after", "delta %", "decisions",
               "verified"]
    return tabulate(rows, headers=headers, disable_numparse=True)


def _slower(after, before) -> bool:
    """Concrete step times where the rewrite made the step slower (symbolic or missing: no verdict)."""
    return isinstance(after, (int, float)) and isinstance(before, (int, float)) and after > before
