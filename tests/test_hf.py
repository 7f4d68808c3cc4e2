"""The HuggingFace corpus through fxopt: capture and analyze tiny ResNet, ViT, ConvNeXt, BERT, GPT-2.

Models are built from small configs (no download). The cost model's matrix FLOPs
(forward + backward) are checked against ``torch.utils.flop_counter.FlopCounterMode``
running the same forward and backward eagerly, with attention counted as the fused
kernel (see ``_FusedAttention``).
"""

import copy
from functools import lru_cache

import pytest
import torch
import torch.nn.functional as F
from torch import fx
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

transformers = pytest.importorskip("transformers", reason="HF transformers not installed")

import fxopt  # noqa: E402
from fxopt import models  # noqa: E402

BATCH = 2
SEQ = 16
VOCAB = 512


def _text_config(config_class, **kw):
    return config_class(vocab_size=VOCAB, bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1, **kw)


def _pixels(size):
    return {"pixel_values": torch.randn(BATCH, 3, size, size)}


def _ids():
    return {"input_ids": torch.randint(0, VOCAB, (BATCH, SEQ))}


_BERT = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    max_position_embeddings=64,
)

# name -> () -> (model, kwargs inputs). Tiny configs built directly from the config classes.
BUILDERS = {
    "resnet": lambda: (
        transformers.ResNetForImageClassification(
            transformers.ResNetConfig(
                embedding_size=8, hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1], num_labels=10
            )
        ),
        _pixels(64),
    ),
    "vit": lambda: (
        transformers.ViTForImageClassification(
            transformers.ViTConfig(
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                intermediate_size=64,
                image_size=32,
                patch_size=8,
                num_labels=10,
            )
        ),
        _pixels(32),
    ),
    "convnext": lambda: (
        transformers.ConvNextForImageClassification(
            transformers.ConvNextConfig(
                hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1], image_size=32, num_labels=10
            )
        ),
        _pixels(32),
    ),
    "bert": lambda: (transformers.BertForMaskedLM(_text_config(transformers.BertConfig, **_BERT)), _ids()),
    # Attention written out (matmul / softmax / matmul) instead of scaled_dot_product_attention.
    "bert_eager": lambda: (
        transformers.BertModel(
            _text_config(transformers.BertConfig, attn_implementation="eager", **_BERT)
        ),
        _ids(),
    ),
    "gpt2": lambda: (
        transformers.GPT2LMHeadModel(
            _text_config(
                transformers.GPT2Config, n_embd=32, n_layer=2, n_head=2, n_positions=64, use_cache=False
            )
        ),
        _ids(),
    ),
}
NAMES = list(BUILDERS)
MODES = ["train", "eval"]


def _build(name: str, mode: str = "train"):
    torch.manual_seed(0)
    model, inputs = BUILDERS[name]()
    return model.train(mode == "train"), inputs


def _snapshot(model: torch.nn.Module):
    return model.training, copy.deepcopy(model.state_dict(keep_vars=False))


def _assert_unchanged(model: torch.nn.Module, before) -> None:
    training, state = before
    assert model.training == training
    assert all(m.training == training for m in model.modules())
    after = model.state_dict()
    assert list(after) == list(state)
    changed = [k for k, v in state.items() if not torch.equal(after[k], v)]
    assert not changed, f"parameters/buffers changed: {changed}"


@lru_cache(maxsize=None)
def _captured(name: str, mode: str):
    model, inputs = _build(name, mode)
    before = _snapshot(model)
    cap = fxopt.capture(model, inputs)
    return model, before, cap


@lru_cache(maxsize=None)
def _analyzed(name: str):
    model, inputs = _build(name, "train")
    before = _snapshot(model)
    report = fxopt.analyze(model, inputs)
    return model, inputs, before, report


def _tensor_outputs(out) -> list[torch.Tensor]:
    if hasattr(out, "to_tuple"):  # HF ModelOutput
        out = out.to_tuple()
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def _float_outputs(out) -> list[torch.Tensor]:
    return [t for t in _tensor_outputs(out) if t.is_floating_point() and t.requires_grad]


