"""Tests for fxopt.models: resolving MODEL spec strings into (model, example inputs)."""

import textwrap

import pytest
import torch

from fxopt import models, zoo
from fxopt.errors import FxoptError, ModelSpecError


def _run(spec: models.ModelSpec):
    inputs = spec.inputs
    return spec.model(**inputs) if isinstance(inputs, dict) else spec.model(*inputs)


# ----------------------------------------------------------------------------------
# Zoo names
# ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", zoo.names())
def test_zoo_tiny_suffix(name):
    spec = models.resolve(f"{name}-tiny", batch=3)
    assert spec.name == f"{name}-tiny"
    assert spec.model.training
    assert isinstance(spec.inputs, tuple) and len(spec.inputs) == 1
    ref = zoo.example_inputs(name, batch=3, tiny=True)
    assert spec.inputs[0].shape == ref[0].shape
    assert spec.inputs[0].shape[0] == 3
    # Same architecture as the zoo's tiny variant.
    n_params = sum(p.numel() for p in spec.model.parameters())
    assert n_params == sum(p.numel() for p in zoo.build(name, tiny=True).parameters())


def test_zoo_tiny_flag_equals_suffix():
    a = models.resolve("driving", batch=2, tiny=True)
    b = models.resolve("driving-tiny", batch=2)
    assert a.name == b.name == "driving-tiny"
    assert a.inputs[0].shape == b.inputs[0].shape
    assert [t.shape for t in a.model.state_dict().values()] == [
        t.shape for t in b.model.state_dict().values()
    ]
    _run(a)


def test_zoo_fresh_model_each_time():
    a = models.resolve("resnet50-tiny")
    b = models.resolve("resnet50-tiny")
    assert a.model is not b.model


def test_zoo_case_and_whitespace():
    assert models.resolve("  ViT_B16-tiny ").name == "vit_b16-tiny"


# ----------------------------------------------------------------------------------
# path/to/file.py:factory
# ----------------------------------------------------------------------------------

_FILE = textwrap.dedent(
    """
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x, scale=1.0):
            return self.fc(x) * scale

    def build():
        return Net().eval()  # resolve() must hand it back in train mode

    def build_with_inputs():
        return Net(), (torch.randn(5, 4),)

    def build_with_kwargs():
        return Net(), {"x": torch.randn(2, 4), "scale": 2.0}

    def build_with_tensor():
        return Net(), torch.randn(6, 4)

    def not_a_module():
        return 42

    def boom():
        raise RuntimeError("factory exploded")

    def example_inputs(batch):
        return (torch.randn(batch, 4),)
    """
)


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "my_model.py"
    path.write_text(_FILE)
    return path


def test_file_factory_module_uses_example_inputs(model_file):
    spec = models.resolve(f"{model_file}:build", batch=7)
    assert spec.name == "my_model:build"
    assert isinstance(spec.model, torch.nn.Module) and spec.model.training
    assert isinstance(spec.inputs, tuple) and spec.inputs[0].shape == (7, 4)
    assert _run(spec).shape == (7, 3)


def test_file_factory_tuple(model_file):
    spec = models.resolve(f"{model_file}:build_with_inputs")
    assert spec.model.training
    assert spec.inputs[0].shape == (5, 4)
    assert _run(spec).shape == (5, 3)


def test_file_factory_kwargs(model_file):
    spec = models.resolve(f"{model_file}:build_with_kwargs")
    assert isinstance(spec.inputs, dict) and set(spec.inputs) == {"x", "scale"}
    assert _run(spec).shape == (2, 3)


def test_file_factory_bare_tensor_inputs(model_file):
    spec = models.resolve(f"{model_file}:build_with_tensor")
    assert isinstance(spec.inputs, tuple) and spec.inputs[0].shape == (6, 4)


def test_file_relative_path(model_file, monkeypatch):
    monkeypatch.chdir(model_file.parent)
    spec = models.resolve("my_model.py:build_with_inputs")
    assert spec.inputs[0].shape == (5, 4)


def test_file_module_without_example_inputs(tmp_path):
    path = tmp_path / "bare.py"
    path.write_text("from torch import nn\ndef build():\n    return nn.Linear(2, 2)\n")
    with pytest.raises(ModelSpecError, match=r"example_inputs\(batch\)"):
        models.resolve(f"{path}:build")


@pytest.mark.parametrize(
    "factory, pattern",
    [
        ("missing", r"defines no function 'missing'.*build"),
        ("not_a_module", r"nn\.Module or a \(module, inputs\) tuple.*int"),
        ("boom", r"RuntimeError: factory exploded"),
    ],
)
def test_file_factory_errors(model_file, factory, pattern):
    with pytest.raises(ModelSpecError, match=pattern):
        models.resolve(f"{model_file}:{factory}")


def test_file_missing(tmp_path):
    with pytest.raises(ModelSpecError, match="not found"):
        models.resolve(f"{tmp_path / 'nope.py'}:build")


def test_file_import_error(tmp_path):
    path = tmp_path / "broken.py"
    path.write_text("import this_module_does_not_exist_anywhere\n")
    with pytest.raises(ModelSpecError, match="importing .*broken.py failed"):
        models.resolve(f"{path}:build")


