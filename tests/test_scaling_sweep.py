"""fxopt.scaling (exact cost formulas in batch/height/width) and fxopt.sweep (model families).

Formulas are checked against separate concrete analyses at sizes they were not fitted on, and
against a hand-derived attention term; sweep rows against separate analyses of each variant.
"""
import csv
import io
import json
import math

import pytest
import sympy
import torch
from torch import nn

import fxopt
from fxopt import zoo
from fxopt.errors import AnalysisError, FxoptError, InputError
from fxopt.study.scaling import scaling
from fxopt.study.sweep import MeasureError, SweepResult, _mark_fronts, parse_grid, sweep


def total_flops(report) -> int:
    return sum(c.flops for c in report.calls)


# ---------------------------------------------------------------------------------------------
# scaling


@pytest.fixture(scope="module")
def resnet_scaling():
    """A two-stage zoo ResNet (stem, max-pool, BN, residual blocks; total stride 8)."""
    model = zoo.ResNet(zoo.BasicBlock, depths=(1, 1), widths=(8, 16), stem_width=8, num_classes=10)
    return model, scaling(model, torch.randn(2, 3, 32, 32), step={"height": 8, "width": 8})


@pytest.mark.parametrize("batch,height,width", [(3, 48, 72), (5, 64, 32), (2, 128, 96)])
def test_scaling_formulas_match_concrete_analyses(resnet_scaling, batch, height, width):
    model, sc = resnet_scaling
    report = fxopt.analyze(model, torch.randn(batch, 3, height, width))
    t = report.totals
    subs = {sc.symbols["batch"]: batch, sc.symbols["height"]: height, sc.symbols["width"]: width}
    assert sc.flops.subs(subs) == total_flops(report)
    assert sc.matrix_flops.subs(subs) == t["matrix_flops_fwd"] + t["matrix_flops_bwd"]
    assert sc.bytes.subs(subs) == t["bytes"]
    assert sc.activation_bytes.subs(subs) == t["activation_bytes"]
    assert sc.kernels == t["kernels"]
    got = sc.at(batch=batch, height=height, width=width)
    assert got["flops"] == total_flops(report) and got["bytes"] == t["bytes"]
    # the time formula keeps each kernel's rates at the example sizes (shape-dependent in the kernel
    # model: tiles, waves, bandwidth ramp), so away from them it approximates the model's GPU time
    # (this tiny net's kernels waste most of each tile at the 2x3x32x32 example, so frozen rates
    # overprice larger sizes by up to ~3.6x: a known limit of closed-form time, stated in scaling.py)
    assert float(sc.time_s.subs(subs)) == pytest.approx(got["step_time_s"], rel=0.15)
    assert 1 <= float(sc.time_s.subs(subs)) / t["gpu_time_s"] < 4


def test_scaling_shape_of_a_conv_net(resnet_scaling):
    """A conv net is linear in batch and in each spatial side: FLOPs ~ batch*height*width."""
    _, sc = resnet_scaling
    assert sc.degrees == {"batch": 1, "height": 1, "width": 1}
    b, h, w = (sc.symbols[n] for n in ("batch", "height", "width"))
    poly = sympy.Poly(sc.flops, b, h, w)
    assert poly.total_degree() == 3 and poly.coeff_monomial(b * h * w) > 0
    assert sc.flops.subs({b: 0}) > 0  # the optimizer step does not scale with the batch
    trunk = next(x for x in sc.blocks if x.block == "trunk")
    assert trunk.leading == trunk.dominant and sympy.Poly(trunk.leading, b, h, w).monoms() == [(1, 1, 1)]
    # the regime polynomial equals the exact time at the example sizes, where its bounds come from
    base = {sc.symbols[n]: v for n, v in sc.base.items()}
    assert float(sc.time_s_regime.subs(base)) == pytest.approx(sc.report.totals["gpu_time_s"], rel=1e-9)
    assert float(sc.time_s.subs(base)) == pytest.approx(sc.report.totals["gpu_time_s"], rel=1e-9)
    assert "trunk" in sc.table() and "batch*height*width" in sc.summary()
    assert json.loads(sc.to_json())["degrees"] == sc.degrees


class PatchEncoder(nn.Module):
    """Patch embedding + one transformer block over all patches (no position table, so any size)."""

    def __init__(self, dim=16, patch=8, heads=2):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.block = zoo.EncoderBlock(dim, heads, 2 * dim)

    def forward(self, x):
        return self.block(self.embed(x).flatten(2).transpose(1, 2)).mean(1)


