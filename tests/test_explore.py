"""fxopt.explore: every rule triggers where it should and nowhere else, builds a trainable module
whose parameter count matches a hand-derived formula, exact rules are verified, candidates are
costed like a whole-model analysis, ranked, ablated, and the user's model is never touched.
CPU, tiny hosts, few steps."""
import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fxopt import zoo
from fxopt.cli import main
from fxopt.workloads.data import teacher_outputs
from fxopt.errors import FxoptError
from fxopt.study.explore import ExploreError, explore, propose
from fxopt.render.html import html_report
from fxopt.study.explore_rules import RULES, Rule, SdpaAttention, TopKMoE, rule_names


def lin(i, o, bias=True):
    """Parameters of Linear(i, o), by hand."""
    return i * o + (o if bias else 0)


class Tokens(nn.Module):
    """Host for token modules: (B, 1, L, C) images from fxopt.data -> (B, L, C) -> module."""

    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body

    def forward(self, x):
        return self.body(x[:, 0])


def seq(*mods):
    return nn.Sequential(*mods)


def frozen_bn_host():
    host = seq(seq(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)), nn.ReLU(), nn.Conv2d(8, 4, 1))
    host[0][1].eval()  # a frozen BN inside a training model
    return host


def dw_host(c=16, k=7):
    return seq(nn.Conv2d(3, c, 1), nn.Conv2d(c, c, k, padding=k // 2, groups=c), nn.Conv2d(c, 4, 1))


def up_host(mode):
    return seq(nn.Conv2d(3, 8, 3, padding=1), nn.Upsample(scale_factor=2, mode=mode), nn.Conv2d(8, 4, 1))


def small_cnn():
    return seq(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
               nn.Linear(8, 10))


def resnet_stem_host():
    """A ResNet stem (7x7/2 conv, BN, ReLU, 3x3/2 max-pool) and a 1x1 head."""
    return seq(seq(nn.Conv2d(3, 8, 7, 2, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(3, 2, 1)),
               nn.Conv2d(8, 4, 1))


class CatFuse(nn.Module):
    """A feature-fusion block in the usual style: concat the branches along channels, conv, BN, ReLU."""

    def __init__(self, widths=(8, 8), out=4, k=1):
        super().__init__()
        self.proj = nn.Conv2d(sum(widths), out, k, padding=k // 2)
        self.bn = nn.BatchNorm2d(out)
        self.act = nn.ReLU()

    def forward(self, feats):
        return self.act(self.bn(self.proj(torch.cat(feats, 1))))


class CatResidual(CatFuse):
    """A look-alike: concat + 1x1 conv, plus a residual of the first branch (not tail(conv(cat)))."""

    def forward(self, feats):
        return self.act(self.bn(self.proj(torch.cat(feats, 1)))) + feats[0][:, :4]


class TwoBranch(nn.Module):
    """Two conv branches of an image fused by ``fuse``."""

    def __init__(self, fuse=None, wb=8):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(3, wb, 1)
        self.fuse = fuse or CatFuse((8, wb))

    def forward(self, x):
        return self.fuse([self.a(x), self.b(x)])


class FunctionalHost(nn.Module):
    """conv -> F.gelu (or an nn.GELU module) -> F.interpolate x2 (bilinear or nearest) -> 1x1 conv."""

    def __init__(self, functional_gelu=True, mode="bilinear"):
        super().__init__()
        self.functional_gelu, self.mode = functional_gelu, mode
        self.c, self.act, self.o = nn.Conv2d(3, 8, 3, padding=1), nn.GELU(), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.c(x)
        y = F.gelu(y) if self.functional_gelu else self.act(y)
        return self.o(F.interpolate(y, scale_factor=2, mode=self.mode))


def moe_host(experts=4, top_k=2, cf=1.25, hidden=64):
    return Tokens(TopKMoE(32, hidden, experts, top_k, cf))


def moe_params(experts, hidden, d=32):
    """Router (no bias) + experts Linear(d, h) -> Linear(h, d), by hand."""
    return d * experts + experts * (lin(d, hidden) + lin(hidden, d))


def depth_width_expected(n=4, d=32, mlp=64):
    """Hand formula: EncoderBlock(d, heads, mlp) = 2 LayerNorms (2d each) + qkv + proj + MLP(d, h, d);
    drop n//4 blocks, hidden h' = round((n * block / n' - other - d) / (2d + 1) / 64) * 64."""
    other = 2 * 2 * d + lin(d, 3 * d) + lin(d, d)
    mlp_p = lambda h: lin(d, h) + lin(h, d)  # noqa: E731
    keep = n - max(1, n // 4)
    hidden = max(64, round((n * (other + mlp_p(mlp)) / keep - other - d) / (2 * d + 1) / 64) * 64)
    return keep * (other + mlp_p(hidden))


T = (1, 16, 32)      # token input: L=16, C=32
IMG = (3, 16, 16)
# rule -> (trigger host, input shape, no-trigger host (same input unless given), touched parameters by hand)
CASES = {
    "sdpa": (lambda: Tokens(zoo.BevSelfAttention(32, 4)), T, lambda: Tokens(zoo.Attention(32, 4)),
             4 * lin(32, 32)),
    "gqa": (lambda: Tokens(zoo.BevSelfAttention(64, 8)), (1, 16, 64), lambda: Tokens(zoo.BevSelfAttention(64, 2)),
            2 * lin(64, 64) + 2 * lin(64, 2 * 8)),  # 8 heads of 8 -> 2 K/V heads
    "mqa": (lambda: Tokens(zoo.BevSelfAttention(32, 4)), T, lambda: Tokens(zoo.BevSelfAttention(32, 1)),
            2 * lin(32, 32) + 2 * lin(32, 8)),
    "window-attn": (lambda: Tokens(zoo.BevSelfAttention(32, 4)), (1, 256, 32),
                    (lambda: Tokens(zoo.BevSelfAttention(32, 4)), T), 4 * lin(32, 32)),
    "heads-hd64": (lambda: Tokens(zoo.BevSelfAttention(128, 4)), (1, 16, 128),
                   lambda: Tokens(zoo.BevSelfAttention(128, 2)), 4 * lin(128, 128)),
    "head-dim-align": (lambda: Tokens(zoo.BevSelfAttention(60, 3)), (1, 16, 60),
                       (lambda: Tokens(zoo.BevSelfAttention(64, 4)), (1, 16, 64)),
                       3 * lin(60, 3 * 24) + lin(3 * 24, 60)),  # head dim 20 -> 24
    "stem-patchify": (resnet_stem_host, (3, 32, 32), (lambda: zoo.ConvNeXt(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64),
                                                                      num_classes=10), (3, 32, 32)),
                      8 * 3 * 16 + 2 * 8),
    "stem-3x3": (resnet_stem_host, (3, 32, 32), (small_cnn, (3, 32, 32)),
                 9 * (3 * 4 + 4 * 4 + 4 * 8) + 2 * 2 * 4 + 2 * 8),
    "rmsnorm": (lambda: Tokens(seq(nn.Linear(32, 32), nn.LayerNorm(32), nn.Linear(32, 8))), T,
                lambda: Tokens(seq(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8))), 32),
    "fold-bn": (frozen_bn_host, IMG, lambda: frozen_bn_host().train(), 3 * 8 * 9 + 8 + 2 * 8),
    "gn-to-ln": (lambda: seq(nn.Conv2d(3, 16, 3, padding=1), nn.GroupNorm(8, 16), nn.Conv2d(16, 4, 1)), IMG,
                 lambda: seq(nn.Conv2d(3, 16, 3, padding=1), nn.GroupNorm(2, 16), nn.Conv2d(16, 4, 1)), 2 * 16),
    "gelu-tanh": (lambda: Tokens(zoo.Mlp(32, 64, 8)), T,
                  lambda: Tokens(seq(nn.Linear(32, 64), nn.GELU("tanh"), nn.Linear(64, 8))), 0),
    "gelu-silu": (lambda: Tokens(zoo.Mlp(32, 64, 8)), T, lambda: Tokens(seq(nn.Linear(32, 8), nn.ReLU())), 0),
    "gelu-relu": (lambda: Tokens(zoo.Mlp(32, 64, 8)), T, lambda: Tokens(seq(nn.Linear(32, 8), nn.ReLU())), 0),
    "dw-smaller-k": (dw_host, IMG, lambda: dw_host(k=3), 16 * 5 * 5 + 16),
    "dw-to-grouped": (dw_host, IMG, lambda: dw_host(c=8), 16 * 8 * 7 * 7 + 16),
    "conv1x1-linear": (lambda: seq(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1)), IMG,
                       lambda: seq(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1)),
                       lin(8, 4)),
    "upsample-nearest": (lambda: up_host("bilinear"), IMG, lambda: up_host("nearest"), 0),
    "upsample-convT": (lambda: up_host("bilinear"), IMG, lambda: up_host("nearest"), 8 * 2 * 2),
    "concat-to-add": (TwoBranch, IMG, lambda: TwoBranch(CatFuse(k=3)), lin(16, 4) + 2 * 4),
    "concat-to-sum": (TwoBranch, IMG, lambda: TwoBranch(CatFuse((8, 4)), wb=4), lin(8, 4) + 2 * 4),
    "moe-top1": (moe_host, T, lambda: moe_host(top_k=1), moe_params(4, 64)),
    "moe-capacity": (moe_host, T, lambda: moe_host(cf=1.0), moe_params(4, 64)),
    "moe-fewer-experts": (moe_host, T, lambda: moe_host(experts=2), moe_params(2, 128)),
    "moe-more-experts": (moe_host, T, lambda: moe_host(hidden=40), moe_params(8, 32)),
    "gelu-tanh-calls": (FunctionalHost, IMG, lambda: FunctionalHost(functional_gelu=False), 3 * 8 * 9 + 8 + lin(8, 4)),
    "interp-nearest-calls": (FunctionalHost, IMG, lambda: FunctionalHost(mode="nearest"), 3 * 8 * 9 + 8 + lin(8, 4)),
    "round-width": (lambda: Tokens(zoo.Mlp(32, 100)), T, lambda: Tokens(zoo.Mlp(32, 128)), lin(32, 128) + lin(128, 32)),
    "depth-width": (lambda: Tokens(seq(*(zoo.EncoderBlock(32, 2, 64) for _ in range(4)))), T,
                    lambda: Tokens(seq(*(zoo.EncoderBlock(32, 2, 64) for _ in range(3)))), depth_width_expected()),
    "resolution": (small_cnn, (3, 64, 64), (small_cnn, (3, 32, 32)), lin(27, 8) + lin(8, 10)),
}


def test_every_rule_has_a_case():
    assert sorted(CASES) == sorted(rule_names())


def _build(fn, seed=0):
    torch.manual_seed(seed)
    return fn()


def _inputs(shape, batch=2):
    return (torch.randn(batch, *shape),)


@pytest.mark.parametrize("rule", sorted(CASES))
def test_rule_triggers_builds_formula_and_trains(rule):
    make, shape, no, expected = CASES[rule]
    host = _build(make)
    before = copy.deepcopy(host.state_dict())
    cands = propose(host, _inputs(shape), rules=rule)
    assert [c.rule for c in cands] == [rule], "the rule must trigger on its host"
    cand = cands[0]
    assert cand.status == "ok", cand.reason
    assert cand.name.startswith(f"{rule}@") and cand.description
    # the user's model is untouched
    assert all(torch.equal(before[k], v) for k, v in host.state_dict().items())

    # a real candidate from the host's weights; its touched modules' parameters match the hand formula
    real = cand.transform(copy.deepcopy(host))
    built = sum(p.numel() for path in cand.sites for p in (real.get_submodule(path) if path else real).parameters())
    assert built == expected
    rule_obj = next(r for r in RULES if r.name == rule)
    # the rule's own stated formula agrees too (evaluated on the original modules)
    stated = sum(rule_obj.params(host.get_submodule(p) if p else host, _site(host, p, shape)) for p in cand.sites)
    assert stated == expected

    # it trains: the loss on fxopt.data's learnable targets (a differently seeded original) falls
    teacher = _build(make, seed=1).eval()
    data = list(teacher_outputs(teacher, shape, n_batches=4, batch=8, seed=0))
    opt = torch.optim.AdamW(real.parameters(), lr=1e-2)
    losses = []
    for _ in range(3):
        for x, y in data:
            opt.zero_grad()
            loss = F.mse_loss(real(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-4:]) < 0.9 * sum(losses[:4]), losses  # the same 4 batches, third pass vs first

    # no trigger on the look-alike
    no_make, no_shape = no if isinstance(no, tuple) else (no, shape)
    assert propose(_build(no_make), _inputs(no_shape), rules=rule) == []


def _site(model, path, shape):
    """The Site explore would record for ``path`` (its first call's inputs, as real tensors)."""
    from fxopt.study.explore import _record
    return _record(model, _inputs(shape))[path]


def test_attention_rebuilds_keep_the_documented_init():
    """GQA K/V weights are the group means of the original heads; head-dim padding starts as the
    same function; window-attn picks the largest divisor of L in [32, L/4]."""
    torch.manual_seed(0)
    attn = zoo.BevSelfAttention(64, 8)
    host = Tokens(attn)
    gqa = propose(host, _inputs((1, 16, 64)), rules="gqa")[0].transform(copy.deepcopy(host)).body
    expect_k = attn.k.weight.view(2, 4, 8, 64).mean(1).reshape(16, 64)
    assert torch.allclose(gqa.k.weight, expect_k) and torch.equal(gqa.q.weight, attn.q.weight)

    host = Tokens(zoo.BevSelfAttention(60, 3))
    x = torch.randn(2, 1, 16, 60)
    padded = propose(host, (x,), rules="head-dim-align")[0].transform(copy.deepcopy(host))
    assert padded.body.head_dim == 24
    torch.testing.assert_close(padded(x), host(x), rtol=1e-5, atol=1e-5)

    host = Tokens(zoo.BevSelfAttention(32, 4))
    win = propose(host, _inputs((1, 256, 32)), rules="window-attn")[0].transform(copy.deepcopy(host)).body
    assert isinstance(win, SdpaAttention) and win.window == 64


def test_round_width_starts_as_the_same_function():
    torch.manual_seed(0)
    host = Tokens(zoo.Mlp(32, 100))
    x = torch.randn(2, 1, 16, 32)
    wide = propose(host, (x,), rules="round-width")[0].transform(copy.deepcopy(host))
    assert wide.body.fc1.out_features == 128
    torch.testing.assert_close(wide(x), host(x))


# ---------------------------------------------------------------------------------------------
# costing, ranking, verification


@pytest.fixture(scope="module")
def vit_explored():
    torch.manual_seed(0)
    model = zoo.build("vit_b16", tiny=True)
    x = zoo.example_inputs("vit_b16", batch=4, tiny=True)
    state = copy.deepcopy(model.state_dict())
    kinds = [type(m) for m in model.modules()]
    spliced = explore(model, x, rules="mqa,rmsnorm,gelu-relu,depth-width")
    whole = explore(model, x, rules="mqa,rmsnorm,gelu-relu,depth-width", full_cost=True)
    return model, x, state, kinds, spliced, whole


def test_explore_leaves_the_model_alone(vit_explored):
    model, _, state, kinds, *_ = vit_explored
    assert [type(m) for m in model.modules()] == kinds
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_spliced_costs_match_whole_model_analysis(vit_explored):
    """The default costs only the touched modules and splices their calls into the original's step;
    a whole-model analysis of each candidate is the independent reference."""
    *_, spliced, whole = vit_explored
    for c in spliced.candidates:
        w = whole[c.name]
        assert c.params == w.params
        assert c.flops == pytest.approx(w.flops, rel=2e-3)
        assert c.step_time_s == pytest.approx(w.step_time_s, rel=0.03), c.name


def test_ranked_by_saving_and_slower_listed(vit_explored):
    model, x, *_, spliced, _ = vit_explored
    ok = [c for c in spliced.candidates if c.status == "ok"]
    savings = [c.saving_s for c in ok]
    assert savings == sorted(savings, reverse=True)
    for c in ok:
        assert c.saving_s == pytest.approx(spliced.baseline["step_time_s"] - c.step_time_s)
        # params: the real candidate's count; speedup: original step / candidate step
        assert c.params == sum(p.numel() for p in c.transform(copy.deepcopy(model)).parameters())
        assert c.speedup == pytest.approx(spliced.baseline["step_time_s"] / c.step_time_s)
        # .model: trainable, with the user's weights where the rule kept them
        assert not any(p.is_meta for p in c.model.parameters())
        assert torch.equal(c.model.get_submodule("head").weight, model.head.weight)
        assert c.model.get_submodule("head").weight is not model.head.weight
    table = spliced.table()
    for c in ok:
        line = next(ln for ln in table.splitlines() if f" {c.name} " in ln)
        assert ("slower" in line) == (c.saving_s < 0)
    assert "PREDICTED" in table
    data = json.loads(spliced.to_json())
    assert data["schema"] == "fxopt.explore/1" and len(data["candidates"]) == len(spliced.candidates)
    assert "<table" in spliced.html_section()


def test_mqa_shrinks_kv_projections_by_hand():
    """MQA on the tiny ViT (dim 32, 2 heads of 16): qkv (32 -> 96) becomes q (32 -> 32) + k, v (32 -> 16)."""
    torch.manual_seed(0)
    m = zoo.build("vit_b16", tiny=True)
    c = propose(m, zoo.example_inputs("vit_b16", tiny=True), rules="mqa")[0]
    removed = lin(32, 96) - (lin(32, 32) + 2 * lin(32, 16))
    real = c.transform(copy.deepcopy(m))
    assert sum(p.numel() for p in m.parameters()) - sum(p.numel() for p in real.parameters()) == removed


def test_exact_rules_are_verified_and_a_wrong_one_is_caught():
    torch.manual_seed(0)
    host = Tokens(zoo.BevSelfAttention(32, 4))
    x = _inputs(T)
    res = explore(host, x, rules="sdpa")
    c = res.candidates[0]
    assert c.exact and c.verified and c.status == "ok"

    for rule, host_fn, shape in (("fold-bn", frozen_bn_host, IMG), ("conv1x1-linear", CASES["conv1x1-linear"][0], IMG)):
        c = explore(_build(host_fn), _inputs(shape), rules=rule).candidates[0]
        assert c.exact and c.verified and c.status == "ok", (rule, c.reason)

    sdpa = next(r for r in RULES if r.name == "sdpa")

    def wrong(m, site):  # claims exactness, changes the scale
        new = sdpa.build(m, site)
        new.scale = 1.0
        return new
    liar = Rule("test-wrong-sdpa", "attention", "wrong", "", "", True, sdpa.match, wrong, sdpa.params)
    res = explore(host, x, rules=[liar])
    bad = res.candidates[0]
    assert bad.status == "verify failed" and not bad.verified
    assert bad.step_time_s is None  # not costed, never ranked as exact
    line = next(ln for ln in res.table().splitlines() if "test-wrong-sdpa@" in ln)
    assert "NOT verified" in line and "verify failed" in line


def test_meta_models_explore_and_ablate_needs_real_weights():
    with torch.device("meta"):
        m = zoo.build("vit_b16", tiny=True)
        x = zoo.example_inputs("vit_b16", tiny=True)
    res = explore(m, x, rules="mqa")
    assert res.candidates[0].status == "ok" and res.candidates[0].step_time_s > 0
    assert all(p.is_meta for p in res.candidates[0].model.parameters())
    with pytest.raises(ExploreError, match="model_fn"):
        explore(m, x, rules="mqa", ablate={"steps": 2})


def test_bad_arguments_are_refused_before_work():
    m, x = Tokens(zoo.Mlp(32, 64)), _inputs(T)
    with pytest.raises(ExploreError, match="unknown rules"):
        explore(m, x, rules="no-such-rule")
    with pytest.raises(ExploreError, match="unknown ablate keys"):
        explore(m, x, ablate={"stepz": 3})
    with pytest.raises(ExploreError, match="nn.Module"):
        explore(lambda t: t, x)
    with pytest.raises(FxoptError):
        explore(m, "not a tensor")
    from fxopt.measure.ablate import AblationError, ablate
    with pytest.raises(AblationError, match="transform must be callable"):  # ablate's hook explore trains through
        ablate(lambda: m, {"a": None, "b": {"optimize": False, "transform": 3}}, [], steps=1)


def test_ablation_gives_verdicts_and_predicted_time_to_target():
    torch.manual_seed(0)
    model = zoo.build("vit_b16", tiny=True)
    x = zoo.example_inputs("vit_b16", batch=4, tiny=True)
    res = explore(model, x, rules="gelu-relu,mqa",
                  ablate={"steps": 8, "seeds": 2, "batch": 4, "candidates": ["gelu-relu", "mqa"]})
    assert res.ablation is not None
    names = [c.name for c in res.candidates]
    combo = next(n for n in names if "+" in n)  # the compatible pair, trained too
    for c in res.candidates:
        assert c.verdict in ("parity", "NOT parity", "diverged"), (c.name, c.verdict)
        v = res.ablation[c.name]
        assert c.verdict == v.verdict
        if v.steps_to_target is not None:
            assert c.time_to_target_s == pytest.approx((v.steps_to_target + 1) * c.step_time_s)
    assert res[combo].params == sum(p.numel() for p in res[combo].transform(copy.deepcopy(model)).parameters())
    assert "time->target" in res.table()


def test_cli_explore_json(capsys):
    assert main(["explore", "vit_b16", "--tiny", "--rules", "gelu-relu,mqa", "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {c["rule"] for c in data["candidates"]} == {"gelu-relu", "mqa"}


# ---------------------------------------------------------------------------------------------
# mixture of experts and concat + 1x1 fusion


def moe_reference(moe: TopKMoE, x: torch.Tensor) -> torch.Tensor:
    """TopKMoE by brute force, token by token: choices in rank order (all first choices, then all
    second ones), each taking its expert's next free place while fewer than C are taken."""
    x = x.reshape(-1, x.shape[-1])
    n, e, k = x.shape[0], len(moe.experts), moe.top_k
    cap = math.ceil(moe.capacity_factor * n * k / e)
    probs = torch.softmax(x @ moe.router.weight.t(), -1)
    ranked = [sorted(range(e), key=lambda j: -probs[t, j].item())[:k] for t in range(n)]
    taken, out = [0] * e, torch.zeros(n, moe.experts[0].fc2.out_features, dtype=x.dtype)
    for r in range(k):
        for t in range(n):
            j = ranked[t][r]
            if taken[j] < cap:
                taken[j] += 1
                out[t] += probs[t, j] * moe.experts[j](x[t:t + 1])[0]
    return out


@pytest.mark.parametrize("top_k,cf", [(2, 1.25), (1, 1.0), (2, 0.5)])
def test_moe_layer_matches_a_token_by_token_reference(top_k, cf):
    torch.manual_seed(0)
    moe = TopKMoE(8, 16, experts=4, top_k=top_k, capacity_factor=cf).double()
    x = torch.randn(3, 10, 8, dtype=torch.float64)
    torch.testing.assert_close(moe(x).reshape(30, -1), moe_reference(moe, x))
    assert moe.capacity(30) == math.ceil(cf * 30 * top_k / 4)
    with pytest.raises(FxoptError, match="top_k"):
        TopKMoE(8, 16, experts=2, top_k=3)


def test_moe_regrouped_experts_start_as_averages():
    """fewer experts: new expert j = the mean of old experts 2j, 2j+1; more experts: a pair of halves
    averages to the old expert. Router rows: pair means / duplicates."""
    torch.manual_seed(0)
    host = moe_host()
    x = torch.randn(5, 32)
    old = host.body
    fewer = propose(host, _inputs(T), rules="moe-fewer-experts")[0].transform(copy.deepcopy(host)).body
    more = propose(host, _inputs(T), rules="moe-more-experts")[0].transform(copy.deepcopy(host)).body
    with torch.no_grad():
        torch.testing.assert_close(fewer.experts[1](x), (old.experts[2](x) + old.experts[3](x)) / 2)
        torch.testing.assert_close((more.experts[6](x) + more.experts[7](x)) / 2, old.experts[3](x))
    torch.testing.assert_close(fewer.router.weight[1], old.router.weight[2:4].mean(0))
    assert torch.equal(more.router.weight[6], old.router.weight[3]) and more.experts[0].fc1.out_features == 32


def test_moe_costs_come_from_the_cost_model():
    """top-1 halves the expert buffers (32 tokens: C = ceil(1.25 * 32 * k / 4) = 20 -> 10 rows per
    expert): the candidate's FLOPs drop by the experts' GEMMs on 4 x 10 rows, by hand: fc1 (32 -> 64)
    forward and weight grad (the tokens are model inputs: no input grad), fc2 (64 -> 32) forward,
    input and weight grads; 2 FLOPs per multiply-add. The rest (bias, GELU) is within 5 %."""
    torch.manual_seed(0)
    res = explore(moe_host(), _inputs(T), rules="moe-top1,moe-capacity")
    top1, cap = res["moe-top1@body"], res["moe-capacity@body"]
    gemm_per_row = 2 * 2 * 32 * 64 + 3 * 2 * 64 * 32
    assert res.baseline["flops"] - top1.flops == pytest.approx(4 * 10 * gemm_per_row, rel=0.05)
    # capacity 1.25 -> 1.0: C = 20 -> 16 rows per expert
    assert res.baseline["flops"] - cap.flops == pytest.approx(4 * 4 * gemm_per_row, rel=0.05)
    assert top1.step_time_s < res.baseline["step_time_s"] and top1.params == res.baseline["params"]


def test_concat_fusion_matches_only_the_cat_conv_structure():
    torch.manual_seed(0)
    x = _inputs(IMG)
    # unequal branch widths: the exact split still applies, the sum does not
    assert [c.rule for c in propose(TwoBranch(CatFuse((8, 4)), wb=4), x, rules="fusion")] == ["concat-to-add"]
    assert propose(TwoBranch(CatResidual()), x, rules="fusion") == []  # not tail(conv(cat)): checked numerically
    res = explore(TwoBranch(), x, rules="concat-to-add")
    c = res.candidates[0]
    assert c.exact and c.verified and c.status == "ok", c.reason
    host = TwoBranch().eval()
    real = c.transform(copy.deepcopy(host))
    assert real.state_dict().keys() == host.state_dict().keys()
    torch.testing.assert_close(real(x[0]), host(x[0]))


def test_html_report_carries_the_explore_section(tmp_path):
    torch.manual_seed(0)
    res = explore(moe_host(), _inputs(T), rules="moe-top1,moe-capacity")
    doc = res.html(tmp_path / "explore.html")
    assert (tmp_path / "explore.html").read_text() == doc
    section = doc[doc.index("<section id='explore'>"):]
    assert '<section id="summary">' in doc  # the model's own report around it
    for c in res.candidates:
        row = section[section.index(c.name):].split("</tr>")[0]
        assert f"{c.step_time_s * 1e3:.4g}" in row and f"{c.speedup:.3f}x" in row
    assert f"{res.baseline['step_time_s'] * 1e3:.4g}" in section
    assert "<section id='explore'>" not in html_report(res.report, lint=None)


def test_cli_explore_html(tmp_path, capsys):
    path = tmp_path / "r.html"
    assert main(["explore", "vit_b16", "--tiny", "--rules", "gelu-relu", "--html", str(path)]) == 0
    assert "gelu-relu@blocks.0.mlp.act" in capsys.readouterr().out
    assert "gelu-relu@blocks.0.mlp.act" in path.read_text()


def test_functional_calls_are_rewritten_and_module_calls_left_alone():
    """F.gelu / F.interpolate written in a forward: the FunctionalSwap candidate runs tanh GELU and
    nearest upsampling there (compared with the same weights computed by hand); calls made by
    nn.GELU / nn.Upsample modules are not counted (the module rules own them)."""
    torch.manual_seed(0)
    host, x = FunctionalHost(), _inputs(IMG)[0]
    gelu = propose(host, (x,), rules="gelu-tanh-calls")[0].transform(copy.deepcopy(host))
    interp = propose(host, (x,), rules="interp-nearest-calls")[0].transform(copy.deepcopy(host))
    with torch.no_grad():
        y = host.c(x)
        want_gelu = host.o(F.interpolate(F.gelu(y, approximate="tanh"), scale_factor=2, mode="bilinear"))
        want_interp = host.o(F.interpolate(F.gelu(y), scale_factor=2, mode="nearest"))
        torch.testing.assert_close(gelu(x), want_gelu)
        torch.testing.assert_close(interp(x), want_interp)
        assert not torch.allclose(gelu(x), host(x)) and not torch.allclose(interp(x), host(x))
    modules = seq(nn.Conv2d(3, 8, 3, padding=1), nn.GELU(), nn.Upsample(scale_factor=2, mode="bilinear"))
    assert propose(modules, (x,), rules="gelu-tanh-calls,interp-nearest-calls") == []
    assert {c.rule for c in propose(modules, (x,), rules="gelu-tanh,upsample-nearest")} == {"gelu-tanh",
                                                                                            "upsample-nearest"}
