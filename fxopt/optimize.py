"""``fxopt.optimize``: capture on the first call (or at once), run the pass pipeline, verify, and
return an nn.Module that trains like the original, under the original's parameter names."""
from __future__ import annotations

import copy
import logging
import warnings
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.utils._pytree import tree_flatten
from torch.utils.hooks import RemovableHandle

from . import live
from ._forward import signed_forward
from .capture import capture_module, normalize_inputs
from .cost_models.hardware import DEFAULT_PRESET, preset_for_gpu
from .cost_models.names import dtype_name
from .checkpointing import ReentrantCheckpointError, checkpoint_regions, regions_of  # noqa: F401 (re-exported)
from .errors import FxoptError, InputError
from .live import HookError  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

BACKENDS = ("eager", "inductor", "triton")


class BackendError(FxoptError, ValueError):
    """An unknown or unavailable backend."""


def hardware_for(model: nn.Module, hardware):
    """``None`` means the GPU the model is on, else the H100 preset."""
    if hardware is not None:
        return hardware
    param = next(model.parameters(), None)
    if param is not None and param.is_cuda:
        return preset_for_gpu(torch.cuda.get_device_name(param.device))
    return DEFAULT_PRESET


@dataclass
class OptimizeReport:
    """What optimize did: each pass's record, the final verification, the cost before and after."""

    pipeline: str
    records: list = field(default_factory=list)
    pipeline_reasons: list = field(default_factory=list)  # why the default pipeline chose each pass
    verification: object = None
    step_time_before_s: float | None = None
    step_time_after_s: float | None = None

    def decisions(self) -> list:
        return [d for r in self.records for d in r.decisions]

    def table(self, verbose: bool = False) -> str:
        """Passes table and predicted step first, then decisions that change the predicted step;
        those with no estimated effect are one summary line unless ``verbose`` (``fxopt optimize -v``)."""
        from .cli_output import optimize_text
        return optimize_text(self, verbose=verbose)


def _signature(args: tuple, kwargs: dict, training: bool):
    """What a captured graph is specialized to: mode, and each input's shape, dtype and device."""
    if not kwargs and all(type(t) is torch.Tensor for t in args):  # the common case, without pytree (hot path)
        return training, tuple((tuple(t.shape), t.dtype, t.device.type) for t in args)
    leaves, _ = tree_flatten((args, kwargs))
    return training, tuple((tuple(t.shape), t.dtype, t.device.type) if isinstance(t, torch.Tensor) else repr(t)
                           for t in leaves)


RECAPTURE_LIMIT = 8  # graphs per OptimizedModule before new inputs run eagerly (torch.compile's default)


@dataclass
class _Entry:
    """One captured graph: ``gm`` as the passes left it (what reports show), ``run`` what is called
    (reads the live tree; checkpoint regions wrapped), and the Python attributes it froze."""

    gm: fx.GraphModule
    run: object
    report: OptimizeReport
    guards: list  # (module __dict__, attr, value, where) read by forward at capture

    def fits(self) -> bool:
        return all(d.get(a, _MISSING) == v for d, a, v, _ in self.guards)


_MISSING = object()


