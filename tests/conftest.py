"""Test-wide setup: Triton runs in its interpreter on CPU-only machines; GPU tests skip cleanly."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must be set before any @triton.jit function is defined, so it lives here, not in a test.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_sessionstart(session):
    # The distributed harness's fork server imports torch, Megatron-Core and moba_cp (~10 s) on the
    # other core while this process collects (~10 s); the first distributed test then finds it ready.
    if not session.config.option.collectonly:
        from tests.distributed_harness import start_server

        start_server()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
