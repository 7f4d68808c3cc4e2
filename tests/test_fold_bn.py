"""``fold-bn``: goldens (diff of the canonical graph text plus the decision log), numerical
verification on small models, tiny zoo models and a tiny HF ResNet (eval, and frozen BN in
training), refusals, the cost-driven choice, and state_dict compatibility.

``FXOPT_ACCEPT=1 pytest tests/test_fold_bn.py`` rewrites the goldens in ``tests/golden/fold-bn``.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings, strategies as st
from torch import nn

import fxopt
import fxopt.passes.fold_bn  # noqa: F401  (registers fold-bn)
from fxopt import zoo
from fxopt.verify import verify

import goldens  # noqa: E402  (tests/goldens.py: shared golden-file check)

GOLDEN = Path(__file__).parent / "golden" / "fold-bn"
aten = torch.ops.aten


# ---------------------------------------------------------------------------------------------
# harness


def run(model, inputs, pipeline="fold-bn", **kw):
    return goldens.run_with_decisions(model, inputs, pipeline, **kw)


def check_golden(case: str, text: str) -> None:
    goldens.check(GOLDEN / f"{case}.diff", text)

def randomize_bn(model: nn.Module, seed: int = 1) -> nn.Module:
    """Non-trivial running statistics and affine parameters, so a wrong fold shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=g) - 0.5)
    return model


class FrozenBN(nn.Module):
    """``model`` in training mode with every BN kept in eval mode, also across ``.train()`` calls
    (fine-tuning with frozen BN statistics; fxopt.verify calls ``.train()`` on its copies)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.train()

    def train(self, mode: bool = True):
        super().train(mode)
        for m in self.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        return self

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)


def freeze_bn(model: nn.Module) -> nn.Module:
    return FrozenBN(model)


def bn_count(gm) -> int:
    return sum(n.target is aten.batch_norm.default for n in gm.graph.nodes)


def _x(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# small models


class Foldable(nn.Module):
    """Every fold form: bias-free conv, conv with bias under an affine=False BN, grouped transposed
    conv, linear + BatchNorm1d, and F.batch_norm(..., training=False) on explicit tensors."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.bn2 = nn.BatchNorm2d(4, affine=False)
        self.up = nn.ConvTranspose2d(4, 6, 2, stride=2, groups=2)
        self.bn_up = nn.BatchNorm2d(6)
        self.fc = nn.Linear(4, 5)
        self.bn_fc = nn.BatchNorm1d(5)
        self.conv1d = nn.Conv1d(4, 3, 3)
        self.register_buffer("f_mean", torch.tensor([0.1, -0.2, 0.3]))
        self.register_buffer("f_var", torch.tensor([0.5, 1.5, 2.0]))
        self.f_gamma = nn.Parameter(torch.tensor([1.5, 0.5, -1.0]))
        self.f_beta = nn.Parameter(torch.tensor([0.2, 0.0, -0.3]))

    def forward(self, x):
        y = F.relu(self.bn(self.conv(x)))
        y = self.bn2(self.conv2(y))
        up = self.bn_up(self.up(y))
        head = self.bn_fc(self.fc(y.mean((2, 3))))
        seq = F.batch_norm(self.conv1d(y.mean(3)), self.f_mean, self.f_var, self.f_gamma, self.f_beta,
                           training=False, eps=1e-3)
        return head, up, seq


