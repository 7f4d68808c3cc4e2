"""``fxopt.optimize``: capture on the first call (or at once), run the pass pipeline, verify, and
return an nn.Module that trains like the original, under the original's parameter names."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.utils._pytree import tree_flatten

from ._forward import signed_forward
from .capture import Captured, capture_module, normalize_inputs
from .errors import FxoptError, InputError

BACKENDS = ("eager", "inductor", "triton")
# torch.cuda.get_device_name() substring -> hardware preset
GPU_PRESETS = (("H200", "h200"), ("H100", "h100"), ("A100", "a100"))


class BackendError(FxoptError, ValueError):
    """An unknown or unavailable backend."""


def hardware_for(model: nn.Module, hardware):
    """``None`` means the GPU the model is on, else the H100 preset."""
    if hardware is not None:
        return hardware
    param = next(model.parameters(), None)
    if param is not None and param.is_cuda:
        name = torch.cuda.get_device_name(param.device)
        return next((preset for key, preset in GPU_PRESETS if key in name), "h100")
    return "h100"


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

    def table(self) -> str:
        from .passes import timing_table
        lines = [f"pipeline: {self.pipeline}"] + [f"  {r}" for r in self.pipeline_reasons]
        lines += [timing_table(self.records),
                 f"predicted step: {_ms(self.step_time_before_s)} ms -> {_ms(self.step_time_after_s)} ms; "
                 f"final verification: {_verdict(self.verification)}"]
        lines += [f"  {r.name}: {r.note}" for r in self.records if r.note]
        from .passes import region_table
        lines += [region_table(r.stats["regions"]) for r in self.records
                  if r.name == "fuse" and r.stats.get("regions") and not r.rolled_back]
        changes = [d for d in self.decisions() if d.action != "keep"]
        lines += [f"  - {d}" for d in changes[:30]]
        if len(self.decisions()) > 30:
            lines.append(f"  ({len(self.decisions())} decisions in all: report.decisions())")
        return "\n".join(lines)


def _ms(t) -> str:
    return "-" if t is None else f"{t * 1e3:.3f}"


def _verdict(v) -> str:
    return "-" if v is None else ("ok" if v else "FAILED")


def _signature(args: tuple, kwargs: dict, training: bool):
    """What a captured graph is specialized to: mode, and each input's shape, dtype and device."""
    leaves, _ = tree_flatten((args, kwargs))
    return training, tuple((tuple(t.shape), t.dtype, t.device.type) if isinstance(t, torch.Tensor) else repr(t)
                           for t in leaves)


class OptimizedModule(nn.Module):
    """The optimized model. It owns a private copy of the user's model (same parameter and buffer
    names, so ``state_dict`` round-trips and optimizers work); each (mode, input signature) gets its
    own captured + rewritten graph, built on first use, all sharing those parameters."""

    def __init__(self, model: nn.Module, *, pipeline: str, hardware, verify: bool, backend: str,
                 print_after_change: bool = False, dump_dir=None):
        super().__init__()
        if backend not in BACKENDS:
            raise BackendError(f"unknown backend {backend!r}; available: {BACKENDS}")
        from .passes.manager import check_config
        check_config(pipeline, hardware)  # PipelineError / HardwareError before anything is captured
        source = copy.deepcopy(model)
        # share the copy's module tree: names, state_dict and .to() all act on the copy
        self._modules, self._parameters, self._buffers = source._modules, source._parameters, source._buffers
        object.__setattr__(self, "_source", source)
        self.training = model.training
        self._options = dict(pipeline=pipeline, hardware=hardware, verify=verify, backend=backend,
                             print_after_change=print_after_change, dump_dir=dump_dir)
        self._graphs: dict = {}    # signature -> (graph_module, callable, report)
        self._last = None

    # ---- the graphs ------------------------------------------------------------------------
    def _build(self, args: tuple, kwargs: dict):
        from .passes import PassManager
        from .passes.default import choose_pipeline
        source = self._source
        source.train(self.training)
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
        self._bind(gm)
        report = OptimizeReport(pipeline, records, reasons)
        if records:
            report.step_time_before_s = records[0].step_time_before_s
            report.step_time_after_s = records[-1].step_time_after_s
        if check:
            from .verify import verify
            report.verification = verify(source, _Runner(gm, source), kwargs or args, training=self.training)
            if not report.verification:
                raise FxoptError(f"the optimized graph does not compute what the model computes:\n"
                                 f"{report.verification.table()}")
        run = torch.compile(gm) if opts["backend"] == "inductor" else gm
        return gm, run, report

    def _bind(self, gm: fx.GraphModule) -> None:
        """Point the graph's parameters and buffers at this module's own tensors (after .to() too).
        Every name of a tied parameter (an LM head sharing the embedding) is bound, so the graph's
        uses of both names update and accumulate into the one tensor."""
        for name, tensor in list(self._source.named_parameters(remove_duplicate=False)) + \
                list(self._source.named_buffers(remove_duplicate=False)):
            prefix, _, leaf = name.rpartition(".")
            try:
                owner = gm.get_submodule(prefix)
            except AttributeError:
                continue  # a pass folded this tensor away
            if leaf in owner._parameters:
                owner._parameters[leaf] = tensor
            elif leaf in owner._buffers:
                owner._buffers[leaf] = tensor

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        for gm, _, _ in self._graphs.values():
            self._bind(gm)
            for name, value in list(vars(gm).items()):  # graph constants move with the module
                if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
                    setattr(gm, name, fn(value))
        return self  # inputs on a new device/dtype get their own graph on their first call

    @signed_forward("_source")  # inspect.signature(opt.forward) is the model's (HF Trainer reads it)
    def forward(self, *args, **kwargs):
        key = _signature(args, kwargs, self.training)
        if key not in self._graphs:
            self._graphs[key] = self._build(args, kwargs)
        self._last = key
        return self._graphs[key][1](*args, **kwargs)

    # ---- what users read ----------------------------------------------------------------------
    def _current(self):
        if not self._graphs:
            raise InputError("the model has not been captured yet: call it once, or pass example_inputs "
                             "to fxopt.optimize")
        return self._graphs[self._last]

    @property
    def graph_module(self) -> fx.GraphModule:
        return self._current()[0]

    @property
    def report(self) -> OptimizeReport:
        return self._current()[2]


class _Runner(nn.Module):
    """A graph module run under the source model's parameter names (what verify compares by name)."""

    def __init__(self, gm: fx.GraphModule, source: nn.Module):
        super().__init__()
        self._modules, self._parameters, self._buffers = source._modules, source._parameters, source._buffers
        object.__setattr__(self, "_gm", gm)

    def forward(self, *args, **kwargs):
        return self._gm(*args, **kwargs)


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
        key = _signature(args, kwargs, opt.training)
        opt._graphs[key] = opt._build(args, kwargs)
        opt._last = key
    return opt
