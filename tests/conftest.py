import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session", autouse=True)
def builtin_cache(tmp_path_factory):
    """Render the built-in shapes sets into one temporary cache for the session.

    Datasets register once per process and keep the cache root they saw then, so every test
    module must see the same root (and tests must not write into the user's ~/.cache).
    """
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CROSSMAE_VITDET_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield
