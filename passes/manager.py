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

import contextlib
import copy
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
from torch.utils._pytree import tree_leaves

from fxopt.capture import Captured
from fxopt.graphtext import canonical_text, unified_diff
from fxopt.progress import progress

from .base import (Decision, Pass, PassContext, PassError, PassResult, PipelineError, check_options, defaults,
                   format_pipeline, get, parse_pipeline)

__all__ = ["PassManager", "PassRecord", "check_config", "ON_ERROR", "timing_table", "propagate_meta", "find_divergence", "Divergence",
           "run_graph", "no_new_guards", "verify_graphs", "graph_precision", "PRECISION_KEY"]

log = logging.getLogger(__name__)

#: What the manager does with a pass that raises (or breaks the graph): roll it back and go on, or raise.
ON_ERROR = ("rollback", "raise")

#: ``GraphModule.meta`` key of the precision a pass lowered the graph to (same as fxopt.verify's).
from fxopt.cost_models.names import PRECISION_KEY, dtype_name  # noqa: E402  (one definition)


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
    verification: Any = None      # a VerificationResult (or fallback OutputCheck), None if not verified
    rolled_back: bool = False
    diverging_node: str | None = None
    options: dict = field(default_factory=dict)
    note: str = ""                # the manager's explanation (rollback reason, divergence details)
    error: str = ""               # the PassError's message, when the pass raised or broke the graph

    @property
    def kept(self) -> bool:
        return self.modified and not self.rolled_back


# ---------------------------------------------------------------------------------------------
# graph utilities the manager needs


def _quiet_deepcopy(obj):
    with warnings.catch_warnings():  # torch's pytree spec copy warns about LeafSpec deprecation
        warnings.simplefilter("ignore", FutureWarning)
        return copy.deepcopy(obj)


def _flat_inputs(gm: fx.GraphModule, args: tuple, kwargs: dict) -> list:
    """The placeholder values for ``gm(*args, **kwargs)`` (export graphs flatten by their in_spec)."""
    spec = getattr(gm, "_in_spec", None)
    if spec is not None:
        from torch.fx._pytree import tree_flatten_spec
        return list(tree_flatten_spec((tuple(args), dict(kwargs)), spec))
    return list(args) + list(kwargs.values())


class _FakeProp(torch.fx.Interpreter):
    """Interpret a graph on fake tensors: placeholders give their ``val``, attributes are
    converted to fakes of the same mode, every node's ``val`` is replaced by a fresh snapshot."""

    def __init__(self, gm, mode):
        super().__init__(gm, garbage_collect_values=False)
        self.mode = mode

    def placeholder(self, target, args, kwargs):
        node = self.current_node
        return node.meta["val"]

    def get_attr(self, target, args, kwargs):
        attr = super().get_attr(target, args, kwargs)
        if isinstance(attr, torch.Tensor) and not isinstance(attr, torch._subclasses.FakeTensor):
            return self.mode.from_tensor(attr, static_shapes=True)
        return attr

    def run_node(self, n):
        from torch._subclasses.fake_tensor import FakeTensor
        from torch.fx.experimental.proxy_tensor import snapshot_fake
        self.current_node = n
        result = super().run_node(n)
        if n.op == "output":
            return result

        def extract(obj):
            if isinstance(obj, FakeTensor):
                return snapshot_fake(obj)
            if isinstance(obj, torch.Tensor):
                return snapshot_fake(self.mode.from_tensor(obj, static_shapes=True))
            if isinstance(obj, (torch.SymInt, torch.SymFloat, torch.SymBool, int, float, bool)):
                return obj
            return None

        meta = torch.fx.node.map_aggregate(result, extract)
        if meta is not None:
            n.meta["val"] = meta
            if isinstance(meta, torch.Tensor):
                from torch.fx.passes.shape_prop import _extract_tensor_metadata
                try:
                    n.meta["tensor_meta"] = _extract_tensor_metadata(meta)
                except Exception:
                    n.meta.pop("tensor_meta", None)
            else:
                n.meta.pop("tensor_meta", None)
        return result


def no_new_guards(gm: fx.GraphModule):
    """A context in which fake-tensor work on ``gm`` adds no guards to its shape env.

    The shape env is shared by every graph copied from one capture: a guard some op's meta
    function adds (upsample specializes the batch symbol of the driving model to its example
    value) would otherwise turn ``[s34, ...]`` into ``[2, ...]`` in the captured graph too.
    """
    from torch._guards import detect_fake_mode
    vals = [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]
    mode = detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])
    if mode is None or mode.shape_env is None:
        return contextlib.nullcontext()
    return mode.shape_env.suppress_guards()


def propagate_meta(gm: fx.GraphModule, example_args: tuple = (), example_kwargs: dict | None = None) -> None:
    """Recompute ``meta["val"]`` (and ``tensor_meta``) of every node on fake tensors.

    Placeholders keep their ``val`` (export's fake tensors, symbolic sizes included); those
    without one get a fake of the matching example input, in a fresh fake mode.
    """
    from torch._guards import detect_fake_mode
    from torch._subclasses.fake_tensor import FakeTensorMode

    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    vals = [n.meta.get("val") for n in placeholders]
    mode = detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])
    if any(v is None for v in vals):
        mode = mode or FakeTensorMode(allow_non_fake_inputs=True)
        flat = _flat_inputs(gm, example_args, example_kwargs or {})
        if len(flat) != len(placeholders):
            raise PassError(f"cannot propagate metadata: {len(placeholders)} placeholders but {len(flat)} "
                            f"example inputs; capture the model with fxopt.capture")
        for n, x in zip(placeholders, flat):
            if n.meta.get("val") is None:
                n.meta["val"] = mode.from_tensor(x) if isinstance(x, torch.Tensor) else x
    if mode is None:
        mode = FakeTensorMode(allow_non_fake_inputs=True)
    prop = _FakeProp(gm, mode)
    with mode, no_new_guards(gm), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        prop.run(*[n.meta["val"] for n in placeholders])


class _AsModule(nn.Module):
    """A graph module seen as a plain nn.Module with the same parameter names.

    Exported graph modules refuse ``.train()``/``.eval()``; this wrapper shares the graph
    module's submodules, parameters and buffers, so names and tensors are the same, while its
    own ``train()`` only touches the (plain) submodules.
    """

    def __init__(self, gm: fx.GraphModule):
        super().__init__()
        self._modules, self._parameters, self._buffers = gm._modules, gm._parameters, gm._buffers
        object.__setattr__(self, "_gm", gm)

    def forward(self, *args, **kwargs):
        return self._gm(*args, **kwargs)

    def __deepcopy__(self, memo):
        return _AsModule(copy.deepcopy(self._gm, memo))


