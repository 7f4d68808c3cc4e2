import pytest
import torch


def pytest_collection_modifyitems(config, items):
    """GPU tests are skipped, with the reason, where no CUDA device exists; never faked."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
