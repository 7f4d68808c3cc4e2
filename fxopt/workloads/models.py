"""Resolve a MODEL spec string (as given on the command line) into a model and inputs.

Accepted forms::

    resnet50 | convnext_t | vit_b16 | driving     a model from :mod:`fxopt.zoo`
    driving-tiny                                  ... its tiny test variant
    hf:BertModel                                  a HuggingFace transformers class, built
                                                  from its default config (no download)
    hf:BertModel-tiny                             ... with a shrunken config
    timm:convnext_tiny                            a timm model (pretrained=False, no download)
    torchvision:resnet50                          a torchvision model (weights=None)
    path/to/file.py:factory                       ``factory()`` from a Python file

``image_size`` (zoo, hf vision, timm, torchvision) and ``seq_len`` (hf text) change the example
inputs (and the model where its size depends on them: ViT position embeddings).

``factory()`` returns either a module -- the same file must then define
``example_inputs(batch)`` -- or a tuple ``(module, inputs)``. Inputs are a tuple of
positional tensors or a dict of keyword arguments.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import importlib.util
import inspect
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fxopt import zoo
from fxopt.errors import ModelSpecError

__all__ = ["ModelSpec", "resolve", "TINY_SUFFIX", "HF_PREFIX", "HF_TINY_OVERRIDES", "LIBRARIES", "input_overrides"]

TINY_SUFFIX = "-tiny"
HF_PREFIX = "hf:"

# Text models: sequence length of the example input_ids.
HF_SEQ_LEN = {False: 128, True: 16}
# Vision models whose config has no image_size (ResNet): side of the example image.
HF_DEFAULT_IMAGE_SIZE = {False: 224, True: 64}


@dataclass
class ModelSpec:
    """A resolved model: a fresh module in train mode plus example inputs for it."""

    name: str  # display name
    model: nn.Module  # fresh, train mode
    inputs: tuple | dict = field(repr=False)  # positional tensors, or keyword arguments


# ----------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------


_OVERRIDES: dict[str, int | None] = {"image_size": None, "seq_len": None}


@contextlib.contextmanager
def input_overrides(image_size: int | None = None, seq_len: int | None = None):
    """Defaults for ``resolve``'s ``image_size``/``seq_len`` while inside (the CLI's ``--image-size``
    and ``--seq-len`` reach every command's model, however each command calls ``resolve``)."""
    saved = dict(_OVERRIDES)
    _OVERRIDES.update(image_size=image_size, seq_len=seq_len)
    try:
        yield
    finally:
        _OVERRIDES.update(saved)


