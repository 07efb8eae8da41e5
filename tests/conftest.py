import os

import pytest
import torch

# `make test` runs two pytest-xdist workers: each, and the processes its tests start, gets its share of the cores
# (one on 2), so that they do not oversubscribe them
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
THREADS = int(os.environ.get("LMFORGE_TEST_THREADS", max(1, (os.cpu_count() or 1) // _WORKERS)))
torch.set_num_threads(THREADS)
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))


def pytest_sessionstart(session):
    """The C++ kernels of every level the tests run, compiled side by side before the first test needs one."""
    from lmforge import kernels

    if hasattr(session.config, "workerinput"):  # an xdist worker: the controller built them before starting it
        return
    if kernels.enabled():
        kernels.prebuild(jobs=os.cpu_count() or 1)


def pytest_collection_modifyitems(items):
    """Tests marked `longest` (minutes on one core) first: `make test`'s xdist workers (--dist load) take the first
    tests one each, so these start at once on different workers instead of last, alone."""
    items.sort(key=lambda item: item.get_closest_marker("longest") is None)  # stable: the rest keep their order


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
    torch.set_num_threads(THREADS)  # a training run in the test process sets its config's `threads`