def _without_dtype_asserts(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` without export's ``_assert_tensor_metadata`` checks, so that it runs when
    verify casts it to float64 (its float64 reference copy)."""
    work = _quiet_deepcopy(gm)
    for node in list(work.graph.nodes):
        if node.op == "call_function" and node.target is torch.ops.aten._assert_tensor_metadata.default \
                and not node.users:
            work.graph.erase_node(node)
    work.recompile()
    return work


class OutputCheck:
    """Fallback verification (used only when :mod:`fxopt.verify` is not importable): forward
    outputs compared with ``torch.testing.assert_close``, same seed for both runs."""

    def __init__(self, failures: list[str]):
        self._failures = failures

    def __bool__(self) -> bool:
        return not self._failures

    def failures(self) -> list[str]:
        return list(self._failures)

    def table(self) -> str:
        return "outputs: ok" if not self._failures else "\n".join(self._failures)


def run_graph(gm: fx.GraphModule, args: tuple, kwargs: dict, seed: int = 0, record: bool = False):
    """Run a deep copy of ``gm`` on real inputs with a fixed seed (BN statistics of ``gm`` stay
    untouched). Returns the flat outputs, and with ``record`` also {node name: value snapshot}."""
    work = _quiet_deepcopy(gm)
    values: dict[str, Any] = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if record and n.op != "output":
                values[n.name] = torch.utils._pytree.tree_map(
                    lambda v: v.detach().clone() if isinstance(v, torch.Tensor) else v, out)
            return out

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.no_grad():
            out = Recorder(work, garbage_collect_values=not record).run(*_flat_inputs(work, args, kwargs))
    return (out, values) if record else out


def _fallback_verify(reference: fx.GraphModule, candidate: fx.GraphModule, args, kwargs) -> OutputCheck:
    ref = tree_leaves(run_graph(reference, args, kwargs))
    new = tree_leaves(run_graph(candidate, args, kwargs))
    failures = []
    if len(ref) != len(new):
        return OutputCheck([f"outputs: {len(new)} values, expected {len(ref)}"])
    for i, (a, b) in enumerate(zip(ref, new)):
        try:
            torch.testing.assert_close(b, a, check_stride=False)
        except AssertionError as exc:
            failures.append(f"output {i}: {str(exc).splitlines()[0]}")
    return OutputCheck(failures)


def verify_graphs(reference: fx.GraphModule | nn.Module, candidate: fx.GraphModule, args: tuple, kwargs: dict,
                  training: bool, reference_precision: torch.dtype | None = None):
    """Check ``candidate`` against ``reference`` on the example inputs with :func:`fxopt.verify.verify`
    (nothing passed in is modified). A graph-module reference is run without its dtype
    assertions, so that verify's float64 copy of it (and its autocast run) runs.
    ``reference_precision``: see :func:`fxopt.verify.verify` (the fallback ignores it)."""
    try:
        from fxopt.verify import verify
    except ImportError:
        if not isinstance(reference, fx.GraphModule):
            raise
        return _fallback_verify(reference, candidate, args, kwargs)
    if isinstance(reference, fx.GraphModule):
        reference = _AsModule(_without_dtype_asserts(reference))
    cand = _AsModule(_quiet_deepcopy(candidate))
    ref = reference
    inputs = dict(kwargs) if kwargs and not args else tuple(args)
    if kwargs and args:
        raise PassError("verification needs either positional or keyword example inputs, not both")
    with warnings.catch_warnings():  # verify deep-copies graph modules: torch's pytree FutureWarning
        warnings.simplefilter("ignore", FutureWarning)
        return verify(ref, cand, inputs, training=training, reference_precision=reference_precision)


@dataclass(frozen=True)
class Divergence:
    """The first node whose value differs between the graph before and after a pass."""

    node: str
    max_abs_diff: float | None
    new_inputs: tuple[str, ...] = ()  # inputs of ``node`` that the pass created

    def __str__(self) -> str:
        diff = "different shape/dtype" if self.max_abs_diff is None else f"max abs diff {self.max_abs_diff:.3g}"
        fed = f"; fed by new node(s) {', '.join(self.new_inputs)}" if self.new_inputs else ""
        return f"{self.node} ({diff}{fed})"


def _differs(a, b, rtol: float, any_dtype: bool = False) -> tuple[bool, float | None]:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return True, None
        worst = 0.0
        for x, y in zip(a, b):
            bad, d = _differs(x, y, rtol, any_dtype)
            if bad:
                return True, d
            worst = max(worst, d or 0.0)
        return False, worst
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.shape != b.shape or (a.dtype != b.dtype and not (
                any_dtype and a.is_floating_point() and b.is_floating_point())):
            return True, None
        if not a.is_floating_point() and not a.is_complex():
            d = float((a != b).sum())
            return d > 0, d
        a64, b64 = a.double(), b.double()
        d = float((a64 - b64).abs().max()) if a.numel() else 0.0
        scale = float(a64.abs().max()) if a.numel() else 0.0
        return not (d <= rtol * max(scale, 1e-6)) , d
    return False, None


def find_divergence(before: fx.GraphModule, after: fx.GraphModule, args: tuple, kwargs: dict,
                    rtol: float = 1e-4, precision: torch.dtype | None = None) -> Divergence | None:
    """Locate where ``after`` starts computing something else than ``before``.

    Both graphs run on the real example inputs with the same seed, recording every node's
    value. Walking ``after`` in graph order, the first node that also exists in ``before`` (same
    name: passes keep the names of nodes they do not touch) and whose value differs by more than
    ``rtol`` relative to the value's magnitude is returned, with the inputs the pass created
    (usually the culprit). Nodes the pass created have nothing to compare with and are skipped;
    the graph outputs are compared last. None when every compared value agrees, e.g. when only
    gradients or the optimizer step differ. ``precision``: ``after`` computes in that 16-bit dtype
    (its declared precision), so floating values may differ in dtype, and ``rtol`` is raised to 8
    units of that dtype's rounding (bfloat16: 0.0625, float16: 0.0078).
    """
    any_dtype = precision is not None
    if precision is not None:
        rtol = max(rtol, 8 * torch.finfo(precision).eps)
    old_out, old = run_graph(before, args, kwargs, record=True)
    new_out, new = run_graph(after, args, kwargs, record=True)
    old_names = {n.name for n in before.graph.nodes}
    for node in after.graph.nodes:
        if node.op == "output":
            bad, d = _differs(list(tree_leaves(old_out)), list(tree_leaves(new_out)), rtol, any_dtype)
            if bad:
                return Divergence("output", d)
            continue
        if node.name not in old or node.name not in new:
            continue
        bad, d = _differs(old[node.name], new[node.name], rtol, any_dtype)
        if bad:
            created = tuple(a.name for a in node.all_input_nodes if a.name not in old_names)
            return Divergence(node.name, d, created)
    return None


# ---------------------------------------------------------------------------------------------
# the manager


PassSpec = Any  # "a,b{k=v}", a name, a Pass subclass or instance, or (name/class/instance, options)


def _resolve(passes: PassSpec | Iterable[PassSpec]) -> list[tuple[Pass, dict]]:
    """Normalize every accepted way of naming passes to (instance, full options) pairs."""
    if isinstance(passes, str):
        return [(get(n)(), check_options(get(n), o)) for n, o in parse_pipeline(passes)]
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
                 dump_dir: str | os.PathLike | None = None, cost: bool = True, hardware: str = "h100",
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
        current = _quiet_deepcopy(captured.graph_module)
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
            candidate = _quiet_deepcopy(current)
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
                                options=dict(options))
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
        failures = "; ".join(_failure_text(f) for f in result.failures()[:3])
        if len(result.failures()) > 3:
            failures += f"; ... {len(result.failures()) - 3} more"
        where = f"first diverging node {div}" if div else \
            "no forward value differs: the difference is in gradients or the optimizer step"
        record.note = f"verification failed ({failures}); {where}"


def _failure_text(check) -> str:
    """One failed check of a VerificationResult (TensorCheck) or of the fallback (a string)."""
    if isinstance(check, str):
        return check
    name, note = getattr(check, "name", "?"), getattr(check, "note", "")
    if note:
        return f"{name}: {note}"
    return f"{name}: error {getattr(check, 'cand_error', float('nan')):.3g} > allowed " \
           f"{getattr(check, 'allowed', float('nan')):.3g}"


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
