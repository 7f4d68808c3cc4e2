"""Built-in data a model can actually learn, so that training curves mean something offline.

* :func:`teacher_images` -- smooth random images labelled by a fixed random *teacher*: a
  classification task any image classifier can learn (the label is a nonlinear function of the
  image's colours; the tiny zoo ViT goes from ln(10) = 2.3 to about 1.6 in 40 steps of batch 8).
* :func:`teacher_outputs` -- the same images with targets computed by any fixed module (e.g. a
  second, differently seeded copy of the model): a regression task for models whose outputs
  are not class logits (the zoo driving model's dict of heads).
* :func:`auto_data` -- picks one of the two from what the model returns.

Both are re-iterable (every ``iter()`` yields the same batches in the same order, generated on
the fly from ``(seed, batch index)``, on the target device) and have ``held_out(n)``: batches
from a disjoint part of the stream with the same teacher, for evaluation.

:func:`default_loss` is cross-entropy for integer targets and mean-squared error for float
targets, summed over the keys of dict outputs.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError

__all__ = ["TeacherImages", "TeacherOutputs", "teacher_images", "teacher_outputs", "auto_data",
           "default_loss", "accuracy", "output_tensor"]

HELD_OUT_OFFSET = 1 << 40   # batch indices of held-out data start here: disjoint from training's
CALIBRATION_OFFSET = 1 << 41  # ... and those of the calibration latents/images here
LATENT = 4                  # side of the low-resolution latent an image is drawn from
NOISE = 0.25                # std of the pixel noise added after upsampling the latent
TEACHER_WIDTH = 16          # hidden channels of the random teacher
CALIBRATION = 4096          # latents used to balance the teacher's classes (at least 8 per class)
BALANCE_ITERS = 100         # bias updates that equalize the class frequencies on them


def _mix(*parts: int) -> int:
    """A 32-bit generator seed from integers (splitmix64 rounds): torch's CPU generator keeps only the
    low 32 bits of a seed, so (seed, batch index) must be hashed, not just added up."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (p & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h = (h ^ (h >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 29
    return h & 0xFFFFFFFF


def _shape(shape) -> tuple[int, ...]:
    shape = tuple(int(s) for s in shape)
    if len(shape) < 3 or min(shape) < 1:
        raise InputError(f"an image shape is (..., C, H, W) without the batch, e.g. (3, 64, 64); got {shape}")
    return shape


def _device(device) -> torch.device:
    return torch.device(device) if device is not None else torch.device("cpu")


class _SmoothImages:
    """Images of shape ``(batch, *shape)``: a Gaussian latent of side ``LATENT`` per channel, bilinearly
    upsampled to (H, W), plus pixel noise. Batch ``i`` depends only on ``(seed, i)``."""

    def __init__(self, shape, batch: int, seed: int, device, dtype):
        self.shape, self.batch, self.seed = _shape(shape), int(batch), int(seed)
        self.device, self.dtype = _device(device), dtype
        *lead, h, w = self.shape
        self.channels = math.prod(lead)
        self.latent = (min(LATENT, h), min(LATENT, w))

    def _stream(self, index: int, part: int = 0) -> int:
        return _mix(self.seed, index, part)

    def latents(self, index: int, n: int | None = None) -> torch.Tensor:
        """(n, channels, latent, latent) float32 on the CPU; deterministic in (seed, index)."""
        gen = torch.Generator().manual_seed(self._stream(index))
        return torch.randn(n or self.batch, self.channels, *self.latent, generator=gen)

    def images(self, index: int, latents: torch.Tensor) -> torch.Tensor:
        *_, h, w = self.shape
        z = latents.to(self.device)
        x = F.interpolate(z, size=(h, w), mode="bilinear", align_corners=False)
        gen = torch.Generator(device=self.device).manual_seed(self._stream(index, 1))
        x = x + NOISE * torch.randn(x.shape, generator=gen, device=self.device)
        return x.reshape(len(latents), *self.shape).to(self.dtype)


