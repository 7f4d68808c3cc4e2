"""An OptimizedModule in real training code (issue 14a): it reads the live module tree, honours or
refuses hooks, keeps checkpointed regions recomputed, recaptures on changed Python state or shapes,
names bad inputs, and pickles. Every expectation is eager PyTorch on the same module tree."""
import copy
import io
import warnings

import pytest
import torch
import torch.utils.checkpoint as ckpt
from torch import nn

import fxopt
from fxopt.optimize import RECAPTURE_LIMIT, HookError, ReentrantCheckpointError

PIPE = "dce,normalize"  # exact rewrites: outputs and grads must equal eager's


class Net(nn.Module):
    def __init__(self, d=6, out=3):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(d, 8), nn.BatchNorm1d(8), nn.GELU(), nn.Linear(8, 8))
        self.head = nn.Linear(8, out)

    def forward(self, x):
        return self.head(torch.tanh(self.body(x)))


def _x(b=4, d=6, seed=0):
    return torch.randn(b, d, generator=torch.Generator().manual_seed(seed))


def _grads(model, x):
    for p in model.parameters():
        p.grad = None
    out = model(x)
    out.square().sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _same(opt, ref, x):
    """opt and ref (an eager module with the same tensors' values) give equal outputs and grads."""
    out_o, g_o = _grads(opt, x)
    out_r, g_r = _grads(ref, x)
    torch.testing.assert_close(out_o, out_r)
    assert g_o.keys() == g_r.keys()
    for k in g_r:
        torch.testing.assert_close(g_o[k], g_r[k], msg=k)


def _fresh_state(model, seed):
    torch.manual_seed(seed)
    return {k: torch.randn_like(v) if v.is_floating_point() else v.clone() for k, v in model.state_dict().items()}


# ---- 1. weights are read live -------------------------------------------------------------------
def test_load_state_dict_assign_is_used():
    model = Net().train()
    opt = fxopt.optimize(model, _x(), pipeline=PIPE)
    sd = _fresh_state(model, 1)
    sd = {k: v.abs() + 0.5 if "running_var" in k else v for k, v in sd.items()}
    opt.load_state_dict(sd, assign=True)
    ref = Net().train()
    ref.load_state_dict(sd)
    assert opt.head.weight.data_ptr() == sd["head.weight"].data_ptr()  # assign kept the new tensor
    _same(opt, ref, _x())
    # the optimized graph, not an eager fallback, ran: still one capture
    assert opt._captures == 1


def test_graphs_hold_no_copy_of_the_weights():
    """Export's module holds copies of the weights; the optimized graphs must not (memory), and a
    replaced tensor is freed, not kept alive by a graph."""
    import gc
    import weakref
    model = Net().train()
    opt = fxopt.optimize(model, _x(), pipeline=PIPE)
    assert list(opt.graph_module.parameters()) == [] and list(opt.graph_module.buffers()) == []
    old = weakref.ref(opt.head.weight)
    opt.load_state_dict(_fresh_state(model, 4), assign=True)
    _grads(opt, _x())
    gc.collect()
    assert old() is None


def test_parameter_assignment_on_a_submodule_is_used():
    model = Net().train()
    opt = fxopt.optimize(model, _x(), pipeline=PIPE)
    ref = copy.deepcopy(model)
    new = nn.Parameter(torch.randn(3, 8, generator=torch.Generator().manual_seed(2)))
    opt.head.weight = new
    ref.head.weight = nn.Parameter(new.detach().clone())
    _same(opt, ref, _x())
    assert new.grad is not None  # the gradient lands in the assigned parameter itself
    assert opt._captures == 1


def test_replaced_submodule_recaptures():
    """A different submodule (other type, other output width) is captured anew, never run with the
    old graph; a same-shaped replacement is used too."""
    model = Net().train()
    opt = fxopt.optimize(model, _x(), pipeline=PIPE)
    ref = copy.deepcopy(model)
    wide = nn.Sequential(nn.Linear(8, 5), nn.ReLU())
    opt.head = wide
    ref.head = copy.deepcopy(wide)
    _same(opt, ref, _x())
    assert opt(_x()).shape == (4, 5) and opt._captures == 2
    deeper = nn.Linear(8, 8)  # replaced deep inside the tree
    opt.body[3] = deeper
    ref.body[3] = copy.deepcopy(deeper)
    _same(opt, ref, _x())
    assert opt._captures == 3


