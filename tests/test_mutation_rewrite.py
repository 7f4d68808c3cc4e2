"""Tests written to kill surviving mutants of the rule engine (``passes/rewrite.py``).

They check the graph facts that keep rewrites sound (a view's storage is its input's, so an
in-place write to the input is seen through the view; forwarding must not make a fresh graph
output alias an input, while an output that already aliases the input may be forwarded) and that a
multi-node rewrite erases the nodes it declares dead. Graphs are built node by node with
``fx.Graph`` and meta-device ``val`` s (no capture); every expectation is a node list or a root
read off the hand-built graph.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import fx, nn

from fxopt.passes.base import PassContext
from fxopt.passes.normalize import RULES as NORMALIZE
from fxopt.passes.rewrite import Call, GraphFacts, Rewrite, Rule, apply_rules

aten = torch.ops.aten


def _node(g: fx.Graph, target, args, shape=(2, 3)) -> fx.Node:
    n = g.call_function(target, args)
    n.meta["val"] = torch.empty(shape, device="meta")
    return n


def _x(g: fx.Graph, shape=(2, 3)) -> fx.Node:
    x = g.placeholder("x")
    x.meta["val"] = torch.empty(shape, device="meta")
    return x


def _calls(gm: fx.GraphModule) -> list:
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def test_rewrite_a_view_is_rooted_at_the_tensor_it_views():
    """view/permute/expand/alias share their input's storage: each root is the placeholder."""
    g = fx.Graph()
    x = _x(g)
    v = _node(g, aten.view.default, (x, [3, 2]), (3, 2))
    p = _node(g, aten.permute.default, (v, [1, 0]))
    e = _node(g, aten.expand.default, (p, [2, 3]))
    a = _node(g, aten.alias.default, (e,))
    g.output(a)
    for n in (x, v, p, e, a):
        assert GraphFacts.root(n) is x, n.name
    assert GraphFacts(g).written == set()


def test_rewrite_a_clone_of_a_view_stays_when_the_viewed_input_is_written_later():
    """``c = x.view(2, 3).clone(); x.add_(1); return c``: the clone is the snapshot taken before
    the write into x's storage (seen through the view), so noop-copy must keep it."""
    g = fx.Graph()
    x = _x(g)
    v = _node(g, aten.view.default, (x, [2, 3]))
    c = _node(g, aten.clone.default, (v,))
    _node(g, aten.add_.Tensor, (x, 1))
    g.output(c)
    gm = fx.GraphModule(nn.Module(), g)
    assert GraphFacts(g).is_written(v)
    apply_rules(gm, PassContext(), NORMALIZE)
    assert aten.clone.default in _calls(gm)
    assert gm.graph.output_node().args[0] is c


def test_rewrite_a_clone_returned_as_output_is_not_forwarded_to_the_input():
    """``return x.clone()``: forwarding would make the output the input itself (callers expect a
    fresh tensor), so the clone stays, although it keeps the layout."""
    g = fx.Graph()
    x = _x(g)
    c = _node(g, aten.clone.default, (x,))
    g.output(c)
    gm = fx.GraphModule(nn.Module(), g)
    facts = GraphFacts(g)
    assert not facts.can_forward(c, x)
    stats = apply_rules(gm, PassContext(), NORMALIZE)
    assert _calls(gm) == [aten.clone.default] and stats == {}


def test_rewrite_a_noop_view_returned_as_output_is_forwarded_to_the_input_it_already_aliases():
    """``return x.view(2, 3)`` on a [2, 3] x: the output already aliases x, so the no-op view goes
    and the output is x itself (forwarding creates no new alias)."""
    g = fx.Graph()
    x = _x(g)
    v = _node(g, aten.view.default, (x, [2, 3]))
    g.output(v)
    gm = fx.GraphModule(nn.Module(), g)
    assert GraphFacts(g).can_forward(v, x)
    stats = apply_rules(gm, PassContext(), NORMALIZE)
    assert _calls(gm) == [] and gm.graph.output_node().args[0] is x
    assert stats == {"noop-view": 1}


def _abs_of_neg(node, facts, ctx):
    """abs(neg(y)) -> abs(y), the neg declared dead (erased once nothing reads it)."""
    inner = node.args[0]
    if isinstance(inner, fx.Node) and inner.target is aten.neg.default:
        return Rewrite(Call(aten.abs.default, (inner.args[0],)), "abs(-y) is abs(y)", dead=(inner,))
    return None


