"""``fxopt profile``: measured time per fx node of a real training step, next to the cost model's
prediction for it.

The captured graph runs under ``torch.profiler`` with one ``record_function`` range per fx node
in the forward (an Interpreter's ``run_node``) and per autograd node in the backward (a pre-hook
opens the range of the fx node that created the autograd node, a post-hook closes it: the same
attribution the cost model uses, cost_models/trace.py). Each unit of measured time is filed
under its innermost fxopt range: on a GPU the device time of each kernel (by the op that
launched it), on the CPU the time of each outermost ATen op. Time no range covers (autograd's
gradient sums, the loss) is "unattributed", so the nodes plus it add up to the step.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from tabulate import tabulate
from torch import fx, nn
from torch.profiler import ProfilerActivity, profile as torch_profile, record_function
from torch.utils._pytree import tree_flatten

from ..cost_models.names import OPTIMIZER_NODE
from ..cost_models.trace import claim_autograd_nodes
from ..errors import FxoptError

FWD, BWD, OPT = "fxopt.fwd::", "fxopt.bwd::", "fxopt.opt::"


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman rank correlation (ties get their average rank): Pearson's r of the ranks."""
    if len(a) != len(b):
        raise FxoptError(f"spearman needs two lists of one length, got {len(a)} and {len(b)}")
    if len(a) < 2:
        return float("nan")

    def ranks(xs):
        order = sorted(range(len(xs)), key=lambda i: xs[i])
        r = [0.0] * len(xs)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2 + 1
            i = j + 1
        return r

    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va = sum((x - ma) ** 2 for x in ra) ** 0.5
    vb = sum((y - mb) ** 2 for y in rb) ** 0.5
    return cov / (va * vb) if va and vb else float("nan")


