"""``fuse`` + the triton backend: goldens (which ops are grouped, which refused and why), training
and eval of the tiny zoo models with ``backend="triton"`` verified against float64, the cost model
on fused graphs, the fallback where Triton cannot run, and re-export of the fused graph.

Without a GPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1).
``FXOPT_ACCEPT=1 pytest tests/test_fuse.py`` rewrites the goldens in ``tests/golden/fuse``.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import fxopt
from fxopt import zoo
from fxopt.codegen import runtime
from fxopt.passes import PassManager, region_table

import goldens  # noqa: E402  (tests/goldens.py)
from nets import Lambda as _Fn  # noqa: E402  (tests/nets.py)

GOLDEN = Path(__file__).parent / "golden" / "fuse"


def _x(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def run(model, inputs, pipeline="fuse", **kw):
    return goldens.run_with_decisions(model, inputs, pipeline, **kw)


class Residual(nn.Module):
    """conv -> residual add -> relu: add and relu fuse, the conv stays (not in the table)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return torch.relu(self.conv(x) + x)


class AttentionTail(nn.Module):
    """residual add + LayerNorm (two outputs: the sum feeds the next residual), and a scaled
    softmax: two row regions."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(16)

    def forward(self, x, y, scores):
        h = x + y
        return self.norm(h), h, torch.softmax(scores * 0.25, dim=-1)


class Refusals(nn.Module):
    """softmax over a middle dim, a path leaving and re-entering (non-convex), training BN."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(4)
        self.conv = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        a = torch.softmax(x, dim=1)
        r = torch.relu(x)
        return self.bn(a) + self.conv(r) * r   # relu -> conv -> mul: {relu, mul} is not convex


class LayerScale(nn.Module):
    """ConvNeXt's block tail: a per-channel scale in NHWC, a permute back to NCHW, the residual."""

    def __init__(self):
        super().__init__()
        self.gamma = nn.Parameter(torch.linspace(0.5, 1.5, 6))
        self.fc = nn.Linear(6, 6)

    def forward(self, x):
        y = self.fc(x.permute(0, 2, 3, 1))
        return x + (self.gamma * y).permute(0, 3, 1, 2)


def test_layer_scale_across_a_permute_golden():
    """The region runs in the permute's output space; gamma and the linear's output are read
    through the permute, gamma's gradient is summed in-kernel (channels innermost in memory)."""
    model = LayerScale().train()
    x = _x(2, 6, 3, 4).to(memory_format=torch.channels_last)
    text, record, gm = run(model, x, verify=True)
    goldens.check(GOLDEN / "layer_scale.diff", text)
    assert not record.rolled_back
    assert [r.ops for r in record.details if r.fused] == [["mul", "add"]]
    from fxopt.codegen.runtime import regions
    region = regions()[next(r.op for r in record.details if r.fused).split(".")[1]]
    plans = [plan for plan, _ in region.backward.values()]
    assert plans and any(spec.kind == "col" for plan in plans for _, spec in plan.program.outputs)


def test_residual_golden():
    text, record, gm = run(Residual().train(), _x(2, 4, 6, 6))
    goldens.check(GOLDEN / "residual.diff", text)
    assert record.stats["fused"] == 1


def test_attention_tail_golden():
    text, record, gm = run(AttentionTail().eval(), (_x(2, 5, 16), _x(2, 5, 16, seed=1), _x(2, 3, 5, 5, seed=2)),
                           verify=True)
    goldens.check(GOLDEN / "attention_tail.diff", text)
    assert not record.rolled_back
    fused = [r for r in record.details if r.fused]
    assert sorted(" ".join(r.ops) for r in fused) == ["add layer_norm", "mul softmax"]


def test_refusals_golden():
    text, record, gm = run(Refusals().train(), _x(2, 4, 5, 5), verify=True)
    goldens.check(GOLDEN / "refusals.diff", text)
    reasons = "\n".join(str(d) for d in record.decisions)
    assert "softmax over a dim that is not the last" in reasons
    assert "batch norm in training" in reasons
    # relu -> conv -> mul: relu cannot join {mul, add} (the region would not be convex)
    assert [r.ops for r in record.details if r.fused] == [["mul", "add"]]
    assert "region r0: one op" in reasons