def test_submodule_switched_to_eval_gets_its_own_graph():
    """Frozen batch norm (a submodule in eval inside a training model) is common in detection
    models: the graph captured with BN in training mode must not be reused."""
    model = Net().train()
    opt = fxopt.optimize(model, _x(), pipeline=PIPE)
    ref = copy.deepcopy(model)
    opt.body[1].eval()
    ref.body[1].eval()
    _same(opt, ref, _x())
    assert opt.training and not opt.body[1].training and opt._captures == 2
    torch.testing.assert_close(opt.body[1].running_mean, ref.body[1].running_mean)  # not updated


def test_functional_call_uses_the_given_tensors():
    model = Net().train()
    opt = fxopt.optimize(model, _x(), pipeline=PIPE)
    names = dict(model.named_parameters())
    params = {k: v.abs() + 0.5 if "running_var" in k else v for k, v in _fresh_state(model, 3).items()}
    params = {k: v.requires_grad_(k in names) for k, v in params.items()}
    ref = Net().train()
    ref_params = {k: v.detach().clone().requires_grad_(v.requires_grad) for k, v in params.items()}
    x = _x()
    out = torch.func.functional_call(opt, params, (x,))
    expected = torch.func.functional_call(ref, ref_params, (x,))
    torch.testing.assert_close(out, expected)
    out.square().sum().backward()
    expected.square().sum().backward()
    for k, p in params.items():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, ref_params[k].grad, msg=k)
    # the module's own parameters are back and untouched by that call
    assert all(p.grad is None for p in opt.parameters())


# ---- 2. hooks ---------------------------------------------------------------------------------------
def test_root_hooks_run_around_the_graph():
    model = Net().train()
    seen = []
    model.register_forward_pre_hook(lambda m, args: (args[0] * 2,))
    model.register_forward_hook(lambda m, args, out: seen.append(out.shape) or out + 1)
    opt = fxopt.optimize(model, _x(), pipeline=PIPE)
    seen.clear()
    x = _x()
    torch.testing.assert_close(opt(x), model(x))  # pre-hook doubled the input, hook added one
    assert seen == [(4, 3), (4, 3)]                # once per call, not baked in at capture
    after = []
    opt.register_forward_hook(lambda m, args, out: after.append(1))
    opt(x)
    assert after == [1]


def test_submodule_hooks_are_refused_before_and_after():
    model = Net()
    handle = model.head.register_forward_hook(lambda m, args, out: None)
    with pytest.raises(HookError, match="forward_hook on head"):
        fxopt.optimize(model, _x(), pipeline=PIPE)
    handle.remove()
    opt = fxopt.optimize(model, _x(), pipeline=PIPE)
    opt.body[0].register_full_backward_hook(lambda m, gi, go: None)
    with pytest.raises(HookError, match="on body.0") as err:
        opt(_x())
    assert "OptimizedModule itself" in str(err.value)


def test_global_module_hooks_warn_once_that_submodules_are_not_called():
    from torch.nn.modules.module import register_module_forward_hook
    opt = fxopt.optimize(Net(), _x(), pipeline=PIPE)
    seen = []
    handle = register_module_forward_hook(lambda m, args, out: seen.append(type(m).__name__))
    try:
        with pytest.warns(UserWarning, match="not for its submodules"):
            opt(_x())
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            opt(_x())                                    # once per module, not every call
    finally:
        handle.remove()
    assert seen.count("OptimizedModule") == 2 and "Linear" not in seen  # the warning told the truth


# ---- 3. nested optimize ----------------------------------------------------------------------------
class Outer(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.proj = nn.Linear(3, 2)

    def forward(self, x):
        return self.proj(self.inner(x))


def test_nested_optimize_keeps_inner_gradients():
    net = Net().train()
    inner = fxopt.optimize(net, _x(), pipeline=PIPE)
    outer = fxopt.optimize(Outer(inner), _x(), pipeline=PIPE, verify=False)
    ref = Outer(copy.deepcopy(net)).train()
    ref.proj.load_state_dict(outer.proj.state_dict())
    _same(outer, ref, _x())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in outer.inner.parameters())


# ---- 5. activation checkpointing ------------------------------------------------------------------
class Checkpointed(nn.Module):
    def __init__(self, reentrant=False, d=32):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
                                    for _ in range(3))
        self.reentrant = reentrant

    def forward(self, x):
        for block in self.blocks:
            x = x + ckpt.checkpoint(block, x, use_reentrant=self.reentrant)
        return x


def _saved_bytes(model, x):
    """Bytes of activations autograd saves for backward in one forward (unique storages; parameters
    are held anyway, so a saved parameter costs nothing)."""
    storages = {}
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    return out, sum(storages.values())