class _ProfiledInterpreter(fx.Interpreter):
    """Runs each node inside a named range; hooks the autograd nodes it creates for the backward."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.owner: set = set()
        self.open: dict = {}

    def run_node(self, n: fx.Node):
        if n.op in ("placeholder", "output", "get_attr"):
            return super().run_node(n)
        with record_function(FWD + n.name):
            out = super().run_node(n)
        self._hook(n.name, out)
        return out

    def _hook(self, name: str, out) -> None:
        for fn in claim_autograd_nodes(out, self.owner):
            if type(fn).__name__ != "AccumulateGrad":
                fn.register_prehook(self._enter(fn, name))
                fn.register_hook(self._exit(fn))

    def _enter(self, fn, name):
        def hook(grad_outputs):
            rf = record_function(BWD + name)
            rf.__enter__()
            self.open[id(fn)] = rf
        return hook

    def _exit(self, fn):
        def hook(grad_inputs, grad_outputs):
            rf = self.open.pop(id(fn), None)
            if rf is not None:
                rf.__exit__(None, None, None)
        return hook


@dataclass
class ProfileResult:
    model: str
    device: str
    hardware: str
    steps: int
    rows: list[dict]   # per node: node, op, predicted_s, measured_s (of which measured_bwd_s), abs_err_s, rel_err
    measured_step_s: float        # per step, everything measured (nodes + unattributed)
    predicted_step_s: float
    unattributed_s: float
    spearman: float
    notes: list = field(default_factory=list)

    def worst(self, n: int = 10) -> list[dict]:
        """Nodes whose prediction is furthest off, by absolute error."""
        return sorted(self.rows, key=lambda r: -r["abs_err_s"])[:n]

    def table(self, top: int = 30, tablefmt: str = "simple") -> str:
        def ms(x):
            return f"{x * 1e3:.3f}"
        body = [[r["node"], r["op"], ms(r["predicted_s"]), ms(r["measured_s"]), ms(r["abs_err_s"]),
                 "—" if r["rel_err"] is None else f"{r['rel_err'] * 100:+.0f}"]
                for r in sorted(self.rows, key=lambda r: -r["measured_s"])[:top]]
        head = ["node", "op", "predicted ms", "measured ms", "|err| ms", "rel err %"]
        lines = [f"{self.model} on {self.device}, predicted with {self.hardware}, {self.steps} steps",
                 f"  step: predicted {ms(self.predicted_step_s)} ms, measured {ms(self.measured_step_s)} ms "
                 f"(unattributed {ms(self.unattributed_s)} ms); Spearman rank correlation per node "
                 f"{self.spearman:.3f}",
                 tabulate(body, headers=head, tablefmt=tablefmt, disable_numparse=True),
                 "worst predicted: " + ", ".join(f"{r['node']} ({ms(r['predicted_s'])} vs {ms(r['measured_s'])} ms)"
                                                 for r in self.worst(5))]
        return "\n".join(lines + [f"  note: {n}" for n in self.notes])

    def to_dict(self) -> dict:
        return {"schema": "fxopt.profile/1", **{k: getattr(self, k) for k in (
            "model", "device", "hardware", "steps", "measured_step_s", "predicted_step_s", "unattributed_s",
            "spearman", "notes", "rows")}}


def _range_of(ev):
    """The innermost fxopt range enclosing a profiler event (itself included), or None."""
    while ev is not None:
        if ev.name.startswith((FWD, BWD, OPT)):
            return ev.name
        ev = ev.cpu_parent
    return None


def _is_aten(ev) -> bool:
    return ev.name.startswith("aten::")


def _attribute(events, device: torch.device) -> dict[str, float]:
    """Seconds per range name (plus None for unattributed)."""
    out: dict = {}
    for ev in events:
        if device.type == "cuda":
            if getattr(ev, "device_type", None) is not None and str(ev.device_type).endswith("CPU"):
                us = sum(k.duration for k in getattr(ev, "kernels", []))
            else:
                continue
        else:
            if not _is_aten(ev):
                continue
            parent, nested = ev.cpu_parent, False
            while parent is not None:
                if _is_aten(parent):
                    nested = True
                    break
                parent = parent.cpu_parent
            if nested:
                continue
            us = ev.cpu_time_total
        if us:
            key = _range_of(ev)
            out[key] = out.get(key, 0.0) + us * 1e-6
    return out


def profile(model: nn.Module, inputs, steps: int = 3, hardware=None, *, warmup: int = 1,
            device=None) -> ProfileResult:
    """Measure a training step per fx node (forward + backward) and compare with ``fxopt.analyze``.

    ``hardware``: preset or profile path for the prediction (default: the GPU's preset, on the CPU
    a quick ``fxopt.calibrate`` of this CPU).
    """
    from ..analyze import UnknownOpWarning, analyze
    from ..capture import capture, normalize_inputs
    device = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    notes = []
    if hardware is None:
        if device.type == "cuda":
            from ..cost_models.hardware import preset_for_gpu
            hardware = preset_for_gpu(torch.cuda.get_device_name(device))
        else:
            from .calibrate import calibrate
            from ..cost_models.hardware import Hardware
            prof = calibrate("cpu", quick=True)
            hardware = Hardware(**{k: v for k, v in prof.items() if k in Hardware.__dataclass_fields__})
            notes.append("predicted with a quick calibration of this CPU")
    model = model.to(device).train()
    args, kwargs = normalize_inputs(inputs)
    move = lambda t: t.to(device) if isinstance(t, torch.Tensor) else t
    args, kwargs = tuple(move(a) for a in args), {k: move(v) for k, v in kwargs.items()}
    captured = capture(model, kwargs or args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnknownOpWarning)
        report = analyze(captured, hardware=hardware)
    gm = captured.graph_module
    spec = getattr(gm, "_in_spec", None)
    if spec is not None:
        from torch.fx._pytree import tree_flatten_spec
        flat = tree_flatten_spec((args, kwargs), spec)
    else:
        flat = tree_flatten((args, kwargs))[0]
    params = [p for p in gm.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9, foreach=True)

    def step():
        out = _ProfiledInterpreter(gm).run(*flat)
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor) and t.requires_grad]
        torch.autograd.backward(outs, [torch.ones_like(t) for t in outs])  # what analyze costs
        with record_function(OPT + OPTIMIZER_NODE):
            opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(max(warmup, 1)):  # creates the momentum buffers (analyze costs a steady step)
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    per_range = _attribute(prof.events(), device)
    measured: dict[str, float] = {}
    measured_bwd: dict[str, float] = {}
    for key, s in per_range.items():
        node = None if key is None else key.split("::", 1)[1]
        measured[node] = measured.get(node, 0.0) + s / steps
        if key is not None and key.startswith(BWD):
            measured_bwd[node] = measured_bwd.get(node, 0.0) + s / steps
    predicted = {r["node"]: float(r["time_s"]) for r in report.rows("node")}
    ops = {n.name: str(n.target) for n in gm.graph.nodes}
    rows = []
    for node in sorted(set(predicted) | {k for k in measured if k is not None}):
        p, m = predicted.get(node, 0.0), measured.get(node, 0.0)
        rows.append({"node": node, "op": ops.get(node, "(optimizer)" if node == OPTIMIZER_NODE else ""),
                     "predicted_s": p, "measured_s": m,
                     "measured_bwd_s": measured_bwd.get(node, 0.0), "abs_err_s": abs(p - m),
                     "rel_err": (p - m) / m if m else None})
    both = [r for r in rows if r["predicted_s"] > 0 and r["measured_s"] > 0]
    rho = spearman([r["predicted_s"] for r in both], [r["measured_s"] for r in both])
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return ProfileResult(captured.source_name, dev_name, getattr(report.hardware, "name", str(hardware)), steps,
                         rows, sum(measured.values()), float(report.totals["step_time_s"]),
                         measured.get(None, 0.0), rho, notes)
