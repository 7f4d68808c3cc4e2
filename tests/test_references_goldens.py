"""tests/goldens.py itself: accepting is refused in CI, a write says what it rewrote, cost figures
are masked out of golden text (and only they)."""
import warnings

import pytest

import goldens  # noqa: E402  (tests/goldens.py)


def test_accept_is_refused_when_ci_is_set(tmp_path, monkeypatch):
    monkeypatch.setenv("FXOPT_ACCEPT", "1")
    monkeypatch.setenv("CI", "true")
    path = tmp_path / "case.diff"
    path.write_text("old\n")
    with pytest.raises(pytest.fail.Exception, match="refused when CI is set"):
        goldens.check(path, "new\n")
    assert path.read_text() == "old\n"  # nothing written


@pytest.mark.parametrize("ci", ["", "0", "false"])
def test_accept_writes_and_reports_outside_ci(tmp_path, monkeypatch, capsys, ci):
    monkeypatch.setenv("FXOPT_ACCEPT", "1")
    monkeypatch.setenv("CI", ci)
    path = tmp_path / "sub" / "case.diff"
    with pytest.warns(goldens.GoldenRewritten, match="created"):
        goldens.check(path, "a\nb\n")
    assert path.read_text() == "a\nb\n"
    assert f"created {path}" in capsys.readouterr().out
    with pytest.warns(goldens.GoldenRewritten, match="rewrote") as w:
        goldens.check(path, "a\nc\n")
    out = capsys.readouterr().out
    assert f"rewrote {path}" in out and "-b" in out and "+c" in out  # the diff of what changed
    assert path.read_text() == "a\nc\n" and len(w) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", goldens.GoldenRewritten)
        goldens.check(path, "a\nc\n")  # unchanged: no write, no report
    assert capsys.readouterr().out == ""


def test_check_compares_without_accept(tmp_path, monkeypatch):
    monkeypatch.delenv("FXOPT_ACCEPT", raising=False)
    path = tmp_path / "case.diff"
    with pytest.raises(pytest.fail.Exception, match="missing"):
        goldens.check(path, "x\n")
    path.write_text("x\n")
    goldens.check(path, "x\n")
    with pytest.raises(pytest.fail.Exception, match=r"differs(.|\n)*-x(.|\n)*\+y"):
        goldens.check(path, "y\n")


def test_cost_figures_are_masked_only_in_the_decision_log():
    graph = "-div = aten.div.Tensor(x, 4.0)  # [2, 8] float32\n+mul = aten.mul.Tensor(x, 0.25)  # [2, 8] float32\n"
    log = ("relu: fuse: region r0 (add relu): 0.02 -> 0.01 MB, 16.0 -> 8.0 us as fxopt.add_relu.default "
           "(est. +8.0 us)\nconv: keep: grouped conv, CL est. 1.3x slower; 5 weight-sized kernels [64, 3, 7, 7]\n")
    masked = goldens.mask_costs(graph + goldens.DECISIONS + log)
    assert masked == graph + goldens.DECISIONS + (
        "relu: fuse: region r0 (add relu): # -> # MB, # -> # us as fxopt.add_relu.default (est. # us)\n"
        "conv: keep: grouped conv, CL est. #x slower; 5 weight-sized kernels [64, 3, 7, 7]\n")
    assert goldens.mask_costs(graph) == graph  # no decision log: untouched
