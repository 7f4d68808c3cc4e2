"""Clean failures (issue 14 part B): a pass that raises is rolled back, recurrent layers, control flow,
in-place inputs and float32-hard-coding models optimize and verify with the default settings."""
import copy

import pytest
import torch
from torch import nn

import fxopt
from fxopt.passes import Pass, PassError, PassManager, PassResult, register, unregister
from fxopt.verify import PERTURB_UNITS, VerificationError, verify

aten = torch.ops.aten


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)) / 2.0)


class Recurrent(nn.Module):
    def __init__(self, cell=nn.GRU):
        super().__init__()
        self.rnn, self.head = cell(6, 12, batch_first=True), nn.Linear(12, 3)

    def forward(self, x):
        y, _ = self.rnn(x)
        return self.head(y[:, -1])


class Float32State(nn.Module):
    """Eager code that hard-codes float32 (a hand-rolled RNN's zero state, a float32 softmax): its
    float64 copy cannot run, so verification must judge it at its own precision."""

    def __init__(self):
        super().__init__()
        self.inp, self.rec, self.out = nn.Linear(6, 12), nn.Linear(12, 12, bias=False), nn.Linear(12, 3)

    def forward(self, x):
        h = torch.zeros(x.shape[0], 12)  # default dtype: float32 even in a float64 copy
        for t in range(x.shape[1]):
            h = torch.tanh(self.inp(x[:, t]) + self.rec(h))
        att = torch.softmax(h @ h.t() / 4.0, dim=-1, dtype=torch.float32)
        return self.out(att @ h)


class MutatesInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x.mul_(2.0)
        return self.fc(x)


class Branchy(nn.Module):
    """torch.cond (a higher-order op) between ordinary layers the default pipeline rewrites."""

    def __init__(self):
        super().__init__()
        self.pre, self.fc = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        y = torch.relu(self.pre(x)) / 2.0
        return torch.cond(y.sum() > 0, lambda a: self.fc(a).relu(), lambda a: self.fc(a) * 2.0, (y,))


def _eager_step(model, x):
    """Output and parameter gradients of eager autograd (the independent reference)."""
    m = copy.deepcopy(model)
    out = m(x.clone())
    out.square().sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}


def _optimized_step(model, x, **kwargs):
    o = fxopt.optimize(model, x.clone(), **kwargs)
    out = o(x.clone())
    out.square().sum().backward()
    return o, out.detach(), {n: p.grad.clone() for n, p in o.named_parameters()}


def _assert_matches_eager(o, model, x, out, grads):
    """Outputs and gradients equal eager's: to float32 rounding, or, where the default pipeline kept
    mixed precision (the graph declares it), to 16-bit rounding relative to each tensor's norm."""
    ref_out, ref_grads = _eager_step(model, x)
    low = o.graph_module.meta.get("fxopt.precision")
    assert grads.keys() == ref_grads.keys()
    for name, got, want in [("output", out, ref_out)] + [(n, grads[n], g) for n, g in ref_grads.items()]:
        if low is None:
            torch.testing.assert_close(got, want, msg=name)
        else:  # bf16 has 8 significant bits: 2**-8 = 0.4 % per rounding, a few roundings deep
            assert (got - want).norm() <= 0.03 * want.norm() + 1e-6, (name, low)


# ---------------------------------------------------------------------------------------------
# a pass that raises is rolled back, recorded, and the pipeline goes on


@pytest.fixture
def exploding_pass():
    @register
    class Explode(Pass):
        name, summary = "test-robust-explode", "test only: half-rewrites the graph, then raises"

        def run(self, gm, ctx):
            relu = next(n for n in gm.graph.nodes if n.target is aten.relu.default)
            relu.target = aten.sigmoid.default  # a change that must not survive the rollback
            raise ValueError("boom")
    yield Explode
    unregister(Explode.name)


def test_a_raising_pass_is_rolled_back_and_the_pipeline_goes_on(exploding_pass, caplog):
    captured = fxopt.capture(MLP(), torch.randn(4, 8))
    gm, records = PassManager("test-robust-explode,normalize", verify=True).run(captured)
    boom, normalize = records
    assert boom.rolled_back and not boom.kept and "ValueError: boom" in boom.error
    assert boom.note.startswith("raised, rolled back") and "test-robust-explode" in caplog.text
    assert normalize.kept and normalize.verification  # the pass after it ran on the graph before it
    targets = {n.target for n in gm.graph.nodes}
    assert aten.relu.default in targets and aten.sigmoid.default not in targets
    assert aten.mul.Tensor in targets and aten.div.Tensor not in targets  # normalize's div -> mul
    x = torch.randn(4, 8)
    torch.testing.assert_close(gm(x), captured.graph_module(x))


def test_on_error_raise_still_raises(exploding_pass):
    with pytest.raises(PassError, match="boom"):
        PassManager("test-robust-explode", cost=False, on_error="raise").run(fxopt.capture(MLP(), torch.randn(4, 8)))


