"""Distributed training costs (fxopt/study/distributed.py): DDP buckets against a real
DistributedDataParallel's, the overlap against hand-built timelines, FSDP volumes against the
module's own parameter bytes, and the analyze/report/lint/CLI wiring."""
import tempfile
import warnings

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils._pytree import tree_leaves

import fxopt
from fxopt import distributed as D
from fxopt import zoo
from fxopt.cli import main
from fxopt.cost_models.comm import collective_time, load_cluster
from fxopt.errors import HardwareError, InputError


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 1024),
                         nn.Linear(1024, 8))


@pytest.fixture(scope="module")
def mlp_report():
    return fxopt.analyze(_mlp(), torch.randn(4, 64))


def _real_ddp_buckets(model, inputs, cap_mb):
    """The buckets of a real gloo DDP (world size 1) after its rebuild, read by a comm hook."""
    names = {p: n for n, p in model.named_parameters()}
    seen = []

    def hook(state, bucket):
        seen.append([names[p] for p in bucket.parameters()])
        fut = torch.futures.Future()
        fut.set_result(bucket.buffer())
        return fut

    with tempfile.TemporaryDirectory() as d:
        dist.init_process_group("gloo", init_method=f"file://{d}/store", rank=0, world_size=1)
        try:
            ddp = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=cap_mb)
            ddp.register_comm_hook(None, hook)
            for _ in range(3):   # iteration 1 uses one bucket; DDP rebuilds them in gradient-ready order
                seen.clear()
                out = ddp(*inputs)
                sum(t.float().sum() for t in tree_leaves(out) if isinstance(t, torch.Tensor)).backward()
            first = getattr(getattr(ddp, "_bucket_config", None), "first_bucket_bytes_cap",
                            dist._DEFAULT_FIRST_BUCKET_BYTES)
            return seen, ddp.bucket_bytes_cap, first
        finally:
            dist.destroy_process_group()


def _hf_bert():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                  vocab_size=100, max_position_embeddings=32)
    torch.manual_seed(0)
    return transformers.BertModel(cfg).train(), (torch.randint(0, 100, (2, 8)),)


def _hf_gpt2():   # tied embedding / LM head, Conv1D layers (addmm with the weight untransposed)
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=32, use_cache=False,
                                  bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).train(), (torch.randint(0, 100, (2, 8)),)


CASES = {"mlp": lambda: (_mlp(), (torch.randn(4, 64),)),
         "resnet50-tiny": lambda: (zoo.build("resnet50", tiny=True), zoo.example_inputs("resnet50", 2, tiny=True)),
         "vit-tiny": lambda: (zoo.build("vit_b16", tiny=True), zoo.example_inputs("vit_b16", 2, tiny=True)),
         "driving-tiny": lambda: (zoo.build("driving", tiny=True), zoo.example_inputs("driving", 2, tiny=True)),
         "hf-bert": _hf_bert, "hf-gpt2": _hf_gpt2}


@pytest.mark.parametrize("case", list(CASES))
def test_ddp_buckets_equal_real_ddp_buckets(case):
    model, inputs = CASES[case]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = fxopt.analyze(model, inputs)
    real, cap, first = _real_ddp_buckets(model, inputs, cap_mb=0.05)
    mine = [[p.name for p in b] for b in D.ddp_buckets(D.parameters(report), cap, first)]
    assert len(real) > 1 and mine == real
    if first == cap:   # torch's rule here: a custom bucket_cap_mb is also the first bucket's cap
        spec = D.apply(report, {"world_size": 2, "bucket_mb": 0.05})
        assert [list(b.params) for b in spec.buckets] == real


def test_overlap_against_a_hand_built_timeline():
    # three buckets: ready at 1, 2, 10 ms taking 2, 1, 1 ms on one stream; backward ends at 10 ms
    spans, exposed = D.overlap([(1e-3, 2e-3), (2e-3, 1e-3), (10e-3, 1e-3)], backward_s=10e-3)
    assert spans == [(1e-3, 3e-3), (3e-3, 4e-3), (10e-3, 11e-3)]
    assert exposed == pytest.approx(1e-3)
    _, hidden = D.overlap([(1e-3, 2e-3)], backward_s=10e-3)
    assert hidden == 0