def test_rewrite_a_multi_node_rewrite_erases_its_dead_nodes():
    """x -> neg -> abs -> output becomes x -> abs -> output: the old abs is replaced and the neg,
    declared dead and now unread, is erased (3 nodes left: placeholder, abs, output)."""
    g = fx.Graph()
    x = _x(g)
    n = _node(g, aten.neg.default, (x,))
    g.output(_node(g, aten.abs.default, (n,)))
    gm = fx.GraphModule(nn.Module(), g)
    stats = apply_rules(gm, PassContext(), [Rule("abs-neg", (aten.abs.default,), _abs_of_neg)], max_sweeps=1)
    assert stats == {"abs-neg": 1}
    assert [nd.op for nd in gm.graph.nodes] == ["placeholder", "call_function", "output"]
    (new,) = [nd for nd in gm.graph.nodes if nd.op == "call_function"]
    assert new.target is aten.abs.default and new.args == (x,)


def test_rewrite_a_declared_dead_node_still_read_elsewhere_is_kept():
    """The same rewrite when the neg is also returned: it still has a reader, so it stays."""
    g = fx.Graph()
    x = _x(g)
    n = _node(g, aten.neg.default, (x,))
    g.output((_node(g, aten.abs.default, (n,)), n))
    gm = fx.GraphModule(nn.Module(), g)
    apply_rules(gm, PassContext(), [Rule("abs-neg", (aten.abs.default,), _abs_of_neg)], max_sweeps=1)
    assert _calls(gm) == [aten.neg.default, aten.abs.default]


def test_rewrite_a_view_whose_input_is_passed_by_keyword_is_rooted_at_that_input():
    """``aten.view(self=x, size=[3, 2])`` (no positional args): the aliased ``self`` is read from
    the kwargs, so the view's root is still x and x's in-place write is seen through it."""
    g = fx.Graph()
    x = _x(g)
    v = g.call_function(aten.view.default, (), {"self": x, "size": [3, 2]})
    _node(g, aten.add_.Tensor, (x, 1))
    g.output(v)
    assert GraphFacts.root(v) is x
    assert GraphFacts(g).is_written(v)


def test_rewrite_an_in_place_write_by_keyword_is_seen():
    """``aten.add_(self=x, other=1)`` (no positional args) writes x: the written ``self`` is read
    from the kwargs."""
    g = fx.Graph()
    x = _x(g)
    g.call_function(aten.add_.Tensor, (), {"self": x, "other": 1})
    g.output(x)
    assert GraphFacts(g).written == {x}


def test_rewrite_dropout_is_rooted_at_its_input_and_an_ordinary_op_at_itself():
    """dropout may return its input itself (the identity case); relu always allocates: root(relu(x))
    is the relu, root(dropout(x)) is x, and so is the root of a view of that dropout."""
    g = fx.Graph()
    x = _x(g)
    r = _node(g, aten.relu.default, (x,))
    d = _node(g, aten.dropout.default, (x, 0.5, False))
    v = _node(g, aten.view.default, (d, [3, 2]), (3, 2))
    g.output((r, v))
    assert GraphFacts.root(r) is r
    assert GraphFacts.root(d) is x and GraphFacts.root(v) is x


def test_rewrite_a_clone_of_a_fresh_value_goes_even_when_its_input_is_written_later():
    """``c = x.relu().clone(); x.add_(1); return c``: the relu owns a fresh storage that nothing
    writes, so the clone is a no-op and is removed (the output becomes the relu)."""
    g = fx.Graph()
    x = _x(g)
    r = _node(g, aten.relu.default, (x,))
    c = _node(g, aten.clone.default, (r,))
    _node(g, aten.add_.Tensor, (x, 1))
    g.output(c)
    gm = fx.GraphModule(nn.Module(), g)
    stats = apply_rules(gm, PassContext(), NORMALIZE)
    assert stats == {"noop-copy": 1}
    assert _calls(gm) == [aten.relu.default, aten.add_.Tensor] and gm.graph.output_node().args[0] is r


def test_rewrite_an_identity_dropout_returned_as_output_is_forwarded_to_its_input():
    """``return dropout(x, 0.5, train=False)`` returns x itself in ATen already: removing it creates
    no new alias, so the output becomes x."""
    g = fx.Graph()
    x = _x(g)
    g.output(_node(g, aten.dropout.default, (x, 0.5, False)))
    gm = fx.GraphModule(nn.Module(), g)
    assert apply_rules(gm, PassContext(), NORMALIZE) == {"identity-dropout": 1}
    assert _calls(gm) == [] and gm.graph.output_node().args[0] is x


