"""Session fixtures: a tiny CLIPSeg on disk, one local Ray, and the S3 server (tests/s3_server.py)."""

from __future__ import annotations

import pathlib
from collections.abc import Iterator

import pytest

from tests.s3_server import s3_bucket, s3_server  # noqa: F401 - fixtures used by other test modules
from tests.tiny_models import make_tiny_clipseg

SLOW_FOLDERS = ("reliability", "cluster")  # fault and cluster tests: each starts Ray clusters of its own


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark the fault and cluster tests `slow`, so `pytest -m "not slow"` runs the quick rest apart."""
    for item in items:
        if pathlib.Path(str(item.fspath)).parent.name in SLOW_FOLDERS:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def tiny_clipseg_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return make_tiny_clipseg(tmp_path_factory.mktemp("tiny-clipseg"))


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny models gain nothing from threads, and on a loaded shared machine OpenMP threads waiting
    for each other made a module ~10x slower (24 s vs 2.5 s measured). Modules of tiny-model checks
    use it with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """One local Ray for the whole test session (starting one costs seconds)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()
