"""Predicted timeline (fxopt.timeline), predicted memory (fxopt.memory) and the HTML page's
timeline, memory plot and fixes, against independent references: a saved_tensors_hooks run of the
real model, hand counts of parameter bytes, the graph's own node order."""
import json
import re
import warnings

import pytest
import torch
from torch import nn
from torch.autograd.graph import saved_tensors_hooks

import fxopt
from fxopt.errors import AnalysisError
from fxopt.render.html import html_report
from fxopt.study.memory import memory_curve
from fxopt.render.timeline import HOST_WAIT, Slice, chrome_trace, predicted_timeline
from nets import Scaled  # noqa: E402  (tests/nets.py)


class Net(nn.Module):
    """stem (conv, relu), body (conv 8->32, relu, conv 32->8, relu), head (linear)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(8, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(8 * 16 * 16, 10)

    def forward(self, x):
        return self.head(self.body(self.stem(x)).flatten(1))


def _analyze(model, x, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fxopt.analyze(model, x, **kw)


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return Net(), torch.randn(4, 3, 16, 16)


@pytest.fixture(scope="module")
def report(net):
    return _analyze(*net)


def _saved_by_hooks(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd saves in a real forward, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            saved[st.data_ptr()] = st.nbytes()
        return t

    with saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    del out
    return sum(saved.values())


def test_peak_activations_equal_the_saved_tensors_of_a_real_run(net, report):
    model, x = net
    expected = _saved_by_hooks(model, x)
    curve = memory_curve(report)
    assert expected > 0 and curve.peak_of("activations") == pytest.approx(expected)
    # saved activations rise through the forward and are all freed by the end of the backward
    acts = [p.bytes["activations"] for p in curve.points]
    fwd = [p.bytes["activations"] for p in curve.points if p.phase == "fwd"]
    assert fwd == sorted(fwd) and fwd[-1] == max(acts)
    opt = next(p for p in curve.points if p.phase == "opt")
    assert opt.bytes["activations"] == 0


def test_persistent_memory_by_hand(net, report):
    model, x = net
    param_bytes = sum(p.numel() * 4 for p in model.parameters())
    curve = memory_curve(report)
    first, opt = curve.points[0], [p for p in curve.points if p.phase == "opt"][-1]
    assert first.bytes["weights"] == param_bytes
    assert first.bytes["optimizer_state"] == param_bytes  # SGD momentum: one buffer per parameter
    assert first.bytes["inputs"] == x.numel() * 4
    assert first.bytes["grads"] == 0 and opt.bytes["grads"] == param_bytes
    grads = [p.bytes["grads"] for p in curve.points]
    assert grads == sorted(grads)  # gradients only appear during the backward
    adam = memory_curve(_analyze(model, x, optimizer="adamw"))
    assert adam.points[0].bytes["optimizer_state"] == 2 * param_bytes


def test_checkpointing_a_block_keeps_only_its_input(net, report):
    model, x = net
    plain, ckpt = memory_curve(report), memory_curve(report, checkpoint=["body"])
    # by hand: checkpointed, body keeps its input (stem's output, which stem's relu saves anyway) and
    # its output stays saved for the head; only the 32-channel relu output inside is dropped
    inner = 4 * 32 * 16 * 16 * 4
    fwd_peak = lambda c: max(p.bytes["activations"] for p in c.points if p.phase == "fwd")
    assert fwd_peak(plain) - fwd_peak(ckpt) == pytest.approx(inner, rel=0.01)
    # in body's backward its saved set is back (recomputed): the backward peak does not drop by as much
    assert ckpt.peak_bytes > plain.peak_bytes - inner
    with pytest.raises(AnalysisError, match="no such block"):
        memory_curve(report, checkpoint=["nope"])


def test_does_not_fit_by_and_a_smaller_batch_that_fits(net, report):
    model, x = net
    peak = memory_curve(report).peak_bytes
    cap = int(peak * 0.8)
    curve = memory_curve(report, capacity_bytes=cap)
    assert curve.fits is False and curve.shortfall_bytes == pytest.approx(peak - cap)
    assert f"does not fit, by {(peak - cap) / 1e9:.3g} GB" in curve.verdict()
    assert curve.options and curve.options[0].change.startswith("keep optimizer states in bf16")
    batch = [o for o in curve.options if o.change.startswith("batch ")]
    assert batch, curve.summary()
    new = int(re.match(r"batch 4 -> (\d+)", batch[0].change).group(1))
    assert 1 <= new < 4
    # independent check: cost the model again at the suggested batch; it fits
    again = memory_curve(_analyze(model, x[:new].clone()), capacity_bytes=cap)
    assert again.fits
    assert memory_curve(report, capacity_bytes=int(peak * 2)).fits is True
    assert "device memory unknown" in memory_curve(report, capacity_bytes=0).verdict()


def test_memory_refuses_forward_only_and_symbolic(net):
    model, x = net
    with pytest.raises(AnalysisError, match="forward only"):
        memory_curve(_analyze(model, x, training=False))


def test_timeline_in_execution_order(report):
    tl = predicted_timeline(report)
    # contiguous, end to end (kernels and the device's waits for the host), adding up to the step
    for a, b in zip(tl.slices, tl.slices[1:]):
        assert b.start_s == pytest.approx(a.end_s)
    assert tl.end_s == pytest.approx(float(report.totals["step_time_s"]))
    assert [t for t in tl.tracks() if t != HOST_WAIT] == ["forward", "backward", "optimizer"]
    waits = [s for s in tl.slices if s.track == HOST_WAIT]
    assert sum(s.dur_s for s in waits) == pytest.approx(float(sum(getattr(report, "host_idle", [0.0]))))
    # per node, the slices carry exactly that node's calls
    for node in {s.args["node"] for s in tl.slices if s.track != HOST_WAIT}:
        expect = sum(float(t.total_s) for c, t in zip(report.calls, report.call_times) if c.node == node)
        assert sum(s.dur_s for s in tl.slices if s.args.get("node") == node) == pytest.approx(expect)
    # forward in graph order, backward the reverse for this chain of modules
    order = [n.name for n in report.captured.graph.nodes]
    fwd = list(dict.fromkeys(s.args["node"] for s in tl.slices if s.track == "forward"))
    assert fwd == sorted(fwd, key=order.index)
    mods = lambda track: list(dict.fromkeys(s.args["module"] for s in tl.slices
                                            if s.track == track and s.args["op"] in ("conv2d", "linear")))
    assert mods("forward") == ["stem.0", "body.0", "body.2", "head"]
    assert mods("backward") == ["head", "body.2", "body.0", "stem.0"]


def test_chrome_trace_one_track_per_phase(report, tmp_path):
    tl = predicted_timeline(report, comm=[Slice("all_reduce bucket 0", "communication", 0.0, 1e-4)])
    path = tl.export_chrome_trace(tmp_path / "step.json")
    trace = json.loads(path.read_text())
    threads = {e["tid"]: e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "thread_name"}
    assert set(threads.values()) - {HOST_WAIT} == {"backward", "communication", "forward", "optimizer"}
    xs = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert len(xs) == len(tl.slices)
    conv = next(e for e in xs if e["args"].get("module") == "stem.0" and threads[e["tid"]] == "forward")
    assert conv["name"] == "stem.0:" + conv["args"]["node"] and conv["dur"] > 0 and "source" in conv["args"]
    assert chrome_trace([tl, tl])["traceEvents"][-1]["pid"] == 2


def test_html_source_column_keeps_code_after_a_slash():
    doc = html_report(_analyze(Scaled(), torch.randn(2, 8)), lint=None)
    nodes = doc[doc.index('<section id="nodes">'):doc.index("</section>", doc.index('<section id="nodes">'))]
    assert "torch.relu(self.fc(x)) / 4.0" in nodes
    assert re.search(r'<td class="src">nets\.py:\d+: ', nodes)  # the path is shortened (tests/nets.py)


def test_html_summary_once_and_timeline_and_memory_sections(report):
    doc = html_report(report, lint=None)
    summary = doc[doc.index('<section id="summary">'):doc.index("</section>", doc.index('<section id="summary">'))]
    assert summary.count("activations saved") == 1 and "<pre>" not in summary
    tl = doc[doc.index('<section id="timeline">'):]
    assert tl.count("<rect") >= len(predicted_timeline(report).slices)
    assert "<title>stem.0:" in tl  # hover titles name module and node
    mem = doc[doc.index('<section id="memory">'):]
    assert "fits: predicted peak" in mem and "<polygon" in mem and "activations: peak" in mem
    assert html_report(_analyze(Scaled(), torch.randn(2, 8), training=False), lint=None).count('id="memory"') == 0


def test_roofline_labels_stay_inside_the_plot():
    """Labels are placed after constrained layout, inside the axes (they were cut off at the edges)."""
    from fxopt import zoo
    from fxopt.render.plots import roofline
    with torch.device("meta"):
        model, x = zoo.build("vit_b16", tiny=True), zoo.example_inputs("vit_b16", 2, tiny=True)
    fig = roofline(_analyze(model, x), top=12)
    fig.canvas.draw()
    renderer, ax = fig.canvas.get_renderer(), fig.axes[0]
    assert len(ax.texts) == 12
    for t in ax.texts:
        box = t.get_window_extent(renderer)
        assert ax.bbox.x0 - 1 <= box.x0 and box.x1 <= ax.bbox.x1 + 1, t.get_text()
        assert ax.bbox.y0 - 1 <= box.y0 and box.y1 <= ax.bbox.y1 + 1, t.get_text()


def test_timeline_of_a_data_parallel_report(net):
    """With distributed=, the buckets' all-reduces get a track and the exposed part delays the optimizer."""
    model, x = net
    rep = _analyze(model, x, distributed={"world_size": 512})
    dist, tl = rep.distributed, predicted_timeline(rep)
    assert tl.end_s == pytest.approx(float(rep.totals["step_time_s"]))
    buckets = [s for s in tl.slices if s.track == "communication"]
    assert len(buckets) == len(dist.buckets) >= 1
    assert sum(s.dur_s for s in buckets) == pytest.approx(dist.comm_time_s)
    exposed = [s for s in tl.slices if s.track == "exposed communication"]
    assert sum(s.dur_s for s in exposed) == pytest.approx(dist.exposed_comm_s) and dist.exposed_comm_s > 0
    first_opt = next(s for s in tl.slices if s.track == "optimizer")
    assert first_opt.start_s >= exposed[-1].end_s - 1e-12
    bwd = [s for s in tl.slices if s.args.get("phase") == "bwd"]
    assert all(bwd[0].start_s <= s.start_s for s in buckets)
    # DDP keeps a full replica plus its flat gradient buckets (one more copy of the gradients)
    grads = sum(p.numel() * 4 for p in model.parameters())
    assert memory_curve(rep).peak_bytes == pytest.approx(memory_curve(_analyze(model, x)).peak_bytes + grads)
    view = _analyze(model, x, distributed={"world_size": 512, "gradient_as_bucket_view": True})
    assert memory_curve(view).points[0].bytes["comm_buffers"] == 0


@pytest.mark.gpu
def test_predicted_memory_increment_against_the_cuda_allocator():
    """What one steady training step adds on top of the weights, momentum and batch, predicted vs
    torch.cuda.max_memory_allocated (cuBLAS workspaces exist after the warm-up and are not counted)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 2048), nn.ReLU(), nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 16))
    x = torch.randn(512, 1024)
    curve = memory_curve(_analyze(model, x))
    start = curve.points[0].bytes
    predicted = curve.peak_bytes - (start["weights"] + start["optimizer_state"] + start["inputs"])
    model, x = model.cuda(), x.cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, foreach=True)

    def step():
        out = model(x)
        out.backward(torch.ones_like(out))  # what the cost model's step does
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated() - base
    assert measured == pytest.approx(predicted, rel=0.25), curve.summary()