class Refusals(nn.Module):
    """One BN per refusal (in eval mode): shared conv output, BN after a relu, BatchNorm1d over the
    sequence axis of a linear output, track_running_stats=False."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn_shared = nn.BatchNorm2d(4)
        self.bn_after_relu = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 4)
        self.bn_seq = nn.BatchNorm1d(5)
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.bn_no_stats = nn.BatchNorm2d(4, track_running_stats=False)

    def forward(self, x):
        c = self.conv(x)
        y = self.bn_shared(c) + c                          # conv output read twice
        y = self.bn_after_relu(F.relu(y))                  # not fed by a conv/linear
        seq = self.bn_seq(self.fc(y.flatten(2)[:, :, :5].transpose(1, 2)))   # [B, 5, 4]: BN over 5
        return self.bn_no_stats(self.conv2(y)), seq


# ---------------------------------------------------------------------------------------------
# goldens + verification


def test_fold_eval_golden():
    torch.manual_seed(0)
    model = randomize_bn(Foldable()).eval()
    x = _x(2, 3, 6, 6)
    text, r, gm = run(model, x, verify=True)
    check_golden("eval_all_forms", text)
    assert r.modified and r.stats == {"folded": 5} and not r.rolled_back and r.verification
    assert bn_count(gm) == 0
    assert verify(model, _runner(gm, model), x, training=False)


def test_fold_frozen_bn_in_training_golden():
    """BN modules in eval mode inside a training model, and F.batch_norm(training=False): folded;
    gradients reach the conv weights and BN gamma/beta (fxopt.verify checks every param grad and
    the params after an SGD step)."""
    torch.manual_seed(0)
    model = freeze_bn(randomize_bn(Foldable()))
    x = _x(2, 3, 6, 6)
    text, r, gm = run(model, x, verify=True)
    check_golden("frozen_bn_train", text)
    assert r.stats == {"folded": 5} and not r.rolled_back
    result = verify(model, _runner(gm, model), x, training=True)
    assert result, result.table()
    names = {c.name for c in result.checks}
    assert {"grad[model.bn.weight]", "grad[model.bn.bias]", "grad[model.conv.weight]", "grad[model.f_gamma]"} <= names


def test_train_mode_bn_is_not_folded():
    """No change: BN in training mode normalizes with the batch's statistics."""
    torch.manual_seed(0)
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                                       nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))).train()
    text, r, gm = run(model, _x(2, 3, 6, 6))
    check_golden("refuse_train_mode", text)
    assert r.modified is False and text.startswith("# decisions") and bn_count(gm) == 2
    assert r.stats == {"kept_batch-statistics": 2}
    assert all("batch statistics (training=True)" in d.reason and d.action == "keep" for d in r.decisions)


def test_train_mode_model_still_folds_functional_frozen_bn():
    """In a train-mode model only F.batch_norm(..., training=False) folds; the BN modules stay."""
    torch.manual_seed(0)
    model = randomize_bn(Foldable()).train()
    x = _x(2, 3, 6, 6)
    _, r, gm = run(model, x, verify=True)
    assert r.stats == {"kept_batch-statistics": 4, "folded": 1} and not r.rolled_back
    assert bn_count(gm) == 4


def test_refusals_golden():
    torch.manual_seed(0)
    model = randomize_bn(Refusals()).eval()
    text, r, gm = run(model, _x(2, 3, 4, 4))
    check_golden("refusals", text)
    assert r.modified is False and bn_count(gm) == 4
    assert r.stats == {"kept_other-users": 1, "kept_no-layer": 1, "kept_channel-axis": 1,
                       "kept_batch-statistics": 1}
    reasons = " | ".join(d.reason for d in r.decisions)
    for words in ("is also read by add", "input comes from aten.relu.default", "not its output-feature axis",
                  "track_running_stats=False"):
        assert words in reasons


def test_frozen_in_training_option():
    model = freeze_bn(randomize_bn(Foldable()))
    _, r, _ = run(model, _x(2, 3, 6, 6), pipeline="fold-bn{frozen_in_training=false}")
    assert r.modified is False and r.stats == {"kept_option": 5}


# ---------------------------------------------------------------------------------------------
# the cost model decides


def test_cost_model_keeps_unprofitable_folds_on_tiny_layers():
    """On a 6x6 image the BN pass (one launch) is cheaper than the 5-6 weight-op launches."""
    model = randomize_bn(Foldable()).eval()
    _, r, _ = run(model, _x(2, 3, 6, 6), cost=True)
    assert r.modified is False and r.stats == {"kept_slower": 5}
    assert all(d.est_gain_s < 0 and "profitable_only=true" in d.reason for d in r.decisions)
    _, r, _ = run(model, _x(2, 3, 6, 6), pipeline="fold-bn{profitable_only=false}", cost=True)
    assert r.stats == {"folded": 5} and r.step_time_after_s > r.step_time_before_s


def test_cost_model_folds_large_layers_full_resnet50_on_meta():
    """Full-size ResNet-50, batch 32, on the meta device (shapes only): early, activation-heavy BNs fold
    with a positive estimated gain, the predicted step gets faster, late small ones stay."""
    with torch.device("meta"):
        model = zoo.build("resnet50").eval()
        x = zoo.example_inputs("resnet50", 32)
    _, r, gm = run(model, x, cost=True)
    folds = [d for d in r.decisions if d.action == "fold"]
    assert len(folds) >= 10 and all(d.est_gain_s > 0 for d in folds)
    assert r.stats["folded"] + r.stats["kept_slower"] == 53
    assert r.step_time_after_s < r.step_time_before_s
    # the stem BN (32x64x112x112 fp32, 103 MB in and out) folds; the reason carries both estimates
    assert folds[0].node == "batch_norm" and re.search(r"pass \(eval, fwd\), est\. [\d.]+ us, for 5 weight-sized "
                                                       r"kernels, est\. [\d.]+ us", folds[0].reason)
    kept = [d for d in r.decisions if d.action == "keep"]
    assert all(d.est_gain_s < 0 and d.reason.startswith("slower") for d in kept)