def test_outputs_take_the_strides_eager_gives_the_actual_inputs():
    """A graph captured (or propagated on meta, whose convs drop channels-last) with one layout and
    run with another: the fused op's outputs are laid out as the unfused ops' would be, so the
    convs after it see the layout they would in eager (and views after it stay valid)."""
    model = Residual().train()
    _, record, gm = run(model, _x(2, 4, 6, 6))
    assert record.stats["fused"] == 1
    for x in (_x(2, 4, 6, 6), _x(2, 4, 6, 6).to(memory_format=torch.channels_last)):
        out, ref = gm(x), model(x)
        assert out.stride() == ref.stride()
        torch.testing.assert_close(out, ref)
    # eager's rule, not a heuristic: ``b + 2a`` follows b's layout though a is read first
    scale_add = lambda a, b: b + a * 2  # noqa: E731
    a, b = _x(2, 4, 6, 6).to(memory_format=torch.channels_last), _x(2, 4, 6, 6, seed=1)
    _, record, gm = run(_Fn(scale_add), (a, b), pipeline="fuse{min_gain_us=-1}")
    assert record.stats["fused"] == 1
    assert gm(a, b).stride() == scale_add(a, b).stride() == b.stride()


def test_reused_graph_with_other_shapes_says_what_to_do():
    from fxopt.codegen.runtime import RegionInputError
    _, record, gm = run(Residual().train(), _x(2, 4, 6, 6))
    with pytest.raises(RegionInputError, match="static shapes"):
        gm(_x(3, 4, 6, 6))


def test_options_bound_regions():
    x = (_x(2, 5, 16), _x(2, 5, 16, seed=1), _x(2, 3, 5, 5, seed=2))
    _, record, _ = run(AttentionTail().eval(), x, pipeline="fuse{max_row=8}")
    assert "row of 16 elements > max_row=8" in "\n".join(str(d) for d in record.decisions)
    _, record, _ = run(AttentionTail().eval(), x, pipeline="fuse{max_ops=1}")
    assert record.stats["fused"] == 0


@pytest.mark.parametrize("name", ["resnet50", "driving", "vit_b16", "convnext_t"])
@pytest.mark.parametrize("training", [True, False])
def test_zoo_trains_with_triton_backend(name, training):
    """optimize(backend="triton") verifies the whole graph against float64 (outputs, input and
    parameter grads, parameters after an SGD step, BN buffers) and raises if it differs."""
    torch.manual_seed(0)
    model = zoo.build(name, tiny=True).train(training)
    x = zoo.example_inputs(name, 2, tiny=True)
    before = runtime.LAUNCHES["triton"]
    opt = fxopt.optimize(model, x, backend="triton")
    record = next(r for r in opt.report.records if r.name == "fuse")
    assert not record.rolled_back, record.note
    assert opt.report.verification
    assert record.stats["fused"] >= 1
    ops = [str(n.target) for n in opt.graph_module.graph.nodes if n.op == "call_function"]
    assert any(o.startswith("fxopt.") for o in ops)
    if training:   # a further training step runs through the fused kernels' backward
        out = opt(*x) if isinstance(x, tuple) else opt(x)
        sum(t.float().pow(2).mean() for t in torch.utils._pytree.tree_leaves(out)).backward()
        assert all(p.grad is not None for p in opt.parameters() if p.requires_grad)
    assert runtime.LAUNCHES["triton"] > before   # the kernels ran, not the ATen fallback
    assert region_table(record.details) in opt.report.table()


def test_fused_graph_is_costed_as_one_kernel_per_region():
    """A fused add+relu moves its boundary bytes in one launch forward and one backward."""
    model, x = Residual().train(), torch.randn(8, 4, 32, 32, device="meta")
    captured = fxopt.capture(model.to("meta"), x)
    gm, (record,) = PassManager("fuse", cost=True).run(captured)
    assert record.stats["fused"] == 1 and record.step_time_after_s < record.step_time_before_s
    report = fxopt.analyze(fxopt.capture(_Wrap(gm), x))
    fused = [r for r in report.rows("node") if r["op_class"] == "fused"]
    assert len(fused) == 1, [(r["node"], r["op_class"]) for r in report.rows("node")]
    assert fused[0]["kernels"] == 2
    n = 8 * 4 * 32 * 32 * 4
    # forward: read conv out + x, write y; backward: read y and dy, write dx (passed through to both inputs)
    assert fused[0]["bytes"] == 3 * n + 3 * n


class _Wrap(nn.Module):
    def __init__(self, gm):
        super().__init__()
        self.gm = gm

    def forward(self, x):
        return self.gm(x)


