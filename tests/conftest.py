"""Shared test settings and fixtures.

Tests run on a 2-core CPU alongside each other: torch is limited to one thread per test
process so that multi-process tests (torchrun, accelerate launch, Slurm) do not oversubscribe.
Fixtures used by several modules live here; plain helpers are imported from ``helpers``,
``predict_fixtures`` and ``slurm_helpers``.
"""

import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def slurm_cluster():
    """The real local Slurm cluster (tests/slurm_helpers.py decides whether to skip or fail)."""
    from slurm_helpers import cluster

    yield from cluster()


@pytest.fixture(scope="session")
def smoke_shards(tmp_path_factory):
    """24 demo pairs of 64 px in shards of 4 (6 train shards: enough for 4 ranks x 1 worker)."""
    from helpers import demo_shards

    return demo_shards(tmp_path_factory.mktemp("smoke-data"), n=24, size=64, shard_size=4)