def test_gradients_are_ready_when_their_nodes_backward_ends(mlp_report):
    """Hand-built from the report's calls: the backward is the bwd calls in order."""
    idle = getattr(mlp_report, "host_idle", None) or [0.0] * len(mlp_report.calls)
    t, end = 0.0, {}
    for c, ct, i in zip(mlp_report.calls, mlp_report.call_times, idle):
        if c.phase == "bwd":
            t += float(ct.total_s) + float(i)
            end[c.node] = t
    params = {p.name: p for p in D.parameters(mlp_report)}
    linears = [n for n in end if n.startswith("linear")]
    assert params["5.weight"].ready_s == pytest.approx(end["linear_3"])
    assert params["0.bias"].ready_s == pytest.approx(end["linear"])
    cost = D.apply(mlp_report, {"world_size": 16})
    last = cost.buckets[-1]
    assert cost.backward_s == pytest.approx(t) and len(linears) == 4
    assert cost.exposed_comm_s == pytest.approx(max(0.0, last.end_s - t))
    for a, b in zip(cost.buckets, cost.buckets[1:]):
        assert b.start_s == pytest.approx(max(b.ready_s, a.end_s))
        assert b.end_s - b.start_s == pytest.approx(collective_time("all_reduce", b.nbytes, 16,
                                                                    load_cluster("h100-ib")).time_s)


def test_ddp_bucket_copies_add_to_the_step(mlp_report):
    copies = D.apply(mlp_report, {"world_size": 16})
    views = D.apply(mlp_report, {"world_size": 16, "gradient_as_bucket_view": True})
    batched = D.apply(mlp_report, {"world_size": 16, "gradient_as_bucket_view": True, "batched_grad_copy": True})
    assert copies.bucket_copy_s > views.bucket_copy_s > 0      # the copy into the buckets stays
    assert batched.bucket_copy_s > 0 and len(batched.buckets) == 2
    assert copies.step_time_s == pytest.approx(copies.compute_s + copies.exposed_comm_s + copies.bucket_copy_s)
    assert D.apply(mlp_report, {"world_size": 1}).bucket_copy_s == 0
    assert D.apply(mlp_report, {"world_size": 16, "strategy": "fsdp"}).bucket_copy_s == 0


def test_ddp_comm_bytes_are_the_gradient_bytes_in_the_grad_dtype(mlp_report):
    grad_bytes = sum(p.numel() * 4 for p in _mlp().parameters())
    assert D.apply(mlp_report, {"world_size": 8}).comm_bytes == grad_bytes
    assert D.apply(mlp_report, {"world_size": 8, "grad_dtype": "bf16"}).comm_bytes == grad_bytes // 2
    assert D.apply(mlp_report, {"world_size": 1}).comm_bytes == 0


