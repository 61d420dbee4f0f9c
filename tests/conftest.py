"""Shared test fixtures: fresh random seeds (printed, so a failure can be replayed) and devices."""

import os

import pytest
import torch

import pfkernels

CUDA_OK = pfkernels.backend_info()["cuda_available"]
DEVICES = ["cpu"] + (["cuda"] if CUDA_OK else [])


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU and a CUDA build of pfkernels")
    for item in items:
        if "cuda" in item.keywords and not CUDA_OK:
            item.add_marker(skip)


@pytest.fixture
def seed():
    """A fresh seed per test; replay a failure with PFK_SEED=<printed value>."""
    value = int(os.environ.get("PFK_SEED", int.from_bytes(os.urandom(4), "little")))
    print(f"PFK_SEED={value}")
    torch.manual_seed(value)
    return value


@pytest.fixture
def gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny problems, restored afterwards.

    With several threads on a shared 2-core machine, waking the OpenMP team costs far more than
    the arithmetic (measured while developing: single optimizer steps and HVPs of 3k-parameter
    models up to ~100x slower under load).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
