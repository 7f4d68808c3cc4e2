"""Configuration is checked before anything runs: hardware names, pipelines, pass options (issue 14)."""
import pytest
import torch
from torch import nn

import fxopt
from fxopt.cli import main
from fxopt.cost_models.hardware import presets
from fxopt.errors import FxoptError, HardwareError
from fxopt.passes import Pass, PassManager, PassResult, PipelineError, available, get, register, unregister
from fxopt.passes.base import Option, check_options, defaults, options_help, schema


class Counted(nn.Module):
    """Counts forward calls of every instance and copy (a class attribute: optimize runs a copy), so
    a check that runs "before capture" leaves the count at 0."""

    calls = [0]

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        Counted.calls[0] += 1
        return self.fc(x).relu()


def _refused_before_capture(error, match, **kwargs):
    model = Counted()
    Counted.calls[0] = 0
    with pytest.raises(error, match=match):
        fxopt.optimize(model, torch.randn(2, 4), **kwargs)
    assert Counted.calls[0] == 0  # refused before capture: neither the model nor a copy of it ran


def test_the_counter_sees_a_capture():
    Counted.calls[0] = 0
    fxopt.optimize(Counted(), torch.randn(2, 4), pipeline="dce", verify=False)
    assert Counted.calls[0] > 0  # so 0 in the tests below means nothing was captured


def test_unknown_hardware_is_an_error_before_capture():
    # today's code warned "analyze failed" and optimized with every predicted time None
    _refused_before_capture(HardwareError, r"unknown hardware preset 'h999'.*h100", hardware="h999")


def test_unknown_hardware_in_the_pass_manager():
    with pytest.raises(HardwareError, match="h999"):
        PassManager("dce", hardware="h999")


def test_cli_unknown_hardware_exits_2_listing_the_presets(capsys):
    code = main(["optimize", "resnet50-tiny", "--hw", "h999", "--pipeline", "dce"])
    err = capsys.readouterr().err
    assert code == 2 and "h999" in err
    assert all(name in err for name in presets())


@pytest.mark.parametrize("pipeline, match", [
    ("epilogue{bias=maybe}", r"option 'bias' of pass 'epilogue' is 'maybe'; it must be true or false"),
    ("fuse{fallback=bogus}", r"option 'fallback' of pass 'fuse' is 'bogus'; it must be one of unfused, reference"),
    ("fuse{max_ops=abc}", r"option 'max_ops' of pass 'fuse' is 'abc'; it must be an integer"),
    ("fuse{max_ops=0}", r"option 'max_ops' of pass 'fuse' is 0; it must be an integer, at least 1"),
    ("sdpa{min_gain_us=fast}", r"option 'min_gain_us' of pass 'sdpa' is 'fast'; it must be a number"),
    ("channels-last{force=1}", r"option 'force' of pass 'channels-last' is 1; it must be true or false"),
    ("normalize{rules=nope;}", r"option 'rules' of pass 'normalize'.*noop-view"),
    ("dce{colour=red}", r"pass 'dce' has no option 'colour'; log_kept=true \(true or false: log a decision"),
    (None, r"pipeline=None: give a pipeline string"),
    ("dce,fuse-everything", r"unknown pass 'fuse-everything'"),
])
def test_bad_pipelines_are_refused_before_capture(pipeline, match):
    _refused_before_capture(PipelineError, match, pipeline=pipeline)


def test_every_built_in_option_is_declared_with_a_type_and_doc():
    for name in available():
        if name.startswith("test-"):
            continue
        for key, opt in schema(get(name)).items():
            assert isinstance(get(name).options[key], Option), f"{name}.{key} is not an Option"
            assert opt.doc and "\n" not in opt.doc, f"{name}.{key} needs a one-line doc"
            assert opt.check(opt.default, f"{name}.{key}") == opt.default  # the default is allowed


def test_option_values_are_typed():
    number = Option(float, 0.0, "x", minimum=0)
    assert number.check(3, "x") == 3.0 and isinstance(number.check(3, "x"), float)
    with pytest.raises(PipelineError, match="at least 0"):
        number.check(-1, "x")
    with pytest.raises(PipelineError, match="a number"):
        number.check(True, "x")  # a bool is not a number here
    with pytest.raises(PipelineError, match="an integer"):
        Option(int, 1).check(True, "n")
    words = Option(list, "all", choices=("all", "a", "b"))
    assert words.check("a", "w") == "a" and words.check(["a", "b"], "w") == ["a", "b"]
    with pytest.raises(PipelineError, match="one of all, a, b"):
        words.check(["a", "c"], "w")
    dtype = get("mixed-precision").options["dtype"]
    assert dtype.check(torch.float16, "dtype") is torch.float16  # programmatic values of a declared type


def test_mixed_precision_options_checked_from_a_dict_too():
    with pytest.raises(PipelineError, match="'reduce_fp32_min' of pass 'mixed-precision' is 0"):
        PassManager([("mixed-precision", {"reduce_fp32_min": 0})])
    full = check_options(get("mixed-precision"), {"dtype": "fp16"})
    assert full == {**defaults(get("mixed-precision")), "dtype": "fp16"}


def test_bare_defaults_are_shorthand_for_options():
    class Shorthand(Pass):
        name, summary = "test-shorthand", "test only: options declared by bare defaults"
        options = {"factor": 2.0, "on": True}

        def run(self, gm, ctx):
            return PassResult(gm, False)

    register(Shorthand)
    try:
        assert schema(Shorthand)["factor"] == Option(float, 2.0)
        with pytest.raises(PipelineError, match="'on' of pass 'test-shorthand' is 'yes'; it must be true or false"):
            PassManager("test-shorthand{on=yes}")
        assert PassManager("test-shorthand{factor=3}").passes[0][1] == {"factor": 3.0, "on": True}
        assert "factor=2.0" in options_help(Shorthand)
    finally:
        unregister("test-shorthand")


def test_a_malformed_declaration_fails_at_registration():
    class Bad(Pass):
        name, summary = "test-bad-decl", "test only"
        options = {"callback": print}

    with pytest.raises(PipelineError, match="declare it as Option"):
        register(Bad)
    assert "test-bad-decl" not in available()


def test_errors_are_fxopt_errors():
    assert issubclass(PipelineError, FxoptError) and issubclass(HardwareError, FxoptError)