@pytest.mark.parametrize("strategy,gathers", [("fsdp", 2), ("shard_grad_op", 1)])
def test_fsdp_all_gather_volume_is_the_parameter_bytes_per_unit(strategy, gathers):
    model, inputs = zoo.build("resnet50", tiny=True), zoo.example_inputs("resnet50", 2, tiny=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = fxopt.analyze(model, inputs)
    cost = D.apply(report, {"world_size": 16, "strategy": strategy, "fsdp_depth": 3})
    expected = {}   # fully_shard per trunk.stages.N (and the root's own parameters)
    for name, p in model.named_parameters():
        unit = ".".join(name.split(".")[:3]) if name.startswith("trunk.stages.") else ".".join(name.split(".")[:-1][:3])
        expected[unit] = expected.get(unit, 0) + p.numel() * p.element_size()
    assert {u.name: u.param_bytes for u in cost.units} == expected
    assert {u.name: u.all_gather.nbytes for u in cost.units} == expected
    total = sum(expected.values())
    assert cost.comm_bytes == gathers * total + total
    assert len(expected) >= 4 and cost.memory_saved_bytes > 0 and cost.exposed_comm_s >= 0
    auto = D.apply(report, {"world_size": 16, "strategy": strategy})   # fsdp_depth None: 4+ units
    assert len(auto.units) >= 4 and sum(u.param_bytes for u in auto.units) == total


def test_analyze_with_distributed_adds_comm_to_the_totals(mlp_report):
    rep = fxopt.analyze(_mlp(), torch.randn(4, 64), distributed=fxopt.Distributed(world_size=16))
    one, many = mlp_report.totals, rep.totals
    assert "comm_bytes" not in one
    assert many["step_time_s"] == pytest.approx(one["step_time_s"] + many["exposed_comm_s"] +
                                                many["ddp_bucket_copy_s"])
    assert many["comm_time_s"] >= many["exposed_comm_s"] > 0 and many["world_size"] == 16
    assert "distributed" in rep.summary()


def test_distributed_spec_is_checked_before_capture():
    class Broken(nn.Module):
        def forward(self, x):
            raise RuntimeError("must not be reached")
    with pytest.raises(InputError, match="multiple"):
        fxopt.analyze(Broken(), torch.randn(2), distributed={"world_size": 12})
    with pytest.raises(InputError, match="unknown keys"):
        fxopt.analyze(Broken(), torch.randn(2), distributed={"world_size": 8, "bucket": 5})
    with pytest.raises(InputError, match="strategy"):
        fxopt.Distributed(world_size=8, strategy="zero9")
    with pytest.raises(HardwareError, match="known"):
        fxopt.analyze(Broken(), torch.randn(2), distributed={"world_size": 8, "cluster": "nope"})
    with pytest.raises(InputError, match="training"):
        fxopt.analyze(Broken(), torch.randn(2), training=False, distributed=8)
    with pytest.raises(InputError, match="dynamic_batch"):
        fxopt.analyze(Broken(), torch.randn(2), dynamic_batch=True, distributed=8)


def test_comm_bound_lint_names_cause_change_and_saving():
    model, inputs = _mlp(), torch.randn(1, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rep = fxopt.analyze(model, inputs, distributed={"world_size": 512})
        assert not fxopt.lint(fxopt.analyze(model, inputs), rules=["comm-bound"]).findings
        found = fxopt.lint(rep, rules=["comm-bound"]).findings
    assert len(found) == 1 and found[0].saving_s > 0 and "Cause" in found[0].evidence
    change, saving = found[0].details["remedies"][0]
    assert saving == found[0].saving_s and found[0].change.startswith(change)


def test_gpu_scaling_table(mlp_report, tmp_path):
    res = fxopt.gpu_scaling(mlp_report, gpus=[1, 8, 64])
    rows = res.rows()
    assert rows[0]["exposed_comm_s"] == 0 and rows[0]["efficiency"] == pytest.approx(1.0)
    for r in rows:
        assert r["throughput"] == pytest.approx(r["gpus"] * 4 / r["step_time_s"])
        assert r["efficiency"] == pytest.approx(rows[0]["step_time_s"] / r["step_time_s"])
    assert "predictions" in res.table()
    pytest.importorskip("matplotlib")
    res.plot(str(tmp_path / "scaling.png"))
    assert (tmp_path / "scaling.png").stat().st_size > 1000
    with pytest.raises(InputError, match="world sizes"):
        fxopt.gpu_scaling(mlp_report, gpus=[0, 8])


def test_calibrate_comm_refuses_without_two_gpus():
    if torch.cuda.device_count() >= 2:
        pytest.skip("a multi-GPU machine: calibration would run")
    with pytest.raises(HardwareError, match="2\\+ CUDA GPUs"):
        D.calibrate_comm()
    assert main(["calibrate", "--comm"]) == 2   # the CLI says why and exits with the error code


def test_cli_report_and_scaling(capsys, tmp_path):
    assert main(["report", "resnet50", "--tiny", "--gpus", "16", "--top", "1"]) == 0
    assert "ddp on 16 GPUs" in capsys.readouterr().out
    assert main(["scaling", "resnet50", "--tiny", "--batch", "2", "--gpus", "1,8,64", "--strategy", "fsdp"]) == 0
    out = capsys.readouterr().out
    assert "scaling eff." in out and "fsdp" in out


@pytest.mark.slow   # ~100 s of torchrun start-up on 2 CPU cores; it once hung when a rank died (now a timeout)
def test_bench_gpus_runs_ddp_under_torchrun_on_gloo(capsys):
    """CPU smoke of `fxopt bench --gpus`: torchrun with 1 and 2 gloo processes, DDP, rank 0's table."""
    assert main(["bench", "resnet50", "--tiny", "--batch", "2", "--gpus", "2", "--device", "cpu",
                 "--variants", "eager-fp32", "--steps", "1", "--warmup", "0"]) == 0
    out = capsys.readouterr().out
    assert "DDP on 2 x cpu (torchrun, gloo)" in out and "eager-fp32" in out and "CPU smoke run" in out


def test_bench_gpus_refuses_variants_it_cannot_run_under_ddp():
    assert main(["bench", "resnet50", "--tiny", "--gpus", "2", "--device", "cpu", "--variants", "compile"]) == 2


def test_hsdp_shards_within_a_node_and_all_reduces_shards_across_nodes(mlp_report):
    cluster = load_cluster("h100-ib")
    hsdp = D.apply(mlp_report, {"world_size": 64, "strategy": "hsdp"})
    for u in hsdp.units:
        assert u.all_gather.ranks == 8 and u.all_gather.time_s == collective_time("all_gather", u.param_bytes, 8,
                                                                                  cluster).time_s
        assert u.replica_all_reduce.ranks == 8 and u.replica_all_reduce.nbytes == u.grad_bytes / 8
    total = sum(p.numel() * 4 for p in _mlp().parameters())
    assert hsdp.comm_bytes == 2 * total + total + total // 8
    one_node_h = D.apply(mlp_report, {"world_size": 8, "strategy": "hsdp"})
    one_node_f = D.apply(mlp_report, {"world_size": 8, "strategy": "fsdp"})
    assert one_node_h.exposed_comm_s == pytest.approx(one_node_f.exposed_comm_s)