def resolve(spec: str, batch: int = 2, tiny: bool = False, *, image_size: int | None = None,
            seq_len: int | None = None) -> ModelSpec:
    """Turn ``spec`` into a :class:`ModelSpec`; raises :class:`ModelSpecError`.

    ``tiny=True`` (or a ``-tiny`` suffix on a zoo or ``hf:`` spec) picks the small test
    variant; it does not apply to ``file.py:factory`` specs, which build what they build.
    ``image_size``: side of the example images; ``seq_len``: tokens per example (text models).
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ModelSpecError(_usage(f"empty model spec {spec!r}"))
    if batch < 1:
        raise ModelSpecError(f"batch must be >= 1, got {batch}")
    image_size = image_size if image_size is not None else _OVERRIDES["image_size"]
    seq_len = seq_len if seq_len is not None else _OVERRIDES["seq_len"]
    for knob, value in (("image_size", image_size), ("seq_len", seq_len)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ModelSpecError(f"{knob} must be a positive integer, got {value!r}")
    spec = spec.strip()

    if spec.startswith(HF_PREFIX):
        name, tiny = _strip_tiny(spec[len(HF_PREFIX) :], tiny)
        return _resolve_hf(name, batch, tiny, image_size, seq_len)

    for prefix in LIBRARIES:
        if spec.startswith(prefix):
            _no_knob(spec, "seq_len", seq_len, "vision models take --image-size")
            if tiny or spec.endswith(TINY_SUFFIX):
                raise ModelSpecError(f"{spec!r}: {prefix}<name> specs have no -tiny variant; "
                                     "shrink them with --image-size and --batch, or pick a smaller model")
            return _resolve_library(prefix, spec[len(prefix):], batch, image_size)

    path, sep, factory = spec.rpartition(":")
    if sep and path.endswith(".py"):
        _no_knob(spec, "image_size", image_size, "your factory builds what it builds")
        _no_knob(spec, "seq_len", seq_len, "your factory builds what it builds")
        return _resolve_file(path, factory, batch)
    if spec.endswith(".py"):
        raise ModelSpecError(
            f"model spec {spec!r} names a file but no factory function; "
            f"write it as '{spec}:<factory>', e.g. '{spec}:build'"
        )

    name, tiny = _strip_tiny(spec, tiny)
    if name.lower() in zoo.names():
        _no_knob(spec, "seq_len", seq_len, "the zoo models are vision models: use --image-size")
        return _resolve_zoo(name if name in zoo.names() else name.lower(), batch, tiny, image_size)

    hint = difflib.get_close_matches(name, zoo.names(), n=1)
    problem = f"unknown model {spec!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
    raise ModelSpecError(_usage(problem))


def _no_knob(spec: str, knob: str, value, why: str) -> None:
    if value is not None:
        raise ModelSpecError(f"{spec!r} takes no --{knob.replace('_', '-')} ({why})")


def _usage(problem: str) -> str:
    return (
        f"{problem}. A model spec is one of:\n"
        f"  <zoo name>[{TINY_SUFFIX}]      zoo models: {', '.join(zoo.names())}\n"
        f"  {HF_PREFIX}<ModelClass>[{TINY_SUFFIX}]  a HuggingFace transformers class built from "
        f"its default config, e.g. {HF_PREFIX}BertModel, {HF_PREFIX}ResNetForImageClassification\n"
        f"  timm:<name> | torchvision:<name>  a timm / torchvision model, random weights\n"
        f"  path/to/file.py:factory   factory() returns a module (the file then defines "
        f"example_inputs(batch)) or a (module, inputs) tuple"
    )


def _strip_tiny(name: str, tiny: bool) -> tuple[str, bool]:
    if name.endswith(TINY_SUFFIX):
        return name[: -len(TINY_SUFFIX)], True
    return name, tiny


def _display(name: str, tiny: bool) -> str:
    return name + (TINY_SUFFIX if tiny else "")


def _check_inputs(inputs: Any, where: str) -> tuple | dict:
    """Normalise example inputs to a tuple of positionals or a dict of kwargs."""
    if isinstance(inputs, torch.Tensor):
        return (inputs,)
    if isinstance(inputs, list):
        inputs = tuple(inputs)
    if isinstance(inputs, dict):
        bad = [k for k in inputs if not isinstance(k, str)]
        if bad:
            raise ModelSpecError(f"{where}: keyword inputs must have str keys, got {bad!r}")
        return inputs
    if isinstance(inputs, tuple):
        return inputs
    raise ModelSpecError(
        f"{where}: example inputs must be a tensor, a tuple of positional inputs or a dict "
        f"of keyword inputs, got {type(inputs).__name__}"
    )


def _check_module(model: Any, where: str) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"{where}: expected a torch.nn.Module, got {type(model).__name__}")
    return model.train()


# ----------------------------------------------------------------------------------
# Zoo
# ----------------------------------------------------------------------------------


def _resolve_zoo(name: str, batch: int, tiny: bool, image_size: int | None = None) -> ModelSpec:
    inputs = zoo.example_inputs(name, batch, tiny)
    if image_size is None:
        model = zoo.build(name, tiny)
    else:
        model = zoo.build(name, tiny, image_size=image_size)
        inputs = tuple(torch.randn(*t.shape[:-2], image_size, image_size) for t in inputs)
    display = _display(name, tiny) + ("" if image_size is None else f"@{image_size}")
    return ModelSpec(display, model.train(), _check_inputs(inputs, name))


# ----------------------------------------------------------------------------------
# timm / torchvision
# ----------------------------------------------------------------------------------


def _timm(lib, name: str, image_size: int | None) -> nn.Module:
    kwargs = {"img_size": image_size} if image_size is not None else {}
    try:
        return lib.create_model(name, pretrained=False, **kwargs)
    except TypeError:  # a model whose size does not depend on the image (a convnet)
        return lib.create_model(name, pretrained=False)


def _torchvision(lib, name: str, image_size: int | None) -> nn.Module:
    import torchvision.models
    kwargs = {"image_size": image_size} if image_size is not None else {}
    try:
        return torchvision.models.get_model(name, weights=None, **kwargs)
    except TypeError:
        return torchvision.models.get_model(name, weights=None)


# prefix -> (module to import, pip package, build(lib, name, image_size))
LIBRARIES = {
    "timm:": ("timm", "timm", _timm),
    "torchvision:": ("torchvision", "torchvision", _torchvision),
}


def _default_side(model: nn.Module) -> int:
    """timm models state their input size in ``pretrained_cfg``; 224 otherwise."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    size = cfg.get("input_size") if isinstance(cfg, dict) else None
    return int(size[-1]) if size else 224


