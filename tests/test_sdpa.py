"""The ``sdpa`` pass: hand-written attention -> ``aten.scaled_dot_product_attention``.

Each form is a small module; its golden (``tests/golden/sdpa/<form>.diff``) is the canonical-text
diff of the captured graph after the pass, and every form is verified with ``fxopt.verify`` against
the eager module in train and eval mode. ``FXOPT_ACCEPT=1 pytest tests/test_sdpa.py`` rewrites
the goldens.
"""
from __future__ import annotations

import math
import warnings
from functools import lru_cache
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxopt
import fxopt.passes.sdpa  # noqa: F401  (registers the pass)
from fxopt import zoo
from fxopt.graphtext import canonical_text, unified_diff
from fxopt.passes import PassManager, PipelineError
from fxopt.passes.sdpa import Refusal, estimate_gain, match_attention

import goldens  # noqa: E402  (tests/goldens.py: shared golden-file check)

GOLDEN = Path(__file__).parent / "golden" / "sdpa"
aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default
SOFTMAX = (aten.softmax.int, aten._softmax.default)

B, L, DIM, H = 2, 8, 16, 2
D = DIM // H


def _x(*shape, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(dtype)


def _count(gm, targets) -> int:
    targets = targets if isinstance(targets, tuple) else (targets,)
    return sum(n.target in targets for n in gm.graph.nodes)


def run(model: nn.Module, inputs, mode: str = "train", pipeline: str = "sdpa", verify: bool = True, **kw):
    """Capture ``model`` in ``mode``, run ``pipeline`` verified against the eager model.
    Returns (diff of the canonical text, the last pass's record, the graph)."""
    model.train(mode == "train")
    captured = fxopt.capture(model, inputs)
    kw.setdefault("cost", False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        gm, records = PassManager(pipeline, verify=verify, **kw).run(captured, reference=model)
    record = records[-1]
    if verify and record.modified:
        assert not record.rolled_back and record.verification, record.note or record.verification.table()
    return unified_diff(canonical_text(captured.graph_module), canonical_text(gm), pipeline), record, gm


def check_golden(case: str, text: str) -> None:
    goldens.check(GOLDEN / f"{case}.diff", text)

# ---------------------------------------------------------------------------------------------
# the forms: one small module each


class Attn(nn.Module):
    """Multi-head self-attention with q/k/v projections; ``form`` picks how it is written."""

    def __init__(self, form: str, p: float = 0.0, dtype=torch.float32):
        super().__init__()
        self.form, self.scale = form, D ** -0.5
        self.q, self.k, self.v, self.proj = (nn.Linear(DIM, DIM, dtype=dtype) for _ in range(4))
        self.drop = nn.Dropout(p)
        self.register_buffer("bias", torch.tril(torch.ones(L, L)).view(1, 1, L, L))

    def heads(self, t):  # (B, L, DIM) -> (B, H, L, D), written canonically (permute) so refusals change nothing
        return t.view(B, -1, H, D).permute(0, 2, 1, 3)

    def forward(self, x, mask=None):
        f = self.form
        q, k, v = self.heads(self.q(x)), self.heads(self.k(x)), self.heads(self.v(x))
        if f == "mul_scale":
            attn = (q @ k.transpose(-2, -1)) * self.scale
        elif f == "div_scale":
            attn = (q @ k.transpose(-2, -1)) / math.sqrt(D)
        elif f == "scale_in_q":  # scale folded into q (before the view) and into k^T (after the transpose)
            q = self.heads(self.q(x) * D ** -0.25)
            attn = q @ (k.transpose(-2, -1) * D ** -0.25)
        elif f == "permute":  # k^T straight from the projection: (B, L, H, D) -> (B, H, D, L)
            kt = self.k(x).view(B, L, H, D).permute(0, 2, 3, 1)
            attn = torch.matmul(q, kt) * self.scale
        elif f == "bmm_3d":
            q3, k3, v3 = (t.reshape(B * H, L, D) for t in (q, k, v))
            p = torch.bmm(q3, k3.transpose(1, 2)).mul(self.scale).softmax(-1)
            return self.proj(torch.bmm(self.drop(p), v3).view(B, H, L, D).transpose(1, 2).reshape(B, L, DIM))
        elif f == "einsum":  # q, v in (B, L, H, D); output straight to (B, L, H, D)
            qb, vb = self.q(x).view(B, L, H, D), self.v(x).view(B, L, H, D)
            p = (torch.einsum("blhd,bhsd->bhls", qb, k) * self.scale).softmax(-1)
            return self.proj(torch.einsum("bhls,bshd->blhd", p, vb).reshape(B, L, DIM))
        elif f == "additive_mask":
            attn = (q @ k.transpose(-2, -1)) * self.scale + mask
        elif f == "mask_before_scale":  # the mask is scaled too: SDPA gets mask * scale
            attn = (q @ k.transpose(-2, -1) + mask) * self.scale
        elif f == "bool_mask":  # mask: True = padding
            attn = ((q @ k.transpose(-2, -1)) * self.scale).masked_fill(mask, float("-inf"))
        elif f == "private_softmax":  # aten._softmax(x, dim, half_to_float) as written by some kernels' users
            p = torch.ops.aten._softmax.default((q @ k.transpose(-2, -1)) * self.scale, -1, False)
            return self.proj((p @ v).transpose(1, 2).reshape(B, L, DIM))
        elif f == "two_masks":  # padding and a causal buffer: one boolean keep mask, logical_and of both
            attn = ((q @ k.transpose(-2, -1)) * self.scale).masked_fill(mask, float("-inf"))
            attn = attn.masked_fill(self.bias[:, :, :L, :L] == 0, float("-inf"))
        elif f == "causal_tril":
            keep = torch.tril(torch.ones(L, L, dtype=torch.bool))
            attn = ((q @ k.transpose(-2, -1)) * self.scale).masked_fill(~keep, float("-inf"))
        elif f == "causal_finite_fill":  # finfo.min acts as -inf: no causal row is masked entirely
            keep = torch.tril(torch.ones(L, L, dtype=torch.bool))
            attn = ((q @ k.transpose(-2, -1)) * self.scale).masked_fill(~keep, torch.finfo(torch.float32).min)
        elif f == "causal_triu_additive":
            attn = (q @ k.transpose(-2, -1)) * self.scale + torch.full((L, L), float("-inf")).triu(1)
        elif f == "causal_buffer":  # nanoGPT: a buffer is data, not provably causal -> passed as a mask
            attn = ((q @ k.transpose(-2, -1)) * self.scale).masked_fill(self.bias[:, :, :L, :L] == 0, float("-inf"))
        elif f == "fp32_softmax":  # low-precision model, softmax in float32 then cast back
            attn = F.softmax(((q @ k.transpose(-2, -1)) * self.scale).float(), dim=-1).to(q.dtype)
            return self.proj((self.drop(attn) @ v).transpose(1, 2).reshape(B, L, DIM))
        elif f == "softmax_dtype":  # HF's eager form: softmax(dtype=float32).to(q.dtype)
            attn = F.softmax((q @ k.transpose(-2, -1)) * self.scale, dim=-1, dtype=torch.float32).to(q.dtype)
            return self.proj((self.drop(attn) @ v).transpose(1, 2).reshape(B, L, DIM))
        else:
            raise ValueError(f)
        attn = self.drop(attn.softmax(dim=-1))
        return self.proj((attn @ v).transpose(1, 2).reshape(B, L, DIM))


def _inputs(form: str, dtype=torch.float32):
    x = _x(B, L, DIM, dtype=dtype)
    if form in ("additive_mask", "mask_before_scale"):
        return x, _x(B, 1, L, L) * 2
    if form in ("bool_mask", "two_masks"):
        pad = torch.zeros(B, 1, 1, L, dtype=torch.bool)
        pad[1, ..., 5:] = True
        return x, pad
    return (x,)


# form -> module kwargs
FORMS = {
    "mul_scale": {},
    "div_scale": {},
    "scale_in_q": {},
    "permute": {},
    "bmm_3d": {},
    "einsum": {},
    "additive_mask": {},
    "mask_before_scale": {},
    "bool_mask": {},
    "two_masks": {},
    "causal_tril": {},
    "causal_finite_fill": {},
    "causal_triu_additive": {},
    "causal_buffer": {},
    "dropout": {"p": 0.1},
    "fp32_softmax": {"dtype": torch.bfloat16},
    "private_softmax": {},
    "softmax_dtype": {"dtype": torch.bfloat16},
}


def _model(form: str) -> Attn:
    torch.manual_seed(0)
    kw = FORMS[form]
    return Attn("mul_scale" if form == "dropout" else form, **kw)


@pytest.mark.parametrize("form", list(FORMS))
def test_form_golden_and_verified_train(form):
    model = _model(form)
    diff, r, gm = run(model, _inputs(form, FORMS[form].get("dtype", torch.float32)), "train")
    check_golden(form, diff)
    assert r.stats.get("fused") == 1, r.decisions
    assert _count(gm, SDPA) == 1 and _count(gm, SOFTMAX) == 0
    fuse = next(d for d in r.decisions if d.action == "fuse")
    assert fuse.node in ("softmax", "_softmax") and fuse.est_gain_s > 0
    (sdpa,) = [n for n in gm.graph.nodes if n.target is SDPA]
    q, k, v, mask, dropout_p, is_causal = sdpa.args
    assert sdpa.kwargs["scale"] == pytest.approx(D ** -0.5, rel=1e-6)
    assert is_causal is (form.startswith("causal_") and form != "causal_buffer")
    assert (mask is not None) is (form in ("additive_mask", "mask_before_scale", "bool_mask", "two_masks",
                                           "causal_buffer"))
    assert dropout_p == (0.1 if form == "dropout" else 0.0)


@pytest.mark.parametrize("form", list(FORMS))
def test_form_verified_eval(form):
    model = _model(form)
    diff, r, gm = run(model, _inputs(form, FORMS[form].get("dtype", torch.float32)), "eval")
    assert r.stats.get("fused") == 1 and _count(gm, SOFTMAX) == 0
    (sdpa,) = [n for n in gm.graph.nodes if n.target is SDPA]
    assert sdpa.args[4] == 0.0  # an eval capture has no dropout
    if form == "dropout":
        check_golden("dropout_eval", diff)


# ---------------------------------------------------------------------------------------------
# refusals: no change, and the decision says why


class ReturnsProbs(Attn):
    def forward(self, x):
        q, k, v = self.heads(self.q(x)), self.heads(self.k(x)), self.heads(self.v(x))
        attn = (q @ k.permute(0, 1, 3, 2) * self.scale).softmax(dim=-1)
        return self.proj((attn @ v).permute(0, 2, 1, 3).reshape(B, L, DIM)), attn  # for visualization


class ReusesScores(Attn):
    def forward(self, x):
        q, k, v = self.heads(self.q(x)), self.heads(self.k(x)), self.heads(self.v(x))
        scores = q @ k.permute(0, 1, 3, 2) * self.scale
        out = scores.softmax(dim=-1) @ v
        return self.proj(out.permute(0, 2, 1, 3).reshape(B, L, DIM)) + scores.mean()


class SigmoidAttention(Attn):
    def forward(self, x):
        q, k, v = self.heads(self.q(x)), self.heads(self.k(x)), self.heads(self.v(x))
        attn = torch.sigmoid(q @ k.permute(0, 1, 3, 2) * self.scale)
        return self.proj((attn @ v).permute(0, 2, 1, 3).reshape(B, L, DIM))


class QueryAxisSoftmax(Attn):
    def forward(self, x):
        q, k, v = self.heads(self.q(x)), self.heads(self.k(x)), self.heads(self.v(x))
        attn = (q @ k.permute(0, 1, 3, 2) * self.scale).softmax(dim=-2)
        return self.proj((attn @ v).permute(0, 2, 1, 3).reshape(B, L, DIM))


class FiniteFill(Attn):
    def forward(self, x, pad):
        q, k, v = self.heads(self.q(x)), self.heads(self.k(x)), self.heads(self.v(x))
        attn = (q @ k.permute(0, 1, 3, 2) * self.scale).masked_fill(pad, -1e4).softmax(dim=-1)
        return self.proj((attn @ v).permute(0, 2, 1, 3).reshape(B, L, DIM))


class MixedMasks(Attn):
    def forward(self, x, pad, bias):
        q, k, v = self.heads(self.q(x)), self.heads(self.k(x)), self.heads(self.v(x))
        attn = ((q @ k.permute(0, 1, 3, 2) * self.scale).masked_fill(pad, float("-inf")) + bias).softmax(dim=-1)
        return self.proj((attn @ v).permute(0, 2, 1, 3).reshape(B, L, DIM))


class SharedKey(Attn):
    """Multi-query attention with k/v broadcast over heads: SDPA does not broadcast."""

    def forward(self, x):
        q = self.heads(self.q(x))
        k, v = self.k(x)[..., None, :D].permute(0, 2, 1, 3), self.v(x)[..., None, :D].permute(0, 2, 1, 3)
        attn = (q @ k.permute(0, 1, 3, 2) * self.scale).softmax(dim=-1)
        return self.proj((attn @ v).permute(0, 2, 1, 3).reshape(B, L, DIM))


class TensorScale(Attn):
    def __init__(self, form="", **kw):
        super().__init__(form, **kw)
        self.temperature = nn.Parameter(torch.tensor(D ** -0.5))

    def forward(self, x):
        q, k, v = self.heads(self.q(x)), self.heads(self.k(x)), self.heads(self.v(x))
        attn = (q @ k.permute(0, 1, 3, 2) * self.temperature).softmax(dim=-1)
        return self.proj((attn @ v).permute(0, 2, 1, 3).reshape(B, L, DIM))


class Windowed5D(Attn):
    def forward(self, x):  # (B, 2 windows, H, L/2, D)
        q, k, v = (t(x).view(B, 2, L // 2, H, D).permute(0, 1, 3, 2, 4) for t in (self.q, self.k, self.v))
        attn = (q @ k.permute(0, 1, 2, 4, 3) * self.scale).softmax(dim=-1)
        return self.proj((attn @ v).permute(0, 1, 3, 2, 4).reshape(B, L, DIM))


@pytest.mark.parametrize("cls, inputs, reason", [
    (ReturnsProbs, None, "attention probabilities (softmax) are used by 2 nodes (matmul_1, a graph output)"),
    (ReusesScores, None, "scores (mul) are used by 2 nodes (softmax, mean)"),
    (QueryAxisSoftmax, None, "softmax over dim -2 of 4-D scores"),
    (FiniteFill, "pad", "fills -10000, not -inf, and the mask is not provably causal"),
    (MixedMasks, "pad+bias", "a boolean and an additive mask on the same scores"),
    (SharedKey, None, "broadcast their batch dimensions"),
    (TensorScale, None, "multiplied by a tensor (temperature)"),
    (Windowed5D, None, "5-D attention"),
])
def test_refusals_change_nothing_and_say_why(cls, inputs, reason):
    torch.manual_seed(0)
    x = _x(B, L, DIM)
    args = {None: (x,), "pad": (x, _inputs("bool_mask")[1]),
            "pad+bias": (x, _inputs("bool_mask")[1], _x(B, 1, L, L))}[inputs]
    diff, r, gm = run(cls(""), args, "train")
    assert r.modified is False and r.diff == "" and r.stats == {"kept": 1}
    (keep,) = r.decisions
    assert keep.action == "keep" and keep.node == "softmax" and reason in keep.reason, keep.reason
    assert _count(gm, SDPA) == 0


def test_non_softmax_normalization_is_not_attention():
    diff, r, gm = run(SigmoidAttention(""), (_x(B, L, DIM),), "train")
    assert r.modified is False and r.decisions == [] and _count(gm, SDPA) == 0


def test_classifier_softmax_is_not_attention():
    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(DIM, 4)

        def forward(self, x):
            return self.fc(x).softmax(-1)

    captured = fxopt.capture(Head(), (_x(B, DIM),))
    softmax = next(n for n in captured.graph.nodes if n.target is aten.softmax.int)
    with pytest.raises(Refusal, match=r"the softmax input comes from linear \(aten.linear.default\), which is not"):
        match_attention(softmax)
    _, r, _ = run(Head(), (_x(B, DIM),), "train")
    assert r.modified is False and r.decisions[0].action == "keep"


def test_refusal_after_normalize_changes_nothing():
    """Written with transpose and '/': normalize canonicalizes, then sdpa refuses and is a no-op."""
    class Probs(Attn):
        def forward(self, x):
            q, k, v = self.heads(self.q(x)), self.heads(self.k(x)), self.heads(self.v(x))
            attn = (q @ k.transpose(-2, -1) / math.sqrt(D)).softmax(dim=-1)
            return (attn @ v).sum(), attn

    _, r, _ = run(Probs(""), (_x(B, L, DIM),), "train", pipeline="normalize,sdpa")
    assert r.name == "sdpa" and r.modified is False and r.stats == {"kept": 1}
    assert "a graph output" in r.decisions[0].reason


# ---------------------------------------------------------------------------------------------
# options


def test_canonicalize_false_needs_normalized_input():
    _, r, _ = run(_model("div_scale"), _inputs("div_scale"), "train", pipeline="sdpa{canonicalize=false}")
    assert r.modified is False and "div" in r.decisions[0].reason
    _, r, gm = run(_model("div_scale"), _inputs("div_scale"), "train",
                   pipeline="normalize,sdpa{canonicalize=false}")
    assert r.stats == {"fused": 1} and _count(gm, SDPA) == 1


def test_fuse_dropout_false_keeps_dropout_attention():
    _, r, _ = run(_model("dropout"), _inputs("dropout"), "train", pipeline="sdpa{fuse_dropout=false}")
    assert r.stats.get("kept") == 1 and "fuse_dropout=false" in r.decisions[-1].reason


def test_bad_option_is_refused_before_running():
    with pytest.raises(PipelineError, match="option 'min_gain_us' of pass 'sdpa' is 'fast'; it must be a number"):
        PassManager("sdpa{min_gain_us=fast}")


def test_min_gain_refuses_with_the_estimate():
    _, r, _ = run(_model("mul_scale"), _inputs("mul_scale"), "train", pipeline="sdpa{min_gain_us=1e6}")
    keep = r.decisions[-1]
    assert keep.action == "keep" and "min_gain_us=1e+06" in keep.reason and r.stats.get("fused") is None


# ---------------------------------------------------------------------------------------------
# the cost estimate


def test_estimate_by_hand():
    """Eval, fp32, no mask: unfused = 2 matmuls + scale + softmax kernels, fused = 1 attention kernel."""
    from fxopt.cost_models import call_time, load_hardware
    from fxopt.passes import PassContext
    from fxopt.passes.normalize import RULES
    from fxopt.passes.rewrite import apply_rules
    gm = fxopt.capture(_model("mul_scale").eval(), _inputs("mul_scale")).graph_module
    apply_rules(gm, PassContext(), RULES)  # the canonical form the pass matches
    att = match_attention(next(n for n in gm.graph.nodes if n.target is aten.softmax.int))
    hw = load_hardware("h100")
    n, es = B * H * L * L, 4
    qkv = B * H * L * D * es

    def t(cls, flops, nbytes):
        return call_time(cls, "float32", flops, nbytes, 1, hw).total_s
    gemm = 2 * B * H * L * L * D
    unfused = (t("matmul", gemm, 2 * qkv + n * es) + t("matmul", gemm, n * es + 2 * qkv)
               + t("softmax", 5 * n, 2 * n * es) + t("pointwise", n, 2 * n * es))
    fused = t("attention", 4 * B * H * L * L * D, 4 * qkv + B * H * L * 4)
    assert estimate_gain(att, "h100", training=False) == pytest.approx(unfused - fused)
    assert estimate_gain(att, "h100", training=True) > unfused - fused


@pytest.mark.parametrize("pipeline", ["sdpa", "normalize,sdpa"])
def test_costed_step_gets_faster_as_estimated(pipeline):
    """The manager re-costs the whole step: it gets faster by about the decision's estimate. After
    normalize the estimate uses the manager's own times of the replaced nodes; alone, the pass
    canonicalizes first and falls back to the roofline, which does not count the operand copies
    the unfused matmuls make (a lower bound: in this launch-bound tiny case about half)."""
    _, r, _ = run(_model("dropout"), _inputs("dropout"), "train", pipeline=pipeline, cost=True, verify=False)
    delta = r.step_time_before_s - r.step_time_after_s
    est = next(d for d in r.decisions if d.action == "fuse").est_gain_s
    low = 0.7 if pipeline == "normalize,sdpa" else 0.4
    assert delta > 0 and low * delta < est < 1.2 * delta, (est, delta)


# ---------------------------------------------------------------------------------------------
# property: random spellings of cross-attention are fused and still compute the same function

from hypothesis import HealthCheck, Phase, given, settings, strategies as st  # noqa: E402


class RandomAttention(nn.Module):
    """Cross-attention from L queries to S keys, spelled as the drawn options say."""

    def __init__(self, heads, d, op, scale_at, mask, mask_first, p):
        super().__init__()
        self.h, self.d, self.op, self.scale_at, self.mask, self.mask_first = heads, d, op, scale_at, mask, mask_first
        self.q, self.kv = nn.Linear(DIM, heads * d), nn.Linear(DIM, 2 * heads * d)
        self.drop = nn.Dropout(p)

    def forward(self, x, memory, mask):
        (b, lq, _), s, h, d = x.shape, memory.shape[1], self.h, self.d
        c = d ** -0.5
        q = self.q(x).view(b, lq, h, d).transpose(1, 2)
        k, v = self.kv(memory).view(b, s, 2, h, d).permute(2, 0, 3, 1, 4)
        if self.scale_at == "q":
            q = q * c
        elif self.scale_at == "k":
            k = k * c
        if self.op == "bmm":
            q, k, v = (t.reshape(b * h, -1, d) for t in (q, k, v))
            mask = mask.expand(b, h, lq, s).reshape(b * h, lq, s) if self.mask in ("additive", "bool") else mask
            scores = torch.bmm(q, k.transpose(1, 2))
        elif self.op == "einsum":
            scores = torch.einsum("...ld,...sd->...ls", q, k)
        else:
            scores = q @ k.transpose(-2, -1)
        if self.mask_first and self.mask == "additive":
            scores = scores + mask
        if self.scale_at == "mul":
            scores = scores * c
        elif self.scale_at == "div":
            scores = scores / math.sqrt(d)
        if self.mask == "bool":
            scores = scores.masked_fill(mask, float("-inf"))
        elif self.mask == "causal":
            scores = scores.masked_fill(~torch.ones(lq, s, dtype=torch.bool).tril(), float("-inf"))
        elif self.mask == "additive" and not self.mask_first:
            scores = scores + mask
        p = self.drop(scores.softmax(-1))
        out = torch.bmm(p, v) if self.op == "bmm" else (
            torch.einsum("...ls,...sd->...ld", p, v) if self.op == "einsum" else p @ v)
        return out.reshape(b, h, lq, d).transpose(1, 2).reshape(b, lq, h * d)


@settings(max_examples=8, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow],
          phases=[Phase.explicit, Phase.reuse, Phase.generate])  # no shrinking: a failure reports quickly
@given(heads=st.integers(1, 3), d=st.sampled_from([4, 8]), lq=st.integers(1, 6), s=st.integers(1, 6),
       op=st.sampled_from(["matmul", "bmm", "einsum"]), scale_at=st.sampled_from(["mul", "div", "q", "k"]),
       mask=st.sampled_from(["none", "additive", "bool", "causal"]), mask_first=st.booleans(),
       p=st.sampled_from([0.0, 0.2]), train=st.booleans())
def test_random_attention_fused_and_verified(heads, d, lq, s, op, scale_at, mask, mask_first, p, train):
    torch.manual_seed(0)
    b = 2
    x, memory = _x(b, lq, DIM), _x(b, s, DIM) * 0.5
    if mask == "bool":  # True = masked; the first key stays visible so that no row is masked entirely
        m = torch.rand(b, 1, lq, s, generator=torch.Generator().manual_seed(1)) < 0.3
        m[..., 0] = False
    elif mask == "additive":
        m = _x(b, heads, lq, s)
    else:
        m = torch.zeros(1)
    model = RandomAttention(heads, d, op, scale_at, mask, mask_first, p)
    _, r, gm = run(model, (x, memory, m), "train" if train else "eval")
    assert r.stats.get("fused") == 1, r.decisions
    (sdpa,) = [n for n in gm.graph.nodes if n.target is SDPA]
    assert sdpa.kwargs["scale"] == pytest.approx(d ** -0.5, rel=1e-6)
    assert sdpa.args[5] is (mask == "causal" and lq == s > 1)  # a 1 x 1 causal mask masks nothing: dropped


# ---------------------------------------------------------------------------------------------
# the zoo's driving model: both hand-written attention blocks


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_driving_attention_matched_and_verified(mode):
    torch.manual_seed(0)
    model = zoo.build("driving", tiny=True)
    diff, r, gm = run(model, zoo.example_inputs("driving", 1, tiny=True), mode)
    fused = {d.reason.split(" in ")[-1].split(";")[0] for d in r.decisions if d.action == "fuse"}
    layers = len(model.bev_layers)
    assert fused == {f"bev_layers.{i}.{a}" for i in range(layers) for a in ("self_attn", "cross_attn")}
    assert _count(gm, SDPA) == 2 * layers and _count(gm, SOFTMAX) == 0
    assert all(n.kwargs["scale"] == pytest.approx(model.bev_layers[0].self_attn.scale)
               for n in gm.graph.nodes if n.target is SDPA)
    if mode == "train":
        check_golden("driving_train", diff)


# ---------------------------------------------------------------------------------------------
# HF BERT with attn_implementation="eager"


try:
    import transformers
except ImportError:  # only the HF tests need it
    transformers = None
hf = pytest.mark.skipif(transformers is None, reason="HF transformers not installed")


@lru_cache(maxsize=None)
def _bert_inputs(padding: bool):
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    if not padding:
        return {"input_ids": ids}
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 10:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=512, bos_token_id=511, eos_token_id=511, hidden_size=32,
                                     num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                     max_position_embeddings=64, attn_implementation="eager")
    return transformers.BertModel(config)


@hf
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("padding", [False, True], ids=["no_mask", "padding_mask"])
def test_hf_bert_eager_matched_and_verified(mode, padding):
    _, r, gm = run(_bert(), _bert_inputs(padding), mode)
    assert r.stats.get("fused") == 2 and _count(gm, SDPA) == 2 and _count(gm, SOFTMAX) == 0
    for n in (n for n in gm.graph.nodes if n.target is SDPA):
        q, k, v, mask, dropout_p, is_causal = n.args
        assert n.kwargs["scale"] == 0.25 and dropout_p == (0.1 if mode == "train" else 0.0)
        # without an attention_mask HF adds an all-zero mask built from constants: provably nothing, dropped
        assert (mask is not None) is padding and is_causal is False


@hf
def test_hf_bert_eager_output_attentions_is_refused():
    """With output_attentions=True the probabilities are graph outputs: nothing may change."""
    model = _bert()
    model.config.output_attentions = True
    _, r, gm = run(model, _bert_inputs(False), "eval", pipeline="normalize,sdpa")
    assert r.modified is False and r.stats == {"kept": 2} and _count(gm, SDPA) == 0
    assert all("a graph output" in d.reason for d in r.decisions)


@hf
def test_hf_gpt2_eager_causal_mask_proved():
    """GPT-2's eager attention adds a causal mask HF builds from aranges: evaluated, it is exactly
    SDPA's is_causal, so the mask is dropped; its attention dropout becomes dropout_p."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=512, bos_token_id=511, eos_token_id=511, n_embd=32, n_layer=2,
                                     n_head=2, n_positions=64, use_cache=False, attn_implementation="eager")
    _, r, gm = run(transformers.GPT2LMHeadModel(config), _bert_inputs(False), "train")
    assert r.stats.get("fused") == 2 and r.stats.get("causal") == 2 and _count(gm, SOFTMAX) == 0
    assert all(n.args[3:6] == (None, 0.1, True) for n in gm.graph.nodes if n.target is SDPA)
    assert all("provably causal" in d.reason for d in r.decisions if d.action == "fuse")