def test_a_raising_pass_inside_optimize_is_reported(exploding_pass):
    model, x = MLP(), torch.randn(4, 8)
    o, out, grads = _optimized_step(model, x, pipeline="test-robust-explode,dce")
    assert "raised, rolled back" in o.report.table() and o.report.records[0].rolled_back
    ref_out, ref_grads = _eager_step(model, x)
    torch.testing.assert_close(out, ref_out)
    assert grads.keys() == ref_grads.keys()


# ---------------------------------------------------------------------------------------------
# models the default settings used to refuse


@pytest.mark.parametrize("cell", [nn.GRU, nn.LSTM])
def test_recurrent_layers_optimize_with_the_defaults(cell):
    torch.manual_seed(0)
    model, x = Recurrent(cell), torch.randn(3, 5, 6)
    o, out, grads = _optimized_step(model, x)
    assert o.report.verification and o.report.verification.reference == "float64"
    _assert_matches_eager(o, model, x, out, grads)


def test_passes_on_a_control_flow_graph_are_verified_or_rolled_back():
    """The pass side of torch.cond, on torch.export's own capture: the default pipeline (plus
    mixed-precision, which the cost model cannot price through cond) never crashes; what it keeps
    is verified, what raises is rolled back with its error."""
    from fxopt.capture import Captured
    from fxopt.passes.default import choose_pipeline

    torch.manual_seed(0)
    model, x = Branchy(), torch.randn(4, 8)
    gm0 = torch.export.export(model, (x,), strict=False).module()
    captured = Captured(gm0, (x,), {}, True)
    pipeline, _ = choose_pipeline(gm0, True)
    gm, records = PassManager(pipeline + ",mixed-precision", verify=True).run(captured)
    assert [r.name for r in records] == [p.split("{")[0] for p in (pipeline + ",mixed-precision").split(",")]
    assert all(r.verification for r in records if r.kept)
    assert all(r.error for r in records if r.rolled_back and r.verification is None)
    assert any(n.target is torch.ops.higher_order.cond for n in gm.graph.nodes)
    torch.testing.assert_close(gm(x), model(x))


def test_control_flow_does_not_crash_the_default_pipeline():
    torch.manual_seed(0)
    model, x = Branchy(), torch.randn(4, 8)
    o, out, grads = _optimized_step(model, x)
    assert all(r.verification is None or r.verification for r in o.report.records if r.kept)
    _assert_matches_eager(o, model, x, out, grads)


def test_a_model_mutating_its_input_verifies_and_optimizes():
    torch.manual_seed(0)
    model, x = MutatesInput(), torch.randn(4, 8)
    before = x.clone()
    result = verify(model, copy.deepcopy(model), x)
    assert result and torch.equal(x, before)  # verification ran on copies of the input
    grad = next(c for c in result.checks if c.name == "grad[input0]")
    assert grad.ok and grad.cand_error == grad.ref_error < 1e-6  # same model: same rounding as the reference
    o, out, grads = _optimized_step(model, x)
    _assert_matches_eager(o, model, x, out, grads)
    want = model.fc(2.0 * x).detach()  # by hand: forward doubles its input first
    torch.testing.assert_close(out, want, **({} if o.graph_module.meta.get("fxopt.precision") is None
                                            else dict(atol=0.05, rtol=0.05)))


# ---------------------------------------------------------------------------------------------
# verification when the float64 copy cannot run


def test_float32_hard_coded_model_is_judged_at_its_own_precision():
    torch.manual_seed(0)
    model, x = Float32State(), torch.randn(3, 4, 6)
    with pytest.raises(RuntimeError):  # the premise: the model's float64 copy does not run
        copy.deepcopy(model).double()(x.double())
    result = verify(model, copy.deepcopy(model), x)
    assert result, result.table()
    assert result.reference.startswith("own precision: the float64 copy failed (RuntimeError")
    assert "own precision" in result.verdict() and f"moved by {PERTURB_UNITS:g} rounding unit" in result.rule
    # the noise floor is real noise: non-zero for the outputs, and far below the outputs' scale
    out = next(c for c in result.checks if c.kind == "output")
    assert 0 < out.ref_error < 1e-5


def test_own_precision_rule_still_catches_a_wrong_candidate():
    torch.manual_seed(0)
    model, x = Float32State(), torch.randn(3, 4, 6)
    wrong = copy.deepcopy(model)
    with torch.no_grad():
        wrong.out.weight.mul_(1.001)  # a 0.1 % error: far above float32 noise
    result = verify(model, wrong, x)
    assert not result and "output" in {c.kind for c in result.failures()}
    assert result.reference.startswith("own precision")


def test_float32_hard_coded_model_optimizes_with_the_defaults():
    torch.manual_seed(0)
    model, x = Float32State(), torch.randn(3, 4, 6)
    o, out, grads = _optimized_step(model, x)
    assert o.report.verification and o.report.verification.reference.startswith("own precision")
    _assert_matches_eager(o, model, x, out, grads)


def test_a_reference_that_fails_says_why_and_what_to_do():
    with pytest.raises(VerificationError, match=r"(?s)reference model itself fails.*mat1 and mat2.*verify=False"):
        verify(MLP(), MLP(), torch.randn(4, 5))


