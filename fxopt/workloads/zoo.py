"""Model zoo: the workloads fxopt's passes and cost model are measured on.

Pure-torch re-implementations (no torchvision/timm) so the graphs are stable across
library versions and we control exactly which ops appear:

* ``resnet50``   -- ResNet-50 v1.5, conv/BN/ReLU heavy (25.56M params).
* ``convnext_t`` -- ConvNeXt-Tiny, depthwise conv + LayerNorm + permutes (28.59M).
* ``vit_b16``    -- ViT-B/16, attention through ``F.scaled_dot_product_attention`` (86.57M).
* ``driving``    -- a multi-camera BEV driving model in typical in-house style, with
  attention written out by hand (matmul/softmax) so attention-fusion passes have
  something to find.

Every model has a *tiny* variant built by the same classes with smaller
hyper-parameters, for fast CPU tests. Models are returned in train mode with torch's
default initialisation; seed torch yourself for reproducibility.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from fxopt.errors import ModelSpecError

__all__ = [
    "ZooEntry",
    "ZOO",
    "names",
    "build",
    "example_inputs",
    "DRIVING_OUTPUTS",
]


# ----------------------------------------------------------------------------------
# Shared blocks
# ----------------------------------------------------------------------------------


class Mlp(nn.Module):
    """Linear -> GELU -> Linear; the feed-forward of ViT, ConvNeXt and the BEV layers."""

    def __init__(self, dim: int, hidden: int, out: int | None = None):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, out or dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel dim of an NCHW tensor (permute to NHWC and back)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1) -> nn.Sequential:
    """Bias-free conv followed by BN: the ResNet building brick."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False),
        nn.BatchNorm2d(cout),
    )


# ----------------------------------------------------------------------------------
# ResNet (ResNet-50 classifier and the driving model's ResNet-18-style trunk)
# ----------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """ResNet-18/34 block: two 3x3 convs plus identity/projection shortcut."""

    expansion = 1

    def __init__(self, cin: int, width: int, stride: int = 1):
        super().__init__()
        cout = width * self.expansion
        self.conv1 = _conv_bn(cin, width, 3, stride)
        self.conv2 = _conv_bn(width, cout, 3)
        self.relu = nn.ReLU()
        self.downsample = _conv_bn(cin, cout, 1, stride) if stride != 1 or cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.conv1(x))
        return self.relu(self.conv2(out) + identity)


class Bottleneck(nn.Module):
    """ResNet-50 v1.5 block: 1x1 -> 3x3 (carries the stride) -> 1x1 expand by 4."""

    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1):
        super().__init__()
        cout = width * self.expansion
        self.conv1 = _conv_bn(cin, width, 1)
        self.conv2 = _conv_bn(width, width, 3, stride)
        self.conv3 = _conv_bn(width, cout, 1)
        self.relu = nn.ReLU()
        self.downsample = _conv_bn(cin, cout, 1, stride) if stride != 1 or cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.conv1(x))
        out = self.relu(self.conv2(out))
        return self.relu(self.conv3(out) + identity)


class ResNetTrunk(nn.Module):
    """7x7/2 stem + maxpool, then four stages at strides 4/8/16/32; returns every stage."""

    def __init__(self, block: type[nn.Module], depths, widths, stem_width: int = 64):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, stem_width, 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(stem_width),
            nn.ReLU(),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        stages, cin = [], stem_width
        for i, (depth, width) in enumerate(zip(depths, widths)):
            blocks = []
            for j in range(depth):
                blocks.append(block(cin, width, stride=2 if (i > 0 and j == 0) else 1))
                cin = width * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(stages)
        self.out_channels = [w * block.expansion for w in widths]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats


