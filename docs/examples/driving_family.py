"""A family of driving models for `fxopt sweep`: trunk width x BEV transformer width.

    fxopt sweep docs/examples/driving_family.py:factory --grid width=32,64 dim=128,256,384 --batch 8
"""
import torch

from fxopt import zoo


def factory(width: int = 64, dim: int = 256, cams: int = 6):
    return zoo.DrivingModel(n_cams=cams, widths=(width, 2 * width, 4 * width, 8 * width), stem_width=width,
                            dim=dim)


def example_inputs(batch: int = 8, cams: int = 6):
    return (torch.randn(batch, cams, 3, 224, 224),)