def _resolve_library(prefix: str, name: str, batch: int, image_size: int | None) -> ModelSpec:
    module_name, package, build = LIBRARIES[prefix]
    try:
        lib = importlib.import_module(module_name)
    except Exception as e:  # not installed, or its compiled ops do not load with this torch build
        raise ModelSpecError(
            f"{prefix}{name} needs {package}, which does not import here ({type(e).__name__}: {e}); "
            f"pip install {package}  (or: pip install 'fxopt[vision]'), with a build matching torch "
            f"{torch.__version__}; or use a zoo model (fxopt models)") from None
    try:
        model = build(lib, name, image_size)
    except Exception as e:
        raise ModelSpecError(f"{package} has no model {name!r} ({type(e).__name__}: {e})") from None
    side = image_size or _default_side(model)
    display = prefix + name + ("" if image_size is None else f"@{image_size}")
    return ModelSpec(display, model.train(), (torch.randn(batch, 3, side, side),))


# ----------------------------------------------------------------------------------
# HuggingFace transformers
# ----------------------------------------------------------------------------------

# Tiny-config overrides per ``config.model_type``: passed as keyword arguments to the
# config class so derived attributes (stage names, head dims, ...) stay consistent.
_BERT_LIKE = dict(
    vocab_size=1000,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    max_position_embeddings=64,
)
_VIT_LIKE = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    image_size=32,
    patch_size=8,
)
_CONVNEXT_LIKE = dict(hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1], image_size=32)

HF_TINY_OVERRIDES: dict[str, dict[str, Any]] = {
    "bert": _BERT_LIKE,
    "roberta": _BERT_LIKE,
    "distilbert": dict(
        vocab_size=1000, dim=32, hidden_dim=64, n_layers=2, n_heads=2, max_position_embeddings=64
    ),
    "gpt2": dict(vocab_size=1000, n_embd=32, n_layer=2, n_head=2, n_positions=64),
    "llama": dict(_BERT_LIKE, num_key_value_heads=2),
    "vit": _VIT_LIKE,
    "deit": _VIT_LIKE,
    "resnet": dict(embedding_size=8, hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1]),
    "convnext": _CONVNEXT_LIKE,
    "convnextv2": _CONVNEXT_LIKE,
    "swin": dict(
        image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=4
    ),
}

# Fallback for model types not in the table: applied only where the config has the field.
_GENERIC_TINY: dict[str, Any] = dict(
    _BERT_LIKE, num_key_value_heads=2, n_embd=32, n_layer=2, n_head=2, n_positions=64
)


def _import_transformers():
    try:
        import transformers
    except ImportError as e:
        raise ModelSpecError(
            f"hf: model specs need HuggingFace transformers, which is not installed ({e}); "
            "pip install transformers  (or: pip install 'fxopt[hf]')"
        ) from None
    return transformers


