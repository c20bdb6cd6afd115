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