def test_rewrite_unpack_dual_is_rooted_at_the_dual_its_primal_views():
    """``_unpack_dual(Tensor(a) dual, int level) -> (Tensor(a) primal, Tensor tangent)``: its first
    result aliases ``dual``, so the node's root is ``dual`` (its last result aliases nothing)."""
    g = fx.Graph()
    x = _x(g)
    u = g.call_function(aten._unpack_dual.default, (x, 0))
    g.output(u)
    assert GraphFacts.root(u) is x


def test_rewrite_a_refusal_is_logged_and_counted_once_per_node():
    """neg(neg(y)) -> y; a neg of anything else is refused. x -> neg -> neg -> relu: sweep 1 refuses
    the inner neg and rewrites the outer one, sweep 2 refuses the inner neg again (now dead) and
    changes nothing. One keep decision and one kept_ count, not two."""
    from fxopt.passes.rewrite import Refusal

    def neg_of_neg(node, facts, ctx):
        inner = node.args[0]
        if isinstance(inner, fx.Node) and inner.target is aten.neg.default:
            return Rewrite(inner.args[0], "neg(neg(y)) is y")
        return Refusal("no inner neg")

    g = fx.Graph()
    x = _x(g)
    n1 = _node(g, aten.neg.default, (x,))
    n2 = _node(g, aten.neg.default, (n1,))
    g.output(_node(g, aten.relu.default, (n2,)))
    gm = fx.GraphModule(nn.Module(), g)
    ctx = PassContext()
    stats = apply_rules(gm, ctx, [Rule("neg-neg", (aten.neg.default,), neg_of_neg)])
    assert stats == {"neg-neg": 1, "kept_neg-neg": 1}
    assert [(d.node, d.action, d.reason) for d in ctx.decisions] == [
        (n1.name, "keep", "neg-neg: no inner neg"), (n2.name, "remove", "neg-neg: neg(neg(y)) is y")]


def test_rewrite_a_raised_refusal_is_logged_with_its_counter_and_gain():
    """A matcher may raise a Refusal from deep inside: the driver logs it as keep with its own
    counter and gain instead of letting it escape, and the graph is unchanged."""
    from fxopt.passes.rewrite import Refusal

    def deep(node, facts, ctx):
        raise Refusal("too deep to fuse", counter="kept_deep", gain=2e-6)

    gm = fx.GraphModule(nn.Module(), _relu_graph())
    ctx = PassContext()
    stats = apply_rules(gm, ctx, [Rule("deep", (aten.relu.default,), deep)])
    assert stats == {"kept_deep": 1} and _calls(gm) == [aten.relu.default]
    assert [(d.action, d.reason, d.est_gain_s) for d in ctx.decisions] == [("keep", "deep: too deep to fuse", 2e-6)]


def test_rewrite_a_builder_refusing_after_it_built_leaves_the_graph_as_it_was():
    """A builder emits a node, then returns a Refusal (a cost known only once built): what it
    emitted is removed and the refusal is logged; the graph keeps its one relu."""
    from fxopt.passes.rewrite import Refusal

    def build(emit):
        emit(Call(aten.neg.default, (x,)))
        return Refusal("not worth it")

    g = _relu_graph()
    x = next(iter(g.nodes))
    gm = fx.GraphModule(nn.Module(), g)
    ctx = PassContext()
    stats = apply_rules(gm, ctx, [Rule("b", (aten.relu.default,), lambda n, f, c: Rewrite(build, "never"))])
    assert stats == {"kept_b": 1} and _calls(gm) == [aten.relu.default]
    assert [(d.action, d.reason) for d in ctx.decisions] == [("keep", "b: not worth it")]


def _relu_graph() -> fx.Graph:
    g = fx.Graph()
    g.output(_node(g, aten.relu.default, (_x(g),)))
    return g


def test_rewrite_calls_rewrites_and_rules_are_immutable_values():
    """A rule's Call/Rewrite (and the Rule itself) may be shared; none can be changed after the fact."""
    call = Call(aten.relu.default, ())
    for obj, attr in ((call, "name"), (Rewrite(call, "r"), "reason"), (Rule("r", (), _abs_of_neg), "name")):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(obj, attr, "changed")