class TeacherImages:
    """Smooth random images labelled by a fixed random teacher (see :func:`teacher_images`)."""

    def __init__(self, shape, num_classes: int, n_batches: int, batch: int, seed: int = 0, *,
                 device=None, dtype=torch.float32, start: int = 0):
        if num_classes < 2:
            raise InputError(f"num_classes must be >= 2, got {num_classes}")
        if n_batches < 1 or batch < 1:
            raise InputError(f"n_batches and batch must be >= 1, got {n_batches} and {batch}")
        self.source = _SmoothImages(shape, batch, seed, device, dtype)
        self.num_classes, self.n_batches, self.start = int(num_classes), int(n_batches), int(start)
        gen = torch.Generator().manual_seed(_mix(seed, -1))
        c = self.source.channels
        # the teacher: 1x1 conv (mix the colours) -> tanh -> global average -> linear. Learnable in a few
        # dozen steps by the tiny zoo models; a 2x2 (per-quadrant) pool made a task they barely moved on.
        self.mix = torch.randn(TEACHER_WIDTH, c, generator=gen) / math.sqrt(c)
        self.mix_bias = 0.5 * torch.randn(TEACHER_WIDTH, generator=gen)
        self.head = torch.randn(num_classes, TEACHER_WIDTH, generator=gen) / math.sqrt(TEACHER_WIDTH)
        # balance the classes: standardize each class's logit over a calibration set of latents, then
        # raise the bias of rare classes and lower that of frequent ones until each is argmax ~1/K of the time
        calibration = max(CALIBRATION, 8 * num_classes)
        logits = self._raw_logits(self.source.latents(CALIBRATION_OFFSET, calibration))
        self.mean, self.std = logits.mean(0), logits.std(0)
        z = (logits - self.mean) / self.std
        self.bias = torch.zeros(num_classes)
        for _ in range(BALANCE_ITERS):
            freq = torch.bincount((z + self.bias).argmax(1), minlength=num_classes) / calibration
            self.bias -= freq - 1 / num_classes

    def _raw_logits(self, z: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(torch.einsum("oc,nchw->nohw", self.mix, z) + self.mix_bias[:, None, None])
        return h.mean((-2, -1)) @ self.head.T

    def labels(self, z: torch.Tensor) -> torch.Tensor:
        return ((self._raw_logits(z) - self.mean) / self.std + self.bias).argmax(1)

    def batch_at(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.source.latents(index)
        return self.source.images(index, z), self.labels(z).to(self.source.device)

    def __len__(self) -> int:
        return self.n_batches

    def __iter__(self):
        for i in range(self.start, self.start + self.n_batches):
            yield self.batch_at(i)

    def held_out(self, n_batches: int) -> "TeacherImages":
        """``n_batches`` batches the training stream never yields, labelled by the same teacher."""
        other = object.__new__(TeacherImages)
        other.__dict__.update(self.__dict__, n_batches=int(n_batches), start=HELD_OUT_OFFSET)
        return other

    def __repr__(self) -> str:
        s = self.source
        return (f"teacher_images(shape={s.shape}, num_classes={self.num_classes}, n_batches={self.n_batches}, "
                f"batch={s.batch}, seed={s.seed})")


def teacher_images(shape, num_classes: int, n_batches: int, batch: int, seed: int = 0, *, device=None,
                   dtype=torch.float32) -> TeacherImages:
    """A re-iterable of ``n_batches`` batches ``(x, y)``: ``x`` float images ``(batch, *shape)``,
    ``y`` int64 class labels in ``[0, num_classes)``, roughly balanced.

    Each image is a 4x4 Gaussian latent per channel, bilinearly upsampled to (H, W), plus noise
    (std 0.25). The label is the argmax of a fixed random teacher applied to the latent: a 1x1
    conv mixing the channels, tanh, a global average, a linear layer; each class's logit is
    standardized over 4096 calibration latents and its bias tuned until every class is the argmax
    about equally often. ``seed`` fixes the teacher and the stream; ``shape`` may have leading dims
    (cameras: ``(6, 3, H, W)``), which the teacher sees as channels. Images are made on ``device``
    (labels from CPU latents, so they are the same on every device).
    """
    return TeacherImages(shape, num_classes, n_batches, batch, seed, device=device, dtype=dtype)


def _standardize_stats(out):
    """Per-element mean over the batch and one overall std, per tensor of a (nested) output."""
    if isinstance(out, torch.Tensor):
        centred = out - out.mean(0)
        return out.mean(0), centred.std().clamp_min(1e-6)
    if isinstance(out, dict):
        return {k: _standardize_stats(v) for k, v in out.items()}
    if isinstance(out, (tuple, list)):
        return type(out)(_standardize_stats(v) for v in out)
    raise InputError(f"teacher outputs must be tensors, tuples or dicts of tensors; got {type(out).__name__}")


def _apply_stats(out, stats):
    if isinstance(out, torch.Tensor):
        mean, std = stats
        return ((out - mean) / std).detach()
    if isinstance(out, dict):
        return {k: _apply_stats(v, stats[k]) for k, v in out.items()}
    return type(out)(_apply_stats(v, s) for v, s in zip(out, stats))


class TeacherOutputs:
    """Smooth random images with regression targets from a fixed module (see :func:`teacher_outputs`)."""

    def __init__(self, teacher: nn.Module, shape, n_batches: int, batch: int, seed: int = 0, *,
                 device=None, dtype=torch.float32, start: int = 0, calibration_batches: int = 2):
        if not isinstance(teacher, nn.Module):
            raise InputError(f"teacher must be an nn.Module, got {type(teacher).__name__}")
        if n_batches < 1 or batch < 1:
            raise InputError(f"n_batches and batch must be >= 1, got {n_batches} and {batch}")
        self.source = _SmoothImages(shape, batch, seed, device, dtype)
        self.teacher = teacher.to(self.source.device).eval().requires_grad_(False)
        self.n_batches, self.start = int(n_batches), int(start)
        calib = torch.cat([self.source.images(i, self.source.latents(i)) for i in
                           range(CALIBRATION_OFFSET, CALIBRATION_OFFSET + calibration_batches)])
        with torch.no_grad():
            self.stats = _standardize_stats(self.teacher(calib))

    def batch_at(self, index: int):
        x = self.source.images(index, self.source.latents(index))
        with torch.no_grad():
            return x, _apply_stats(self.teacher(x), self.stats)

    def __len__(self) -> int:
        return self.n_batches

    def __iter__(self):
        for i in range(self.start, self.start + self.n_batches):
            yield self.batch_at(i)

    def held_out(self, n_batches: int) -> "TeacherOutputs":
        other = object.__new__(TeacherOutputs)
        other.__dict__.update(self.__dict__, n_batches=int(n_batches), start=HELD_OUT_OFFSET)
        return other

    def __repr__(self) -> str:
        s = self.source
        return (f"teacher_outputs({type(self.teacher).__name__}, shape={s.shape}, n_batches={self.n_batches}, "
                f"batch={s.batch}, seed={s.seed})")


def teacher_outputs(teacher: nn.Module, shape, n_batches: int, batch: int, seed: int = 0, *, device=None,
                    dtype=torch.float32) -> TeacherOutputs:
    """A re-iterable of ``(x, y)``: the images of :func:`teacher_images` and, as targets, the outputs of
    the fixed module ``teacher`` (run in eval mode, no grad), standardized per output tensor (minus
    the per-element mean, divided by the overall std, both from two calibration batches) so that
    predicting a constant scores an MSE of about 1. Outputs may be tensors, tuples or dicts
    (the driving model's heads). A student of the teacher's own architecture can represent the
    targets up to that standardization. The teacher runs on ``device`` each time a batch is made:
    on a GPU, its kernels may differ in the last bits from one pass over the data to the next.
    """
    return TeacherOutputs(teacher, shape, n_batches, batch, seed, device=device, dtype=dtype)


def output_tensor(out):
    """The tensor a loss reads from a model output: the output itself, or a HF ``.logits``."""
    if isinstance(out, torch.Tensor) or isinstance(out, (dict, tuple, list)):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    raise InputError(f"cannot take a loss of a {type(out).__name__} output: pass loss_fn(output, y)")


def default_loss(out, y) -> torch.Tensor:
    """Cross-entropy for integer targets, mean-squared error for float targets (computed in fp32);
    dict/tuple outputs: the sum over the target's keys/items (each head's loss)."""
    out = output_tensor(out)
    if isinstance(y, dict):
        if not isinstance(out, dict):
            raise InputError(f"dict targets need a dict output, got {type(out).__name__}; pass loss_fn")
        missing = [k for k in y if k not in out]
        if missing:
            raise InputError(f"the output has no {missing}; its keys are {list(out)}; pass loss_fn")
        return sum(default_loss(out[k], y[k]) for k in y)
    if isinstance(y, (tuple, list)):
        return sum(default_loss(o, t) for o, t in zip(out, y))
    if not isinstance(out, torch.Tensor):
        raise InputError(f"a tensor target needs a tensor output, got {type(out).__name__}; pass loss_fn")
    if not y.is_floating_point():
        return F.cross_entropy(out.float().flatten(0, -2), y.flatten())
    return F.mse_loss(out.float(), y.float())


def accuracy(out, y) -> float | None:
    """Top-1 accuracy for integer targets and tensor logits; None otherwise."""
    try:
        out = output_tensor(out)
    except InputError:
        return None
    if not isinstance(out, torch.Tensor) or not isinstance(y, torch.Tensor) or y.is_floating_point():
        return None
    return (out.argmax(-1) == y).float().mean().item()


def auto_data(model_fn: Callable[[], nn.Module], shape, n_batches: int, batch: int, seed: int = 0, *,
              device=None, max_classes: int = 10):
    """Learnable data for ``model_fn()``'s model: :func:`teacher_images` when it returns class logits
    ``(batch, classes)``, with labels among the first ``min(classes, max_classes)`` classes (a
    1000-way head then learns a 10-way task, whose loss moves within a few hundred steps); else
    :func:`teacher_outputs` with a teacher of the same architecture built under
    ``torch.manual_seed(seed + 12345)`` (the caller's RNG state is restored afterwards)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 12345)
        teacher = model_fn()
    probe = torch.zeros(2, *_shape(shape))
    with torch.no_grad():
        out = output_tensor(teacher.eval()(probe))
    if isinstance(out, torch.Tensor) and out.dim() == 2 and out.shape[1] >= 2:
        return teacher_images(shape, min(out.shape[1], max_classes), n_batches, batch, seed, device=device)
    return teacher_outputs(teacher, shape, n_batches, batch, seed, device=device)
