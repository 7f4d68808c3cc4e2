"""fxopt.ablate: convergence parity by a stated rule, time to target, failures and divergence reported
per variant; fxopt.data: learnable, deterministic built-in data. CPU, tiny zoo models, few steps."""
import argparse
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from fxopt import zoo
from fxopt.measure.ablate import K_STD, REL_TOL, AblationError, ablate, add_cli
from fxopt.workloads.data import auto_data, default_loss, teacher_images, teacher_outputs
from fxopt.passes import Pass, PassResult, register, unregister

STEPS, SEEDS, BATCH = 40, 2, 8
VIT = lambda: zoo.build("vit_b16", tiny=True)  # noqa: E731


class ScaleWeight(Pass):
    """Test only: a deliberately wrong rewrite, multiplying one weight by a constant in the graph."""

    name = "test-scale-weight"
    summary = "test only: multiply one weight by a constant inside the graph"
    options = {"target": "head.weight", "factor": 10.0}

    def run(self, gm, ctx):
        for node in gm.graph.nodes:
            if node.op == "get_attr" and node.target == ctx.options["target"]:
                with gm.graph.inserting_after(node):
                    scaled = gm.graph.call_function(torch.ops.aten.mul.Tensor, (node, ctx.options["factor"]))
                node.replace_all_uses_with(scaled, delete_user_cb=lambda user: user is not scaled)
                ctx.decide(node, "scaled", "test only: deliberately wrong")
                return PassResult(gm, True)
        return PassResult(gm, False)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads; on a loaded machine their spin-waits cost a lot."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def vit_data():
    return teacher_images((3, 32, 32), 10, STEPS, BATCH, seed=0)


@pytest.fixture(scope="module")
def result(vit_data):
    """One ablation of the tiny ViT covering every verdict (2 seeds x 40 steps)."""
    register(ScaleWeight, replace=True)
    try:
        return ablate(VIT, {
            "eager": None,
            "fxopt": {"pipeline": "dce,normalize", "verify": False},
            # attention logits x100: a wrong pass that verify=False lets through
            "wrong-pass": {"pipeline": "test-scale-weight{target=blocks.0.attn.qkv.weight,factor=10}",
                           "verify": False},
            "lr-x100": {"optimize": False, "lr_scale": 100},
            "no-such-pass": {"pipeline": "dce,no-such-pass"},
            "blows-up": {"optimize": False, "optimizer_fn": lambda p: torch.optim.SGD(p, lr=1e4)},
        }, list(vit_data), steps=STEPS, seeds=SEEDS, device="cpu", warmup=1, eval_data=list(vit_data.held_out(2)))
    finally:
        unregister(ScaleWeight.name)


def test_identical_variants_are_at_parity_and_the_curves_learn(result):
    eager, fx = result["eager"], result["fxopt"]
    assert eager.verdict == "baseline" and fx.verdict == "parity" and fx.parity is True
    assert [len(r.losses) for r in fx.runs] == [STEPS] * SEEDS
    # the built-in data is learnable: from ln(10) = 2.30 to well below it, far above chance on held-out data
    assert eager.runs[0].losses[0] > 2.2 and eager.final_loss < 0.85 * math.log(10)
    assert eager.eval_acc > 0.3 and fx.eval_acc == pytest.approx(eager.eval_acc, abs=0.1)
    # both reach the default target (every baseline seed does, by construction) -> a speedup
    assert eager.reached == SEEDS and fx.reached == SEEDS and fx.speedup > 0
    assert eager.steps_to_target <= math.ceil(0.9 * STEPS) - 1


def test_broken_variants_are_not_at_parity(result):
    b = result["eager"]
    for name in ("wrong-pass", "lr-x100"):
        v = result[name]
        assert v.status == "ok" and v.verdict == "NOT parity" and v.parity is False, v.detail
        # the stated rule, recomputed from the recorded curves
        finals = [sum(r.losses[-result.constants["tail_steps"]:]) / result.constants["tail_steps"] for r in v.runs]
        assert v.final_loss == pytest.approx(sum(finals) / len(finals))
        assert abs(v.final_loss - b.final_loss) > max(K_STD * b.final_std, REL_TOL * b.final_loss)
        assert "NOT parity" in result.table() and name in result.table()


def test_a_failing_variant_is_reported_and_the_others_complete(result):
    v = result["no-such-pass"]
    assert v.status == "failed" and v.verdict == "failed" and v.parity is None
    assert "fxopt.optimize failed" in v.reason and "no-such-pass" in v.reason and "unknown pass" in v.reason
    assert v.runs == [] and v.traceback
    assert all(len(result[n].runs) == SEEDS for n in ("eager", "fxopt", "wrong-pass", "lr-x100"))
    assert "no-such-pass: failed: seed 0: fxopt.optimize failed" in result.table()