# ---------------------------------------------------------------------------------------------
# zoo and HF models


def _runner(gm, model):
    """The graph module as a plain module with the model's parameter names (verify matches by name)."""
    from fxopt.passes.graph_utils import AsModule as _AsModule
    runner = _AsModule(gm)
    assert [n for n, _ in runner.named_parameters()] == [n for n, _ in model.named_parameters()]
    return runner


@pytest.mark.parametrize("name, batch, mode", [
    ("resnet50", 2, "eval"),
    ("driving", 1, "eval"),
    ("resnet50", 2, "frozen"),
])
def test_zoo_models_verify(name, batch, mode):
    torch.manual_seed(0)
    model = randomize_bn(zoo.build(name, tiny=True))
    model = model.eval() if mode == "eval" else freeze_bn(model)
    x = zoo.example_inputs(name, batch, tiny=True)
    _, r, gm = run(model, x, verify=True)
    assert r.modified and not r.rolled_back and r.verification, r.note
    bns = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert r.stats == {"folded": bns} and bn_count(gm) == 0
    # parameter and buffer names unchanged: every get_attr still names the model's tensor
    targets = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    assert targets <= set(dict(model.named_parameters())) | set(dict(model.named_buffers()))
    assert [n for n, _ in gm.named_parameters()] == [n for n, _ in model.named_parameters()]


def test_hf_resnet_eval_verifies():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1],
                                       num_labels=10)
    model = randomize_bn(transformers.ResNetForImageClassification(config)).eval()
    _, r, gm = run(model, {"pixel_values": _x(2, 3, 64, 64)}, verify=True)
    assert r.stats == {"folded": 16} and not r.rolled_back and r.verification, r.note


def test_load_state_dict_after_folding():
    """The fold is computed from the module's tensors each call: new statistics loaded later are used."""
    torch.manual_seed(0)
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())).eval()
    x = _x(2, 3, 8, 8)
    opt = fxopt.optimize(model, x, pipeline="fold-bn{profitable_only=false}")
    assert bn_count(opt.graph_module) == 0 and opt.state_dict().keys() == model.state_dict().keys()
    randomize_bn(model, seed=7)
    opt.load_state_dict(model.state_dict())
    torch.testing.assert_close(opt(x), model(x))


# ---------------------------------------------------------------------------------------------
# property: random conv/linear + BN configurations fold exactly enough, eval and frozen training


class OneFold(nn.Module):
    def __init__(self, kind, dims, groups, bias, affine):
        super().__init__()
        c_in, c_out = 2 * groups, 3 * groups
        if kind == "linear":
            self.layer, self.bn = nn.Linear(c_in, c_out, bias=bias), nn.BatchNorm1d(c_out, affine=affine)
        else:
            conv = {("conv", 1): nn.Conv1d, ("conv", 2): nn.Conv2d, ("conv", 3): nn.Conv3d,
                    ("transposed", 1): nn.ConvTranspose1d, ("transposed", 2): nn.ConvTranspose2d,
                    ("transposed", 3): nn.ConvTranspose3d}[kind, dims]
            norm = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
            self.layer, self.bn = conv(c_in, c_out, 2, groups=groups, bias=bias), norm(c_out, affine=affine)

    def forward(self, x):
        return self.bn(self.layer(x))


@settings(max_examples=8, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(["conv", "transposed", "linear"]), dims=st.integers(1, 3), groups=st.integers(1, 2),
       bias=st.booleans(), affine=st.booleans(), frozen=st.booleans())
def test_fold_property(kind, dims, groups, bias, affine, frozen):
    groups = 1 if kind == "linear" else groups
    torch.manual_seed(0)
    model = randomize_bn(OneFold(kind, dims, groups, bias, affine))
    model = freeze_bn(model) if frozen else model.eval()
    x = _x(2, 2 * groups) if kind == "linear" else _x(2, 2 * groups, *[3] * dims)
    _, r, gm = run(model, x, verify=True)
    assert r.stats == {"folded": 1} and not r.rolled_back, r.note
    assert verify(model, _runner(gm, model), x, training=frozen)
