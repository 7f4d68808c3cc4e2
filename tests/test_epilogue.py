"""``epilogue``: goldens (diff of the canonical graph text plus the decision log) for every fused
form and every refusal, numerical verification in train and eval on small models, tiny zoo models
and a tiny HF ViT, and the torch facts the pass relies on (``_addmm_activation`` has no derivative;
its GELU is exact erf on the CPU and the tanh approximation on CUDA).

``FXOPT_ACCEPT=1 pytest tests/test_epilogue.py`` rewrites the goldens in ``tests/golden/epilogue``.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

import fxopt
import fxopt.passes.epilogue as epilogue
from fxopt import zoo
from fxopt.passes import PassContext
from fxopt.passes.graph_utils import AsModule as _AsModule
from fxopt.verify import verify

import goldens  # noqa: E402  (tests/goldens.py: shared golden-file check)

GOLDEN = Path(__file__).parent / "golden" / "epilogue"
aten = torch.ops.aten


def run(model, inputs, pipeline="epilogue", **kw):
    return goldens.run_with_decisions(model, inputs, pipeline, **kw)


def check_golden(case: str, text: str) -> None:
    goldens.check(GOLDEN / f"{case}.diff", text)

def _x(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def targets(gm) -> list[str]:
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]


def check(model, gm, x, training):
    result = verify(model, _AsModule(gm), x, training=training)
    assert result, result.table()


# ---------------------------------------------------------------------------------------------
# small models


class BiasForms(nn.Module):
    """A GEMM followed by a separate bias add, in the spellings hand-written models use."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 6) / 3)      # [N, K]: used as x @ w.t()
        self.b = nn.Parameter(torch.randn(8))
        self.w_kn = nn.Parameter(torch.randn(8, 8) / 3)   # [K, N]: used as x @ w_kn
        self.b2 = nn.Parameter(torch.randn(8))
        self.w_mm = nn.Parameter(torch.randn(8, 4) / 3)
        self.b3 = nn.Parameter(torch.randn(1, 4))         # a [1, N] row: viewed as [N]

    def forward(self, x):  # [2, 5, 6]
        h = x @ self.w.t() + self.b               # matmul-bias, transposed weight: linear(x, w, b)
        h = self.b2 + torch.tanh(h) @ self.w_kn   # matmul-bias, bias first, [K, N] weight: permute
        return torch.mm(h.reshape(-1, 8), self.w_mm) + self.b3   # mm-bias: addmm


class ActivationForms(nn.Module):
    """GEMM + bias followed by relu/gelu: linear (2-D and 3-D input), a GPT-2-style addmm -> view ->
    activation, and an mm + bias that becomes addmm and then takes the relu."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 8)
        self.w = nn.Parameter(torch.randn(8, 8) / 3)
        self.b = nn.Parameter(torch.randn(8))
        self.w2 = nn.Parameter(torch.randn(8, 8) / 3)
        self.b2 = nn.Parameter(torch.randn(8))

    def forward(self, x):  # [2, 5, 6]
        h = F.gelu(self.fc1(x))                                       # exact GELU, 3-D linear
        h = torch.addmm(self.b, h.reshape(-1, 8), self.w).view(2, 5, 8).relu()   # addmm -> view -> relu
        h = F.relu(self.fc2(h.reshape(-1, 8)))                        # 2-D linear
        return torch.relu(torch.mm(h, self.w2) + self.b2)             # mm-bias, then relu


class Refusals(nn.Module):
    """One candidate per refusal."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.fc_nobias = nn.Linear(8, 8, bias=False)
        self.fc_shared = nn.Linear(8, 8)
        self.w = nn.Parameter(torch.randn(8, 8) / 3)
        self.row = nn.Parameter(torch.randn(1, 8))
        self.col = nn.Parameter(torch.randn(4, 1))
        self.conv = nn.Conv2d(2, 2, 1)

    def forward(self, x, img):  # x [4, 8], img [1, 2, 3, 3]
        a = F.gelu(self.fc(x), approximate="tanh")      # not the GELU _addmm_activation computes on CPU
        b = F.silu(self.fc(a))                          # no epilogue computes silu
        c = torch.relu(self.fc_nobias(b))               # no bias
        s = self.fc_shared(c)
        d = torch.relu(s) + s                           # linear read twice
        e = torch.mm(d, self.w) + d                     # full [M, N] addend, not a bias vector
        f = torch.mm(e, self.w) + self.col              # [M, 1] addend: per row
        q = f.view(2, 2, 8)
        g = torch.bmm(q, q.transpose(1, 2)) + self.row[:, :2]     # bmm + add
        q4 = f.view(1, 2, 2, 8)
        h = q4 @ q4.transpose(-1, -2) + self.row[:, :2]          # 4-D matmul + mask-like add
        i = torch.relu(self.conv(img))                  # conv + relu
        return g, h, i


