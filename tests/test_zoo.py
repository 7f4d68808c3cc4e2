"""Tests for fxopt.zoo: faithful sizes, tiny variants train and export, driving graph shape."""

from functools import lru_cache

import pytest
import torch

from fxopt import zoo
from fxopt.errors import ModelSpecError

# Parameter counts of the reference (torchvision) implementations.
REFERENCE_PARAMS = {
    "resnet50": 25_557_032,
    "convnext_t": 28_589_128,
    "vit_b16": 86_567_656,
}

MODES = ["train", "eval"]


def _tensors(out):
    return list(out.values()) if isinstance(out, dict) else [out]


@lru_cache(maxsize=None)
def _exported(name: str, mode: str):
    torch.manual_seed(0)
    model = zoo.build(name, tiny=True)
    model.train(mode == "train")
    inputs = zoo.example_inputs(name, batch=2, tiny=True)
    return torch.export.export(model, inputs, strict=False)


def _targets(ep) -> set[str]:
    return {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}


def test_registry_names():
    assert zoo.names() == ["resnet50", "convnext_t", "vit_b16", "driving"]
    assert set(zoo.ZOO) == set(zoo.names())
    for name, entry in zoo.ZOO.items():
        assert entry.name == name and entry.description


@pytest.mark.parametrize("name", sorted(REFERENCE_PARAMS))
def test_full_size_param_count(name):
    with torch.device("meta"):
        model = zoo.build(name)
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - REFERENCE_PARAMS[name]) / REFERENCE_PARAMS[name] < 0.005, n


def test_full_size_driving_builds_on_meta():
    with torch.device("meta"):
        model = zoo.build("driving")
        (images,) = zoo.example_inputs("driving", batch=1)
        out = model(images)
    assert images.shape == (1, 6, 3, 224, 224)
    assert out["det_logits"].shape == (1, 16 * 16, 10)
    assert out["depth"].shape == (1, 6, 32, 28, 28)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", zoo.names())
def test_tiny_forward_backward(name, mode):
    torch.manual_seed(0)
    model = zoo.build(name, tiny=True)
    assert model.training
    model.train(mode == "train")
    inputs = zoo.example_inputs(name, batch=2, tiny=True)
    outs = _tensors(model(*inputs))
    assert all(torch.isfinite(o).all() for o in outs)
    sum(o.float().pow(2).mean() for o in outs).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", zoo.names())
def test_tiny_export(name, mode):
    ep = _exported(name, mode)
    assert any(n.op == "call_function" for n in ep.graph.nodes)


@pytest.mark.parametrize("name", zoo.names())
def test_tiny_export_dynamic_batch(name):
    """Capture may mark the batch dim dynamic; no model may specialise on it."""
    model = zoo.build(name, tiny=True)
    batch = torch.export.Dim("batch")
    ep = torch.export.export(model, zoo.example_inputs(name, 2, tiny=True), strict=False,
                             dynamic_shapes=({0: batch},))
    outs = _tensors(ep.module()(*zoo.example_inputs(name, 3, tiny=True)))
    assert all(o.shape[0] == 3 for o in outs)


def test_example_inputs_shapes():
    expected = {
        "resnet50": (3, 3, 64, 64),
        "convnext_t": (3, 3, 32, 32),
        "vit_b16": (3, 3, 32, 32),
        "driving": (3, 2, 3, 64, 64),
    }
    for name, shape in expected.items():
        (x,) = zoo.example_inputs(name, batch=3, tiny=True)
        assert x.shape == shape and x.dtype == torch.float32 and x.device.type == "cpu"


def test_driving_outputs():
    model = zoo.build("driving", tiny=True).eval()
    (images,) = zoo.example_inputs("driving", batch=2, tiny=True)
    out = model(images)
    assert set(out) == set(zoo.DRIVING_OUTPUTS)
    # tiny: 2 cams of 64x64, 4x4 BEV grid, 3 det classes, 2 seg classes, 4 occ bins, 8 depth bins
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "det_logits": (2, 16, 3),
        "det_boxes": (2, 16, 10),
        "bev_seg": (2, 2, 4, 4),
        "occupancy": (2, 4, 4, 4),
        "depth": (2, 2, 8, 8, 8),
    }


@pytest.mark.parametrize("mode", MODES)
def test_driving_graph_has_handwritten_attention(mode):
    targets = _targets(_exported("driving", mode))
    assert any("matmul" in t or "bmm" in t for t in targets), targets
    assert any("softmax" in t for t in targets), targets
    assert not any("scaled_dot_product" in t for t in targets), targets


def test_vit_graph_uses_sdpa():
    assert any("scaled_dot_product" in t for t in _targets(_exported("vit_b16", "eval")))


@pytest.mark.parametrize("call", [zoo.build, zoo.example_inputs])
def test_unknown_name(call):
    with pytest.raises(ModelSpecError) as excinfo:
        call("resnet51")
    for name in zoo.names():
        assert name in str(excinfo.value)
