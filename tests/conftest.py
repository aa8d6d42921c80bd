"""Session fixtures: a tiny CLIPSeg on disk, one local Ray, and the S3 server (tests/s3_server.py)."""

from __future__ import annotations

import pathlib
from collections.abc import Iterator

import pytest

from tests.s3_server import s3_bucket, s3_server  # noqa: F401 - fixtures used by other test modules
from tests.tiny_models import make_tiny_clipseg


@pytest.fixture(scope="session")
def tiny_clipseg_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return make_tiny_clipseg(tmp_path_factory.mktemp("tiny-clipseg"))


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """One local Ray for the whole test session (starting one costs seconds)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()