def test_without_triton_regions_stay_aten_ops(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    text, record, gm = run(Residual().train(), _x(2, 4, 6, 6))
    assert not record.modified
    assert "TRITON_INTERPRET" in str(record.decisions[0])
    # fallback=reference fuses anyway and runs the same program with ATen ops, saying so
    model = Residual().train()
    _, record, gm = run(model, _x(2, 4, 6, 6), pipeline="fuse{fallback=reference}")
    assert record.stats["fused"] == 1
    before = runtime.LAUNCHES["reference"]
    x = _x(2, 4, 6, 6, seed=3)
    with pytest.warns(UserWarning, match="runs as ATen ops"):
        out = gm(x)
    torch.testing.assert_close(out, model(x))
    assert runtime.LAUNCHES["reference"] > before


def test_fused_graph_exports_and_trains():
    model, x = AttentionTail().train(), (_x(2, 5, 16), _x(2, 5, 16, seed=1), _x(2, 3, 5, 5, seed=2))
    opt = fxopt.optimize(model, x, pipeline="fuse")
    ep = torch.export.export(opt.graph_module, x)
    fused = lambda g: sum(str(n.target).startswith("fxopt.") for n in g.graph.nodes)  # noqa: E731
    assert fused(ep.graph_module) == fused(opt.graph_module) >= 1
    out = ep.module()(*x)
    ref = model(*x)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(sum(o.sum() for o in opt(*x)), list(opt.parameters()))
    ref_grads = torch.autograd.grad(sum(o.sum() for o in model(*x)), list(model.parameters()))
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_model_passed_in_is_not_changed():
    model = Residual().train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fxopt.optimize(model, _x(2, 4, 6, 6), backend="triton")
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert not any(p.grad is not None for p in model.parameters())


def test_cli_optimize_triton_backend(capsys):
    from fxopt.cli import main
    assert main(["optimize", "driving", "--tiny", "--backend", "triton", "--eval", "-v"]) == 0   # -v: every decision
    out = capsys.readouterr().out
    assert "fuse: backend triton" in out and "batch_norm relu" in out and "fused" in out


@pytest.mark.parametrize("spec", ["hf:GPT2LMHeadModel", "hf:BertForMaskedLM"])
def test_hf_language_models_train_with_triton_backend(spec):
    """Real models from their configs: GPT-2's hand-written tanh GELU (8 ops) and the residual
    add + LayerNorm pairs become kernels; the LM head's tied weight still gets both gradients
    (the whole train step is verified against float64)."""
    from fxopt.workloads.models import resolve
    built = resolve(spec, batch=2, tiny=True)
    opt = fxopt.optimize(built.model.train(), built.inputs, backend="triton")
    record = next(r for r in opt.report.records if r.name == "fuse")
    assert opt.report.verification and not record.rolled_back
    fused = [" ".join(r.ops) for r in record.details if r.fused]
    assert any("layer_norm" in f for f in fused)
    if "GPT2" in spec:
        assert "mul pow mul add mul tanh add mul" in fused


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["resnet50", "vit_b16", "convnext_t"])
def test_zoo_trains_with_compiled_triton_kernels_on_cuda(name, monkeypatch):
    """On a GPU the kernels are compiled (not interpreted): the whole train step of each tiny zoo
    model, in fp32 and under the default pipeline's bf16, is verified against float64."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    torch.manual_seed(0)
    model = zoo.build(name, tiny=True).cuda().train()
    x = zoo.example_inputs(name, 4, tiny=True)
    x = tuple(t.cuda() for t in x) if isinstance(x, tuple) else x.cuda()
    before = runtime.LAUNCHES["triton"]
    opt = fxopt.optimize(model, x, backend="triton")
    record = next(r for r in opt.report.records if r.name == "fuse")
    assert opt.report.verification and not record.rolled_back and record.stats["fused"] >= 1
    assert runtime.LAUNCHES["triton"] > before


def test_region_benchmark_script_runs_on_cpu(tmp_path):
    """benchmarks/fuse_regions.py --cpu-smoke: every region compiles, checks against float64 and
    gets a row (the GPU numbers come from the same code)."""
    import subprocess
    import sys
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "fuse_regions.py"
    out = tmp_path / "regions.md"
    done = subprocess.run([sys.executable, str(script), "--cpu-smoke", "--dtype", "fp32", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line for line in out.read_text().splitlines() if line.startswith("| ") and "fp32" in line]
    assert len(rows) >= 7 and not any("not run" in r for r in rows)
