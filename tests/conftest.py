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
    """Tests marked `longest` (minutes on one core) at the head of each xdist worker's share: `make test`'s
    workers (--dist worksteal) each take a contiguous share of the collection and run it in order, stealing from
    the tail of another's queue once theirs is empty. So these start at once, on different workers, and never wait
    at the end alone (under --dist load one worker idled for minutes at the end while the other's queue ran)."""
    longest = [item for item in items if item.get_closest_marker("longest")]
    rest = [item for item in items if not item.get_closest_marker("longest")]
    starts, left = [], len(items)
    for remaining in range(_WORKERS, 0, -1):  # worksteal's first split: len // remaining to each idle worker
        starts.append(len(items) - left)
        left -= left // remaining
    for position, item in sorted(zip(starts, longest, strict=False), key=lambda pair: -pair[0]):
        rest.insert(min(position, len(rest)), item)
    rest[:0] = longest[len(starts):]  # more of them than workers: the rest first
    items[:] = rest


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
    torch.set_num_threads(THREADS)  # a training run in the test process sets its config's `threads`
