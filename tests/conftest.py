import os

import pytest
import torch

torch.set_num_threads(int(os.environ.get("LMFORGE_TEST_THREADS", "2")))


def pytest_sessionstart(session):
    """The C++ kernels of every level the tests run, compiled side by side before the first test needs one."""
    from lmforge import kernels

    if kernels.enabled():
        kernels.prebuild(jobs=os.cpu_count() or 1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
