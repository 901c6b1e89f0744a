import pytest
import torch

from dsv4.engine.tools.synthetic import random_tensors, tiny_configs

TINY = tiny_configs()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_cfg():
    return TINY["swa-csa-hca"]


@pytest.fixture(scope="session")
def tiny_tensors(tiny_cfg):
    return random_tensors(tiny_cfg, seed=1)