# ---------------------------------------------------------------------------------------------
# goldens + verification


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_bias_forms_golden(mode):
    torch.manual_seed(0)
    model = BiasForms().train(mode == "train")
    x = _x(2, 5, 6)
    text, r, gm = run(model, x, verify=True)
    check_golden("bias_forms", text)  # the same rewrite in training and eval graphs
    assert r.stats == {"matmul-bias": 2, "mm-bias": 1, "kept_gemm-activation": 1}  # tanh: no epilogue
    assert not r.rolled_back and r.verification
    assert "aten.matmul.default" not in targets(gm) and "aten.add.Tensor" not in targets(gm)
    assert "aten.t.default" not in targets(gm)  # the transpose feeding the matmul went with it
    check(model, gm, x, training=mode == "train")


def test_activation_forms_eval_golden():
    torch.manual_seed(0)
    model = ActivationForms().eval()
    x = _x(2, 5, 6)
    text, r, gm = run(model, x, verify=True)
    check_golden("activation_forms_eval", text)
    assert r.stats == {"gemm-activation": 4, "mm-bias": 1} and not r.rolled_back and r.verification
    assert targets(gm).count("aten._addmm_activation.default") == 4
    assert not {"aten.relu.default", "aten.gelu.default"} & set(targets(gm))
    check(model, gm, x, training=False)


def test_activation_forms_train_are_kept():
    """Training graph: _addmm_activation has no derivative, so only the bias add is fused."""
    torch.manual_seed(0)
    model = ActivationForms().train()
    x = _x(2, 5, 6)
    text, r, gm = run(model, x, verify=True)
    check_golden("activation_forms_train", text)
    assert r.stats == {"kept_gemm-activation": 4, "mm-bias": 1} and not r.rolled_back
    assert all("no derivative" in d.reason for d in r.decisions if d.action == "keep")
    check(model, gm, x, training=True)


def test_refusals_golden():
    torch.manual_seed(0)
    text, r, gm = run(Refusals().eval(), (_x(4, 8), _x(1, 2, 3, 3)))
    check_golden("refusals_eval", text)
    assert r.modified is False and text.startswith("# decisions")
    reasons = [d.reason for d in r.decisions]
    for words in ("gelu(approximate='tanh') differs from the GELU _addmm_activation computes on cpu",
                  "no ATen GEMM epilogue computes silu", "has no bias", "is also read by add",
                  "[4, 8] is not a per-column bias [8]", "[4, 1] is not a per-column bias [8]",
                  "baddbmm copies the addend", "batched matmul [1, 2, 2, 8] @ [1, 2, 8, 2]",
                  "cudnn_convolution_relu (relu only), is CUDA-only"):
        assert sum(words in why for why in reasons) == 1, words


def test_options_turn_rules_off():
    model = ActivationForms().eval()
    _, r, _ = run(model, _x(2, 5, 6), pipeline="epilogue{activation=false}")
    assert r.stats == {"mm-bias": 1, "kept_gemm-activation": 4}
    _, r, _ = run(BiasForms(), _x(2, 5, 6), pipeline="epilogue{bias=false}")
    assert r.modified is False and r.stats == {}


def test_costed_decisions_carry_the_removed_kernel_time():
    _, r, _ = run(BiasForms().train(), _x(2, 5, 6), cost=True)
    fused = [d for d in r.decisions if d.action == "fuse"]
    assert len(fused) == 3 and all(d.est_gain_s > 0 for d in fused)
    assert r.step_time_after_s < r.step_time_before_s


# ---------------------------------------------------------------------------------------------
# zoo and HF models


@pytest.mark.parametrize("name, batch, mode, fused", [
    ("vit_b16", 2, "eval", {"gemm-activation": 1}),       # the MLP's exact GELU, on a CPU graph
    ("vit_b16", 2, "train", {}),
    ("driving", 1, "eval", {"gemm-activation": 2}),
    ("driving", 1, "train", {}),
])
def test_zoo_models_verify(name, batch, mode, fused):
    torch.manual_seed(0)
    model = zoo.build(name, tiny=True).train(mode == "train")
    x = zoo.example_inputs(name, batch, tiny=True)
    _, r, gm = run(model, x, verify=True)
    assert {k: v for k, v in r.stats.items() if not k.startswith("kept_")} == fused
    assert r.modified == bool(fused) and not r.rolled_back
    if fused:
        assert r.verification, r.note
    else:
        assert any("no derivative" in d.reason for d in r.decisions)