class _FusedAttention(TorchFunctionMode):
    """Run every ``scaled_dot_product_attention`` as CPU's fused (flash) kernel.

    fxopt costs attention as the fused kernel a GPU runs (one kernel; its backward
    recomputes the scores), which is what FlopCounterMode reports on a GPU. On CPU the
    fused kernel has no dropout, so eager training-mode attention falls back to unfused
    math (bmm, no recompute). Dropout changes no matrix FLOPs, so it is switched off here
    and the fused kernel is forced (an error, not a silent fallback, if it cannot run).
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is F.scaled_dot_product_attention:
            args = list(args)
            if len(args) > 4:
                args[4] = 0.0
            else:
                kwargs["dropout_p"] = 0.0
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return func(*args, **kwargs)
        return func(*args, **kwargs)


def _cpu_fused_attention_flops(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs):
    return flop_counter.sdpa_flop_count(q_shape, k_shape, v_shape)


def _cpu_fused_attention_backward_flops(grad_shape, q_shape, k_shape, v_shape, *args, out_shape=None,
                                        **kwargs):
    return flop_counter.sdpa_backward_flop_count(grad_shape, q_shape, k_shape, v_shape)


def _conv_backward_flops(grad_out_shape, x_shape, w_shape, bias, stride, padding, dilation, transposed,
                         output_padding, groups, output_mask, out_shape=None, **kwargs):
    """grad_input and grad_weight each cost exactly one forward convolution.

    torch 2.13's own formula computes grad_weight as a conv of the batch-transposed input with
    grad_out and ignores ``groups``, so a depthwise conv's weight gradient comes out
    ``groups`` times too large (ConvNeXt: 3.7M instead of 0.7M FLOPs in this test).
    """
    fwd = flop_counter.conv_flop_count(x_shape, w_shape, grad_out_shape, transposed=transposed)
    return fwd * (bool(output_mask[0]) + bool(output_mask[1]))


# Additions to FlopCounterMode's registry: it knows the CUDA fused-attention ops, CPU's are
# counted with torch's same formulas. And the grouped-conv backward correction above.
_REFERENCE_FORMULAS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_fused_attention_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_fused_attention_backward_flops,
    torch.ops.aten.convolution_backward: _conv_backward_flops,
}


def _reference_matrix_flops(model: torch.nn.Module, inputs: dict) -> int:
    """FlopCounterMode over an eager forward + backward (grad = ones) of a copy of the model."""
    model = copy.deepcopy(model)
    counter = FlopCounterMode(display=False, custom_mapping=_REFERENCE_FORMULAS)
    with _FusedAttention(), counter:
        outs = _float_outputs(model(**inputs))
        assert outs, "model produced no float output that requires grad"
        torch.autograd.backward(outs, [torch.ones_like(t) for t in outs])
    return counter.get_total_flops()


# ----------------------------------------------------------------------------------
# capture
# ----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", NAMES)
def test_capture(name, mode):
    model, before, cap = _captured(name, mode)
    gm = cap.graph_module
    assert isinstance(gm, fx.GraphModule)
    assert cap.training == (mode == "train")

    calls = [n for n in gm.graph.nodes if n.op == "call_function"]
    assert calls
    assert [n for n in calls if "val" not in n.meta] == []
    assert [n for n in calls if not n.meta.get("nn_module_stack")] == []

    # nn_module_stack names the user's own submodules.
    submodules = {fqn for fqn, _ in model.named_modules() if fqn}
    paths = {path for n in calls for path, _ in n.meta["nn_module_stack"].values()}
    assert paths & submodules, sorted(paths)[:10]

    # Matrix work is in the graph.
    targets = {str(n.target) for n in calls}
    assert any(k in t for t in targets for k in ("linear", "addmm", "mm", "matmul", "conv"))

    _assert_unchanged(model, before)


@pytest.mark.parametrize("name", ["resnet", "bert"])
def test_capture_runs_like_the_model(name):
    """The captured graph computes what the model computes (eval: no dropout / BN updates)."""
    model, before, cap = _captured(name, "eval")
    _, inputs = _build(name, "eval")
    with torch.no_grad():
        want = _tensor_outputs(model(**inputs))
        got = _tensor_outputs(cap.graph_module(**inputs))
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    _assert_unchanged(model, before)


# ----------------------------------------------------------------------------------
# analyze
# ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_analyze_knows_every_op(name):
    model, _, before, report = _analyzed(name)
    assert dict(report.unknown_ops) == {}, f"ATen ops with no cost formula in {name}"
    assert report.totals["matrix_flops_fwd"] > 0
    assert report.totals["matrix_flops_bwd"] > 0
    _assert_unchanged(model, before)


@pytest.mark.parametrize("name", NAMES)
def test_analyze_matrix_flops_match_flop_counter(name):
    model, inputs, _, report = _analyzed(name)
    ours = report.totals["matrix_flops_fwd"] + report.totals["matrix_flops_bwd"]
    ref = _reference_matrix_flops(model, inputs)
    assert ref > 0
    assert ours == pytest.approx(ref, rel=0.01), (
        f"{name}: fxopt fwd {report.totals['matrix_flops_fwd']:,} + bwd "
        f"{report.totals['matrix_flops_bwd']:,} = {ours:,} vs FlopCounterMode {ref:,}"
    )


@pytest.mark.parametrize(
    "spec", ["hf:ViTModel-tiny", "hf:ConvNextModel-tiny", "hf:BertModel-tiny", "hf:GPT2Model-tiny"]
)
def test_resolved_hf_specs_analyze(spec):
    """The models behind ``fxopt report hf:<Class>-tiny`` capture and cost cleanly too."""
    torch.manual_seed(0)
    resolved = models.resolve(spec, batch=BATCH, tiny=True)
    report = fxopt.analyze(resolved.model, resolved.inputs)
    assert dict(report.unknown_ops) == {}
    assert report.totals["matrix_flops_fwd"] > 0 and report.totals["matrix_flops_bwd"] > 0


@pytest.mark.parametrize("groups", [1, 4])
def test_reference_conv_backward_formula(groups):
    """The reference's conv-backward correction agrees with torch for ungrouped convs only."""
    conv = torch.nn.Conv2d(8, 8, 3, padding=1, groups=groups)
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    with FlopCounterMode(display=False) as plain:
        conv(x).sum().backward()
    with FlopCounterMode(display=False, custom_mapping=_REFERENCE_FORMULAS) as fixed:
        conv(x).sum().backward()
    fwd = 2 * 2 * 8 * (8 // groups) * 6 * 6 * 9  # 2 * N * C_out * C_in/groups * H * W * k * k
    assert fixed.get_total_flops() == 3 * fwd  # forward + grad_input + grad_weight
    torch_bwd = plain.get_total_flops() - fwd
    assert torch_bwd == fwd + groups * fwd  # torch counts grad_weight `groups` times
