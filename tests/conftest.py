"""Shared test fixtures. Kept small: only what several test files need."""

import pytest

from references.cache import ENV_VAR


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """Point the project cache at a fresh per-session folder, so tests never read or write the
    user's ~/.cache/alignsweep and always exercise a cold cache first."""
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
