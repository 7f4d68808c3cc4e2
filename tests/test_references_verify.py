"""fxopt.verify's tolerance rule against hand-computed bounds.

The rule (fxopt/verify.py): e_cand <= multiple * e_ref + floor * max(1, max|ref|), where the floor
follows the coarser of the reference tensor's and the candidate tensor's dtype (plus the
``reference_precision``'s). Values here are exactly representable in every dtype used, so e_ref is
0 unless a test sets it, and each bound is computed by hand from the documented floors.
"""
import math

import pytest
import torch

from fxopt.verify import check_tensor

FLOOR = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
VALUES = [1.0, -2.0, 0.5, 0.0]          # exact in bf16, fp16, fp32: e_ref = 0; max|ref| = 2


def _t(dtype, values=VALUES):
    return torch.tensor(values, dtype=dtype)


@pytest.mark.parametrize("ref_dtype, cand_dtype, floor", [
    (torch.float32, torch.float32, 1e-5),
    (torch.float32, torch.bfloat16, 1e-2),   # the candidate's coarser dtype wins
    (torch.bfloat16, torch.float32, 1e-2),   # the reference's coarser dtype wins
    (torch.float32, torch.float16, 1e-3),
    (torch.float16, torch.bfloat16, 1e-2),
    (torch.float64, torch.float32, 1e-5),
    (torch.float64, torch.float64, 1e-12),
])
def test_floor_is_the_coarser_dtypes(ref_dtype, cand_dtype, floor):
    ref64 = _t(torch.float64)
    c = check_tensor("t", "output", ref64, _t(ref_dtype), _t(cand_dtype))
    assert c.ok and c.ref_error == 0 and c.cand_error == 0
    assert c.allowed == pytest.approx(floor * 2.0, rel=1e-12)  # max(1, max|ref|) = 2


def test_a_bf16_sized_error_passes_only_when_a_side_is_bf16():
    ref64 = _t(torch.float64)
    off = ref64 + torch.tensor([0.0, 0.0, 0.0, 0.015], dtype=torch.float64)  # 0.015 <= 1e-2 * 2
    assert check_tensor("t", "output", ref64, _t(torch.float32), off.bfloat16()).ok
    assert not check_tensor("t", "output", ref64, _t(torch.float32), off.float()).ok


def test_reference_precision_adds_its_floor():
    ref64 = _t(torch.float64)
    c = check_tensor("t", "output", ref64, _t(torch.float32), _t(torch.float32), reference_precision="bf16")
    assert c.allowed == pytest.approx(1e-2 * 2.0)
    c = check_tensor("t", "output", ref64, _t(torch.float32), _t(torch.float32), reference_precision="fp16")
    assert c.allowed == pytest.approx(1e-3 * 2.0)


def test_multiple_of_the_references_own_error():
    ref64 = _t(torch.float64)
    ref = _t(torch.float32, [1.0, -2.0, 0.5, 0.001])   # e_ref = 0.001 (and fp32 rounding of 0.001)
    e_ref = abs(float(torch.tensor(0.001, dtype=torch.float32)) - 0.0)
    c = check_tensor("t", "output", ref64, ref, ref)
    assert c.ref_error == pytest.approx(e_ref, rel=1e-12)
    assert c.allowed == pytest.approx(3.0 * e_ref + 1e-5 * 2.0, rel=1e-12)
    c = check_tensor("t", "output", ref64, ref, ref, multiple=10)
    assert c.allowed == pytest.approx(10.0 * e_ref + 1e-5 * 2.0, rel=1e-12)
    c = check_tensor("t", "output", ref64, ref, _t(torch.float32), multiple=0)
    assert c.allowed == pytest.approx(1e-5 * 2.0)


def test_scale_is_at_least_one():
    small = torch.tensor([0.25, -0.125], dtype=torch.float64)
    c = check_tensor("t", "output", small, small.float(), small.float())
    assert c.allowed == pytest.approx(1e-5 * 1.0)
    big = torch.tensor([8.0, -64.0], dtype=torch.float64)
    c = check_tensor("t", "output", big, big.float(), big.float())
    assert c.allowed == pytest.approx(1e-5 * 64.0)


def test_floor_overrides():
    ref64 = _t(torch.float64)
    c = check_tensor("t", "output", ref64, _t(torch.float32), _t(torch.float32), floor=0.5)
    assert c.allowed == pytest.approx(0.5 * 2.0)
    c = check_tensor("t", "output", ref64, _t(torch.float32), _t(torch.bfloat16), floor={torch.float32: 1e-3})
    assert c.allowed == pytest.approx(1e-2 * 2.0)   # bf16's default entry is still the coarser
    c = check_tensor("t", "output", ref64, _t(torch.float32), _t(torch.float32), floor={torch.float32: 1e-3})
    assert c.allowed == pytest.approx(1e-3 * 2.0)


def test_integers_are_exact():
    r = torch.tensor([3, 4, 5])
    exact = check_tensor("t", "buffer", r.double(), r, r)
    assert exact.allowed == 0 and exact.ratio == 0.0          # nothing allowed, nothing off
    off = check_tensor("t", "buffer", r.double(), r, r + torch.tensor([0, 0, 1]))
    assert not off.ok and off.ratio == math.inf
    c = check_tensor("t", "output", _t(torch.float64), _t(torch.float32), _t(torch.float32, [1.0, -2.0, 0.5, 1e-5]))
    assert c.ratio == pytest.approx(1e-5 / (1e-5 * 2.0), rel=1e-3)   # cand_error / allowed


