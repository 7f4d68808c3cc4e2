import os

import pytest
import torch

# Without a GPU, fxopt's Triton kernels run in Triton's interpreter (it reads this when a kernel
# is defined); on a GPU they are compiled for it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    """GPU tests are skipped, with the reason, where no CUDA device exists; never faked."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
