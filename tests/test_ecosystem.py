"""fxopt inside the PyTorch ecosystem: the torch.compile backend, forward's signature, packaging."""
import copy
import importlib.metadata
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import fxopt
from fxopt import backend as fb
from fxopt._torch_private import PRIVATE_APIS, resolve as resolve_private

ROOT = Path(__file__).resolve().parents[1]
# Passes that keep float32 numerics: "same outputs and gradients as eager" is then a tight check.
# (The default pipeline may add mixed precision, whose error the verifier judges instead.)
FP32_PIPELINE = "dce,normalize,sdpa,fold-bn,epilogue,channels-last,dce"


class ConvBreak(nn.Module):
    """conv-BN-ReLU, a graph break, then a linear head: dynamo hands the backend two regions."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x))).mean((2, 3))
        torch._dynamo.graph_break()
        return self.head(y).log_softmax(-1)


def _counting_backend(regions, **options):
    def compiler(gm, example_inputs, **kwargs):
        kwargs.setdefault("options", options)
        region = fb.fxopt_backend(gm, example_inputs, **kwargs)
        regions.append(region)
        return region
    return compiler


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_backend_is_registered_by_name_and_entry_point():
    assert "fxopt" in torch._dynamo.list_backends()
    assert torch._dynamo.lookup_backend("fxopt") is fb.fxopt_backend
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'\[project\.entry-points\.torch_dynamo_backends\]\s*\nfxopt = "fxopt\.backend:fxopt_backend"',
                     pyproject)


def test_backend_found_without_importing_fxopt_first():
    """Dynamo's own entry-point lookup, in a fresh interpreter that never imported fxopt (run outside
    the source tree: a stale fxopt.egg-info there would shadow the installed metadata)."""
    code = ("import importlib.metadata as md, sys, torch\n"
            "if 'fxopt' not in md.entry_points(group='torch_dynamo_backends').names: sys.exit(3)\n"
            "assert 'fxopt' not in sys.modules\n"
            "f = torch.compile(lambda x: (x * 2).sin(), backend='fxopt', options={'verify': False})\n"
            "x = torch.randn(5); assert torch.equal(f(x), (x * 2).sin()); print('fxopt' in sys.modules)")
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, cwd="/")
    if out.returncode == 3:
        pytest.skip("this install predates the entry point: pip install -e . again")
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "True"


def test_training_through_graph_break_matches_eager():
    torch.manual_seed(0)
    model = ConvBreak()
    eager = copy.deepcopy(model)
    regions = []
    compiled = torch.compile(model, backend=_counting_backend(regions, verify=True, pipeline=FP32_PIPELINE))
    opt_c = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.1, momentum=0.9)
    for step in range(2):
        x = torch.randn(4, 3, 10, 10, generator=torch.Generator().manual_seed(step))
        out_c, out_e = compiled(x), eager(x)
        torch.testing.assert_close(out_c, out_e)
        out_c.square().sum().backward()
        out_e.square().sum().backward()
        gc, ge = _grads(model), _grads(eager)
        assert gc.keys() == ge.keys() == {n for n, _ in eager.named_parameters()}
        for name in ge:
            torch.testing.assert_close(gc[name], ge[name], msg=name)
        opt_c.step(), opt_e.step(), opt_c.zero_grad(), opt_e.zero_grad()
    assert len(regions) == 2  # one per side of the graph break
    # the user's own tensors trained and tracked statistics (not a private copy)
    for name, tensor in eager.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], tensor, msg=name)
    assert int(model.bn.num_batches_tracked) == 2
    assert all(r.report.verification for r in regions)  # each region verified against float64
    assert {n for r in regions for n, _ in r.optimized.named_parameters()} == {
        "conv.weight", "conv.bias", "bn.weight", "bn.bias", "head.weight", "head.bias"}


def test_default_options_verify_every_region():
    """No options: the default pipeline (it may choose bf16) and verification, region by region."""
    torch.manual_seed(2)
    model = ConvBreak()
    eager = copy.deepcopy(model)
    regions = []
    compiled = torch.compile(model, backend=_counting_backend(regions))
    x = torch.randn(4, 3, 10, 10)
    out = compiled(x)
    out.sum().backward()
    assert len(regions) == 2 and all(r.report.verification for r in regions)
    torch.testing.assert_close(out, eager(x), rtol=2e-2, atol=2e-2)  # bf16-level agreement at worst


def test_eval_under_no_grad_and_a_new_shape():
    torch.manual_seed(1)
    model = ConvBreak().eval()
    compiled = torch.compile(model, backend="fxopt", options={"pipeline": "dce,normalize,fold-bn"})
    with torch.no_grad():
        for batch in (2, 3):  # the second shape is captured again (dynamo may mark it dynamic)
            x = torch.randn(batch, 3, 9, 9)
            torch.testing.assert_close(compiled(x), model(x))


def test_hf_bert_outputs_and_gradients_match_eager():
    from fxopt.workloads.models import resolve
    torch.manual_seed(0)
    spec = resolve("hf:BertForSequenceClassification-tiny")
    model = spec.model
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0  # dropout draws differ between eager and a captured graph
    eager = copy.deepcopy(model)
    regions = []
    compiled = torch.compile(model, backend=_counting_backend(regions, verify=False, pipeline=FP32_PIPELINE))
    labels = torch.tensor([0, 1])
    out_c = compiled(**spec.inputs, labels=labels)
    out_e = eager(**spec.inputs, labels=labels)
    torch.testing.assert_close(out_c.logits, out_e.logits)
    torch.testing.assert_close(out_c.loss, out_e.loss)
    out_c.loss.backward()
    out_e.loss.backward()
    gc, ge = _grads(model), _grads(eager)
    assert gc.keys() == ge.keys() and len(ge) > 20
    for name in ge:
        torch.testing.assert_close(gc[name], ge[name], msg=name)
    assert regions and all(r.optimized is not None for r in regions)


def test_options_map_to_optimize_and_unknown_ones_are_refused():
    assert fb.optimize_kwargs({"pipeline": "dce", "hw": "h200", "verify": False}) == {
        "pipeline": "dce", "hardware": "h200", "verify": False}
    with pytest.raises(fb.BackendOptionsError, match="unknown fxopt backend option.*pipline.*known"):
        fb.optimize_kwargs({"pipline": "dce"})
    with pytest.raises(fb.BackendOptionsError, match="mode"):
        fb.optimize_kwargs({}, mode="max-autotune")
    assert issubclass(fb.BackendOptionsError, fxopt.FxoptError)
    compiled = torch.compile(nn.Linear(2, 2), backend="fxopt", options={"pipline": "dce"})
    with pytest.raises(Exception, match="unknown fxopt backend option"):
        compiled(torch.randn(1, 2))


@pytest.mark.parametrize("source,name", [
    ("L['self']._modules['bn']._buffers['running_mean']", "bn.running_mean"),
    ("L['self']._modules['layer']._modules['0']._parameters['weight']", "layer.0.weight"),
    ("L['s']._modules['bn'].eps", "bn.eps"),
    ("L['x']", None),
    ("L['x'].size()[0]", None),
    ("G['torch'].pi", None),
])
def test_state_names_from_dynamo_sources(source, name):
    assert fb._state_name(source) == name


# ---- forward's signature ------------------------------------------------------------------------
def test_optimized_forward_keeps_the_model_signature():
    class Two(nn.Module):
        def forward(self, image, mask=None, *, scale: float = 1.0):
            return image * scale

    opt = fxopt.optimize(Two(), verify=False)
    assert inspect.signature(opt.forward) == inspect.signature(Two().forward)
    assert list(inspect.signature(opt.forward).parameters) == ["image", "mask", "scale"]
    x = torch.randn(3)
    torch.testing.assert_close(opt(x), x)


def test_trainer_style_loop_filters_columns_by_signature():
    """What HF Trainer's _remove_unused_columns does: keep the dataset columns forward names."""
    from fxopt.workloads.models import resolve
    torch.manual_seed(0)
    spec = resolve("hf:BertForSequenceClassification-tiny")
    model = spec.model
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0  # the eager twin then gives the same losses
    eager = copy.deepcopy(model)
    opt = fxopt.optimize(model, verify=False, pipeline=FP32_PIPELINE)
    ids = spec.inputs["input_ids"]
    dataset = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([1, 0]),
               "idx": torch.arange(2), "sentence": ["a b", "c d"]}  # columns forward does not take
    keep = set(inspect.signature(opt.forward).parameters)
    batch = {k: v for k, v in dataset.items() if k in keep}
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    sgd_o = torch.optim.SGD(opt.parameters(), lr=0.5)
    sgd_e = torch.optim.SGD(eager.parameters(), lr=0.5)
    losses = []
    for _ in range(3):
        lo, le = opt(**batch).loss, eager(**batch).loss
        torch.testing.assert_close(lo, le)
        lo.backward(), le.backward()
        sgd_o.step(), sgd_e.step(), sgd_o.zero_grad(), sgd_e.zero_grad()
        losses.append(lo.item())
    assert losses[-1] < losses[0]  # it trains