def test_hf_eager_attention_verifies_in_float64():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                 image_size=8, patch_size=4, attn_implementation="eager")
    torch.manual_seed(0)
    model, x = transformers.ViTModel(cfg).train(), torch.randn(2, 3, 8, 8)
    captured = fxopt.capture(model, x)
    _, records = PassManager("normalize,sdpa", verify=True).run(captured)
    sdpa = records[-1]
    assert sdpa.kept and sdpa.verification and sdpa.verification.reference == "float64", sdpa.note


# ---------------------------------------------------------------------------------------------
# attention with a learnable mask (windowed ViT relative position bias passed as attn_mask)


class BiasedAttention(nn.Module):
    def __init__(self, dim=16, heads=2, tokens=8):
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.rel_bias = nn.Parameter(0.1 * torch.randn(heads, tokens, tokens))

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        y = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=self.rel_bias)
        return self.proj(y.transpose(1, 2).reshape(b, n, c))


def test_learnable_attention_bias_is_costed_as_the_gpu_kernel():
    torch.manual_seed(0)
    b, h, n, d = 2, 2, 8, 8
    report = fxopt.analyze(BiasedAttention(), torch.randn(b, n, h * d))
    row = next(r for r in report.rows("node") if r["op"] == "scaled_dot_product_attention")
    assert row["fwd_flops"] == 2 * (2 * b * h * n * n * d)  # QK^T and PV, by hand
    assert row["bwd_flops"] >= 2 * row["fwd_flops"] and row["kernels"] >= 2  # one fused fwd, one fused bwd
    assert report.totals["step_time_s"] > 0


def test_learnable_attention_bias_trains_like_eager():
    torch.manual_seed(0)
    model, x = BiasedAttention(), torch.randn(2, 8, 16)
    o, out, grads = _optimized_step(model, x)
    assert o.report.step_time_before_s is not None  # costed, not silently skipped
    assert grads["rel_bias"].abs().sum() > 0
    _assert_matches_eager(o, model, x, out, grads)


# ---------------------------------------------------------------------------------------------
# HF decoders with the default use_cache=True


@pytest.mark.parametrize("arch", ["gpt2", "opt"])
def test_hf_decoder_with_default_kv_cache_captures_for_training(arch):
    transformers = pytest.importorskip("transformers")
    cfg = {"gpt2": lambda: transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=64, n_positions=16),
           "opt": lambda: transformers.OPTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                                 ffn_dim=32, vocab_size=64, max_position_embeddings=16,
                                                 word_embed_proj_dim=16)}[arch]()
    assert cfg.use_cache is True  # the default this test is about
    torch.manual_seed(0)
    model = (transformers.GPT2Model if arch == "gpt2" else transformers.OPTModel)(cfg).train()
    ids = torch.randint(0, 64, (2, 8))
    o = fxopt.optimize(model, {"input_ids": ids}, pipeline="dce,normalize")
    assert o.report.verification and model.config.use_cache is True
    torch.manual_seed(1)
    got = o(input_ids=ids).last_hidden_state
    torch.manual_seed(1)  # same dropout masks as the optimized call
    want = model(input_ids=ids).last_hidden_state
    torch.testing.assert_close(got, want)
    got.square().sum().backward()
    want.square().sum().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(dict(o.named_parameters())[name].grad, p.grad, msg=name)


class RouterCastsItself(nn.Module):
    """Like HF SwitchTransformers' router: ``self.classifier = self.classifier.to(self.dtype)`` in forward."""

    def __init__(self):
        super().__init__()
        self.classifier, self.out = nn.Linear(8, 4), nn.Linear(4, 2)

    def forward(self, x):
        self.classifier = self.classifier.to(torch.float32)
        return self.out(torch.softmax(self.classifier(x), dim=-1))


def test_a_no_op_module_to_inside_forward_captures():
    torch.manual_seed(0)
    model, x = RouterCastsItself(), torch.randn(4, 8)
    o, out, grads = _optimized_step(model, x, pipeline="dce,normalize")
    _assert_matches_eager(o, model, x, out, grads)


def test_moe_expert_loop_is_a_clean_capture_error():
    """Switch's experts loop over the experts the batch hits (``nonzero``): the graph would depend on
    the example's routing, so capture refuses with the line, not a crash in the router's ``.to``."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.SwitchTransformersConfig(d_model=16, d_ff=32, d_kv=8, num_heads=2, num_layers=2,
                                                encoder_sparse_step=1, num_experts=2, vocab_size=32,
                                                expert_capacity=16, use_cache=False)
    model = transformers.SwitchTransformersEncoderModel(cfg).train()
    inputs = {"input_ids": torch.randint(0, 32, (2, 4)), "attention_mask": torch.ones(2, 4, dtype=torch.long)}
    with pytest.raises(fxopt.CaptureError, match=r"(?s)data-dependent.*for expert_idx in expert_hit.*torch.cond"):
        fxopt.capture(model, inputs)