def test_file_without_factory(model_file):
    with pytest.raises(ModelSpecError, match=r":<factory>"):
        models.resolve(str(model_file))


# ----------------------------------------------------------------------------------
# hf:<ModelClass>
# ----------------------------------------------------------------------------------


@pytest.fixture
def transformers():
    return pytest.importorskip("transformers", reason="HF transformers not installed")


@pytest.mark.parametrize(
    "cls, expect",
    [
        ("ResNetForImageClassification", ("pixel_values", (2, 3, 64, 64))),
        ("ViTModel", ("pixel_values", (2, 3, 32, 32))),
        ("ConvNextModel", ("pixel_values", (2, 3, 32, 32))),
        ("BertModel", ("input_ids", (2, 16))),
        ("GPT2LMHeadModel", ("input_ids", (2, 16))),
    ],
)
def test_hf_tiny(transformers, cls, expect):
    spec = models.resolve(f"hf:{cls}-tiny")
    assert spec.name == f"hf:{cls}-tiny"
    assert type(spec.model) is getattr(transformers, cls)
    assert spec.model.training
    key, shape = expect
    assert isinstance(spec.inputs, dict) and list(spec.inputs) == [key]
    assert tuple(spec.inputs[key].shape) == shape
    if key == "input_ids":
        ids = spec.inputs[key]
        assert ids.dtype == torch.long
        assert 0 <= int(ids.min()) and int(ids.max()) < spec.model.config.vocab_size
    else:
        assert spec.inputs[key].dtype == torch.float32
    # Shrunk: well under a million parameters, and it runs.
    assert sum(p.numel() for p in spec.model.parameters()) < 1_000_000
    with torch.no_grad():
        _run(spec)


def test_hf_tiny_flag_equals_suffix(transformers):
    a = models.resolve("hf:BertModel", tiny=True, batch=4)
    b = models.resolve("hf:BertModel-tiny", batch=4)
    assert a.name == b.name
    assert a.inputs["input_ids"].shape == b.inputs["input_ids"].shape == (4, 16)
    assert a.model.config.hidden_size == b.model.config.hidden_size < 768


def test_hf_no_kv_cache_and_valid_special_tokens(transformers):
    # A KV cache in the outputs is useless for training and breaks torch.export.
    spec = models.resolve("hf:GPT2LMHeadModel-tiny")
    config = spec.model.config
    assert config.use_cache is False
    assert config.bos_token_id < config.vocab_size and config.eos_token_id < config.vocab_size
    with torch.no_grad():
        out = _run(spec)
    assert getattr(out, "past_key_values", None) is None


def test_hf_tiny_table_keyed_by_model_type(transformers):
    for cls in ("ResNetModel", "ViTModel", "ConvNextModel", "BertModel", "GPT2Model"):
        model_type = getattr(transformers, cls).config_class.model_type
        assert model_type in models.HF_TINY_OVERRIDES, cls


def test_hf_full_config_is_default(transformers, monkeypatch):
    # Building the full-size models is slow-ish; check the config/input logic without it.
    built = {}

    def fake_init(self, config):
        torch.nn.Module.__init__(self)
        built["config"] = config

    monkeypatch.setattr(transformers.ViTModel, "__init__", fake_init)
    spec = models.resolve("hf:ViTModel", batch=1)
    default = transformers.ViTConfig()
    assert built["config"].hidden_size == default.hidden_size
    assert spec.inputs["pixel_values"].shape == (1, 3, default.image_size, default.image_size)


def test_hf_full_text_seq_len(transformers, monkeypatch):
    def fake_init(self, config):
        torch.nn.Module.__init__(self)
        self.config = config

    monkeypatch.setattr(transformers.BertModel, "__init__", fake_init)
    spec = models.resolve("hf:BertModel", batch=2)
    assert spec.inputs["input_ids"].shape == (2, 128)


@pytest.mark.parametrize(
    "spec, pattern",
    [
        ("hf:BertModle", r"no class 'BertModle'.*BertModel"),
        ("hf:BertConfig", "not a model class"),
        ("hf:", "not a transformers class name"),
    ],
)
def test_hf_errors(transformers, spec, pattern):
    with pytest.raises(ModelSpecError, match=pattern):
        models.resolve(spec)


def test_hf_without_transformers(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` fail
    with pytest.raises(ModelSpecError, match="pip install transformers"):
        models.resolve("hf:BertModel-tiny")


# ----------------------------------------------------------------------------------
# Bad specs
# ----------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["bogus", "resnet", "driving-small", "", "   ", "foo:bar"])
def test_bad_spec_lists_forms_and_zoo_names(spec):
    with pytest.raises(ModelSpecError) as info:
        models.resolve(spec)
    msg = str(info.value)
    for name in zoo.names():
        assert name in msg
    assert "hf:" in msg and "file.py:factory" in msg


def test_bad_spec_suggests_close_zoo_name():
    with pytest.raises(ModelSpecError, match="did you mean 'resnet50'"):
        models.resolve("resnet5")


def test_model_spec_error_is_value_error():
    with pytest.raises(ValueError):
        models.resolve("bogus")
    with pytest.raises(FxoptError):
        models.resolve("bogus")


def test_bad_batch():
    with pytest.raises(ModelSpecError, match="batch"):
        models.resolve("driving-tiny", batch=0)
