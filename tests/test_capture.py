"""Capture: every zoo model in train and eval, inputs of every form, the user's model untouched,
and failures that say what went wrong, where, and what to try."""
import copy

import pytest
import torch
from torch import nn

import fxopt
from fxopt import zoo
from fxopt.errors import CaptureError, InputError


def snapshot(model):
    return copy.deepcopy(model.state_dict()), model.training


def assert_unchanged(model, snap):
    state, training = snap
    assert model.training == training
    now = model.state_dict()
    assert now.keys() == state.keys()
    assert all(torch.equal(now[k], state[k]) for k in state)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("name", zoo.names())
def test_zoo_captures_with_metadata_and_runs_like_eager(name, train):
    model = zoo.build(name, tiny=True).train(train)
    inputs = zoo.example_inputs(name, 2, tiny=True)
    snap = snapshot(model)
    captured = fxopt.capture(model, inputs)
    assert_unchanged(model, snap)
    assert captured.training == train
    calls = [n for n in captured.graph.nodes if n.op == "call_function"]
    assert calls and all("val" in n.meta for n in calls)
    assert all(n.meta.get("nn_module_stack") for n in calls if n.target is torch.ops.aten.conv2d.default)
    assert any("zoo.py" in (n.meta.get("stack_trace") or "") for n in calls)
    # same parameter names as the user's model
    assert {k for k, _ in captured.graph_module.named_parameters()} == {k for k, _ in model.named_parameters()}
    if not train:  # eval is deterministic: the graph computes what the model computes
        torch.testing.assert_close(captured(*inputs), model(*inputs))


def test_inputs_as_tensor_tuple_or_kwargs():
    class Two(nn.Module):
        def forward(self, x, scale):
            return x * scale

    x, s = torch.randn(2, 3), torch.randn(2, 3)
    torch.testing.assert_close(fxopt.capture(Two(), (x, s))(x, s), x * s)
    torch.testing.assert_close(fxopt.capture(Two(), {"x": x, "scale": s})(x=x, scale=s), x * s)
    assert fxopt.capture(nn.ReLU(), x)(x).shape == x.shape


def test_dynamic_batch_symbol_is_named_batch():
    captured = fxopt.capture(zoo.build("resnet50", tiny=True), zoo.example_inputs("resnet50", 4, tiny=True),
                             dynamic_batch=True)
    assert "batch" in captured.symbols.values()
    (ph,) = captured.placeholders()
    assert isinstance(ph.meta["val"].shape[0], torch.SymInt)


class DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # branches on a tensor value: export cannot trace this
            return x * 2
        return x


def test_uncapturable_model_names_cause_source_line_and_fix():
    with pytest.raises(CaptureError) as info:
        fxopt.capture(DataDependent(), torch.randn(3))
    msg = str(info.value)
    assert "DataDependent" in msg
    assert "test_capture.py" in msg and "if x.sum() > 0" in msg   # the user's source line
    assert "try:" in msg and "torch.cond" in msg                   # what to do next


def test_inputs_that_do_not_fit_get_an_input_error():
    model = zoo.build("resnet50", tiny=True)
    snap = snapshot(model)
    with pytest.raises(InputError, match="do not fit"):
        fxopt.capture(model, torch.randn(2, 5, 64, 64))  # 5 channels instead of 3
    with pytest.raises(InputError, match="do not match"):
        fxopt.capture(model, (torch.randn(2, 3, 64, 64), torch.randn(1)))  # one argument too many
    with pytest.raises(InputError, match="no tensor"):
        fxopt.capture(model, ())
    with pytest.raises(InputError, match="tensor, a tuple"):
        fxopt.capture(model, 3.0)
    with pytest.raises(InputError, match="nn.Module"):
        fxopt.capture(lambda x: x, torch.randn(1))
    assert_unchanged(model, snap)


def test_analyze_needs_inputs_with_a_clear_error():
    with pytest.raises(InputError, match="example_inputs"):
        fxopt.analyze(nn.ReLU())