def test_non_finite_candidate_always_fails():
    ref64 = _t(torch.float64)
    nan = _t(torch.float32, [1.0, -2.0, math.nan, 0.0])
    c = check_tensor("t", "output", ref64, _t(torch.float32), nan, floor=1e9)
    assert not c.ok and c.cand_error == math.inf
    inf = torch.tensor([math.inf, 1.0], dtype=torch.float64)
    assert check_tensor("t", "output", inf, inf.float(), inf.float()).ok
    assert not check_tensor("t", "output", inf, inf.float(), torch.tensor([-math.inf, 1.0])).ok


class _ConstMatmul(torch.nn.Module):
    """A constant matrix built in forward: export lifts it to a plain tensor attribute of the graph."""

    def forward(self, x):
        return x @ torch.tensor([[1.0, 2.0], [3.0, 4.0]]) + 0.1


def test_graph_constants_are_promoted_in_the_float64_copy():
    """The float64 reference of a captured graph with a lifted fp32 constant runs in float64 (an fp32
    constant in an fp64 matmul would not run, and the reference would fall back to fp32). Export
    registers the constant as a buffer, so ``.double()`` promotes it; verify's own promotion of
    unregistered tensor attributes is not reached here."""
    import fxopt
    from fxopt.verify import verify
    x = torch.randn(3, 2, generator=torch.Generator().manual_seed(0))
    gm = fxopt.capture(_ConstMatmul(), x).graph_module
    assert any(isinstance(v, torch.Tensor) and not isinstance(v, torch.nn.Parameter) and v.dtype == torch.float32
               for v in vars(gm).values()), "no plain tensor constant captured: the test needs one"
    import copy
    res = verify(gm, copy.deepcopy(gm), x, training=False)
    assert res.ok and res.reference == "float64", res.table()


def test_table_limit_and_verdict_name_the_precision():
    import fxopt
    from fxopt.verify import verify
    x = torch.randn(3, 2, generator=torch.Generator().manual_seed(0))
    model = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    res = verify(model, fxopt.capture(model, x).graph_module, x)
    assert len(res.checks) > 3
    rows = lambda text: [l for l in text.splitlines() if l.startswith(("ok ", "FAIL "))]  # noqa: E731
    assert len(rows(res.table(limit=2))) == 2 and len(rows(res.table())) == len(res.checks)
    assert "judged at" not in res.verdict()
    res16 = verify(model, fxopt.capture(model, x).graph_module, x, reference_precision="bf16")
    assert "(judged at bfloat16)" in res16.verdict()


def test_complex_tensors_use_the_complex_floor_and_modulus():
    """complex64 has float32's floor (1e-5), complex128 float64's; the scale is max |z| (modulus)."""
    ref64 = torch.tensor([3 + 4j, 0.5j], dtype=torch.complex128)        # max |z| = 5
    c = check_tensor("t", "output", ref64, ref64.to(torch.complex64), ref64.to(torch.complex64))
    assert c.ok and c.allowed == pytest.approx(1e-5 * 5.0, rel=1e-12)
    off = ref64 + torch.tensor([0, 3e-5 + 4e-5j], dtype=torch.complex128)  # |error| = 5e-5 = allowed
    assert check_tensor("t", "output", ref64, ref64.to(torch.complex64), off).cand_error == pytest.approx(5e-5)
    c = check_tensor("t", "output", ref64, ref64, ref64)
    assert c.allowed == pytest.approx(1e-12 * 5.0, rel=1e-12)


@pytest.mark.skipif(not hasattr(torch, "float8_e4m3fn"), reason="no float8 in this torch")
def test_float8_floor():
    ref64 = _t(torch.float64)
    c = check_tensor("t", "output", ref64, _t(torch.float32), _t(torch.float32).to(torch.float8_e4m3fn))
    assert c.ok and c.allowed == pytest.approx(1e-1 * 2.0)


def test_integer_and_bool_tensors_stay_exact_under_a_reference_precision():
    """reference_precision adds its floor to floating tensors only: counters stay exact."""
    r = torch.tensor([3, 4, 5])
    c = check_tensor("t", "buffer", r, r, r, reference_precision="bf16")   # .double() keeps int buffers int
    assert c.allowed == 0 and c.ok
    assert not check_tensor("t", "buffer", r, r, r + 1, reference_precision="bf16").ok
    assert check_tensor("t", "buffer", r.double(), r.float(), r.float(), reference_precision="bf16").allowed == \
        pytest.approx(1e-2 * 5.0)   # a floating one gets the bf16 floor
    b = torch.tensor([True, False])
    assert check_tensor("t", "output", b, b, b).allowed == 0
    assert not check_tensor("t", "output", b, b, ~b).ok


def test_floor_dict_entry_for_the_candidates_dtype():
    ref64 = _t(torch.float64)
    c = check_tensor("t", "output", ref64, _t(torch.float32), _t(torch.bfloat16), floor={torch.bfloat16: 0.25})
    assert c.allowed == pytest.approx(0.25 * 2.0)
    with pytest.raises(Exception, match="floor dict keys must be torch dtypes"):
        check_tensor("t", "output", ref64, ref64, ref64, floor={"float32": 1e-3})