def test_hf_vit_eval_verifies():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                    intermediate_size=64, image_size=32, patch_size=8, num_labels=10)
    model = transformers.ViTForImageClassification(config).eval()
    _, r, gm = run(model, {"pixel_values": _x(2, 3, 32, 32)}, verify=True)
    assert r.stats == {"gemm-activation": 2} and not r.rolled_back and r.verification, r.note


# ---------------------------------------------------------------------------------------------
# the torch facts behind the rules


def test_addmm_activation_has_no_derivative_in_this_torch():
    b, x, w = torch.randn(8), torch.randn(4, 6, requires_grad=True), torch.randn(6, 8)
    try:
        aten._addmm_activation(b, x, w).sum().backward()
        direct = True
    except RuntimeError as exc:
        assert "derivative for aten::_addmm_activation is not implemented" in str(exc)
        direct = False
    assert epilogue.addmm_activation_differentiable() is direct
    if torch.__version__.startswith("2.13"):
        assert direct is False


def test_cpu_addmm_activation_is_relu_and_exact_gelu():
    b, x, w = _x(8, seed=1), _x(16, 6, seed=2), _x(6, 8, seed=3)
    ref = torch.addmm(b, x, w)
    assert torch.equal(aten._addmm_activation(b, x, w), ref.relu())
    gelu = aten._addmm_activation(b, x, w, use_gelu=True)
    assert torch.equal(gelu, F.gelu(ref))
    assert (gelu - F.gelu(ref, approximate="tanh")).abs().max() > 1e-5  # not the tanh form


def test_training_fuses_once_torch_has_the_derivative(monkeypatch):
    monkeypatch.setattr(epilogue, "addmm_activation_differentiable", lambda: True)
    _, r, gm = run(ActivationForms().train(), _x(2, 5, 6))
    assert r.stats == {"gemm-activation": 4, "mm-bias": 1}
    assert all("differentiable in this torch" in d.reason for d in r.decisions if d.reason.startswith("gemm"))


def _as_device(gm, device: str):
    """Re-type every GEMM output's fake value to ``device`` (how a graph captured there looks)."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    for node in gm.graph.nodes:
        v = node.meta.get("val")
        if node.op == "call_function" and node.target in (aten.linear.default, aten.addmm.default):
            with mode:
                node.meta["val"] = torch.empty(v.shape, dtype=v.dtype, device=device)


@pytest.mark.parametrize("device, fused, kept", [
    ("cuda", "gelu_1", "gelu: keep: gemm-activation: gelu(approximate='none') differs from the GELU "
                       "_addmm_activation computes on cuda (approximate='tanh')"),
    ("meta", None, "gelu: keep: gemm-activation: graph on meta: which GELU _addmm_activation computes there"),
])
def test_gelu_fusion_follows_the_graphs_device(device, fused, kept):
    class TwoGelus(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2, self.fc3 = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            h = F.gelu(self.fc1(x))
            return torch.relu(self.fc3(F.gelu(self.fc2(h), approximate="tanh")))

    gm = fxopt.capture(TwoGelus().eval(), _x(2, 4)).graph_module
    _as_device(gm, device)
    ctx = PassContext(training=False)
    ctx.begin("epilogue", {"bias": True, "activation": True})
    result = epilogue.FuseEpilogues().run(gm, ctx)
    decisions = [str(d) for d in ctx.decisions]
    assert any(d.startswith(kept) for d in decisions), decisions
    assert any(d.startswith("relu: fuse") for d in decisions)  # relu is the same function everywhere
    if fused:
        assert any(d.startswith(f"{fused}: fuse") and "approximate='tanh'" in d for d in decisions)
    assert result.modified


@pytest.mark.gpu
def test_cuda_addmm_activation_gelu_is_tanh_and_fusion_verifies():
    b = torch.randn(64, device="cuda")
    x, w = torch.randn(32, 48, device="cuda"), torch.randn(48, 64, device="cuda")
    ref = torch.addmm(b, x, w)
    gelu = aten._addmm_activation(b, x, w, use_gelu=True)
    tanh_err = (gelu - F.gelu(ref, approximate="tanh")).abs().max().item()
    erf_err = (gelu - F.gelu(ref)).abs().max().item()
    assert tanh_err < erf_err and tanh_err < 1e-4

    class Mlp(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(48, 64), nn.Linear(64, 48)

        def forward(self, x):
            return self.fc2(F.gelu(self.fc1(x), approximate="tanh")).relu()

    model = Mlp().cuda().eval()
    _, r, gm = run(model, torch.randn(4, 8, 48, device="cuda"), verify=True)
    assert r.stats.get("gemm-activation") == 1 and not r.rolled_back and r.verification, r.note
