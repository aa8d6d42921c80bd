"""A real S3 endpoint over loopback for tests: moto's server in a thread, reached through s3fs like a bucket.

Import the fixtures into conftest.py (`from tests.s3_server import s3_bucket, s3_server`). The fake
credentials travel only in `storage_options` and the boto3 client built here, never in the environment, so
no other test sees them. Code under test gets no mocks: it talks HTTP to this server as it would to AWS.
"""

from __future__ import annotations

import functools
import logging
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

REGION = "us-east-1"  # the one region where CreateBucket needs no LocationConstraint
ACCESS_KEY = "textseg-test-key"
SECRET_KEY = "textseg-test-secret"


@dataclass(frozen=True)
class S3Server:
    """A running moto S3 server: where it listens and how to reach it."""

    endpoint_url: str

    @property
    def storage_options(self) -> dict[str, Any]:
        """Options for s3fs (and textseg's `storage_options`) that reach this server with fake credentials."""
        return {
            "key": ACCESS_KEY,
            "secret": SECRET_KEY,
            "client_kwargs": {"endpoint_url": self.endpoint_url, "region_name": REGION},
        }

    def client(self) -> Any:
        """A boto3 S3 client for arranging test data behind the back of the code under test."""
        return self._client

    @functools.cached_property
    def _client(self) -> Any:  # one per server: building a boto3 client takes ~0.1 s
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=REGION,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
        )

    def create_bucket(self, name: str | None = None) -> str:
        """Create a bucket (a fresh unique name unless given) and return its name."""
        bucket = name or f"textseg-test-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=bucket)
        return bucket

    def put_object(self, bucket: str, key: str, body: bytes) -> None:
        """Write one object directly with boto3 (e.g. a key s3fs itself would refuse to produce)."""
        self.client().put_object(Bucket=bucket, Key=key, Body=body)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """One moto S3 server on 127.0.0.1 and a free port for the whole session."""
    from moto.server import ThreadedMotoServer

    werkzeug_logger = logging.getLogger("werkzeug")
    previous_level = werkzeug_logger.level
    werkzeug_logger.setLevel(logging.WARNING)  # one line per request would bury real failures
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield S3Server(endpoint_url=f"http://{host}:{port}")
    finally:
        server.stop()
        werkzeug_logger.setLevel(previous_level)


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> str:
    """A fresh empty bucket on the session's server: unique per test, so tests never see each other's keys."""
    return s3_server.create_bucket()