def test_checkpointed_regions_are_recomputed_not_saved():
    torch.manual_seed(0)
    model = Checkpointed().train()
    x = torch.randn(64, 32, requires_grad=True)
    opt = fxopt.optimize(model, x, pipeline=PIPE)
    plain = copy.deepcopy(model)
    plain.forward = lambda x: _no_checkpoint(plain, x)
    _, eager_bytes = _saved_bytes(model, x)
    _, plain_bytes = _saved_bytes(plain, x)
    _, ours = _saved_bytes(opt, x)
    assert plain_bytes > 3 * eager_bytes          # the test model is one where checkpointing matters
    assert ours <= eager_bytes                    # the optimized graph saves no more than eager did
    assert opt.graph_module.graph is not None and any(
        "fxopt.ac_region" in n.meta for n in opt.graph_module.graph.nodes)
    _same(opt, copy.deepcopy(model), x.detach())


def _no_checkpoint(model, x):
    for block in model.blocks:
        x = x + block(x)
    return x


def test_reentrant_checkpoint_is_refused_with_the_fix():
    with pytest.raises(ReentrantCheckpointError, match="use_reentrant=False"):
        fxopt.optimize(Checkpointed(reentrant=True).train(), torch.randn(2, 32), pipeline=PIPE)


# ---- 6. Python state read or written in forward ------------------------------------------------------
class Stateful(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 3)
        self.scale = 1.0
        self.use_tanh = True
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        y = self.lin(x) * self.scale
        return torch.tanh(y) if self.use_tanh else y


def test_counter_written_in_forward_warns_with_the_line():
    with pytest.warns(UserWarning, match=r"calls is assigned in forward \(at .*test_live_weights.py:\d+\)"):
        fxopt.optimize(Stateful(), _x(), pipeline=PIPE)


def test_flag_flipped_between_calls_recaptures():
    model = Stateful()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = fxopt.optimize(model, _x(), pipeline=PIPE)
        ref = copy.deepcopy(model)
        for flag, scale in [(False, 1.0), (False, 3.0), (True, 1.0)]:
            opt.use_tanh, opt.scale = flag, scale
            ref.use_tanh, ref.scale = flag, scale
            _same(opt, ref, _x())
    assert opt._captures == 3  # (True, 1.0) reuses the first graph


# ---- 7. call-time mismatch and the recapture limit ---------------------------------------------------
def test_wrong_feature_dim_or_dtype_names_expected_and_got():
    opt = fxopt.optimize(Net(), _x(), pipeline=PIPE)
    with pytest.raises(fxopt.InputError, match=r"float32\[4, 7\].*captured for inputs \(float32\[4, 6\]\)"):
        opt(_x(d=7))
    with pytest.raises(fxopt.InputError, match=r"float64\[4, 6\].*float32\[4, 6\]"):
        opt(_x().double())


def test_new_shapes_recapture_up_to_the_limit_then_run_eagerly():
    model = Net().eval()
    opt = fxopt.optimize(model, _x(b=1), pipeline="dce", verify=False)
    ref = copy.deepcopy(model)
    with pytest.warns(UserWarning, match=f"captured {RECAPTURE_LIMIT} times"):
        for b in range(2, RECAPTURE_LIMIT + 3):
            torch.testing.assert_close(opt(_x(b=b)), ref(_x(b=b)))
    assert opt._captures == RECAPTURE_LIMIT


# ---- 8. pickling ---------------------------------------------------------------------------------
def test_torch_save_load_round_trip_recaptures_lazily():
    model = Net().train()
    opt = fxopt.optimize(model, _x(), pipeline=PIPE)
    _grads(opt, _x())
    buf = io.BytesIO()
    torch.save(opt, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert isinstance(loaded, fxopt.OptimizedModule) and loaded._captures == 0
    for (k, a), b in zip(loaded.state_dict().items(), opt.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)
    ref = copy.deepcopy(opt._source)
    _same(loaded, ref, _x(seed=5))
    assert loaded._captures == 1
    # the loaded module's graph reads the loaded tensors, not the saved module's
    assert loaded.head.weight.grad is not None and opt.head.weight.grad is not None
    assert loaded.head.weight is not opt.head.weight


def test_user_model_is_never_changed():
    model = Stateful()
    snapshot = copy.deepcopy(model.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = fxopt.optimize(model, _x(), pipeline=PIPE)
    opt.load_state_dict(_fresh_state(model, 9), assign=True)
    _grads(opt, _x())
    assert model.calls == 0 and all(torch.equal(v, snapshot[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