def test_attention_is_quadratic_in_tokens_hand_derived():
    """L = (H/p)(W/p) tokens: fused SDPA costs 4*B*L^2*C forward and 10*B*L^2*C backward (torch's
    formulas: 2 + 5 batched matmuls of 2*B*L^2*C FLOPs over all heads), so at batch 2 the attention
    block's leading term is 2 * 14*C/p^4 * height^2*width^2, and nothing else grows that fast."""
    dim, patch = 16, 8
    model = PatchEncoder(dim, patch)
    sc = scaling(model, torch.randn(2, 3, 16, 16), dims=("height", "width"))
    assert sc.degrees == {"height": 2, "width": 2}
    h, w = sc.symbols["height"], sc.symbols["width"]
    expected = 2 * sympy.Rational(14 * dim, patch ** 4) * h ** 2 * w ** 2
    assert sympy.Poly(sc.matrix_flops, h, w).coeff_monomial(h ** 2 * w ** 2) * h ** 2 * w ** 2 == expected
    block = next(x for x in sc.blocks if x.block == "block")
    assert block.leading == expected
    report = fxopt.analyze(model, torch.randn(2, 3, 48, 80))
    assert sc.flops.subs({h: 48, w: 80}) == total_flops(report)


def test_scaling_named_and_custom_dims():
    """``side`` sets both spatial axes; (name, axis) pairs name any axis."""
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    sc = scaling(model, torch.randn(2, 4, 6), dims=("batch", ("rows", 1)))
    b, r = sc.symbols["batch"], sc.symbols["rows"]
    assert sc.degrees == {"batch": 1, "rows": 1}
    # two linears, forward 2*B*R*(6*5 + 5*3); backward: weight grads of both, input grad of the second
    assert sc.matrix_flops == 2 * b * r * (6 * 5 + 5 * 3) + 2 * b * r * (6 * 5 + 2 * 5 * 3)
    sq = scaling(PatchEncoder(), torch.randn(2, 3, 16, 16), dims=("side",))
    assert sq.degrees == {"side": 4} and sq.step == {"side": 16}


def test_scaling_refuses_sizes_off_its_lattice(resnet_scaling):
    _, sc = resnet_scaling
    with pytest.raises(InputError, match="lattice"):
        sc.at(height=36)
    with pytest.raises(InputError, match="lattice"):
        sc.at(batch=1)  # below the example: a model may run other ops at batch 1
    with pytest.raises(InputError, match="no dimension"):
        sc.at(depth=3)


def test_scaling_bad_dims():
    model = PatchEncoder()
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(InputError, match="unknown dimension"):
        scaling(model, x, dims=("batch", "colour"))
    with pytest.raises(InputError, match="no input tensor has it"):
        scaling(nn.Linear(4, 4), torch.randn(2, 4))  # default dims include height: a rank-2 input has none
    with pytest.raises(InputError, match="not in dims"):
        scaling(model, x, dims=("batch",), step={"height": 8})


def test_scaling_says_when_the_cost_is_not_a_polynomial():
    """A stride-2 conv on sizes of step 1: out = floor((H+1)/2) is no polynomial in H."""
    model = nn.Conv2d(1, 2, 3, stride=2, padding=1)
    with pytest.raises(AnalysisError, match="not a polynomial"):
        scaling(model, torch.randn(1, 1, 5, 4), dims=("height",), step={"height": 1})


def test_scaling_names_the_size_where_the_model_breaks():
    """ViT's learned position table pins the image size: the error says which size failed."""
    model = zoo.build("vit_b16", tiny=True)
    with pytest.raises(FxoptError, match="height=64"):
        scaling(model, zoo.example_inputs("vit_b16", 2, tiny=True))


# ---------------------------------------------------------------------------------------------
# sweep


def resnet_family(width, depth):
    return zoo.ResNet(zoo.BasicBlock, depths=(depth,) * 2, widths=(width, 2 * width), stem_width=width,
                      num_classes=10)


def images(image, batch=2):
    return (torch.randn(batch, 3, image, image),)


def vit_family(dim, image, depth=1):
    return zoo.VisionTransformer(image_size=image, patch=8, dim=dim, depth=depth, heads=2, mlp_dim=2 * dim,
                                 num_classes=10)