# ---- packaging ------------------------------------------------------------------------------------
def test_every_private_torch_api_is_listed_and_exists():
    """A torch upgrade is one place: each private name used in fxopt is in _torch_private.PRIVATE_APIS."""
    for name in PRIVATE_APIS:
        assert resolve_private(name) is not None, name
    used = set()
    pattern = re.compile(r"torch(?:\.utils)?\._[a-z][\w]*(?:\.[A-Za-z_]\w*)*")
    for folder in ("fxopt", "passes", "cost_models"):
        for path in (ROOT / folder).rglob("*.py"):
            if path.name == "_torch_private.py":
                continue
            for line in path.read_text().splitlines():
                code = line.split("#")[0]
                used |= {m.group(0) for m in pattern.finditer(code) if not m.group(0).startswith("torch._C")}
    missing = {u for u in used if not any(u == k or u.startswith(k + ".") or k.startswith(u + ".")
                                          for k in PRIVATE_APIS)}
    assert not missing, f"private torch APIs not listed in fxopt/_torch_private.py: {sorted(missing)}"


def test_version_has_one_source():
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in pyproject and 'attr = "fxopt.__version__"' in pyproject
    assert not re.search(r'^version\s*=\s*"', pyproject, re.M)
    assert importlib.metadata.version("fxopt") == fxopt.__version__
    assert re.search(r'"torch>=2\.11,<2\.\d+"', pyproject)
    assert (ROOT / "fxopt" / "py.typed").exists()


