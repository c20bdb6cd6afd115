"""Shared test fixtures. Kept small: only what several test files need."""

import pytest

from references.cache import ENV_VAR

# The longest files first. The README's command runs the suite on two workers, a file on one
# worker from start to end (`-n 2 --dist loadfile`: module fixtures are built once), handed
# out in collection order (`--no-loadscope-reorder`; xdist's default order, most tests first,
# left test_cluster.py's four tests, six minutes of Ray clusters, running alone at the end).
# test_interrupts.py was split from test_reliability.py (which held one worker for 26 of the
# suite's 36 minutes, measured at stop 40 on this VM's AMD cores) so that no single file holds
# a worker for most of the run.
FIRST = ("test_reliability.py", "test_interrupts.py", "test_cluster.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(FIRST)))  # stable: files' own order


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """Point the project cache at a fresh per-session folder (one per worker under xdist), so
    tests never read or write the user's ~/.cache/alignsweep and always exercise a cold cache
    first."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(ENV_VAR, str(tmp_path_factory.mktemp("alignsweep-cache")))
        yield


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a test module: the test machine's cores are shared, and OpenMP
    threads spinning against other processes make a 20 ms step take seconds."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