class OptimizedModule(nn.Module):
    """The optimized model. It owns a private copy of the user's model (same parameter and buffer
    names, so ``state_dict`` round-trips and optimizers work); each (mode, input signature) gets its
    own captured + rewritten graph, built on first use. Graphs read parameters and buffers from the
    module tree at every call, so assigning, loading (``assign=True``), ``functional_call`` and
    FSDP's unsharded parameters are used as in eager. A replaced submodule, a tensor with a new
    shape/dtype/device, or a changed Python attribute that forward read recaptures (``fxopt.live``);
    hooks on the model's root run around the graph; hooks on submodules are refused (``HookError``)."""

    def __init__(self, model: nn.Module, *, pipeline: str, hardware, verify: bool, backend: str,
                 print_after_change: bool = False, dump_dir=None):
        super().__init__()
        if backend not in BACKENDS:
            raise BackendError(f"unknown backend {backend!r}; available: {BACKENDS}")
        from .passes.manager import check_config
        check_config(pipeline, hardware)  # PipelineError / HardwareError before anything is captured
        live.refuse_wrapped(model)
        live.refuse_foreign_hooks(model, "at optimize()")
        source = copy.deepcopy(model)
        live.move_root_hooks(source, self)
        # share the copy's module tree: names, state_dict and .to() all act on the copy
        self._modules, self._parameters, self._buffers = source._modules, source._parameters, source._buffers
        object.__setattr__(self, "_source", source)
        self.training = model.training
        self._options = dict(pipeline=pipeline, hardware=hardware, verify=verify, backend=backend,
                             print_after_change=print_after_change, dump_dir=dump_dir)
        self._captures = 0         # graphs built so far, against RECAPTURE_LIMIT
        self._warned: dict = {}
        self._reset()

    def _reset(self) -> None:
        """Forget every graph (the tree they were captured from changed)."""
        self._graphs: dict = {}    # key -> [_Entry]
        self._last = None
        self._tree = None

    # ---- the root's own Python attributes live on the copy that forward reads ------------------------
    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            source = self.__dict__.get("_source")
            if source is None or name.startswith("__"):
                raise
            return getattr(source, name)  # config, flags and methods of the wrapped model

    def __setattr__(self, name, value):
        source = self.__dict__.get("_source")
        if source is not None and name in source.__dict__ and not name.startswith("_") and name != "training":
            setattr(source, name, value)  # a flag forward reads: the per-call guards see it
        else:
            super().__setattr__(name, value)

    # ---- pickling: graphs are rebuilt lazily, on the first call after loading -----------------------
    def __getstate__(self):
        state = dict(self.__dict__)
        state.update(_graphs={}, _last=None, _tree=None, _captures=0, _warned={})
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)

    # ---- the graphs ------------------------------------------------------------------------
    def _build(self, args: tuple, kwargs: dict) -> _Entry:
        from .passes import PassManager
        from .passes.default import choose_pipeline
        source = self._source
        source.training = self.training  # the root's flag only: submodules keep the modes the user set
        captured = capture_module(source, args, kwargs)
        opts = self._options
        # meta tensors carry no values: such a graph is rewritten and costed but cannot be verified
        check = opts["verify"] and not any(isinstance(t, torch.Tensor) and t.is_meta
                                           for t in tree_flatten((args, kwargs))[0])
        pipeline, reasons = opts["pipeline"], []
        if pipeline == "default":
            pipeline, reasons = choose_pipeline(captured.graph_module, self.training, opts["backend"])
        manager = PassManager.from_pipeline(
            pipeline, verify=check, print_after_change=opts["print_after_change"],
            dump_dir=opts["dump_dir"], hardware=hardware_for(source, opts["hardware"]))
        gm, records = manager.run(captured)
        gm = live.live_graph(gm, source)  # what reports show and what runs read the live tree
        run = gm
        if self.training and regions_of(gm.graph):
            run = live.copy_live(gm)
            checkpoint_regions(run)
        report = OptimizeReport(pipeline, records, reasons)
        if records:
            report.step_time_before_s = records[0].step_time_before_s
            report.step_time_after_s = records[-1].step_time_after_s
        if check:
            from .passes.graph_utils import AsModule
            from .verify import verify
            report.verification = verify(source, AsModule(run, source), kwargs or args, training=self.training)
            if not report.verification:
                raise FxoptError(f"the optimized graph does not compute what the model computes:\n"
                                 f"{report.verification.table()}")
        if opts["backend"] == "inductor":
            run = torch.compile(run)
        guards = captured.python_state.guards() if captured.python_state else []
        return _Entry(gm, run, report, guards)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self._tree is not None:
            self._tree.recheck_metadata()
        for entries in self._graphs.values():
            for entry in entries:
                run = getattr(entry.run, "_orig_mod", entry.run)
                for module in [run] + [m for _, m in run.named_children()]:
                    for name, value in list(vars(module).items()):  # graph constants move with the module
                        if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
                            setattr(module, name, fn(value))
        return self  # inputs on a new device/dtype get their own graph on their first call

    def _check_tree(self, tree: live.TreeState) -> None:
        """Per-call guards on the module tree; recapture (drop every graph) when it changed."""
        if RemovableHandle.next_id != tree.hook_id:  # some hook was registered somewhere: look
            live.refuse_foreign_hooks(self._source, "since optimize()")
            tree.hook_id = RemovableHandle.next_id
        why = tree.changed()
        if why:
            log.info("recapturing %s: %s", type(self._source).__name__, why)
            self._reset()

    def _entry(self, args, kwargs):
        """The graph for these inputs and the current tree, or None to run the source eagerly."""
        tracing = torch.compiler.is_exporting() or torch.compiler.is_compiling()
        if self._tree is not None and not tracing:
            self._check_tree(self._tree)
        if self._tree is None:
            self._tree = live.TreeState(self._source)
        key = (_signature(args, kwargs, self.training), self._tree.modes())
        entries = self._graphs.setdefault(key, [])
        entry = next((e for e in entries if e.fits()), None)
        if entry is not None or tracing:  # an outer capture inlines a graph, or the original
            self.__dict__["_last"] = entry or self._last  # (plain dict writes: this runs every call)
            return entry
        if self._captures >= RECAPTURE_LIMIT:
            if not self._warned.get("limit"):
                self._warned["limit"] = True
                warnings.warn(f"{type(self._source).__name__} was captured {RECAPTURE_LIMIT} times (new input "
                              f"shapes, modes or attributes read by forward); further new inputs run the "
                              f"original model eagerly, unoptimized", stacklevel=3)
            return None
        entry = self._build_for(args, kwargs)
        entries.append(entry)
        self._captures += 1
        self.__dict__["_last"] = entry
        return entry

    def _build_for(self, args, kwargs) -> _Entry:
        """Build a graph; inputs the model cannot run on at all give an InputError naming expected vs got."""
        try:
            return self._build(args, kwargs)
        except (ReentrantCheckpointError, HookError):
            raise  # about the model, not the inputs
        except FxoptError as exc:
            eager_error = _eager_failure(self._source, args, kwargs, self.training)
            if eager_error is None:
                raise
            known = sorted({_describe(k[0][1]) for k in self._graphs if self._graphs[k]})
            expected = f"it was captured for inputs {' and '.join(known)}; " if known else ""
            raise InputError(f"the inputs {_describe(_signature(args, kwargs, self.training)[1])} do not fit "
                             f"{type(self._source).__name__}: {expected}the original model fails on them too: "
                             f"{eager_error}") from exc

    @signed_forward("_source")
    def forward(self, *args, **kwargs):
        live.warn_global_hooks(self._warned)
        entry = self._entry(args, kwargs)
        if entry is None:
            self._source.training = self.training
            return self._source(*args, **kwargs)
        return entry.run(*args, **kwargs)

    # ---- what users read ----------------------------------------------------------------------
    def _current(self) -> _Entry:
        if self._last is None:
            raise InputError("the model has not been captured yet: call it once, or pass example_inputs "
                             "to fxopt.optimize")
        return self._last

    @property
    def graph_module(self) -> fx.GraphModule:
        return self._current().gm

    @property
    def report(self) -> OptimizeReport:
        return self._current().report