# ---- command line conventions ---------------------------------------------------------------------
from fxopt.measure.bench import SPREAD_LIMIT, BenchResult, VariantResult  # noqa: E402
from fxopt.cli import main  # noqa: E402


def _cli(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_python_m_fxopt_and_version():
    out = subprocess.run([sys.executable, "-m", "fxopt", "--version"], capture_output=True, text=True)
    assert out.returncode == 0
    assert out.stdout.split()[:2] == ["fxopt", fxopt.__version__]
    assert f"torch {torch.__version__}" in out.stdout


def test_models_json_lists_the_zoo_and_spec_forms(capsys):
    import json
    from fxopt import zoo
    code, out, _ = _cli(capsys, "models", "--format", "json")
    data = json.loads(out)
    assert code == 0 and data["schema"] == "fxopt.models/1"
    assert [m["name"] for m in data["models"]] == zoo.names()
    assert {f["form"].split(":")[0] for f in data["spec_forms"]} >= {"timm", "torchvision"}


def test_optimize_json_and_quiet_decisions(capsys):
    import json
    argv = ("optimize", "driving-tiny", "--pipeline", "dce,normalize", "--no-verify")
    code, out, _ = _cli(capsys, *argv, "--format", "json")
    data = json.loads(out)
    assert code == 0 and data["schema"] == "fxopt.optimize/1"
    assert [p["name"] for p in data["passes"]] == ["dce", "normalize"]
    assert sum(p["decisions"] for p in data["passes"]) == len(data["decisions"]) > 0
    for d in data["decisions"]:  # "no effect" is exactly what prints as +0.0 us (or no estimate)
        est = d["est_gain_s"]
        assert d["no_effect"] == (est is None or f"{abs(est) * 1e6:.1f}" == "0.0")
    silent = [d for d in data["decisions"] if d["no_effect"]]
    assert silent, "normalize's transpose->permute rewrites have no estimated effect"

    code, text, _ = _cli(capsys, *argv)
    lines = text.splitlines()
    summary = [ln for ln in lines if "decisions with no estimated effect" in ln]
    assert code == 0 and len(summary) == 1 and summary[0].startswith(f"{len(silent)} decisions")
    assert "transpose-to-permute" in summary[0]
    assert not any(ln.strip().startswith("- ") and "transpose-to-permute" in ln for ln in lines)
    assert lines.index(next(ln for ln in lines if ln.startswith("predicted step"))) < lines.index(summary[0])

    code, verbose, _ = _cli(capsys, *argv, "-v")
    listed = [ln for ln in verbose.splitlines() if ln.strip().startswith("- ")]
    assert sum("transpose-to-permute" in ln for ln in listed) == sum(
        d["reason"].startswith("transpose-to-permute") for d in silent)


def test_diff_json(capsys):
    import json
    code, out, _ = _cli(capsys, "diff", "driving-tiny", "--pipeline", "dce,normalize", "--format", "json")
    data = json.loads(out)
    assert code == 0 and data["schema"] == "fxopt.diff/1"
    normalize = data["passes"][1]
    assert normalize["name"] == "normalize" and normalize["status"] == "changed"
    assert "+" in normalize["diff"] and "permute" in normalize["diff"]


def test_broken_pipe_is_quiet():
    proc = subprocess.Popen([sys.executable, "-m", "fxopt", "models"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader (| head) is gone before fxopt writes
    err = proc.stderr.read().decode()
    code = proc.wait()
    assert "Traceback" not in err and "BrokenPipe" not in err
    assert code in (0, 141)


def test_verbosity_sets_fxopt_logging(capsys):
    import logging
    _cli(capsys, "models", "-v")
    assert logging.getLogger("fxopt").level == logging.INFO
    _cli(capsys, "-q", "models")
    assert logging.getLogger("fxopt").level == logging.ERROR
    _cli(capsys, "models")
    assert logging.getLogger("fxopt").level == logging.WARNING


def test_input_knobs_reach_the_model(capsys):
    import json
    code, out, _ = _cli(capsys, "report", "hf:BertModel-tiny", "--seq-len", "24", "--batch", "3", "--format", "json")
    assert code == 0 and "[3, 24]" in json.loads(out)["inputs"]
    code, out, _ = _cli(capsys, "report", "vit_b16-tiny", "--image-size", "64", "--format", "json")
    data = json.loads(out)
    assert code == 0 and "64, 64]" in data["inputs"]
    # ViT's position embeddings follow the image: (64/8)^2 + 1 tokens of width 32, by hand
    from fxopt.workloads.models import resolve
    spec = resolve("vit_b16-tiny", image_size=64)
    assert spec.model.pos_embed.shape == (1, (64 // 8) ** 2 + 1, 32)
    code, _, err = _cli(capsys, "report", "driving-tiny", "--seq-len", "8")
    assert code == 2 and "--image-size" in err


def test_missing_vision_library_says_what_to_install(capsys):
    import importlib.util
    for lib in ("timm", "torchvision"):
        if importlib.util.find_spec(lib) is not None:
            continue
        code, _, err = _cli(capsys, "lint", f"{lib}:resnet18")
        assert code == 2 and err.startswith("fxopt: error:") and f"pip install {lib}" in err


def test_bench_marks_ratios_of_noisy_runs():
    def variant(name, p10, median, p90):
        return VariantResult(name, name, steps=10, median_s=median, p10_s=p10, p90_s=p90)
    steady = variant("eager-fp32", 0.100, 0.101, 0.104)   # spread 4 %
    noisy = variant("fxopt", 0.050, 0.060, 0.080)         # spread 60 %
    assert steady.spread == pytest.approx(0.104 / 0.100 - 1) and not steady.noisy
    assert noisy.spread == pytest.approx(0.6) and noisy.noisy and SPREAD_LIMIT < 0.6
    res = BenchResult("m", "cpu", 2, 10, 1, None, None, torch.__version__, "today", [steady, noisy])
    rows = {ln.split()[0]: ln for ln in res.table().splitlines()[2:] if ln.strip()}
    assert f"{0.101 / 0.060:.2f}x ?" in rows["fxopt"] and "?" not in rows["eager-fp32"].split("x")[0]
    assert "fxopt 60 %" in res.table() and "not to be trusted" in res.table()
    assert [r["noisy"] for r in res.to_dict()["results"]] == [False, True]


def test_progress_only_on_a_terminal(monkeypatch):
    from fxopt import progress as prog
    items = [1, 2, 3]
    monkeypatch.delenv("FXOPT_PROGRESS", raising=False)
    assert prog.progress(items) is items  # pytest's captured stderr is not a TTY
    monkeypatch.setenv("FXOPT_PROGRESS", "1")
    bar = prog.progress(items, desc="x")
    assert bar is not items and list(bar) == items
    monkeypatch.setenv("FXOPT_PROGRESS", "0")
    assert prog.progress(items) is items


# ---- per-module tree ------------------------------------------------------------------------------
def test_module_tree_adds_up_and_counts_parameters():
    from fxopt import zoo
    from fxopt.tree import SELF, module_tree
    model = zoo.build("driving", tiny=True)
    report = fxopt.analyze(model, zoo.example_inputs("driving", 2, tiny=True))
    rows = module_tree(report, model, depth=2)
    top = [r for r in rows if r["depth"] == 1]
    assert sum(r["time_s"] for r in top) == pytest.approx(report.totals["step_time_s"], rel=1e-9)
    assert sum(r["fwd_flops"] + r["bwd_flops"] for r in top) + 0 == pytest.approx(
        sum(report.totals[k] for k in ("matrix_flops_fwd", "matrix_flops_bwd", "other_flops_fwd",
                                       "other_flops_bwd", "optimizer_flops")), rel=1e-9)
    for i, parent in enumerate(rows):
        if parent["depth"] != 1:
            continue
        kids = []
        for r in rows[i + 1:]:
            if r["depth"] == 1:
                break
            kids.append(r)
        if kids:  # children (and the module's own ops) add up to the module
            assert sum(k["time_s"] for k in kids) == pytest.approx(parent["time_s"], rel=1e-9)
            assert sum(k["fwd_flops"] for k in kids) == parent["fwd_flops"]
        if not parent["block"].startswith("("):
            sub = model.get_submodule(parent["block"])
            assert parent["params"] == sum(p.numel() for p in sub.parameters())
            for k in kids:
                if k["block"].endswith(SELF):
                    assert k["params"] == sum(p.numel() for p in sub.parameters(recurse=False))
                else:
                    assert k["params"] == sum(p.numel() for p in model.get_submodule(k["block"]).parameters())
    assert {r["block"] for r in top} == {r["block"] for r in report.rows("block", 1)}


def test_report_by_tree_cli(capsys):
    code, out, _ = _cli(capsys, "report", "convnext_t-tiny", "--by", "tree", "--depth", "2")
    assert code == 0 and "│ 0" in out and "params M" in out


def test_ablate_format_json_equals_its_json_file(capsys, tmp_path):
    import json
    path = tmp_path / "a.json"
    code, out, err = _cli(capsys, "ablate", "vit_b16", "--tiny", "--variants", "eager", "--steps", "3",
                          "--seeds", "1", "--batch", "4", "--format", "json", "--json", str(path))
    doc = json.loads(out)  # stdout is one JSON document; notes went to stderr
    assert code == 0 and doc["schema"] == "fxopt.ablation/1" and "result written to" in err
    assert json.loads(path.read_text())["variants"][0]["name"] == doc["variants"][0]["name"] == "eager"


@pytest.mark.gpu
def test_backend_trains_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (run on the GPU machine)")
    torch.manual_seed(0)
    model = ConvBreak().cuda()
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, backend="fxopt", options={"pipeline": FP32_PIPELINE})
    x = torch.randn(8, 3, 16, 16, device="cuda")
    out_c, out_e = compiled(x), eager(x)
    # cuDNN convs run in TF32 by default (10-bit mantissa) and channels-last picks other algorithms
    torch.testing.assert_close(out_c, out_e, rtol=5e-3, atol=5e-3)
    out_c.sum().backward()
    out_e.sum().backward()
    for name, grad in _grads(eager).items():
        torch.testing.assert_close(_grads(model)[name], grad, rtol=5e-3, atol=5e-3, msg=name)