def _hf_class(transformers, class_name: str) -> type:
    if not class_name.isidentifier():
        raise ModelSpecError(
            _usage(f"{HF_PREFIX}{class_name!r} is not a transformers class name")
        )
    try:
        cls = getattr(transformers, class_name)
    except (AttributeError, ImportError, RuntimeError) as e:
        hint = difflib.get_close_matches(class_name, dir(transformers), n=3)
        msg = f"transformers has no class {class_name!r}"
        if hint:
            msg += f" (did you mean {', '.join(hint)}?)"
        if not isinstance(e, AttributeError):
            msg += f": {e}"
        raise ModelSpecError(msg) from None
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ModelSpecError(
            f"transformers.{class_name} is not a model class (a torch.nn.Module subclass); "
            f"use e.g. {HF_PREFIX}BertModel"
        )
    if getattr(cls, "config_class", None) is None:
        raise ModelSpecError(
            f"transformers.{class_name} has no config_class; pick a concrete model class "
            f"such as {HF_PREFIX}BertModel rather than an Auto/base class"
        )
    return cls


def _hf_config(cls: type, tiny: bool, image_size: int | None = None):
    config = _hf_config_sized(cls, tiny)
    if image_size is not None and hasattr(config, "image_size"):
        config.image_size = image_size  # position embeddings follow it (ViT, Swin)
    return config


def _hf_config_sized(cls: type, tiny: bool):
    config_class = cls.config_class
    config = config_class()
    if not tiny:
        return _for_training(config)
    model_type = getattr(config, "model_type", None)
    overrides = HF_TINY_OVERRIDES.get(model_type)
    if overrides is None:
        accepted = set(inspect.signature(config_class.__init__).parameters)
        overrides = {
            k: v for k, v in _GENERIC_TINY.items() if k in accepted or hasattr(config, k)
        }
    if "vocab_size" in overrides:
        # Special-token ids of the default config may fall outside the shrunken vocabulary.
        overrides = dict(overrides)
        for key in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id"):
            tok = getattr(config, key, None)
            if key not in overrides and isinstance(tok, int) and tok >= overrides["vocab_size"]:
                overrides[key] = overrides["vocab_size"] - 1
    try:
        return _for_training(config_class(**overrides))
    except Exception as e:
        raise ModelSpecError(
            f"could not build a tiny {config_class.__name__} (model_type {model_type!r}) "
            f"with {overrides}: {e}"
        ) from e


def _for_training(config):
    # Training workloads never use a KV cache; returning one (a DynamicCache object in
    # the outputs) only gets in torch.export's way.
    if getattr(config, "use_cache", None):
        config.use_cache = False
    return config


def _image_side(config, tiny: bool, image_size: int | None = None) -> tuple[int, int]:
    if image_size is not None:
        return image_size, image_size
    size = getattr(config, "image_size", None)
    if size is None:
        size = HF_DEFAULT_IMAGE_SIZE[tiny]
    if isinstance(size, (list, tuple)):
        return int(size[0]), int(size[-1])
    return int(size), int(size)


def _hf_inputs(model: nn.Module, config, batch: int, tiny: bool, name: str,
               image_size: int | None = None, seq_len: int | None = None) -> dict:
    params = inspect.signature(model.forward).parameters
    if "pixel_values" in params:
        _no_knob(name, "seq_len", seq_len, "a vision model: use --image-size")
        channels = int(getattr(config, "num_channels", None) or 3)
        height, width = _image_side(config, tiny, image_size)
        return {"pixel_values": torch.randn(batch, channels, height, width)}
    if "input_ids" in params:
        _no_knob(name, "image_size", image_size, "a text model: use --seq-len")
        seq = HF_SEQ_LEN[tiny]
        max_pos = getattr(config, "max_position_embeddings", None) or getattr(
            config, "n_positions", None
        )
        if seq_len is not None:
            if isinstance(max_pos, int) and 0 < max_pos < seq_len:
                raise ModelSpecError(f"{name}: --seq-len {seq_len} exceeds the model's {max_pos} positions")
            seq = seq_len
        elif isinstance(max_pos, int) and max_pos > 0:
            seq = min(seq, max_pos)
        vocab = int(getattr(config, "vocab_size", None) or 1000)
        return {"input_ids": torch.randint(0, vocab, (batch, seq), dtype=torch.long)}
    raise ModelSpecError(
        f"{name}: cannot make example inputs -- forward() takes neither pixel_values nor "
        f"input_ids (it takes {', '.join(p for p in params if p != 'self')}); wrap the model "
        "in a file.py:factory spec that returns (module, inputs)"
    )


