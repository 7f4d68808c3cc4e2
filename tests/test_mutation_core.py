"""Tests written to kill the surviving mutants of the core's mutation run (tools/mutation.py).

Each test pins behaviour the module docs promise against a number derived by hand (exact powers of
two, so rounding is known), a float64 computation or brute force; none compares the code with
itself. Names start with the module they test (``verify``, ``capture``, ``program``, ``lower``):
tools/mutation.py selects them per shard with ``-k``.
"""
from __future__ import annotations

import copy
import threading

import pytest
import torch
from torch import nn

from fxopt.errors import InputError
from fxopt.verify import VerificationError, check_tensor, verify

EPS32 = 2.0 ** -23   # float32's rounding unit (torch.finfo(torch.float32).eps), by hand


# ----------------------------------------------------------------------------------
# verify
# ----------------------------------------------------------------------------------


class Fp32Only(nn.Module):
    """Runs only in float32 (``torch.eye`` is float32, so the float64 copy's matmul fails): verify
    falls back to the own-precision rule. ``unused`` gets no gradient (SGD leaves it), ``scale`` is a
    buffer the forward does not change; every value is a power of two, so moving it by one float32
    rounding unit is exact."""

    def __init__(self):
        super().__init__()
        self.unused = nn.Parameter(torch.tensor([1.0, -2.0, 4.0]))
        self.register_buffer("scale", torch.tensor([0.5, -8.0]))
        self.register_buffer("count", torch.tensor(3))   # an integer buffer is never moved

    def forward(self, x):
        return x @ torch.eye(x.shape[-1])


X_POW2 = torch.tensor([[1.0, -2.0, 0.5, 2.0], [-1.0, 0.25, -2.0, 1.0]])   # max|x| = 2


def _by_name(res):
    return {c.name: c for c in res.checks}


@pytest.mark.parametrize("training", [True, False])
def test_verify_own_precision_noise_is_one_rounding_unit(training):
    """Module doc: without a float64 copy, e_ref is the reference rerun with every floating input,
    parameter and buffer moved by 1 rounding unit. For an exact model (x @ I) that is eps * max|t|
    for each tensor the run reports unchanged: the output (x), a parameter SGD does not step, a buffer."""
    res = verify(Fp32Only(), Fp32Only(), X_POW2, training=training)
    assert res.ok and res.reference.startswith("own precision: the float64 copy failed (RuntimeError")
    checks = _by_name(res)
    out = checks["output"]
    assert out.ref_error == EPS32 * 2.0 and out.cand_error == 0.0
    assert out.allowed == pytest.approx(3.0 * EPS32 * 2.0 + 1e-5 * 2.0, rel=1e-12)
    assert checks["buffer[scale]"].ref_error == EPS32 * 8.0
    assert "buffer[count]" not in checks
    if training:
        assert checks["param_after_step[unused]"].ref_error == EPS32 * 4.0
        assert checks["grad[unused]"].ref_error == 0.0 and checks["grad[input0]"].ref_error == 0.0


def test_verify_perturbation_moves_every_element_by_one_unit_both_ways():
    from fxopt.verify import _perturbed
    t = torch.tensor([1.0, -2.0, 0.5, 4.0] * 16)
    moved = _perturbed(t, 1.0, torch.Generator().manual_seed(0))
    step = moved - t
    assert torch.equal(step.abs(), t.abs() * EPS32)              # each element: one unit, exactly
    up = (step.sign() == t.sign()).sum().item()
    assert 16 <= up <= 48                                         # random sign: both ways, about half


class Scaled(nn.Module):
    """``y = x @ w.T * factor``: with factor != 1 a candidate whose gradient is off by that factor."""

    def __init__(self, factor=1.0):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([[1.0, -0.5], [0.25, 2.0], [-1.0, 1.0]]))
        self.factor = factor

    def forward(self, x):
        return x @ self.w.t() * self.factor


def test_verify_sgd_step_is_lr_times_the_gradient():
    """A candidate whose weight gradient is 1.5x the reference's: after one SGD step its weight is
    off by lr * (its gradient error), lr = 0.1 by default."""
    x = torch.tensor([[1.0, 2.0], [-0.5, 1.0], [2.0, -1.0], [0.5, 0.5]])
    for lr in (0.1, 0.25):
        kw = {} if lr == 0.1 else {"lr": lr}
        checks = _by_name(verify(Scaled(), Scaled(1.5), x, **kw))
        g, w = checks["grad[w]"], checks["param_after_step[w]"]
        assert g.cand_error > 0.1 and not g.ok
        assert w.cand_error == pytest.approx(lr * g.cand_error, rel=1e-5)


class Identity(nn.Module):
    def forward(self, x):
        return x * 1.0


class NoInputGrad(nn.Module):
    def forward(self, x):
        return x.detach() * 1.0


