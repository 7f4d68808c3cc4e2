"""An OptimizedModule under DDP and FSDP2 (issue 14a): two gloo processes on CPU, gradients compared
with the plain model wrapped the same way (and with DDP's averaged gradient); fully_shard before
optimize and per-submodule sharding are refused with what to do instead."""
import copy
import os
import pickle
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

WORLD = 2
PIPE = "dce,normalize"


class Block(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)

    def forward(self, x):
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm(x))))


class Net(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.blocks = nn.Sequential(Block(d), Block(d))
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        return self.head(self.blocks(x))


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _step(model, x):
    """One backward; the full (unsharded) gradient of every parameter, by name."""
    model.zero_grad(set_to_none=True)
    model(x).square().mean().backward()
    return {n.removeprefix("module."): _full(p.grad).detach().clone() if p.grad is not None else None
            for n, p in model.named_parameters()}


def _worker(rank, port, out_dir):
    import fxopt
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, init_method=f"tcp://127.0.0.1:{port}")
    torch.manual_seed(0)
    model = Net()                                   # same weights on every rank
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(rank))  # each rank its own batch
    res = {}
    res["ddp_plain"] = _step(DDP(copy.deepcopy(model)), x)
    res["ddp_ours"] = _step(DDP(fxopt.optimize(model, x, pipeline=PIPE, verify=False)), x)
    plain = copy.deepcopy(model)
    fully_shard(plain)
    res["fsdp_plain"] = _step(plain, x)
    ours = fxopt.optimize(model, x, pipeline=PIPE, verify=False)
    fully_shard(ours)
    res["fsdp_ours"] = _step(ours, x)
    res["fsdp_ours_2"] = _step(ours, x)             # a second step: parameters resharded and gathered again
    res["fsdp_ours_sharded_type"] = type(next(ours.parameters())).__name__
    lazy = fxopt.optimize(model, pipeline=PIPE, verify=False)      # captured on the first call, inside FSDP's forward
    fully_shard(lazy)
    res["fsdp_lazy"] = _step(lazy, x)
    sharded = copy.deepcopy(model)
    fully_shard(sharded)
    try:
        fxopt.optimize(sharded, x, pipeline=PIPE, verify=False)
        res["before"] = "no error"
    except fxopt.FxoptError as exc:
        res["before"] = f"{type(exc).__name__}: {exc}"
    per_layer = fxopt.optimize(model, x, pipeline=PIPE, verify=False)
    for block in per_layer.blocks:
        fully_shard(block)
    fully_shard(per_layer)
    try:
        _step(per_layer, x)
        res["per_layer"] = "no error"
    except fxopt.FxoptError as exc:
        res["per_layer"] = f"{type(exc).__name__}: {exc}"
    with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(res, f)
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results():
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_worker, args=(_free_port(), out), nprocs=WORLD, join=True)
        ranks = []
        for r in range(WORLD):
            with open(os.path.join(out, f"rank{r}.pkl"), "rb") as f:
                ranks.append(pickle.load(f))
    return ranks


def _assert_grads(got, expected):
    assert got.keys() == expected.keys()
    for k, g in expected.items():
        assert got[k] is not None, f"{k}: no gradient"
        torch.testing.assert_close(got[k], g, msg=k)


def test_ddp_gradients_equal_the_plain_model_under_ddp(results):
    for r in results:
        _assert_grads(r["ddp_ours"], r["ddp_plain"])
    # and DDP averaged them: both ranks hold the same gradient
    _assert_grads(results[0]["ddp_ours"], results[1]["ddp_ours"])


@pytest.mark.parametrize("case", ["fsdp_ours", "fsdp_ours_2", "fsdp_lazy"])
def test_fully_shard_after_optimize_gives_fsdp_gradients(results, case):
    for r in results:
        _assert_grads(r[case], r["fsdp_plain"])
        _assert_grads(r[case], r["ddp_plain"])     # FSDP's reduce-scatter averages like DDP
        assert r["fsdp_ours_sharded_type"] == "DTensor"


def test_fully_shard_before_optimize_is_refused_with_the_order_to_use(results):
    for r in results:
        assert r["before"].startswith("InputError") and "fully_shard(opt)" in r["before"]


def test_per_layer_fully_shard_is_refused_naming_the_layer(results):
    for r in results:
        assert r["per_layer"].startswith("HookError") and "blocks.0" in r["per_layer"]
        assert "fully_shard(opt)" in r["per_layer"]
