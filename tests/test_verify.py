"""fxopt.verify: a rewrite is accepted only when it is as close to the float64 answer as the original."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils._pytree import tree_map

from fxopt import zoo
from fxopt.errors import FxoptError, InputError
from fxopt.verify import (DEFAULT_FLOORS, TensorCheck, VerificationError, VerificationResult, check_tensor,
                          verify)


# ----------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------


def _zoo(name: str, seed: int = 0):
    torch.manual_seed(seed)
    return zoo.build(name, tiny=True), zoo.example_inputs(name, 2, tiny=True)


class MLP(nn.Module):
    def __init__(self, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(16, 64)
        self.norm = nn.LayerNorm(64)
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(64, 8)

    def forward(self, x):
        return self.fc2(self.drop(F.gelu(self.norm(self.fc1(x)))))


class MLPRewritten(MLP):
    """The same function written differently: matmul + separate bias add, norm and GELU upcast to fp32."""

    def forward(self, x):
        h = x @ self.fc1.weight.t() + self.fc1.bias
        h = F.layer_norm(h.float(), (64,), self.norm.weight.float(), self.norm.bias.float()).to(h.dtype)
        h = self.drop(F.gelu(h.float()).to(h.dtype))
        return h @ self.fc2.weight.t() + self.fc2.bias


class MLPExtraRandomCall(MLP):
    """Mathematically the same, but draws random numbers before the dropout: masks no longer line up."""

    def forward(self, x):
        torch.rand(7)
        return super().forward(x)


def _mlp(cls=MLP, seed: int = 0, **kw):
    torch.manual_seed(seed)
    return cls(**kw), torch.randn(32, 16)


def _bf16_io_candidate(model: nn.Module) -> nn.Module:
    """A bf16 copy that takes and returns float32 (hooks keep the parameter names unchanged)."""
    cand = copy.deepcopy(model).to(torch.bfloat16)
    cand.register_forward_pre_hook(
        lambda m, args: tuple(a.to(torch.bfloat16) if torch.is_floating_point(a) else a for a in args))
    cand.register_forward_hook(
        lambda m, args, out: tree_map(lambda t: t.float() if isinstance(t, torch.Tensor) else t, out))
    return cand


def _names(checks) -> set[str]:
    return {c.name for c in checks}


def _snapshot(model: nn.Module):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {n: m.training for n, m in model.named_modules()},
            {n: (p.requires_grad, p.grad) for n, p in model.named_parameters()})


def _assert_unchanged(model: nn.Module, snap) -> None:
    state, modes, grads = snap
    now = model.state_dict()
    assert now.keys() == state.keys()
    for k, v in state.items():
        assert now[k].dtype == v.dtype and now[k].device == v.device
        assert torch.equal(now[k], v), k  # bit-identical (no NaNs in these models)
    assert {n: m.training for n, m in model.named_modules()} == modes
    for n, p in model.named_parameters():
        assert p.requires_grad == grads[n][0]
        assert p.grad is grads[n][1], n


# ----------------------------------------------------------------------------------
# Identical models pass
# ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["resnet50", "vit_b16", "driving"])
@pytest.mark.parametrize("training", [True, False])
def test_identical_copy_passes(name, training):
    model, x = _zoo(name)
    res = verify(model, copy.deepcopy(model), x, training=training)
    assert isinstance(res, VerificationResult)
    assert res.ok and bool(res) and res.failures() == []
    kinds = {c.kind for c in res.checks}
    n_params = len(dict(model.named_parameters()))
    n_float_buffers = sum(1 for b in model.buffers() if b.is_floating_point())
    if training:
        assert kinds >= {"output", "input_grad", "param_grad", "param_after_step"}
        assert sum(c.kind == "param_grad" for c in res.checks) == n_params
        assert sum(c.kind == "param_after_step" for c in res.checks) == n_params
        assert "grad[input0]" in _names(res.checks)
    else:
        assert kinds <= {"output", "buffer"}
    assert sum(c.kind == "buffer" for c in res.checks) == n_float_buffers
    if name == "driving":  # dict outputs are flattened and named by key
        assert {f"output[{k}]" for k in zoo.DRIVING_OUTPUTS} <= _names(res.checks)
    else:
        assert "output" in _names(res.checks)
    for c in res.checks:
        # an identical copy reproduces the reference bit for bit, and the reference is not exact
        assert c.cand_error == c.ref_error
        assert c.cand_error <= c.allowed
    # The float32 reference differs from the float64 run somewhere: the reference is really float64.
    assert max(c.ref_error for c in res.checks) > 0


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch's own deepcopy of the export TreeSpec
def test_exported_graph_module_candidate_passes():
    """A torch.export GraphModule keeps the parameter FQNs, so it can be verified directly."""
    model, x = _mlp()
    gm = torch.export.export(copy.deepcopy(model), (x,)).module()
    res = verify(model, gm, x)
    assert res.ok, res.table()
    assert "grad[fc1.weight]" in _names(res.checks)


# ----------------------------------------------------------------------------------
# Wrong candidates fail, and say where
# ----------------------------------------------------------------------------------


PERTURBED = "trunk.stages.0.0.conv1.0.weight"


def test_perturbed_weight_fails_naming_parameter_and_output():
    model, x = _zoo("resnet50")
    cand = copy.deepcopy(model)
    with torch.no_grad():
        cand.get_parameter(PERTURBED).add_(1e-3)
    res = verify(model, cand, x)
    assert not res.ok and not bool(res)
    failed = _names(res.failures())
    assert "output" in failed
    assert f"param_after_step[{PERTURBED}]" in failed
    # parameters that were not touched agree after the step
    assert "param_after_step[fc.bias]" not in failed
    check = next(c for c in res.checks if c.name == f"param_after_step[{PERTURBED}]")
    assert check.kind == "param_after_step"
    assert check.cand_error > check.allowed > 0
    text = res.table()
    assert "FAIL" in text.splitlines()[-1]
    assert PERTURBED in text

    res_eval = verify(model, cand, x, training=False)
    assert not res_eval.ok
    assert "output" in _names(res_eval.failures())


def test_bn_momentum_difference_fails_on_buffers_only():
    model, x = _zoo("resnet50")
    cand = copy.deepcopy(model)
    cand.trunk.stem[1].momentum = 0.2  # reference: 0.1
    res = verify(model, cand, x)
    assert not res.ok
    failed = res.failures()
    assert {c.kind for c in failed} == {"buffer"}  # train-mode BN uses batch stats: outputs and grads agree
    assert _names(failed) == {"buffer[trunk.stem.1.running_mean]", "buffer[trunk.stem.1.running_var]"}


def test_missing_and_extra_parameter_names_fail_clearly():
    model, x = _mlp()
    cand = copy.deepcopy(model)
    cand.fc2.bias = None  # the parameter is gone from named_parameters()
    cand.extra = nn.Parameter(torch.zeros(3))
    res = verify(model, cand, x)
    assert not res.ok
    by_name = {c.name: c for c in res.checks}
    for name in ("grad[fc2.bias]", "param_after_step[fc2.bias]"):
        c = by_name[name]
        assert not c.ok and math.isinf(c.cand_error) and "missing in the candidate" in c.note
    assert by_name["grad[fc2.bias]"].kind == "param_grad"
    c = by_name["grad[extra]"]
    assert not c.ok and "missing in the reference" in c.note
    assert "fc2.bias" in res.table()


def test_missing_buffer_fails():
    """A BatchNorm that stopped tracking running stats has no running_mean/var: a named buffer failure."""
    model, x = _zoo("resnet50")
    cand = copy.deepcopy(model)
    old = cand.trunk.stem[1]
    bn = nn.BatchNorm2d(old.num_features, track_running_stats=False)
    bn.load_state_dict({"weight": old.weight, "bias": old.bias})
    cand.trunk.stem[1] = bn
    res = verify(model, cand, x)
    failed = {c.name: c for c in res.failures()}
    assert set(failed) == {"buffer[trunk.stem.1.running_mean]", "buffer[trunk.stem.1.running_var]"}
    for c in failed.values():
        assert c.kind == "buffer" and "missing in the candidate" in c.note


class _ShapeChanged(MLP):
    def forward(self, x):
        return super().forward(x)[:, :4]


class _NaNOut(MLP):
    def forward(self, x):
        out = super().forward(x)
        return out.index_put((torch.tensor([0]), torch.tensor([0])), torch.tensor(float("nan")))


def test_shape_mismatch_and_nan_fail():
    model, x = _mlp()
    shaped = _ShapeChanged()
    shaped.load_state_dict(model.state_dict())
    res = verify(model, shaped, x, training=False)
    (c,) = [c for c in res.checks if c.name == "output"]
    assert not c.ok and "shape" in c.note and "(32, 4)" in c.note

    nan = _NaNOut()
    nan.load_state_dict(model.state_dict())
    res = verify(model, nan, x, training=False, multiple=1e9, floor=1e9)  # no tolerance rescues a NaN
    (c,) = [c for c in res.checks if c.name == "output"]
    assert not c.ok and "NaN" in c.note


# ----------------------------------------------------------------------------------
# Low precision
# ----------------------------------------------------------------------------------


def test_bf16_candidate_against_fp32_reference_fails_by_default():
    """Documented: the floor follows the dtype a tensor has; a bf16 model returning fp32 is judged at fp32."""
    model, x = _zoo("vit_b16")
    cand = _bf16_io_candidate(model)
    res = verify(model, cand, x)
    assert not res.ok
    by_name = {c.name: c for c in res.checks}
    for name in ("output", "grad[input0]"):
        assert not by_name[name].ok
        assert by_name[name].dtype == "float32 -> float32"
        assert by_name[name].allowed < 1e-3  # 3 * fp32 error + 1e-5 * scale
    assert by_name["grad[head.weight]"].dtype == "float32 -> bfloat16"
    assert not verify(model, cand, x, training=False).ok


def test_bf16_forward_accepted_with_bf16_floor():
    """Documented: floor=1e-2 admits bf16 rounding of a shallow forward; the train step still fails."""
    model, x = _mlp()
    cand = _bf16_io_candidate(model)
    assert not verify(model, cand, x, training=False).ok
    res = verify(model, cand, x, training=False, floor={torch.float32: 1e-2})
    assert res.ok, res.table()
    assert max(c.ratio for c in res.checks) < 0.9  # with margin (about 0.2-0.7 over 30 seeds)
    assert verify(model, cand, x, training=False, floor=1e-2).ok
    train = verify(model, cand, x, floor=1e-2)
    assert not train.ok
    assert {c.kind for c in train.failures()} <= {"param_grad", "input_grad", "param_after_step"}


def test_bf16_rewrite_against_bf16_reference_passes():
    """Documented way to verify a low-precision rewrite: the low-precision model is the reference."""
    model, x = _mlp()
    ref = model.to(torch.bfloat16)
    cand = MLPRewritten().to(torch.bfloat16)
    cand.load_state_dict(ref.state_dict())
    xb = x.to(torch.bfloat16)
    res = verify(ref, cand, xb)
    assert res.ok, res.table()
    # really a different rounding, not a bitwise copy
    assert any(c.cand_error != c.ref_error for c in res.checks)
    assert all(c.dtype == "bfloat16 -> bfloat16" for c in res.checks)
    assert res.table().splitlines()[-1].startswith("PASS")


def test_wrong_bf16_candidate_fails():
    model, x = _mlp()
    ref = model.to(torch.bfloat16)
    cand = MLPRewritten().to(torch.bfloat16)
    cand.load_state_dict(ref.state_dict())
    with torch.no_grad():
        cand.fc2.weight.mul_(1.1)  # 10% off
    xb = x.to(torch.bfloat16)
    for training in (True, False):
        res = verify(ref, cand, xb, training=training)
        assert not res.ok
        assert "output" in _names(res.failures())
    assert "grad[fc1.weight]" in _names(verify(ref, cand, xb).failures())
    # and against the fp32 original with a bf16-sized floor it is still wrong
    assert not verify(model.float(), _bf16_io_candidate(cand.float()), x, training=False, floor=1e-2).ok


# ----------------------------------------------------------------------------------
# Side effects, randomness, options
# ----------------------------------------------------------------------------------


def test_user_models_inputs_and_rng_untouched():
    model, x = _zoo("resnet50")
    cand = copy.deepcopy(model).eval()  # a different training flag than the reference, kept as it is
    x_before = x[0].clone()
    snap_m, snap_c = _snapshot(model), _snapshot(cand)
    rng = torch.get_rng_state()
    res = verify(model, cand, x)
    assert res.ok  # verify sets the mode of its own copies
    _assert_unchanged(model, snap_m)
    _assert_unchanged(cand, snap_c)
    assert model.training and not cand.training
    assert torch.equal(x[0], x_before) and not x[0].requires_grad and x[0].grad is None
    assert torch.equal(torch.get_rng_state(), rng)

    # .grad already set by the user is neither used nor changed
    out = model(x[0]).sum()
    out.backward()
    snap_m = _snapshot(model)
    assert verify(model, copy.deepcopy(model), x).ok
    _assert_unchanged(model, snap_m)


def test_dropout_masks_match_in_train_mode():
    model, x = _mlp(dropout=0.5)
    res = verify(model, copy.deepcopy(model), x)
    assert res.ok, res.table()
    (out,) = [c for c in res.checks if c.name == "output"]
    assert out.ref_error < 1e-4  # the float64 run drew the same mask: its error is rounding only
    # a rewrite that changes the random calls cannot be verified in train mode, but can in eval mode
    cand = MLPExtraRandomCall(dropout=0.5)
    cand.load_state_dict(model.state_dict())
    assert not verify(model, cand, x).ok
    assert verify(model, cand, x, training=False).ok
    # the seed matters only as a whole: different seeds still pass
    assert verify(model, copy.deepcopy(model), x, seed=123).ok


def test_dict_and_kwargs_inputs():
    class TwoIn(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 3), nn.Linear(5, 3)

        def forward(self, x, y, n_repeat: int = 1):
            return {"sum": self.a(x) + self.b(y), "pair": (self.a(x) * n_repeat, torch.argmax(self.b(y), -1))}

    torch.manual_seed(0)
    m = TwoIn()
    inputs = {"x": torch.randn(6, 4), "y": torch.randn(6, 5)}
    res = verify(m, copy.deepcopy(m), inputs)
    assert res.ok, res.table()
    names = _names(res.checks)
    assert {"output[sum]", "output[pair][0]", "output[pair][1]", "grad[x]", "grad[y]"} <= names
    # integer outputs are compared exactly
    (argmax,) = [c for c in res.checks if c.name == "output[pair][1]"]
    assert argmax.allowed == 0.0 and argmax.cand_error == 0.0


def test_rule_text_and_table():
    model, x = _mlp()
    res = verify(model, copy.deepcopy(model), x)
    assert "3 * e_ref" in res.rule and "float32 1e-05" in res.rule and "bfloat16 0.01" in res.rule
    res2 = verify(model, copy.deepcopy(model), x, multiple=5, floor=1e-4)
    assert "5 * e_ref" in res2.rule and "0.0001" in res2.rule
    lines = res.table().splitlines()
    assert "tensor" in lines[0] and "allowed" in lines[0]
    assert lines[-1].startswith("PASS")
    limited = res.table(limit=2).splitlines()
    assert any("more checks" in line for line in limited)


def test_bad_arguments():
    model, x = _mlp()
    with pytest.raises(InputError):
        verify(model, model, "not a tensor")
    with pytest.raises(InputError):
        verify(model, model, x, multiple=-1)
    with pytest.raises(InputError):
        verify(model, model, x, floor="big")
    with pytest.raises(VerificationError) as err:
        verify(model, copy.deepcopy(model), torch.randn(3, 7))  # wrong feature size
    assert isinstance(err.value, FxoptError) and "reference" in str(err.value)

    class IntOut(nn.Module):
        def forward(self, x):
            return x.argmax(-1)

    with pytest.raises(VerificationError, match="training=False"):
        verify(IntOut(), IntOut(), x)
    assert verify(IntOut(), IntOut(), x, training=False).ok


# ----------------------------------------------------------------------------------
# The tolerance rule itself
# ----------------------------------------------------------------------------------


def test_rule_arithmetic():
    ref64 = torch.tensor([1.0, -2.0, 4.0], dtype=torch.float64)
    ref = torch.tensor([1.0, -2.0, 4.001])  # e_ref = 1e-3 (fp32 rounding aside)
    e_ref = float((ref.double() - ref64).abs().max())
    allowed = 3 * e_ref + 1e-5 * 4.0
    ok = check_tensor("t", "output", ref64, ref, ref64.float() + torch.tensor([0, 0, allowed * 0.99]))
    assert ok.ok and ok.allowed == pytest.approx(allowed)
    bad = check_tensor("t", "output", ref64, ref, ref64.float() + torch.tensor([0, 0, allowed * 1.5]))
    assert not bad.ok
    # floor follows the coarser dtype, and max(1, .) keeps small tensors on an absolute scale
    small = torch.tensor([1e-3], dtype=torch.float64)
    c = check_tensor("t", "output", small, small.bfloat16(), small.bfloat16())
    assert c.allowed >= DEFAULT_FLOORS[torch.bfloat16] * 1.0
    # inf in the reference must be matched by the candidate
    r = torch.tensor([float("inf"), 1.0], dtype=torch.float64)
    assert check_tensor("t", "output", r, r.float(), r.float()).ok
    assert not check_tensor("t", "output", r, r.float(), torch.tensor([1.0, 1.0])).ok
    assert isinstance(c, TensorCheck)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=1, max_size=20),
       st.floats(0.0, 1e-2), st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
def test_rule_properties(values, noise, dtype):
    ref64 = torch.tensor(values, dtype=torch.float64)
    ref = ref64.to(dtype)
    # the reference itself always passes; so does the exact answer
    assert check_tensor("t", "output", ref64, ref, ref).ok
    assert check_tensor("t", "output", ref64, ref, ref64.to(dtype)).ok
    # an error beyond the bound always fails
    c = check_tensor("t", "output", ref64, ref, ref)
    worse = ref64 + (c.allowed * 2 + noise + 1e-6)
    assert not check_tensor("t", "output", ref64, ref, worse).ok


# ----------------------------------------------------------------------------------
# GPU
# ----------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["resnet50", "driving"])
def test_cuda_device(name):
    model, x = _zoo(name)
    res = verify(model, copy.deepcopy(model), x, device="cuda")
    assert res.ok, res.table(limit=10)
    assert next(model.parameters()).device.type == "cpu"  # the user's model stays where it was
    cand = copy.deepcopy(model)
    with torch.no_grad():
        next(cand.parameters()).add_(1e-2)
    assert not verify(model, cand, x, device="cuda").ok
    # models already on the GPU: verify runs there by default
    gm, gx = model.cuda(), tuple(t.cuda() for t in x)
    assert verify(gm, copy.deepcopy(gm), gx).ok


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_dropout_masks_match():
    """The float64 run must draw the same dropout mask as the float32 one, else e_ref is not rounding."""
    model, x = _mlp(dropout=0.5)
    res = verify(model, copy.deepcopy(model), x, device="cuda")
    assert res.ok
    (out,) = [c for c in res.checks if c.name == "output"]
    assert out.ref_error < 1e-4