class ResNet(nn.Module):
    """Image classifier: ResNet trunk + global average pool + Linear."""

    def __init__(
        self,
        block: type[nn.Module] = Bottleneck,
        depths=(3, 4, 6, 3),
        widths=(64, 128, 256, 512),
        stem_width: int = 64,
        num_classes: int = 1000,
    ):
        super().__init__()
        self.trunk = ResNetTrunk(block, depths, widths, stem_width)
        self.fc = nn.Linear(self.trunk.out_channels[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.trunk(x)[-1]
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# ----------------------------------------------------------------------------------
# ConvNeXt
# ----------------------------------------------------------------------------------


class ConvNeXtBlock(nn.Module):
    """7x7 depthwise conv, then LN + MLP in NHWC with layer scale, residual."""

    def __init__(self, dim: int, layer_scale: float = 1e-6):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, 4 * dim)
        self.gamma = nn.Parameter(torch.full((dim,), layer_scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.mlp(self.norm(y)) * self.gamma
        return x + y.permute(0, 3, 1, 2)


class ConvNeXt(nn.Module):
    """ConvNeXt: 4x4/4 patchify stem, stages joined by LN + 2x2/2 conv downsamples."""

    def __init__(self, depths=(3, 3, 9, 3), dims=(96, 192, 384, 768), num_classes: int = 1000):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, dims[0], 4, stride=4), LayerNorm2d(dims[0], eps=1e-6))
        self.downsamples = nn.ModuleList(
            nn.Sequential(LayerNorm2d(cin, eps=1e-6), nn.Conv2d(cin, cout, 2, stride=2))
            for cin, cout in zip(dims[:-1], dims[1:])
        )
        self.stages = nn.ModuleList(
            nn.Sequential(*(ConvNeXtBlock(dim) for _ in range(depth))) for depth, dim in zip(depths, dims)
        )
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.head = nn.Linear(dims[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages[0](self.stem(x))
        for down, stage in zip(self.downsamples, self.stages[1:]):
            x = stage(down(x))
        return self.head(self.norm(x.mean((-2, -1))))


# ----------------------------------------------------------------------------------
# ViT
# ----------------------------------------------------------------------------------


class Attention(nn.Module):
    """Fused-qkv multi-head self-attention through F.scaled_dot_product_attention."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, C = x.shape
        qkv = self.qkv(x).reshape(B, L, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(B, L, C))


class EncoderBlock(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)); x + mlp(LN(x))."""

    def __init__(self, dim: int, heads: int, mlp_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, mlp_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """ViT: conv patch embedding, cls token, learned positions, classify the cls token."""

    def __init__(
        self,
        image_size: int = 224,
        patch: int = 16,
        dim: int = 768,
        depth: int = 12,
        heads: int = 12,
        mlp_dim: int = 3072,
        num_classes: int = 1000,
    ):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, (image_size // patch) ** 2 + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*(EncoderBlock(dim, heads, mlp_dim) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


# ----------------------------------------------------------------------------------
# Multi-camera BEV driving model
# ----------------------------------------------------------------------------------

#: Output names of DrivingModel, in order, with their shapes.
DRIVING_OUTPUTS = {
    "det_logits": "(B, Hb*Wb, det_classes)   per-BEV-query class logits",
    "det_boxes": "(B, Hb*Wb, box_dim)        per-BEV-query box regression",
    "bev_seg": "(B, seg_classes, Hb, Wb)     BEV semantic map logits",
    "occupancy": "(B, occ_bins, Hb, Wb)      per-cell height-bin occupancy logits",
    "depth": "(B, N_cam, depth_bins, H/8, W/8) per-camera depth-bin logits (aux head)",
}


class FPN(nn.Module):
    """Feature pyramid: lateral 1x1s, top-down nearest upsample + add, 3x3 smoothing."""

    def __init__(self, in_channels, dim: int):
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, dim, 1) for c in in_channels)
        self.output = nn.ModuleList(nn.Conv2d(dim, dim, 3, padding=1) for _ in in_channels)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        laterals = [conv(f) for conv, f in zip(self.lateral, feats)]
        merged = [laterals[-1]]
        for lat in reversed(laterals[:-1]):
            merged.insert(0, lat + F.interpolate(merged[0], size=lat.shape[-2:], mode="nearest"))
        return [conv(m) for conv, m in zip(self.output, merged)]


class BevSelfAttention(nn.Module):
    """Hand-written self-attention over BEV queries, scaled by ``* self.scale``.

    Written out op by op (not SDPA) on purpose: this is how in-house code looks, and
    it is what attention-fusion passes must recognise.
    """

    def __init__(self, dim: int, heads: int, attn_drop: float = 0.0):
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.scale = self.head_dim**-0.5
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, Lq, C = x.shape
        h, d = self.heads, self.head_dim
        q = self.q(x).view(B, Lq, h, d).transpose(1, 2)
        k = self.k(x).view(B, Lq, h, d).transpose(1, 2)
        v = self.v(x).view(B, Lq, h, d).transpose(1, 2)
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn.softmax(dim=-1)
        attn = self.attn_drop(attn)
        out = (attn @ v).transpose(1, 2).reshape(B, Lq, C)
        return self.proj(out)


class BevCrossAttention(nn.Module):
    """Hand-written cross-attention from BEV queries to image tokens, ``/ math.sqrt(d)``.

    The other common spelling of the scale, kept distinct from BevSelfAttention so
    pattern matchers are exercised on both.
    """

    def __init__(self, dim: int, heads: int, attn_drop: float = 0.0):
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        B, Lq, C = x.shape
        Lk = memory.shape[1]
        h, d = self.heads, self.head_dim
        q = self.q(x).view(B, Lq, h, d).transpose(1, 2)
        k = self.k(memory).view(B, Lk, h, d).transpose(1, 2)
        v = self.v(memory).view(B, Lk, h, d).transpose(1, 2)
        attn = (q @ k.transpose(-2, -1)) / math.sqrt(d)
        attn = attn.softmax(dim=-1)
        attn = self.attn_drop(attn)
        out = (attn @ v).transpose(1, 2).reshape(B, Lq, C)
        return self.proj(out)


class BevLayer(nn.Module):
    """Pre-norm decoder layer: self-attn, cross-attn to image tokens, MLP; all residual."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 4):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.self_attn = BevSelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.cross_attn = BevCrossAttention(dim, heads)
        self.norm3 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_ratio * dim)

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.norm1(x))
        x = x + self.cross_attn(self.norm2(x), tokens)
        return x + self.mlp(self.norm3(x))


class ConvHead(nn.Module):
    """3x3 conv-BN-ReLU then 1x1 conv to logits; shared by the dense heads."""

    def __init__(self, cin: int, hidden: int, cout: int):
        super().__init__()
        self.conv = _conv_bn(cin, hidden, 3)
        self.relu = nn.ReLU()
        self.cls = nn.Conv2d(hidden, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cls(self.relu(self.conv(x)))


class DetectionHead(nn.Module):
    """Per-query class logits (Linear) and box regression (MLP)."""

    def __init__(self, dim: int, num_classes: int, box_dim: int):
        super().__init__()
        self.cls = nn.Linear(dim, num_classes)
        self.box = Mlp(dim, dim, box_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cls(x), self.box(x)


class DrivingModel(nn.Module):
    """Multi-camera perception: shared ResNet-18-style trunk + FPN over all cameras,
    learned BEV queries cross-attending to camera tokens, and several task heads.

    Input ``images``: (B, N_cam, 3, H, W), H and W divisible by 32.
    Output: dict, see DRIVING_OUTPUTS.
    """

    def __init__(
        self,
        n_cams: int = 6,
        depths=(2, 2, 2, 2),
        widths=(64, 128, 256, 512),
        stem_width: int = 64,
        dim: int = 256,
        heads: int = 8,
        bev_size: int = 16,
        layers: int = 2,
        det_classes: int = 10,
        box_dim: int = 10,
        seg_classes: int = 4,
        occ_bins: int = 8,
        depth_bins: int = 32,
    ):
        super().__init__()
        self.n_cams, self.bev_size, self.dim = n_cams, bev_size, dim
        self.backbone = ResNetTrunk(BasicBlock, depths, widths, stem_width)
        # FPN over strides 8/16/32; stride 8 feeds the depth head, 16 and 32 become tokens.
        self.fpn = FPN(self.backbone.out_channels[1:], dim)
        self.token_levels = (1, 2)
        self.cam_embed = nn.Parameter(torch.randn(n_cams, dim) * 0.02)
        self.level_embed = nn.Parameter(torch.randn(len(self.token_levels), dim) * 0.02)
        self.token_norm = nn.LayerNorm(dim)
        self.bev_queries = nn.Parameter(torch.randn(bev_size * bev_size, dim) * 0.02)
        self.bev_layers = nn.ModuleList(BevLayer(dim, heads) for _ in range(layers))
        self.bev_norm = nn.LayerNorm(dim)
        self.det_head = DetectionHead(dim, det_classes, box_dim)
        self.seg_head = ConvHead(dim, dim, seg_classes)
        self.occ_head = ConvHead(dim, dim, occ_bins)
        self.depth_head = ConvHead(dim, dim // 2, depth_bins)

    def _tokens(self, level: torch.Tensor, idx: int, B: int) -> torch.Tensor:
        """(B*N, C, h, w) -> (B, N*h*w, C) with camera and level embeddings added."""
        _, C, h, w = level.shape
        t = level.view(B, self.n_cams, C, h * w).transpose(2, 3)
        t = t + self.cam_embed[None, :, None, :] + self.level_embed[idx]
        return t.reshape(B, self.n_cams * h * w, C)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        B = images.shape[0]
        feats = self.backbone(images.flatten(0, 1))
        pyramid = self.fpn(feats[1:])

        depth = self.depth_head(pyramid[0])
        depth = depth.view(B, self.n_cams, *depth.shape[1:])

        tokens = torch.cat([self._tokens(pyramid[lvl], i, B) for i, lvl in enumerate(self.token_levels)], 1)
        tokens = self.token_norm(tokens)

        x = self.bev_queries.unsqueeze(0).expand(B, -1, -1)
        for layer in self.bev_layers:
            x = layer(x, tokens)
        x = self.bev_norm(x)

        det_logits, det_boxes = self.det_head(x)
        bev = x.transpose(1, 2).reshape(B, self.dim, self.bev_size, self.bev_size)
        return {
            "det_logits": det_logits,
            "det_boxes": det_boxes,
            "bev_seg": self.seg_head(bev),
            "occupancy": self.occ_head(bev),
            "depth": depth,
        }


# ----------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ZooEntry:
    name: str
    description: str
    build: Callable[..., nn.Module]  # build(tiny, image_size=None) -> fresh model in train mode
    make_inputs: Callable[[int, bool], tuple]  # make_inputs(batch, tiny) -> example inputs


# name -> (description, model class, full kwargs, tiny kwargs, full input shape, tiny input shape)
# Input shapes exclude the batch dim.
_TABLE = {
    "resnet50": (
        "ResNet-50 v1.5 image classifier (torchvision layout, 25.56M params)",
        ResNet,
        {},
        dict(depths=(1, 1, 1, 1), widths=(8, 16, 32, 64), stem_width=8, num_classes=10),
        (3, 224, 224),
        (3, 64, 64),
    ),
    "convnext_t": (
        "ConvNeXt-Tiny image classifier (28.59M params)",
        ConvNeXt,
        {},
        dict(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64), num_classes=10),
        (3, 224, 224),
        (3, 32, 32),
    ),
    "vit_b16": (
        "ViT-B/16 image classifier, attention via scaled_dot_product_attention (86.57M params)",
        VisionTransformer,
        {},
        dict(image_size=32, patch=8, dim=32, depth=1, heads=2, mlp_dim=64, num_classes=10),
        (3, 224, 224),
        (3, 32, 32),
    ),
    "driving": (
        "Multi-camera BEV driving model: ResNet-18-style trunk + FPN, BEV transformer with "
        "hand-written attention, detection/segmentation/occupancy/depth heads",
        DrivingModel,
        {},
        dict(
            n_cams=2, depths=(1, 1, 1, 1), widths=(8, 16, 32, 64), stem_width=8, dim=32, heads=2,
            bev_size=4, layers=1, det_classes=3, box_dim=10, seg_classes=2, occ_bins=4, depth_bins=8,
        ),
        (6, 3, 224, 224),
        (2, 3, 64, 64),
    ),
}


def _make_entry(name, description, cls, full, tiny, full_shape, tiny_shape) -> ZooEntry:
    kwargs = {False: full, True: tiny}
    shapes = {False: full_shape, True: tiny_shape}

    def build_fn(tiny: bool = False, image_size: int | None = None) -> nn.Module:
        # image_size: only models whose parameters depend on it (ViT position embeddings) take it
        takes = image_size is not None and "image_size" in inspect.signature(cls.__init__).parameters
        return cls(**{**kwargs[bool(tiny)], **({"image_size": image_size} if takes else {})}).train()

    def inputs_fn(batch: int = 2, tiny: bool = False) -> tuple:
        # Default device/dtype: float32 on CPU unless the caller set a device context.
        return (torch.randn(batch, *shapes[bool(tiny)]),)

    return ZooEntry(name, description, build_fn, inputs_fn)


ZOO: dict[str, ZooEntry] = {name: _make_entry(name, *spec) for name, spec in _TABLE.items()}


def names() -> list[str]:
    return list(ZOO)


def _entry(name: str) -> ZooEntry:
    try:
        return ZOO[name]
    except KeyError:
        raise ModelSpecError(f"unknown model {name!r}; known models: {', '.join(ZOO)}") from None


def build(name: str, tiny: bool = False, image_size: int | None = None) -> nn.Module:
    """Fresh model in train mode (full size, or the tiny test variant); ``image_size`` for models
    whose parameters depend on it (ViT)."""
    return _entry(name).build(tiny, image_size) if image_size is not None else _entry(name).build(tiny)


def example_inputs(name: str, batch: int = 2, tiny: bool = False) -> tuple:
    """Random float32 example inputs matching ``build(name, tiny)``."""
    return _entry(name).make_inputs(batch, tiny)
