"""``choose_saved`` (what a fused region keeps for its backward) against brute force.

The reference enumerates every subset of the region's inputs and outputs, keeps those from which
``derive_backward`` builds a backward, and takes the fewest bytes (ties: fewer tensors, then
outputs before inputs, as documented). The chosen set's backward is then run in float64 with
ATen ops and compared with autograd on the unfused ops, so "feasible" is also checked by numbers.
No Triton kernel is compiled: programs are lowered and run by the torch reference runner.
"""
import itertools

import pytest
import torch
import torch.nn.functional as F

import fxopt
from fxopt.codegen import choose_saved, classify, derive_backward, lower
from fxopt.codegen.kernel import run_reference
from nets import Lambda as Fn  # noqa: E402  (tests/nets.py)


def program_of(fn, *xs):
    """Every op of ``fn``'s captured graph as one pointwise region's program, and for each program
    input the position of the example input it reads."""
    gm = fxopt.capture(Fn(fn), xs).graph_module
    nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
    domain = None
    for n in nodes:
        d = classify(n)[1]
        domain = d if domain is None else domain.merge(d)
    low = lower(nodes, domain)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    low.program.example_index = [placeholders.index(n) for n, _ in low.inputs]
    return low.program


def rand(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32) * 4 - 2


def brute_force(program):
    """(bytes, count, subset) of every feasible saved set, best first by the documented order."""
    cands = [("out", j) for j in range(len(program.outputs))] + [("in", i) for i in range(len(program.inputs))]
    size = {("out", j): s.nbytes for j, (_, s) in enumerate(program.outputs)}
    size.update({("in", i): s.nbytes for i, s in enumerate(program.inputs)})
    needs = tuple(s.dtype != "torch.bool" for s in program.inputs)
    feasible = []
    for r in range(len(cands) + 1):
        for subset in itertools.combinations(cands, r):
            try:
                derive_backward(program, needs, list(subset))
            except ValueError:
                continue
            feasible.append((sum(size[c] for c in subset), r, list(subset)))
    feasible.sort(key=lambda t: (t[0], t[1]))
    return feasible


CASES = {
    # the issue's example: the output (8x16 fp32, 512 B) also determines relu', but x and y (96 B)
    # are smaller and x + y is recomputed from them
    "relu_outer_sum": (lambda x, y: torch.relu(x + y), (rand(8, 1), rand(1, 16, seed=1)), 96),
    "relu_bias": (lambda x, b: torch.relu(x + b), (rand(8, 16), rand(16, seed=1)), 8 * 16 * 4),
    "gelu_bias": (lambda x, b: F.gelu(x + b), (rand(8, 16), rand(16, seed=1)), (8 * 16 + 16) * 4),
    "sigmoid": (lambda x: torch.sigmoid(x), (rand(6, 8),), 6 * 8 * 4),
    "product": (lambda x, y: x * y, (rand(4, 8), rand(4, 8, seed=1)), 2 * 4 * 8 * 4),
    "scaled_exp": (lambda x, s: torch.exp(x) * s, (rand(4, 8), rand(8, seed=1)), (4 * 8 + 8) * 4),
    "tanh_residual": (lambda x: torch.tanh(x) + x, (rand(5, 7),), 5 * 7 * 4),
    # row programs (k = 1). softmax: the derivative reads exp(x - max) and the row sum, recomputed
    # from x; the output (same size) does not determine them
    "softmax": (lambda x: torch.softmax(x, -1), (rand(4, 8),), 4 * 8 * 4),
    "log_softmax": (lambda x: torch.log_softmax(x, -1), (rand(4, 8),), 4 * 8 * 4),
    # x and the weight (statistics recomputed from x); the bias's gradient is the row sum of gy
    "layer_norm": (lambda x, w, b: F.layer_norm(x, (8,), w, b), (rand(4, 8), rand(8, seed=1), rand(8, seed=2)),
                   (4 * 8 + 8) * 4),
    "rms_norm": (lambda x, w: torch.rms_norm(x, (8,), w, eps=1e-6), (rand(4, 8), rand(8, seed=1)), (4 * 8 + 8) * 4),
    # d/dx = gy * s, d/ds = sum(gy * x): both inputs, not the (4,) output
    "row_sum_scaled": (lambda x, s: (x * s).sum(-1), (rand(4, 8), rand(4, 1, seed=1)), (4 * 8 + 4) * 4),
    "silu_mean": (lambda x: F.silu(x).mean(-1), (rand(4, 8),), 4 * 8 * 4),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_choose_saved_is_the_fewest_bytes(name):
    fn, xs, hand_bytes = CASES[name]
    program = program_of(fn, *xs)
    chosen = choose_saved(program)
    feasible = brute_force(program)
    assert feasible, "no saved set determines the backward"
    best_bytes, best_count, _ = feasible[0]
    size = {("out", j): s.nbytes for j, (_, s) in enumerate(program.outputs)}
    size.update({("in", i): s.nbytes for i, s in enumerate(program.inputs)})
    assert sum(size[c] for c in chosen) == best_bytes == hand_bytes
    assert len(chosen) == best_count
    assert any(sorted(chosen) == sorted(s) for b, r, s in feasible if (b, r) == (best_bytes, best_count))
    check_backward_numerically(program, fn, xs, chosen)


def test_ties_prefer_outputs_to_inputs():
    """relu(x): the output and the input are the same size and both determine relu'; the output
    is saved (outputs come first among equal costs: it is kept alive anyway)."""
    program = program_of(lambda x: torch.relu(x), rand(4, 8))
    assert [b for b, r, s in brute_force(program)][:2] == [4 * 8 * 4, 4 * 8 * 4]
    assert choose_saved(program) == [("out", 0)]


def check_backward_numerically(program, fn, xs, saved):
    """The backward program derived for ``saved``, run in float64, equals autograd's gradients."""
    needs = tuple(True for _ in program.inputs)
    plan = derive_backward(program, needs, saved)
    leaves = [x.double().requires_grad_() for x in xs]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    gys = [rand(*o.shape, seed=7 + j).double() for j, o in enumerate(outs)]
    want = torch.autograd.grad(outs, leaves, gys)
    forward_outs = [o.detach() for o in outs]
    # program input i reads example input example_index[i], viewed in the program's shape
    inputs = [leaves[j].detach().reshape(spec.shape) for j, spec in zip(program.example_index, program.inputs)]
    ins = [inputs[i] if where == "in" else forward_outs[i] for where, i in saved]
    ins += gys
    # a row result is read back with its kept dims; a "col" gradient is per-program partial rows
    ins = [t.reshape(spec.shape) for t, spec in zip(ins, plan.program.inputs)]
    outputs = [torch.empty(((1,) if spec.kind == "col" else ()) + tuple(spec.shape), dtype=torch.float64)
               for _, spec in plan.program.outputs]
    run_reference(plan.program, ins, outputs)
    for k, i in enumerate(plan.grads_for):
        where, m = plan.route[k]
        got = outputs[m] if where == "out" else gys[m]
        x, ref = inputs[i], want[program.example_index[i]]
        if where == "out" and plan.program.outputs[m][1].kind == "col":
            got = got.sum(0).reshape(x.shape)
        dims = [d for d in range(got.dim()) if x.shape[d] != got.shape[d]]  # broadcast: the caller sums
        got = (got.sum(dim=dims, keepdim=True) if dims else got).reshape(ref.shape)
        assert torch.allclose(got, ref, rtol=1e-10, atol=1e-10), f"input {i}: {got} != {ref}"
