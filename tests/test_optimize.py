"""fxopt.optimize: the returned module trains exactly like the original, under its names, and the
user's model is never touched."""
import copy

import pytest
import torch
from torch import nn

import fxopt
from fxopt import zoo
from fxopt.optimize import BackendError


EXACT = "dce,normalize"  # bit-faithful rewrites: training must match eager step for step


def loss_of(out):
    leaves = out.values() if isinstance(out, dict) else [out]
    return sum(o.float().square().mean() for o in leaves)


def train_losses(model, inputs, steps=3, lr=0.05):
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_of(model(*inputs))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("name", ["resnet50", "driving"])
def test_optimized_module_trains_like_the_original(name):
    torch.manual_seed(0)
    model = zoo.build(name, tiny=True)
    inputs = zoo.example_inputs(name, 2, tiny=True)
    reference = copy.deepcopy(model)
    snapshot = copy.deepcopy(model.state_dict())
    opt_model = fxopt.optimize(model, inputs, pipeline=EXACT)
    assert [k for k, _ in opt_model.named_parameters()] == [k for k, _ in model.named_parameters()]
    ours, theirs = train_losses(opt_model, inputs), train_losses(reference, inputs)
    assert ours == pytest.approx(theirs, rel=1e-5, abs=1e-6)
    # parameters and BN running statistics moved exactly as in eager training
    for (k, a), b in zip(opt_model.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=k)
    # the user's model is untouched
    assert all(torch.equal(v, snapshot[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_state_dict_round_trip():
    model = zoo.build("resnet50", tiny=True)
    inputs = zoo.example_inputs("resnet50", 2, tiny=True)
    opt_model = fxopt.optimize(model, inputs, pipeline=EXACT)
    train_losses(opt_model, inputs, steps=1)
    fresh = zoo.build("resnet50", tiny=True)
    fresh.load_state_dict(opt_model.state_dict())           # optimized -> original
    opt_model.load_state_dict(fresh.state_dict())           # and back
    fresh.eval(), opt_model.eval()
    torch.testing.assert_close(opt_model(*inputs), fresh(*inputs))


def test_captures_lazily_on_first_call_and_per_mode():
    model = zoo.build("vit_b16", tiny=True)
    inputs = zoo.example_inputs("vit_b16", 2, tiny=True)
    opt_model = fxopt.optimize(model, pipeline=EXACT)
    with pytest.raises(fxopt.InputError, match="call it once"):
        opt_model.graph_module
    opt_model(*inputs)
    train_graph = opt_model.graph_module
    assert isinstance(train_graph, torch.fx.GraphModule)
    opt_model.eval()
    reference = copy.deepcopy(model).eval()
    torch.testing.assert_close(opt_model(*inputs), reference(*inputs))
    assert opt_model.graph_module is not train_graph           # eval got its own graph
    bigger = zoo.example_inputs("vit_b16", 3, tiny=True)
    torch.testing.assert_close(opt_model(*bigger), reference(*bigger))  # new shape: re-specialized


def test_to_dtype_and_device_move_the_graph_too():
    model = zoo.build("convnext_t", tiny=True).eval()
    inputs = zoo.example_inputs("convnext_t", 2, tiny=True)
    opt_model = fxopt.optimize(model, inputs, pipeline=EXACT)
    opt_model.to(torch.float64)
    x64 = inputs[0].double()
    torch.testing.assert_close(opt_model(x64), copy.deepcopy(model).double()(x64))
    # no CPU-only constants baked in: the meta device stands in for "cuda" on CPU-only machines
    opt_model.to("meta")
    assert opt_model(x64.to("meta")).device.type == "meta"


def test_report_lists_passes_and_verification():
    model = zoo.build("driving", tiny=True)
    opt_model = fxopt.optimize(model, zoo.example_inputs("driving", 2, tiny=True), pipeline=EXACT)
    report = opt_model.report
    assert [r.name for r in report.records] == ["dce", "normalize"]
    assert report.verification and report.step_time_before_s > 0
    text = report.table()
    assert "dce" in text and "normalize" in text and "final verification: ok" in text


def test_bad_arguments():
    with pytest.raises(fxopt.InputError, match="nn.Module"):
        fxopt.optimize(lambda x: x)
    with pytest.raises(BackendError, match="eager"):
        fxopt.optimize(nn.ReLU(), backend="tvm")
    with pytest.raises(fxopt.FxoptError, match="normalize"):
        fxopt.optimize(nn.Linear(2, 2), torch.randn(1, 2), pipeline="dce,normalise")


@pytest.mark.parametrize("name,train", [("resnet50", True), ("driving", False), ("vit_b16", True)])
def test_default_pipeline_is_chosen_from_the_graph_and_verified(name, train):
    model = zoo.build(name, tiny=True).train(train)
    inputs = zoo.example_inputs(name, 4, tiny=True)
    opt_model = fxopt.optimize(model, inputs)
    report = opt_model.report
    chosen = [r.name for r in report.records]
    assert chosen[:2] == ["dce", "normalize"] and chosen[-1] == "dce"
    assert "channels-last" in chosen and "mixed-precision" in chosen  # all three have convs and GEMMs
    assert ("fold-bn" in chosen) == (name != "vit_b16")         # ViT has no batch norm
    assert ("sdpa" in chosen) == (name == "driving")            # ViT already uses SDPA: no softmax
    assert len(report.pipeline_reasons) >= len(chosen)
    assert report.verification                                   # the final graph is verified
    assert all(r.verification is None or r.verification or r.rolled_back for r in report.records)
    assert "pipeline:" in report.table()


class _TiedLM(nn.Module):
    """An LM head sharing the embedding's weight (GPT-2, BERT): one parameter, two names."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 8)
        self.head = nn.Linear(8, 11, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.embed(ids)))


def test_tied_weights_get_both_gradients():
    """Both uses of a tied weight accumulate into the one parameter (the graph reads it under both
    names); the verification compares the summed gradient with float64 eager."""
    model = _TiedLM().train()
    ids = torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(0))
    opt = fxopt.optimize(model, ids, pipeline="dce")
    assert opt.report.verification
    opt(ids).sum().backward()
    model(ids).sum().backward()
    torch.testing.assert_close(opt.embed.weight.grad, model.embed.weight.grad)
