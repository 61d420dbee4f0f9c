"""The compiled extension loads and describes itself."""

import torch

import pfkernels


def test_extension_loaded():
    info = pfkernels.backend_info()
    assert info["extension_loaded"], info.get("import_error")


def test_backend_info_fields():
    info = pfkernels.backend_info()
    for key in ("version", "cuda_built", "cuda_archs", "cuda_available", "cpu_threads", "openmp"):
        assert key in info
    assert info["version"] == pfkernels.__version__
    assert isinstance(info["cuda_built"], bool)
    assert info["cpu_threads"] >= 1
    if info["cuda_available"]:
        assert info["cuda_built"] and torch.cuda.is_available()
    if info["cuda_built"]:
        assert info["cuda_archs"]
