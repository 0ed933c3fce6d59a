"""Shared fixtures. Every test session gets its own TFDS data dir and no persistent compilation
cache (``learned-opt``'s, in the user's cache folder): tests never touch the user's files."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session", autouse=True)
def tfds_data_dir(tmp_path_factory):
    """A fresh ``$TFDS_DATA_DIR`` for the whole session (digits is prepared there on first use)."""
    path = tmp_path_factory.mktemp("tensorflow_datasets")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TFDS_DATA_DIR", str(path))
        yield path


@pytest.fixture(scope="session", autouse=True)
def no_compile_cache():
    """``LEARNED_OPT_COMPILE_CACHE=off`` for the session: ``learned-opt`` commands run in the test
    process or as subprocesses neither write to nor read from a cache folder."""
    from outer_train.runtime import compile_cache

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(compile_cache.ENV_VAR, "off")
        mp.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
        yield


@pytest.fixture(scope="session")
def digits(tfds_data_dir):
    """The digits dataset (8x8), loaded once per session."""
    from tasks.datasets import load_dataset

    return load_dataset("digits")


@pytest.fixture(scope="session")
def standard_task(digits):
    """The project's standard task: digits 8x8, MLP 64-32-32-10, ReLU, batch 128."""
    from tasks.image_mlp import STANDARD_PRESET, preset

    return preset(STANDARD_PRESET)