def test_a_diverging_variant_stops_at_the_reported_step(result):
    v = result["blows-up"]
    assert v.status == "diverged" and v.verdict == "diverged" and v.parity is False
    for run in v.runs:
        assert run.diverged_at is not None and 0 < run.diverged_at < STEPS
        assert len(run.losses) == run.diverged_at and all(math.isfinite(x) for x in run.losses)
    assert f"non-finite loss at step {v.runs[0].diverged_at} (seed 0)" in v.reason
    assert v.final_loss is None and v.time_to_target_s is None


def test_rule_constants_table_json_and_plots(result, tmp_path):
    assert result.constants["k_std"] == K_STD and result.constants["rel_tol"] == REL_TOL
    assert f"max({K_STD:g} * std_b, {REL_TOL:g} * |mean_b|)" in result.rule
    assert result.target_source.startswith("max over seeds") and result.target_loss > 0
    text = result.table()
    for col in ("final loss", "eval acc", "step ms", "time to target s", "speedup", "verdict"):
        assert col in text
    data = json.loads(result.to_json())
    assert data["schema"] == "fxopt.ablation/1" and len(data["variants"]) == 6
    assert data["variants"][0]["runs"][0]["losses"] == result["eager"].runs[0].losses
    assert all(t > 0 for t in result["eager"].runs[0].step_times_s)
    png, svg = result.plot(tmp_path / "curves.png"), result.plot(tmp_path / "curves.svg")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "<svg" in svg.read_text()


def test_same_seed_gives_bitwise_the_same_curves(result, vit_data, capsys):
    again = ablate(VIT, {"eager": None, "fxopt": {"pipeline": "dce,normalize", "verify": False}}, vit_data,
                   steps=STEPS, seeds=[1], device="cpu", warmup=0, eval_data=vit_data.held_out(2))
    for name in ("eager", "fxopt"):
        assert again[name].runs[0].losses == result[name].runs[1].losses          # bitwise
        assert again[name].runs[0].eval_loss == result[name].runs[1].eval_loss
    assert "ablate seed 1 (1/1) fxopt (2/2)" in capsys.readouterr().err             # the progress line


def test_dict_outputs_with_a_teacher_of_the_same_architecture():
    driving = lambda: zoo.build("driving", tiny=True)  # noqa: E731
    data = auto_data(driving, (2, 3, 64, 64), 4, 2, seed=0)
    x, y = next(iter(data))
    with torch.no_grad():
        out = driving().eval()(x)
    assert set(y) == set(out) and all(y[k].shape == out[k].shape for k in y)
    r = ablate(driving, {"eager": None, "fxopt": {"pipeline": "dce,normalize", "verify": False}}, data,
               steps=4, seeds=1, device="cpu", progress=False, warmup=0, eval_data=data.held_out(1))
    assert [v.verdict for v in r.variants] == ["baseline", "parity"]
    assert r["eager"].eval_loss is not None and r["eager"].eval_acc is None   # regression: no accuracy


def test_user_data_generator_custom_loss_and_per_seed_data():
    net = lambda: nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1))  # noqa: E731
    w = torch.randn(4, 1, generator=torch.Generator().manual_seed(0))

    def batches(n, seed):
        g = torch.Generator().manual_seed(seed)
        for _ in range(n):
            x = torch.randn(16, 4, generator=g)
            yield x, x @ w

    mse = lambda out, y: (out - y).square().mean()  # noqa: E731
    twins = {"a": None, "b": {"optimize": False}}
    # a generator is read once and replayed (and cycled: 5 batches for 12 steps) for every variant
    r = ablate(net, twins, batches(5, 0), steps=12, seeds=2, loss_fn=mse, device="cpu", progress=False, warmup=0,
               optimizer_fn=lambda p: torch.optim.SGD(p, lr=0.05))
    assert r["a"].runs[0].losses == r["b"].runs[0].losses and r["b"].verdict == "parity"
    assert r["a"].runs[0].losses[0:5] != r["a"].runs[1].losses[0:5]        # seeds differ in their init
    assert r["a"].eval_loss is None                                          # no held-out data offered
    # a function seed -> data: each seed its own stream; explicit eval data
    r = ablate(net, twins, lambda seed: list(batches(12, seed)), steps=12, seeds=2, loss_fn=mse, device="cpu",
               progress=False, eval_data=list(batches(2, 99)), target_loss=1e9, warmup=0)
    assert r["b"].eval_loss is not None and r.target_source == "given" and r["b"].steps_to_target == 0