def _describe(leaves) -> str:
    """``(float32[2, 3, 32, 32], 5)`` for a signature's leaves."""
    return "(" + ", ".join(f"{dtype_name(x[1])}{list(x[0])}" if isinstance(x, tuple) else x
                           for x in leaves) + ")"


def _eager_failure(source: nn.Module, args, kwargs, training: bool) -> str | None:
    """The error the original model raises on these inputs (run on a copy, without grad), or None."""
    try:
        with torch.no_grad():
            copy.deepcopy(source).train(training)(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - reported, not swallowed
        return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    return None


def optimize(model: nn.Module, example_inputs=None, *, pipeline: str = "default", hardware=None,
             verify: bool = True, backend: str = "eager", print_after_change: bool = False,
             dump_dir=None) -> OptimizedModule:
    """Optimize a model for training. The model passed in is never changed.

    ``pipeline="default"`` picks passes from the captured graph (see ``fxopt.passes.default``);
    ``backend``: ``"eager"`` (library kernels only), ``"triton"`` (adds the ``fuse`` pass: fxopt's
    own Triton kernels for pointwise/row-reduction chains), ``"inductor"`` (torch.compile of the
    final graph). Any pipeline string (``"dce,normalize,mixed-precision{dtype=bf16}"``) runs as given.
    Without ``example_inputs`` the model is captured on its first call, like ``torch.compile``.
    """
    if not isinstance(model, nn.Module):
        raise InputError(f"optimize() needs an nn.Module, got {type(model).__name__}")
    opt = OptimizedModule(model, pipeline=pipeline, hardware=hardware, verify=verify, backend=backend,
                          print_after_change=print_after_change, dump_dir=dump_dir)
    if example_inputs is not None:
        args, kwargs = normalize_inputs(example_inputs)
        opt._entry(args, kwargs)
    return opt
