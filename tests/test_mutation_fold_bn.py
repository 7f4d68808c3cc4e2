"""fold-bn checked by hand where the mutation run found gaps: the transposed-conv fold axis in
float64, and the cost estimate's kernel counts (a recorder stands in for ``call_time`` so the
expected totals are counted by hand, not recomputed by the cost model)."""
from __future__ import annotations

import copy

import torch
from torch import nn

import fxopt
import fxopt.passes.fold_bn  # noqa: F401  (registers fold-bn)
from fxopt.passes import PassManager


def test_fold_bn_transposed_conv_scales_its_output_channel_axis():
    """ConvTranspose2d weights are [C_in, C_out, k, k]: the BN scale (one per output channel) goes on
    axis 1. C_out (6) differs from C_in (4) and from k (3), so a wrong axis cannot broadcast by luck."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.ConvTranspose2d(4, 6, 3), nn.BatchNorm2d(6)).eval()
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 1.5)
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, 4, 5, 5)
    gm, (record,) = PassManager("fold-bn", cost=False).run(fxopt.capture(model, (x,)))
    assert not record.rolled_back and record.modified
    assert not [n for n in gm.graph.nodes if "batch_norm" in str(n.target)]
    ref = copy.deepcopy(model).double()
    got = gm(x)
    got = got[0] if isinstance(got, (tuple, list)) else got
    torch.testing.assert_close(got.double(), ref(x.double()), rtol=1e-5, atol=1e-5)


def test_fold_bn_cost_counts_one_kernel_per_weight_op_doubled_in_training(monkeypatch):
    """Every new weight-sized op is one pointwise kernel (views free), priced once in eval and twice in
    training (its backward); the bias gradient a bias-free conv gains is one reduction kernel.
    With a recorder whose time is the launch count, the totals are the kernel counts."""
    import fxopt.cost_models.roofline as roofline
    from fxopt.passes import fold_bn

    calls = []

    class T:
        def __init__(self, k):
            self.total_s = float(k)

    def recorder(cls, dtype, flops, nbytes, kernels, hw, precision=None, *a, **kw):
        calls.append((cls, kernels))
        return T(kernels)

    monkeypatch.setattr(roofline, "call_time", recorder)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4)).eval()
    gm = fxopt.capture(model, (torch.randn(1, 3, 6, 6),)).graph_module
    w = next(n for n in gm.graph.nodes if n.op == "placeholder")
    conv = next(n for n in gm.graph.nodes if "conv" in str(n.target))
    g = gm.graph
    with g.inserting_before(conv):
        a = g.call_function(torch.ops.aten.mul.Tensor, (w, 2.0))
        v = g.call_function(torch.ops.aten.view.default, (a, [-1]))
    a.meta["val"], v.meta["val"] = w.meta["val"] * 2.0, (w.meta["val"] * 2.0).view(-1)
    assert fold_bn._weight_ops_time([a, v], None, None, training=False) == (1.0, 1)
    assert fold_bn._weight_ops_time([a, v], None, None, training=True) == (2.0, 1)
    calls.clear()
    assert fold_bn._bias_grad_time(conv, None, None) == 1.0 and calls == [("reduction", 1)]


def test_fold_bn_bias_free_conv_folds_and_gets_a_bias():
    """export drops a bias-free conv's trailing defaults (conv2d(x, w)): the fold reads the absent
    bias as None and gives the conv the folded bias -mean * scale + beta; float64 reference."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4)).eval()
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, 3, 6, 6)
    gm, (record,) = PassManager("fold-bn", cost=False).run(fxopt.capture(model, (x,)))
    assert not record.rolled_back and record.modified and record.stats == {"folded": 1}, record.stats
    got = gm(x)
    got = got[0] if isinstance(got, (tuple, list)) else got
    torch.testing.assert_close(got.double(), copy.deepcopy(model).double()(x.double()), rtol=1e-5, atol=1e-5)


def test_fold_bn_refuses_a_bf16_conv_with_fp32_statistics():
    """Two dtypes among the conv and BN tensors (bf16 conv feeding an fp32 BN) refuse the fold: the
    folded weight would be computed in one of them; the reason lists each tensor's dtype."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3).to(torch.bfloat16), nn.BatchNorm2d(4)).eval()
    x = torch.randn(1, 3, 6, 6, dtype=torch.bfloat16)
    gm, (record,) = PassManager("fold-bn", cost=False).run(fxopt.capture(model, (x,)))
    (d,) = [d for d in record.decisions if "mixed dtypes" in d.reason]
    assert not record.modified and "input bfloat16" in d.reason and "running_mean float32" in d.reason, d.reason