def test_bad_arguments(vit_data):
    with pytest.raises(AblationError, match="function that builds"):
        ablate(VIT(), {"eager": None}, vit_data, steps=2)
    with pytest.raises(AblationError, match="unknown keys.*'pipline'"):
        ablate(VIT, {"eager": None, "x": {"pipline": "dce"}}, vit_data, steps=2)
    with pytest.raises(AblationError, match="non-empty dict"):
        ablate(VIT, {}, vit_data, steps=2)
    with pytest.raises(AblationError, match="optimize=False but"):
        ablate(VIT, {"x": {"optimize": False, "pipeline": "dce"}}, vit_data, steps=2)
    with pytest.raises(AblationError, match="autocast"):
        ablate(VIT, {"x": {"autocast": "int8"}}, vit_data, steps=2)
    with pytest.raises(AblationError, match="baseline 'nope'"):
        ablate(VIT, {"eager": None}, vit_data, steps=2, baseline="nope")
    with pytest.raises(AblationError, match="steps"):
        ablate(VIT, {"eager": None}, vit_data, steps=0)
    with pytest.raises(AblationError, match="seeds"):
        ablate(VIT, {"eager": None}, vit_data, steps=2, seeds=0)
    with pytest.raises(AblationError, match=r"pair \(inputs, target\)"):
        ablate(VIT, {"eager": None}, [torch.zeros(2, 3, 32, 32)], steps=2, device="cpu", progress=False)
    with pytest.raises(AblationError, match="iterable of"):
        ablate(VIT, {"eager": None}, 5, steps=2)


def test_teacher_images_are_deterministic_balanced_and_held_out_is_disjoint():
    data = teacher_images((3, 16, 16), 5, 3, 256, seed=3)
    first, again = list(data), list(data)
    assert len(first) == 3 and all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    x, y = first[0]
    assert x.shape == (256, 3, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64
    counts = torch.bincount(torch.cat([b[1] for b in first]), minlength=5)
    assert counts.min() > 0.6 * counts.float().mean()                      # balanced classes
    held = list(data.held_out(2))
    assert len(held) == 2 and not torch.equal(held[0][0], x)
    assert torch.equal(data.held_out(2).labels(data.source.latents(0)), y)  # the same teacher
    other = next(iter(teacher_images((3, 16, 16), 5, 1, 256, seed=4)))
    assert not torch.equal(other[0], x)
    cams = next(iter(teacher_images((2, 3, 16, 16), 3, 1, 4)))[0]
    assert cams.shape == (4, 2, 3, 16, 16)


def test_teacher_outputs_and_default_loss():
    teacher = nn.Conv2d(3, 2, 3, padding=1)
    data = teacher_outputs(teacher, (3, 8, 8), 2, 64, seed=0)
    x, y = next(iter(data))
    assert y.shape == (64, 2, 8, 8) and 0.7 < y.std().item() < 1.3 and not y.requires_grad
    # predicting a constant scores an MSE of about 1 by construction
    assert default_loss(torch.zeros_like(y), y).item() == pytest.approx(1.0, abs=0.3)
    logits, labels = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    assert default_loss(logits, labels).item() == pytest.approx(nn.functional.cross_entropy(logits, labels).item())
    out = {"a": torch.ones(2, 2), "b": logits}
    assert default_loss(out, {"a": torch.zeros(2, 2), "b": labels}).item() == pytest.approx(
        1.0 + nn.functional.cross_entropy(logits, labels).item())
    with pytest.raises(Exception, match="dict output"):
        default_loss(logits, {"a": labels})


def test_cli(tmp_path, capsys):
    p = argparse.ArgumentParser()
    add_cli(p.add_subparsers())
    plot, out = tmp_path / "c.png", tmp_path / "r.json"
    args = p.parse_args(["ablate", "vit_b16", "--tiny", "--variants", "eager,fxopt", "--steps", "6", "--seeds", "1",
                         "--batch", "4", "--pipeline", "dce,normalize", "--no-verify", "--plot", str(plot),
                         "--json", str(out)])
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "teacher_images(shape=(3, 32, 32), num_classes=10" in text and "parity" in text
    saved = json.loads(out.read_text())
    assert plot.exists() and saved["baseline"] == "eager"
    assert saved["variants"][1]["eval_acc"] is not None     # the built-in data's held_out() batches by default
    with pytest.raises(AblationError, match="unknown variants"):
        args = p.parse_args(["ablate", "vit_b16", "--tiny", "--variants", "eager,turbo"])
        args.func(args)


def _bench():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "ablate_zoo.py"
    spec = importlib.util.spec_from_file_location("ablate_zoo", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_benchmark_refuses_to_run_without_a_gpu():
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        _bench().main(["--models", "vit_b16"])


def test_benchmark_dry_run(tmp_path):
    assert _bench().main(["--dry-run", "--models", "vit_b16", "--steps", "6", "--out", str(tmp_path)]) == 0
    assert {p.name for p in tmp_path.iterdir()} >= {"vit_b16.json", "vit_b16.png", "vit_b16.md", "ABLATION.md"}
    assert "| fxopt | ok |" in (tmp_path / "ABLATION.md").read_text()