def test_verify_loss_weights_are_seeded_standard_normals():
    """The loss is sum(out * w) with w ~ N(0, 1) from a generator seeded with ``seed``: the input
    gradient of the identity is w, so a candidate that drops it is off by max|w| (float64 randn)."""
    x = torch.ones(3, 5)
    for seed in (0, 3):
        w = torch.randn(3, 5, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        kw = {} if seed == 0 else {"seed": seed}
        c = _by_name(verify(Identity(), NoInputGrad(), x, **kw))["grad[input0]"]
        assert c.cand_error == pytest.approx(float(w.abs().max()), rel=1e-6)   # float32 rounding of w
        assert not c.ok


class Unpicklable(nn.Module):
    def __init__(self):
        super().__init__()
        self.lock = threading.Lock()

    def forward(self, x):
        return x


def test_verify_a_model_that_cannot_be_copied_is_a_verification_error():
    with pytest.raises(VerificationError, match="could not copy the float64 copy of the reference onto cpu"):
        verify(Unpicklable(), Identity(), torch.ones(2))


def test_verify_verdict_names_at_most_three_failures():
    from fxopt.verify import TensorCheck, VerificationResult

    def result(n_bad):
        checks = [TensorCheck(f"t{i}", "output", 0.0, 1.0, 0.5, False) for i in range(n_bad)]
        checks.append(TensorCheck("fine", "output", 0.0, 0.0, 0.5, True))
        return VerificationResult(ok=False, checks=checks, rule="")

    assert result(3).verdict() == "FAIL: 3 of 4 tensors of the train step out of tolerance (t0, t1, t2)"
    assert result(4).verdict() == "FAIL: 4 of 5 tensors of the train step out of tolerance (t0, t1, t2, ...)"



def test_verify_ratio_of_a_failure_without_a_finite_error_is_inf():
    from fxopt.verify import TensorCheck
    assert TensorCheck("t", "output", 0.0, float("nan"), 1.0, False).ratio == float("inf")
    assert TensorCheck("t", "output", 0.0, float("inf"), 1.0, False).ratio == float("inf")
    assert TensorCheck("t", "output", 0.0, 0.5, 2.0, True).ratio == 0.25
    assert TensorCheck("t", "output", 0.0, 0.5, 0.0, False).ratio == float("inf")


def test_verify_a_multiple_below_one_still_scales_e_ref():
    ref64 = torch.tensor([1.0, 2.0], dtype=torch.float64)
    ref = torch.tensor([1.0, 2.0 + 2.0 ** -10])                 # e_ref = 2^-10, exactly
    c = check_tensor("t", "output", ref64, ref, ref, multiple=0.5)
    assert c.allowed == 0.5 * 2.0 ** -10 + 1e-5 * 2.0
    c = check_tensor("t", "output", ref64, ref, ref, multiple=0.0)
    assert c.allowed == 1e-5 * 2.0


class Float64Fails(nn.Module):
    def forward(self, x):
        if x.dtype == torch.float64:
            raise RuntimeError("no float64 here: " + "x" * 400)
        return x * 2.0


def test_verify_reference_names_the_float64_failure_in_300_characters():
    res = verify(Float64Fails(), Float64Fails(), torch.ones(3), training=False)
    cause = ("RuntimeError: no float64 here: " + "x" * 400)[:300]
    assert res.ok and res.reference == f"own precision: the float64 copy failed ({cause})"


def test_verify_declared_precision_of_a_graph_module_and_its_wrapper():
    from torch import fx

    from fxopt.verify import PRECISION_KEY, declared_precision
    gm = fx.symbolic_trace(Identity())
    assert declared_precision(gm) is None
    gm.meta[PRECISION_KEY] = "bf16"
    assert declared_precision(gm) is torch.bfloat16

    class Wrapper(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self._gm = inner

        def forward(self, x):
            return self._gm(x)

    assert declared_precision(Wrapper(gm)) is torch.bfloat16
    res = verify(Identity(), Wrapper(gm), torch.ones(2, 3))
    assert res.precision is torch.bfloat16 and "(judged at bfloat16)" in res.verdict()
    assert verify(Identity(), Wrapper(gm), torch.ones(2, 3), reference_precision=None).precision is None



def test_verify_a_captured_graph_runs_its_float64_copy():
    """Module doc: in an fx graph, float32 dtype arguments become float64 in the float64 copy. The
    captured graph of ``x @ eye(dtype=float32)`` (eager cannot run in float64) is therefore
    judged against a true float64 reference, and x @ I is exact: no error on either side."""
    import fxopt

    class Fp32Eye(nn.Module):
        def forward(self, x):
            return x @ torch.eye(x.shape[-1], dtype=torch.float32)

    gm = fxopt.capture(Fp32Eye(), X_POW2).graph_module
    assert any(n.kwargs.get("dtype") is torch.float32 for n in gm.graph.nodes), "no float32 dtype argument"
    res = verify(gm, copy.deepcopy(gm), X_POW2, training=False)
    assert res.ok and res.reference == "float64", res.reference
    assert _by_name(res)["output"].ref_error == 0.0


# ----------------------------------------------------------------------------------
# capture
# ----------------------------------------------------------------------------------


def test_capture_normalize_inputs_forms():
    from fxopt.capture import normalize_inputs
    x, y = torch.ones(2), torch.zeros(3)
    assert normalize_inputs(x) == ((x,), {})
    assert normalize_inputs([x, y]) == ((x, y), {}) and normalize_inputs((x,)) == ((x,), {})
    assert normalize_inputs({"a": x}) == ((), {"a": x})
    with pytest.raises(InputError, match="got int"):
        normalize_inputs(3)


def test_capture_drops_exports_guard_module():
    """torch.export's ``ep.module()`` calls a ``_guards_fn`` submodule first; the captured graph has
    neither the call nor the submodule (it is not part of the model's computation)."""
    import fxopt
    gm = fxopt.capture(nn.Linear(2, 2), torch.ones(3, 2)).graph_module
    assert not [n for n in gm.graph.nodes if n.op == "call_module"]
    assert not [name for name, _ in gm.named_children()]
    assert "_guards" not in gm.code


class Cached(nn.Module):
    """An HF-style decoder: ``config.use_cache`` changes what forward computes."""

    def __init__(self):
        super().__init__()
        self.config = type("Config", (), {"use_cache": True})()

    def forward(self, x):
        return x * (2.0 if self.config.use_cache else 3.0)


@pytest.mark.parametrize("training, factor", [(True, 3.0), (False, 2.0)])
def test_capture_training_graph_runs_without_kv_cache(training, factor):
    import fxopt
    model = Cached().train(training)
    captured = fxopt.capture(model, torch.ones(2))
    assert torch.equal(captured(torch.ones(2)), torch.full((2,), factor))
    assert model.config.use_cache is True


class NoOpTo(nn.Module):
    """SwitchTransformers' router: ``self.lin = self.lin.to(dtype)`` in forward, a no-op in eager."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.lin, self.dtype = nn.Linear(2, 2), dtype

    def forward(self, x):
        self.lin = self.lin.to(self.dtype)
        return self.lin(x)


def test_capture_keeps_a_no_op_module_to_and_restores_nn_module_to():
    import fxopt
    original = nn.Module.to
    model = NoOpTo()
    x = torch.tensor([[1.0, 2.0]])
    torch.testing.assert_close(fxopt.capture(model, x)(x), x @ model.lin.weight.t() + model.lin.bias)
    assert nn.Module.to is original
    from fxopt.errors import CaptureError
    with pytest.raises(CaptureError, match="Couldn't swap Linear.weight"):   # a converting .to still runs
        fxopt.capture(NoOpTo(torch.float64), x.double())
    assert nn.Module.to is original


HINTS = [  # an export failure message -> a word of the hint the table gives for it
    ("Could not guard on data-dependent expression", "torch.cond"),
    ("Constraints violated (batch)!", "dynamic_batch=False"),
    ("DynamicCache is not a tensor", "use_cache=False"),
    ("Unsupported: call_function foo", "custom_op"),
    ("something else went wrong", "simplify the failing line"),
]


@pytest.mark.parametrize("message, hint", HINTS)
def test_capture_export_failure_gets_the_matching_hint(monkeypatch, message, hint):
    import fxopt
    from fxopt.errors import CaptureError

    def fail(*a, **k):
        raise RuntimeError(message)

    monkeypatch.setattr(torch.export, "export", fail)
    with pytest.raises(CaptureError) as info:
        fxopt.capture(nn.ReLU(), torch.ones(2))
    text = str(info.value)
    assert text.startswith(f"torch.export could not capture ReLU: RuntimeError: {message}\n")
    assert hint in text.split("try:")[1]


@pytest.mark.parametrize("exc, error, words", [
    (TypeError("forward() takes 2 positional arguments but 3 were given"), InputError, "do not match"),
    (TypeError("forward() got an unexpected keyword argument 'y'"), InputError, "do not match"),
    (TypeError("forward() takes 2 positional ones"), InputError, "do not match"),
    (TypeError("unsupported operand type(s) for +"), "CaptureError", "could not capture"),
    (RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)"), InputError, "shapes [(2, 3)]"),
    (ValueError("size mismatch for fc"), InputError, "do not fit"),
    (RuntimeError("mat1 and mat2 cannot be multiplied"), "CaptureError", "could not capture"),
])
def test_capture_input_mismatch_is_an_input_error(monkeypatch, exc, error, words):
    import fxopt
    from fxopt.errors import CaptureError

    def fail(*a, **k):
        raise exc

    monkeypatch.setattr(torch.export, "export", fail)
    with pytest.raises(CaptureError if error == "CaptureError" else error) as info:
        fxopt.capture(nn.ReLU(), torch.ones(2, 3))
    assert words in str(info.value)


def test_capture_user_frame_names_the_users_line():
    from fxopt.capture import _user_frame, normalize_inputs
    try:
        raise ValueError("boom")   # this line is the user's frame
    except ValueError as e:
        assert _user_frame(e).endswith('test_mutation_core.py:' + str(e.__traceback__.tb_lineno)
                                       + ': raise ValueError("boom")   # this line is the user\'s frame')
    from functools import partial
    for call in (partial(normalize_inputs, 3), partial(nn.Linear(2, 2), torch.ones(3))):   # fxopt's, torch's
        try:
            call()   # the user's line
        except (InputError, RuntimeError) as e:
            assert _user_frame(e).endswith("call()   # the user's line"), _user_frame(e)
    no_frame = RuntimeError('while tracing File "/models/net.py", line 12, in forward')
    assert _user_frame(no_frame) == "/models/net.py:12"
    assert _user_frame(RuntimeError("plain")) == "(no user frame in the stack trace)"


def test_capture_batch_dim_of_tensors_only():
    from fxopt.capture import _batch_dynamic_shapes

    class Three(nn.Module):
        def forward(self, x, s, n):
            return x * s * n

    shapes = _batch_dynamic_shapes(Three(), (torch.ones(4, 2), torch.tensor(2.0), 3), {})
    assert set(shapes) == {"x", "s", "n"} and shapes["s"] is None and shapes["n"] is None
    assert list(shapes["x"]) == [0] and shapes["x"][0].__name__ == "batch"
    with pytest.raises(InputError, match="do not match Three.forward"):
        _batch_dynamic_shapes(Three(), (torch.ones(1),), {})


# ----------------------------------------------------------------------------------
# codegen: program
# ----------------------------------------------------------------------------------


def _softmax_like():
    """S = (4, 8), k = 1: y = exp(x) / sum(exp(x)) (full, fp32) and z = sum + 1 (row, fp16 (4,));
    a dead row step (s * 2) and an input only it reads (in1)."""
    from fxopt.codegen.program import Program, Step, TensorSpec
    from fxopt.codegen.scalar import symbol
    v = symbol
    steps = [Step("x0", "full", "load", index=0), Step("x1", "row", "load", index=1),
             Step("e", "full", "expr", expr=__import__("sympy").exp(v("x0"))),
             Step("s", "row", "reduce", src="e", how="sum"),
             Step("y", "full", "expr", expr=v("e") / v("s")),
             Step("dead", "row", "expr", expr=v("s") * v("x1")),
             Step("z", "row", "expr", expr=v("s") + 1)]
    inputs = [TensorSpec("full", (4, 8), "torch.float32"), TensorSpec("row", (4, 1), "torch.float32")]
    outputs = [("y", TensorSpec("full", (4, 8), "torch.float32")), ("z", TensorSpec("row", (4,), "torch.float16"))]
    return Program((4, 8), 1, inputs, steps, outputs, label="soft.max-like")


def test_program_live_flops_and_bytes_by_hand():
    p = _softmax_like()
    assert p.live() == {"x0", "e", "s", "y", "z"}
    # exp: 1 op x 32 elements, the row sum: 32 elements, e / s: 1 op x 32, s + 1: 1 op x 4 rows
    assert p.flops() == 32 + 32 + 32 + 4
    # reads in0 (4*8*4 B; in1 feeds only the dead step), writes y (128 B) and z (4 fp16: 8 B)
    assert p.boundary_bytes() == 128 + 128 + 8
    assert (p.rows, p.row_size, p.inner) == (4, 8, (1,))
    assert [s.deps() for s in p.steps] == [set(), set(), {"x0"}, {"e"}, {"e", "s"}, {"s", "x1"}, {"s"}]


def test_program_rows_of_pointwise_programs():
    from fxopt.codegen.program import Program
    flat = Program((2, 3, 4), 0, [], [], [])
    assert (flat.inner, flat.rows, flat.row_size) == ((), 1, 24)
    tiled = Program((2, 3, 4), 0, [], [], [], cols=(1, 2))
    assert (tiled.inner, tiled.rows, tiled.row_size) == ((1, 2), 2, 12)
    two = Program((2, 3, 4), 2, [], [], [])
    assert (two.inner, two.rows, two.row_size) == ((1, 2), 2, 12)


@pytest.mark.parametrize("dtype, size", [("torch.float32", 4), ("torch.float64", 8), ("torch.float16", 2),
                                         ("torch.bfloat16", 2), ("torch.bool", 1)])
def test_program_spec_bytes(dtype, size):
    from fxopt.codegen.program import TensorSpec
    assert TensorSpec("full", (3, 5), dtype).nbytes == 15 * size


@pytest.mark.parametrize("perm", [(0, 2, 1), (2, 0, 1), (1, 2, 0), (0, 1, 2)])
def test_program_own_shape_is_what_the_permute_reads(perm):
    """``t.view(own_shape).permute(perm)`` has the region-space ``shape`` (checked with torch)."""
    from fxopt.codegen.program import TensorSpec
    spec = TensorSpec("full", (2, 3, 5), "torch.float32", perm=perm)
    assert tuple(torch.empty(spec.own_shape).permute(perm).shape) == (2, 3, 5)
    assert TensorSpec("full", (2, 3, 5), "torch.float32").own_shape == (2, 3, 5)


def test_program_text_and_name():
    from fxopt.codegen.program import Step
    p = _softmax_like()
    text = p.text().splitlines()
    assert text[0] == "program soft.max-like S=(4, 8) k=1"
    assert text[1] == "in0: full (4, 8) float32" and text[2] == "in1: row (4, 1) float32"
    assert text[3] == "x0 = load in0 (full)" and text[6] == "s = sum(e)"
    assert text[-1] == "out1 = z: row (4,) float16"
    assert p.name == "soft_max_like_" + p.key() and len(p.key()) == 12
    q = _softmax_like()
    assert q.key() == p.key()
    q.steps[3] = Step("s", "row", "reduce", src="e", how="max", nograd=True)
    assert q.text().splitlines()[6] == "s = max(e) nograd" and q.key() != p.key()
    q.order, q.cols = (1, 0), (1,)
    assert q.text().splitlines()[0] == "program soft.max-like S=(4, 8) k=1 order=(1, 0) cols=(1,)"


def test_program_spec_text():
    from fxopt.codegen.program import TensorSpec
    assert TensorSpec("full", (2, 3), "torch.bfloat16", strides=(1, 2), perm=(1, 0)).text() == \
        "full (2, 3) bfloat16 strides=(1, 2) perm=(1, 0)"


@pytest.mark.parametrize("strides, order", [
    (None, (0, 1, 2, 3)),
    ((60, 1, 15, 3), (0, 2, 1, 3)),     # channels-last-like: by decreasing stride, reduced dim last
    ((5, 5, 1, 1), (0, 1, 2, 3)),       # ties keep their order
    ((1, 2, 8, 99), (2, 1, 0, 3)),      # the reduced dim's stride does not move it
])
def test_program_iteration_order(strides, order):
    from fxopt.codegen.program import iteration_order
    assert iteration_order((2, 3, 4, 5), 1, strides) == order


@pytest.mark.parametrize("shape, order, k, kind, want", [
    ((1, 1, 4), (0, 1, 2), 0, "full", (2,)),        # spans the innermost dim
    ((1, 3, 4), (0, 1, 2), 0, "full", (1, 2)),      # the two innermost
    ((1, 3, 1), (0, 1, 2), 0, "full", None),        # not innermost
    ((2, 3, 4), (0, 1, 2), 0, "full", None),        # the whole space: not a column
    ((1, 3, 4), (0, 2, 1), 0, "full", None),        # innermost in the walk, but not in dim order
    ((1, 1, 4), None, 0, "full", None),             # no fixed order
    ((1, 1, 4), (0, 1, 2), 1, "full", None),        # a row program
    ((1, 1, 4), (0, 1, 2), 0, "row", None),
    ((1, 3, 4), (0, 1, 2), 0, "full", (1, 2)),
    ((2, 1, 1), (1, 2, 0), 0, "full", (0,)),        # channels-last walk: dim 0 innermost
])
def test_program_column_dims(shape, order, k, kind, want):
    from fxopt.codegen.program import Program, TensorSpec, _column_dims
    forward = Program((2, 3, 4), k, [], [], [], order=order)
    assert _column_dims(forward, TensorSpec(kind, shape, "torch.float32")) == want


def test_verify_ignores_gradients_left_on_the_users_model():
    """The copies start without ``.grad``: a reference holding a stale gradient (an earlier
    backward) is judged on the step verify runs, not on the stale gradient plus that step."""
    x = torch.tensor([[1.0, 2.0], [-0.5, 1.0]])
    stale = Scaled()
    stale.w.grad = torch.full_like(stale.w, 100.0)
    res = verify(stale, Scaled(), x)
    assert res.ok, res.table()
    assert _by_name(res)["grad[w]"].cand_error < 1e-5
    assert torch.equal(stale.w.grad, torch.full_like(stale.w, 100.0))   # the user's .grad untouched


# ----------------------------------------------------------------------------------
# codegen: lower
# ----------------------------------------------------------------------------------

aten = torch.ops.aten


def _graph_nodes(fn, *xs, train=False):
    """The call_function nodes of ``fn``'s captured graph."""
    import fxopt
    from nets import Lambda
    gm = fxopt.capture(Lambda(fn).train(train), xs).graph_module
    return [n for n in gm.graph.nodes if n.op == "call_function"]


def _domain(nodes):
    """The index space of a region: its nodes' domains merged (views have none of their own)."""
    from fxopt.codegen import classify
    domain = None
    for n in nodes:
        d = classify(n)[1]
        if d is not None:
            domain = d if domain is None else domain.merge(d)
    return domain


def _lowered(fn, *xs):
    """``fn``'s whole captured graph lowered as one region, run in float64 by the reference runner."""
    from fxopt.codegen import lower
    from fxopt.codegen.kernel import run_reference
    nodes = _graph_nodes(fn, *xs)
    low = lower(nodes, _domain(nodes))
    phs = [n for n in nodes[0].graph.nodes if n.op == "placeholder"]
    ins = [xs[phs.index(node)].double().reshape(view) for node, view in low.inputs]
    outs = [torch.empty(spec.shape, dtype=torch.float64) for _, spec in low.program.outputs]
    run_reference(low.program, ins, outs)
    return low, outs


def test_lower_domain_merge():
    from fxopt.codegen.lower import Domain
    row, pw = Domain((4, 8), 1), Domain((4, 8))
    assert row.row_shapes == ((4, 1), (4,)) and pw.row_shapes == ()
    assert row.merge(pw) == row and pw.merge(row) == row and pw.merge(pw) == pw
    assert Domain((4, 8), 2).merge(row) is None                       # two reduction depths
    assert row.merge(Domain((4, 1))) == row and Domain((4,)).merge(row) == row   # its rows
    assert row.merge(Domain((4, 1), 1)) is None and Domain((8,)).merge(row) is None
    assert pw.merge(Domain((8, 4))) is None


@pytest.mark.parametrize("dims, rank, k", [(None, 3, 3), ([], 2, 2), (-1, 3, 1), ([2], 3, 1),
                                           ([1, 2], 3, 2), ([-1, -2], 3, 2), ([0, 1, 2], 3, 3)])
def test_lower_trailing_dims(dims, rank, k):
    from fxopt.codegen.lower import _trailing
    assert _trailing(dims, rank) == k


@pytest.mark.parametrize("dims, rank", [([0], 2), ([0, 2], 3), (1, 3)])
def test_lower_non_trailing_dims_are_unfusible(dims, rank):
    from fxopt.codegen.lower import Unfusible, _trailing
    with pytest.raises(Unfusible, match="only trailing dims are a row"):
        _trailing(dims, rank)


X48 = torch.linspace(-2, 2, 32).reshape(4, 8)

CLASSIFY = [  # fn, inputs, the node's target, (class, domain shape, k) or the reason's words
    (lambda x: x.sum(-1), (X48,), aten.sum.dim_IntList, ("reduce", (4, 8), 1)),
    (lambda x: x.amax(dim=(0, 1)), (X48,), aten.amax.default, ("reduce", (4, 8), 2)),
    (lambda x: torch.softmax(x, -1), (X48,), aten.softmax.int, ("reduce", (4, 8), 1)),
    (lambda x: torch.softmax(x, 0), (X48,), aten.softmax.int, "softmax over a dim that is not the last"),
    (lambda x: torch.relu(x), (X48,), aten.relu.default, ("pointwise", (4, 8), 0)),
    (lambda x: x.view(32), (X48,), aten.view.default, ("view", None, None)),
    (lambda x: x @ x.t(), (X48,), aten.matmul.default, "not in the fusible op table"),
    (lambda x: x.argmax(-1), (X48,), aten.argmax.default, "torch.int64 result"),
    (lambda x, i: x + i, (X48, torch.arange(8)), aten.add.Tensor, "torch.int64 operand"),
    (lambda x: x.clone(memory_format=torch.channels_last), (X48.reshape(1, 4, 8, 1),), aten.clone.default,
     "copy to another memory format"),
    (lambda x: x.clone(), (X48,), aten.clone.default, ("pointwise", (4, 8), 0)),
    (lambda x: x.amax(), (X48,), aten.amax.default, ("reduce", (4, 8), 2)),   # no dim argument: every dim
]


@pytest.mark.parametrize("case", range(len(CLASSIFY)))
def test_lower_classify(case):
    from fxopt.codegen.lower import Domain, Unfusible, classify
    fn, xs, target, want = CLASSIFY[case]
    (node,) = [n for n in _graph_nodes(fn, *xs) if n.target is target]
    if isinstance(want, str):
        with pytest.raises(Unfusible, match=want):
            classify(node)
    else:
        cls, shape, k = want
        assert classify(node) == (cls, Domain(shape, k) if shape else None)


def test_lower_classify_refuses_training_batch_norm_and_dropout():
    from fxopt.codegen.lower import Unfusible, classify
    x = torch.ones(2, 3, 4)
    bn = nn.BatchNorm1d(3)
    nodes = _graph_nodes(lambda x: bn(x), x, train=True)
    (node,) = [n for n in nodes if n.target is aten.batch_norm.default]
    with pytest.raises(Unfusible, match="batch norm in training"):
        classify(node)
    (drop,) = [n for n in _graph_nodes(lambda x: torch.nn.functional.dropout(x, 0.5, True), x, train=True)
               if n.target is aten.dropout.default]
    with pytest.raises(Unfusible, match="dropout in training"):
        classify(drop)
    (drop,) = [n for n in _graph_nodes(lambda x: torch.nn.functional.dropout(x, 0.5, False), x)
               if n.target is aten.dropout.default]
    assert classify(drop)[0] == "pointwise"
    placeholder = next(n for n in nodes[0].graph.nodes if n.op == "placeholder")
    with pytest.raises(Unfusible, match="not an op"):
        classify(placeholder)


def test_lower_rms_norm_default_eps_is_the_dtypes():
    """rms_norm without eps uses finfo(dtype).eps (torch's default): at mean(x^2) ~ eps it matters."""
    x = torch.tensor([[1e-4, -2e-4, 3e-4, 1e-4]])
    low, (y,) = _lowered(lambda x: torch.rms_norm(x, (4,)), x)
    x64 = x.double()
    want = x64 / torch.sqrt((x64 * x64).mean(-1, keepdim=True) + 2.0 ** -23)
    torch.testing.assert_close(y, want, rtol=1e-12, atol=0)
    w = torch.tensor([1.0, -2.0, 0.5, 3.0])  # with a weight and still no eps: (x, shape, weight)
    low, (y,) = _lowered(lambda x, w: torch.rms_norm(x, (4,), w), x, w)
    torch.testing.assert_close(y, want * w.double(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("eps", [1e-5, 0.5])
def test_lower_layer_norm_in_float64(eps):
    x = torch.tensor([[0.5, -1.0, 2.0, 0.25], [1.0, 1.0, 3.0, -1.0]])
    w, b = torch.tensor([1.0, 2.0, -1.0, 0.5]), torch.tensor([0.0, 1.0, 0.5, -2.0])
    _, (y,) = _lowered(lambda x, w, b: torch.nn.functional.layer_norm(x, (4,), w, b, eps), x, w, b)
    x64 = x.double()
    mu = x64.mean(-1, keepdim=True)
    var = ((x64 - mu) ** 2).mean(-1, keepdim=True)
    torch.testing.assert_close(y, (x64 - mu) / torch.sqrt(var + eps) * w.double() + b.double(), rtol=1e-12, atol=0)


def test_lower_mean_and_log_softmax_in_float64():
    _, (m,) = _lowered(lambda x: x.mean(-1) * 2.0, X48)
    torch.testing.assert_close(m, X48.double().mean(-1) * 2.0, rtol=1e-12, atol=0)
    _, (ls,) = _lowered(lambda x: torch.log_softmax(x, -1), X48)
    torch.testing.assert_close(ls, torch.log_softmax(X48.double(), -1), rtol=1e-12, atol=1e-15)


def test_lower_eval_batch_norm_in_float64():
    bn = nn.BatchNorm2d(3, eps=0.25).eval()
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
        bn.running_var.copy_(torch.tensor([1.0, 4.0, 0.75]))
        bn.weight.copy_(torch.tensor([2.0, -1.0, 0.5]))
        bn.bias.copy_(torch.tensor([0.0, 1.0, -0.5]))
    x = torch.linspace(-3, 3, 24).reshape(2, 3, 2, 2)
    import fxopt
    from fxopt.codegen import classify, lower
    from fxopt.codegen.kernel import run_reference
    gm = fxopt.capture(bn, x).graph_module
    (node,) = [n for n in gm.graph.nodes if n.target is aten.batch_norm.default]
    low = lower([node], classify(node)[1])
    ins = [(x if arg.op == "placeholder" else gm.get_parameter(arg.target) if "weight" in arg.target or
            "bias" in arg.target else gm.get_buffer(arg.target)).double().reshape(view) for arg, view in low.inputs]
    assert len(ins) == 5
    (y,) = outs = [torch.empty(2, 3, 2, 2, dtype=torch.float64)]
    run_reference(low.program, ins, outs)
    c = (1, 3, 1, 1)
    want = (x.double() - bn.running_mean.double().view(c)) / torch.sqrt(bn.running_var.double().view(c) + 0.25) \
        * bn.weight.double().view(c) + bn.bias.double().view(c)
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-14)


def test_lower_label_and_refusals():
    from fxopt.codegen import classify, lower
    from fxopt.codegen.lower import Domain, Unfusible, _label
    nodes = _graph_nodes(lambda x: torch.relu(x.view(32) + 1.0).view(4, 8) * 2.0 + 1.0, X48)
    assert _label(nodes) == "add_relu_mul"     # op names in graph order, each once, views skipped
    assert _label([n for n in nodes if n.target in (aten.view.default,)]) == "fused"
    (add,) = [n for n in _graph_nodes(lambda x: x + 1.0, X48) if n.target is aten.add.Tensor]
    add_users = dict(add.users)
    for u in add_users:   # a region whose result nobody reads
        u.replace_input_with(add, add.args[0])
    with pytest.raises(Unfusible, match="results are not used"):
        lower([add], Domain((4, 8)))


def _node(target, kwargs, out):
    """One hand-built node ``target(x, **kwargs)`` of a (4, 8) float32 input, its result ``out``."""
    from torch import fx
    g = fx.Graph()
    x = g.placeholder("x")
    x.meta["val"] = torch.empty(4, 8)
    n = g.call_function(target, (x,), kwargs)
    n.meta["val"] = out
    return n


@pytest.mark.parametrize("kwargs, words", [
    ({"dtype": torch.float16}, None),
    ({"dtype": torch.float16, "memory_format": torch.preserve_format}, None),
    ({"memory_format": torch.channels_last}, "copy to another memory format"),
    ({"dtype": torch.float16, "device": torch.device("cpu")}, "copy that changes device or layout"),
    ({"layout": torch.strided}, "copy that changes device or layout"),
])
def test_lower_classify_copies(kwargs, words):
    from fxopt.codegen.lower import Domain, Unfusible, classify
    node = _node(aten._to_copy.default, kwargs, torch.empty(4, 8, dtype=kwargs.get("dtype", torch.float32)))
    if words is None:
        assert classify(node) == ("pointwise", Domain((4, 8)))
    else:
        with pytest.raises(Unfusible, match=words):
            classify(node)


def test_lower_classify_needs_one_float_tensor_result():
    from fxopt.codegen.lower import Unfusible, classify
    with pytest.raises(Unfusible, match="does not return one tensor"):
        classify(_node(aten.relu.default, {}, (torch.empty(4, 8), torch.empty(4, 8))))
    with pytest.raises(Unfusible, match="dynamic shape"):
        from torch.fx.experimental.symbolic_shapes import ShapeEnv
        from torch._subclasses.fake_tensor import FakeTensorMode
        mode = FakeTensorMode(shape_env=ShapeEnv())
        from torch._dynamo.source import ConstantSource
        from torch.fx.experimental.symbolic_shapes import DimDynamic, StatelessSymbolicContext
        ctx = StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DYNAMIC, DimDynamic.STATIC])
        sym = mode.from_tensor(torch.empty(4, 8), symbolic_context=ctx, source=ConstantSource("x"))
        classify(_node(aten.relu.default, {}, sym))


def _program(fn, *xs):
    from fxopt.codegen import lower
    nodes = _graph_nodes(fn, *xs)
    return lower(nodes, _domain(nodes)).program


def _product_plus_sum(n_product, n_inputs):
    """x0 * ... * x(p-1) + xp + ... : the backward needs exactly the p factors (each gradient is the
    product of the others; the added inputs' gradient is the output's, passed through)."""
    def fn(*xs):
        out = xs[0]
        for x in xs[1:n_product]:
            out = out * x
        for x in xs[n_product:]:
            out = out + x
        return out
    return _program(fn, *[torch.full((2, 3), 1.0 + i / 16) for i in range(n_inputs)])


@pytest.mark.parametrize("n_product, n_inputs", [(3, 14), (4, 13), (2, 9)])
def test_program_choose_saved_finds_the_factors(n_product, n_inputs):
    """14 or 15 candidates (inputs and the output): the fewest-bytes set is the product's factors."""
    from fxopt.codegen import choose_saved, derive_backward
    p = _product_plus_sum(n_product, n_inputs)
    assert len(p.inputs) == n_inputs and len(p.outputs) == 1
    assert sorted(choose_saved(p)) == [("in", i) for i in range(n_product)]
    derive_backward(p, (True,) * n_inputs, choose_saved(p))      # feasible


def test_program_choose_saved_over_14_candidates_tries_up_to_three_tensors():
    """Over 14 candidates the search stops at sets of 3 (2^15 subsets is too slow to try); a backward
    that needs 4 then saves every input, which is always feasible."""
    from fxopt.codegen import choose_saved, derive_backward
    p = _product_plus_sum(4, 14)
    assert choose_saved(p) == [("in", i) for i in range(14)]
    derive_backward(p, (True,) * 14, choose_saved(p))


@pytest.mark.parametrize("shape", [(4,), (4, 3)])
def test_capture_dynamic_batch_of_a_vector_input_is_named_batch(shape):
    """Every tensor input's dim 0 is the one ``batch`` symbol, a 1-D input's too."""
    import fxopt
    captured = fxopt.capture(nn.ReLU(), torch.ones(shape), dynamic_batch=True)
    assert list(captured.symbols.values()) == ["batch"]
    (ph,) = captured.placeholders()
    assert str(ph.meta["val"].shape[0].node.expr) in captured.symbols


def test_capture_retry_without_the_recorder_warns_at_the_callers_line(monkeypatch):
    """When export cannot trace the attribute recorder (torch.cond), capture exports again without
    it and warns, pointing at the line that called capture."""
    import fxopt
    real, calls = torch.export.export, []

    def export_once_failing(*a, **k):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("cannot trace the recorder")
        return real(*a, **k)

    monkeypatch.setattr(torch.export, "export", export_once_failing)
    x = torch.tensor([-1.0, 2.0])
    with pytest.warns(UserWarning, match="ReLU: Python attributes that forward reads are not guarded") as w:
        captured = fxopt.capture(nn.ReLU(), x)   # the caller's line
    assert len(calls) == 2 and captured.python_state is None
    assert torch.equal(captured(x), torch.tensor([0.0, 2.0]))
    (warning,) = [m for m in w if "not guarded" in str(m.message)]
    assert warning.filename == __file__


def test_lower_region_through_one_permute_in_float64():
    """ConvNeXt's layer scale + residual: mul (NHWC), permute to NCHW, add. The region runs in the
    permute's output space and reads x and the scale through the permute; float64 against eager."""
    from fxopt.codegen import lower
    from fxopt.codegen.kernel import run_reference
    from fxopt.codegen.lower import Domain
    x = torch.linspace(-2, 2, 2 * 3 * 3 * 4).reshape(2, 3, 3, 4)
    g, r = torch.tensor([0.5, -1.0, 2.0, 0.25]), torch.linspace(1, 3, 2 * 4 * 3 * 3).reshape(2, 4, 3, 3)
    nodes = _graph_nodes(lambda x, g, r: (x * g).permute(0, 3, 1, 2) + r, x, g, r)
    assert [n.target for n in nodes] == [aten.mul.Tensor, aten.permute.default, aten.add.Tensor]
    low = lower(nodes, Domain((2, 4, 3, 3)))
    phs = [n for n in nodes[0].graph.nodes if n.op == "placeholder"]
    ins = []
    for (node, view), spec in zip(low.inputs, low.program.inputs):
        t = (x, g, r)[phs.index(node)].double()
        ins.append(t.reshape(spec.own_shape).permute(spec.perm) if spec.perm else t.reshape(view))
    assert sum(1 for s in low.program.inputs if s.perm) == 2       # x and the scale, through the permute
    (out,) = outs = [torch.empty(2, 4, 3, 3, dtype=torch.float64)]
    run_reference(low.program, ins, outs)
    torch.testing.assert_close(out, (x.double() * g.double()).permute(0, 3, 1, 2) + r.double(), rtol=0, atol=0)


def test_lower_label_is_cut_at_40_characters():
    from fxopt.codegen.lower import _label
    fn = lambda x: torch.sigmoid(torch.tanh(torch.exp(torch.abs(torch.neg(torch.relu(x)))))) * 2.0 + 1.0 - 3.0  # noqa: E731
    names = "relu_neg_abs_exp_tanh_sigmoid_mul_add_sub"          # 41 characters
    assert _label(_graph_nodes(fn, X48)) == names[:40]


def test_capture_python_write_warning_names_the_module_path():
    """A Python attribute assigned in forward is named by its module's path in the model (the root by
    the model's class name), so the user can find which module's forward does it."""
    import warnings

    from fxopt.capture import capture

    class Counter(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.calls = nn.Linear(4, 4), 0

        def forward(self, x):
            self.calls += 1
            return self.lin(x)

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = Counter()

        def forward(self, x):
            return self.block(x)

    for model, expected in ((Outer(), "block.calls"), (Counter(), "Counter.calls")):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            capture(model, (torch.randn(2, 4),))
        msgs = [str(w.message) for w in caught if "is assigned in forward" in str(w.message)]
        assert len(msgs) == 1 and msgs[0].startswith(f"{expected} is assigned in forward"), msgs


def test_verify_check_tensor_empty_and_keyword_only_options():
    """An empty tensor (a zero-size batch slice) agrees with an empty reference; ``multiple`` and
    ``floor`` are keyword-only (a positional number would land in the wrong one silently)."""
    e = torch.empty(0, 3)
    check = check_tensor("x", "output", e.double(), e, e)
    assert check.ok and check.cand_error == 0.0
    with pytest.raises(TypeError):
        check_tensor("x", "output", e.double(), e, e, 50.0)
    x = torch.ones(2)
    for ref64, ref in ((None, x), (x.double(), None)):  # either reference result missing: a failure, said so
        c = check_tensor("x", "output", ref64, ref, x)
        assert not c.ok and c.note == "missing in the reference"


def test_program_backward_of_only_a_per_channel_input_is_tiled_by_its_columns():
    """x * w walked in (0, 1, 2) order, only w (spanning the innermost dim) needing a gradient: the
    backward's one output is w's per-program column partials, so the program must be tiled by w's
    columns (else the partials are summed over every dim); float64 against autograd."""
    from dataclasses import replace

    from fxopt.codegen import choose_saved, derive_backward
    from fxopt.codegen.runtime import execute
    x, w = torch.linspace(-2, 2, 24).reshape(2, 3, 4), torch.tensor([0.5, -1.0, 2.0, 0.25])
    p = replace(_program(lambda x, w: x * w, x, w), order=(0, 1, 2))
    assert [s.shape for s in p.inputs] == [(2, 3, 4), (1, 1, 4)]
    plan = derive_backward(p, (False, True), choose_saved(p))
    assert plan.program.cols == (2,) and [s.kind for _, s in plan.program.outputs] == ["col"]
    gy = torch.linspace(1, 3, 24, dtype=torch.float64).reshape(2, 3, 4)
    w64 = w.double().requires_grad_()
    (want,) = torch.autograd.grad(x.double() * w64, w64, gy)
    saved = {("in", 0): x.double(), ("in", 1): w.double().reshape(1, 1, 4)}
    (partials,) = execute(plan.program, [saved[s] for s in plan.saved] + [gy])
    torch.testing.assert_close(partials.sum(0).double(), want, rtol=1e-6, atol=1e-6)   # a float32 output


def test_program_backward_gradient_kinds_and_flops_by_hand():
    """y = x * s (full), w = 2 * s (row), s one value per row of S = (2, 3). The gradient of x,
    gy0 * s, is full (one per element); that of s, sum(gy0 * x) + 2 * gy1, is a row value. Its
    flops count each expression once per element of its kind: gy0 * x 6, the sum 6, the row
    gradient's 2 ops x 2 rows, gy0 * s 6."""
    from fxopt.codegen.program import Program, Step, TensorSpec, derive_backward
    from fxopt.codegen.scalar import symbol as v
    f32 = "torch.float32"
    steps = [Step("x0", "full", "load", index=0), Step("s0", "row", "load", index=1),
             Step("y", "full", "expr", expr=v("x0") * v("s0")), Step("w", "row", "expr", expr=2 * v("s0"))]
    p = Program((2, 3), 1, [TensorSpec("full", (2, 3), f32), TensorSpec("row", (2, 1), f32)], steps,
                [("y", TensorSpec("full", (2, 3), f32)), ("w", TensorSpec("row", (2,), f32))])
    bwd = derive_backward(p, (True, True), [("in", 0), ("in", 1)]).program
    kinds = bwd.kinds()
    assert [(kinds[value], spec.kind) for value, spec in bwd.outputs] == [("full", "full"), ("row", "row")]
    assert bwd.flops() == 6 + 6 + 2 * 2 + 6


def test_program_name_keeps_a_lowered_label_whole():
    """lower cuts a label at 40 characters; the op/kernel name ``<ops>_<key>`` keeps all 40 (what a
    profile shows is the region's whole label), and only the 12-hex key tells programs apart."""
    fn = lambda x: torch.sigmoid(torch.tanh(torch.exp(torch.abs(torch.neg(torch.relu(x)))))) * 2.0 + 1.0 - 3.0  # noqa: E731
    p = _program(fn, X48)
    assert p.name == "relu_neg_abs_exp_tanh_sigmoid_mul_add_su_" + p.key()
    assert len(p.key()) == 12 and set(p.key()) <= set("0123456789abcdef")


def test_lower_view_between_row_shapes_is_free():
    """A reduction's row result viewed as the other row shape ([2] -> [2, 1]) stays in the region and
    moves nothing: x * sum(x, -1) in float64, by hand."""
    x = torch.tensor([[0.5, -1.0, 2.0, 0.25], [1.0, 1.0, 3.0, -1.0]])
    _, (y,) = _lowered(lambda x: x * x.sum(-1).view(2, 1), x)
    assert y.tolist() == [[0.875, -1.75, 3.5, 0.4375], [4.0, 4.0, 12.0, -4.0]]
