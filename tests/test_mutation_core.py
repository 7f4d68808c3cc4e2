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
    from fxopt.capture import _user_frame
    try:
        raise ValueError("boom")   # this line is the user's frame
    except ValueError as e:
        assert _user_frame(e).endswith('test_mutation_core.py:' + str(e.__traceback__.tb_lineno)
                                       + ': raise ValueError("boom")   # this line is the user\'s frame')
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
