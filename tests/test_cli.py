"""The `fxopt` command line, run in-process through its main()."""
import json

import pytest

from fxopt.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_report_table_by_block(capsys):
    code, out, _ = run(capsys, "report", "driving-tiny", "--by", "block", "--depth", "1")
    assert code == 0
    assert "predicted step" in out and "backbone" in out and "bev_layers" in out


def test_report_json_schema(capsys):
    code, out, _ = run(capsys, "report", "resnet50", "--tiny", "--format", "json", "--dtype", "bf16")
    data = json.loads(out)
    assert code == 0 and data["schema"] == "fxopt.graph_report/1"
    assert data["totals"]["matrix_flops_fwd"] > 0 and data["unknown_ops"] == {}


def test_report_symbolic_and_markdown(capsys):
    code, out, _ = run(capsys, "report", "vit_b16-tiny", "--symbolic", "--by", "op")
    assert code == 0 and "batch" in out
    code, out, _ = run(capsys, "report", "convnext_t-tiny", "--format", "md", "--eval")
    assert code == 0 and out.count("|") > 20 and "forward" in out


def test_report_full_size_model_builds_on_meta(capsys):
    code, out, _ = run(capsys, "report", "resnet50", "--batch", "256", "--top", "3")
    assert code == 0 and "25.6 M" in out


def test_bad_inputs_exit_2_with_a_message(capsys):
    code, _, err = run(capsys, "report", "resnet5O")
    assert code == 2 and "resnet50" in err
    code, _, err = run(capsys, "report", "driving-tiny", "--hw", "tpu")
    assert code == 2 and "h100" in err
    code, _, err = run(capsys, "report", "driving-tiny", "--dtype", "int3")
    assert code == 2 and "bf16" in err


def test_models_lists_the_zoo(capsys):
    code, out, _ = run(capsys, "models")
    assert code == 0 and all(n in out for n in ("resnet50", "convnext_t", "vit_b16", "driving"))


def test_optimize_verifies_and_dumps(capsys, tmp_path):
    code, out, _ = run(capsys, "optimize", "driving-tiny", "--pipeline", "dce,normalize", "--dump-dir",
                       str(tmp_path))
    assert code == 0 and "final verification: ok" in out and "identity-dropout" in out
    assert {p.name for p in tmp_path.iterdir()} >= {"00_capture.txt", "01_dce.txt", "02_normalize.txt",
                                                    "02_normalize.diff"}


def test_diff_prints_each_pass(capsys):
    code, out, _ = run(capsys, "diff", "vit_b16-tiny", "--pipeline", "dce,normalize")
    assert code == 0
    assert "=== 01 dce: no change" in out and "=== 02 normalize: changed" in out
    assert "+permute" in out and "-transpose" in out


def test_optimize_unknown_pass(capsys):
    code, _, err = run(capsys, "optimize", "resnet50-tiny", "--pipeline", "dce,fuse-everything")
    assert code == 2 and "normalize" in err


def test_lint_command_and_report_lint_section(capsys):
    code, out, _ = run(capsys, "lint", "driving-tiny")
    assert code == 0 and "unfused-attention" in out
    code, out, _ = run(capsys, "report", "driving-tiny", "--lint", "5", "--format", "json")
    data = json.loads(out)
    assert code == 0 and data["lint"]["findings"]


def test_bench_calibrate_profile_commands_on_cpu(capsys, tmp_path):
    code, out, _ = run(capsys, "bench", "resnet50", "--tiny", "--batch", "4", "--variants", "eager-fp32", "fxopt",
                       "--steps", "2", "--warmup", "1", "--device", "cpu", "--format", "json")
    rows = {r["name"]: r for r in json.loads(out)["results"]} if code == 0 else {}
    assert code == 0 and set(rows) == {"eager-fp32", "fxopt"}
    assert all(r["status"] == "ok" and r["median_s"] > 0 for r in rows.values())
    profile_path = tmp_path / "cpu.json"
    code, out, _ = run(capsys, "calibrate", "--quick", "--device", "cpu", "--out", str(profile_path))
    assert code == 0 and profile_path.exists()
    code, out, _ = run(capsys, "profile", "resnet50", "--tiny", "--steps", "1", "--hw", str(profile_path))
    assert code == 0 and "spearman" in out.lower()