def _resolve_hf(class_name: str, batch: int, tiny: bool, image_size: int | None = None,
                seq_len: int | None = None) -> ModelSpec:
    transformers = _import_transformers()
    cls = _hf_class(transformers, class_name)
    config = _hf_config(cls, tiny, image_size)
    name = _display(HF_PREFIX + class_name, tiny)
    try:
        model = cls(config)
    except Exception as e:
        raise ModelSpecError(f"{name}: building {cls.__name__} from its config failed: {e}") from e
    model.train()
    return ModelSpec(name, model, _hf_inputs(model, config, batch, tiny, name, image_size, seq_len))


# ----------------------------------------------------------------------------------
# path/to/file.py:factory
# ----------------------------------------------------------------------------------


def _load_file(path: Path):
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    mod_name = f"_fxopt_user_{path.stem}_{digest}"
    spec = importlib.util.spec_from_file_location(mod_name, path)
    if spec is None or spec.loader is None:
        raise ModelSpecError(f"cannot import {path} as a Python module")
    module = importlib.util.module_from_spec(spec)
    # Registered before exec so dataclasses / pickling inside the file can find it.
    sys.modules[mod_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        sys.modules.pop(mod_name, None)
        raise ModelSpecError(f"importing {path} failed: {type(e).__name__}: {e}") from e
    return module


def load_spec_file(spec: str, usage: str, kind: str, error=ModelSpecError):
    """``path/to/file.py:name`` -> (the file loaded as a module, ``name``). ``error(usage + ...)`` when
    the spec is not of that form, ``error`` naming the ``kind`` file when it does not exist."""
    path, sep, name = spec.rpartition(":")
    if not sep or not path.endswith(".py") or not name.isidentifier():
        raise error(f"{usage}, got {spec!r}")
    if not Path(path).is_file():
        raise error(f"{kind} file {path!r} not found")
    return _load_file(Path(path).resolve()), name


def _resolve_file(path_str: str, factory_name: str, batch: int) -> ModelSpec:
    where = f"{path_str}:{factory_name}"
    path = Path(path_str).expanduser()
    if not path.is_file():
        raise ModelSpecError(f"model file {path_str!r} not found (from spec {where!r})")
    if not factory_name.isidentifier():
        raise ModelSpecError(
            f"{where}: {factory_name!r} is not a function name; write it as '{path_str}:<factory>'"
        )
    module = _load_file(path.resolve())
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        funcs = sorted(
            n for n, v in vars(module).items() if inspect.isfunction(v) and not n.startswith("_")
        )
        raise ModelSpecError(
            f"{path_str} defines no function {factory_name!r}"
            + (f"; it defines: {', '.join(funcs)}" if funcs else "")
        )
    try:
        result = factory()
    except Exception as e:
        raise ModelSpecError(f"{where}() raised {type(e).__name__}: {e}") from e

    if isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], nn.Module):
        model = _check_module(result[0], where)
        inputs = _check_inputs(result[1], where)
    elif isinstance(result, nn.Module):
        model = _check_module(result, where)
        make_inputs = getattr(module, "example_inputs", None)
        if not callable(make_inputs):
            raise ModelSpecError(
                f"{where}() returned a module but {path_str} defines no example_inputs(batch); "
                "define `def example_inputs(batch): return (tensor, ...)` in that file, or have "
                f"{factory_name}() return a (module, inputs) tuple"
            )
        try:
            inputs = make_inputs(batch)
        except Exception as e:
            raise ModelSpecError(
                f"{path_str}: example_inputs({batch}) raised {type(e).__name__}: {e}"
            ) from e
        inputs = _check_inputs(inputs, f"{path_str}:example_inputs")
    else:
        raise ModelSpecError(
            f"{where}() must return a torch.nn.Module or a (module, inputs) tuple, "
            f"got {type(result).__name__}"
        )
    return ModelSpec(f"{path.stem}:{factory_name}", model, inputs)