@pytest.mark.parametrize("factory,grid", [
    (resnet_family, {"width": [8, 16], "depth": [1, 2], "image": [32]}),
    (vit_family, {"dim": [16, 32], "image": [16, 32]}),
], ids=["resnet", "vit"])
def test_sweep_rows_equal_separate_analyses(factory, grid):
    result = sweep(factory, grid, images, progress=False)
    assert len(result.rows) == math.prod(len(v) for v in grid.values())
    for row, report in zip(result.rows, result.reports):
        params = {k: row[k] for k in grid}
        kw = {k: v for k, v in params.items() if k != "image"}
        separate = fxopt.analyze(factory(**kw) if factory is resnet_family else factory(**params),
                                 images(params["image"]))
        assert row["flops"] == total_flops(separate)
        assert row["n_params"] == separate.totals["params"]
        assert row["step_time_s"] == pytest.approx(separate.totals["step_time_s"], rel=1e-12)
        assert row["activation_bytes"] == separate.totals["activation_bytes"]
        assert row["throughput"] == pytest.approx(2 / row["step_time_s"])
        assert row["ai"] == pytest.approx(row["flops"] / separate.totals["bytes"])
        assert report.hardware.name == "h100"
    # wider and deeper variants have more parameters and FLOPs
    by = {tuple(r[k] for k in grid): r for r in result.rows}
    first, last = by[tuple(v[0] for v in grid.values())], by[tuple(v[-1] for v in grid.values())]
    assert last["n_params"] > first["n_params"] and last["flops"] > first["flops"]


def test_sweep_outputs_table_json_csv_and_progress(capsys):
    result = sweep(resnet_family, {"width": [8], "depth": [1, 2]}, lambda: images(32), progress=True)
    err = capsys.readouterr().err
    assert "fxopt sweep 1/2" in err and "2/2" in err and "depth=2" in err
    table = result.table()
    assert "width" in table and "front" in table and "samples/s" in table
    data = json.loads(result.to_json())
    assert data["schema"] == "fxopt.sweep/1" and [r["depth"] for r in data["rows"]] == [1, 2]
    rows = list(csv.DictReader(io.StringIO(result.to_csv())))
    assert [int(r["flops"]) for r in rows] == [r["flops"] for r in result.rows]
    assert set(result.columns) <= set(rows[0])


def test_sweep_builds_on_meta():
    devices = []

    def factory(width):
        devices.append(torch.empty(1).device.type)
        return nn.Sequential(nn.Linear(8, width), nn.ReLU(), nn.Linear(width, 1))

    result = sweep(factory, {"width": [4, 8]}, lambda: (torch.randn(3, 8),), progress=False)
    assert devices == ["meta", "meta"]
    assert [r["n_params"] for r in result.rows] == [8 * 4 + 4 + 4 + 1, 8 * 8 + 8 + 8 + 1]
    assert [r["batch"] for r in result.rows] == [3, 3]


def test_pareto_fronts_by_hand():
    rows = [dict(step_time_s=1.0, n_params=10, flops=100), dict(step_time_s=2.0, n_params=20, flops=100),
            dict(step_time_s=2.0, n_params=15, flops=300), dict(step_time_s=3.0, n_params=5, flops=50)]
    _mark_fronts(rows)
    assert [r["pareto_params"] for r in rows] == [True, True, False, False]
    assert [r["pareto_flops"] for r in rows] == [True, False, True, False]
    result = SweepResult({"x": [0, 1, 2, 3]}, [dict(r, x=i) for i, r in enumerate(rows)], "h100")
    assert [r["x"] for r in result.front("flops")] == [0, 2]


def test_sweep_bad_grids():
    with pytest.raises(InputError, match="dict"):
        sweep(resnet_family, [("width", [8])], images)
    with pytest.raises(InputError, match="empty"):
        sweep(resnet_family, {"width": []}, images)
    with pytest.raises(InputError, match="taken by neither"):
        sweep(resnet_family, {"width": [8], "depth": [1], "colour": ["red"]}, images)
    with pytest.raises(InputError, match="needs \\['depth'\\]"):
        sweep(resnet_family, {"width": [8], "image": [32]}, images, progress=False)
    assert parse_grid(["width=64,96", "act=gelu", "p=0.5"]) == {"width": [64, 96], "act": ["gelu"], "p": [0.5]}
    with pytest.raises(InputError, match="name=v1"):
        parse_grid(["width"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_sweep_measure_needs_a_gpu():
    with pytest.raises(MeasureError, match="GPU"):
        sweep(resnet_family, {"width": [8], "depth": [1]}, lambda: images(32), measure=True)


@pytest.mark.gpu
def test_sweep_measures_on_the_gpu():
    result = sweep(resnet_family, {"width": [8, 16], "depth": [1]}, lambda: images(64, batch=8), measure=True,
                   progress=False)
    for r in result.rows:
        assert r["measured_s"] > 0 and r["measured_throughput"] == pytest.approx(8 / r["measured_s"])
    assert "measured ms" in result.table()
