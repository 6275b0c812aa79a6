"""Shared fixtures: thread ranks on the host backend, fresh random inputs, a per-test
deadline, and the GPU gate (skip with a message, or fail under SYMMCOMM_REQUIRE_GPU=1)."""

from __future__ import annotations

import faulthandler
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

#: Seconds one test may run before the process dumps every thread's stack and exits.
TEST_TIMEOUT = float(os.environ.get("SYMMCOMM_TEST_TIMEOUT", "300"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    """Every test has a deadline: a hang dumps the stacks and ends the run, never waits."""
    faulthandler.dump_traceback_later(TEST_TIMEOUT, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


def pytest_collection_modifyitems(config, items):
    """Outside `SYMMCOMM_REQUIRE_GPU=1`, GPU tests that cannot run are skipped with the reason;
    under it they fail with the reason instead (see `gpu_or_skip`)."""


def require_gpu() -> bool:
    return os.environ.get("SYMMCOMM_REQUIRE_GPU") == "1"


def gpu_or_skip(min_gpus: int = 1):
    """torch with at least `min_gpus` CUDA devices, or a skip (a failure when
    SYMMCOMM_REQUIRE_GPU=1 and no GPU at all is usable; a 2-GPU test on a 1-GPU machine is
    skipped either way, with its reason)."""
    try:
        import torch
    except ImportError:
        why = "torch is not installed"
        if require_gpu():
            pytest.fail(f"SYMMCOMM_REQUIRE_GPU=1 but {why}")
        pytest.skip(why)
    if not torch.cuda.is_available():
        why = "no CUDA device is visible to torch"
        if require_gpu():
            pytest.fail(f"SYMMCOMM_REQUIRE_GPU=1 but {why}")
        pytest.skip(why)
    n = torch.cuda.device_count()
    if n < min_gpus:
        pytest.skip(f"needs {min_gpus} GPUs, {n} visible")
    return torch


@pytest.fixture
def rng(request):
    """A generator seeded by the test's name and SYMMCOMM_TEST_SEED (default 0): fresh inputs
    per test, reproducible from the name and the seed a failure prints."""
    import zlib

    import numpy as np

    seed = zlib.crc32(request.node.nodeid.encode()) ^ int(os.environ.get("SYMMCOMM_TEST_SEED", "0"))
    request.node.user_properties.append(("seed", seed))
    print(f"seed {seed} (SYMMCOMM_TEST_SEED={os.environ.get('SYMMCOMM_TEST_SEED', '0')})")
    return np.random.default_rng(seed)
