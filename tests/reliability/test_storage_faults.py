"""Storage faults, injected for real: tests/reliability/faulty_s3.py sits between textseg and moto's S3 server
and answers 503 SlowDown, 500, connection resets, timeouts, and writes that land but whose answer is lost.

Runs go through `textseg label`. botocore's own retries are cut to 2 attempts (and its timeouts to 1 s)
with --storage-option, so the faults get through to the layers above it (s3fs's retries and textseg's
`call_with_retry`), which must absorb them: every image is labeled once, the masks equal the in-process
runner's, and nothing is lost or written twice. Permanent errors are not retried: they become that
image's error row. A DEST that cannot be written fails the job before any model loads.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import uuid
from collections import Counter

import fsspec
import pytest

from tests.reliability.conftest import subprocess_env
from tests.reliability.dataset import (
    PROMPTS,
    Runs,
    label_args,
    lost_and_duplicated,
    mask_bytes,
    reference_masks,
    tiny_images,
    tiny_png,
)
from tests.reliability.faulty_s3 import TRANSIENT_FAULTS, FaultyS3Proxy, Rule
from tests.s3_server import REGION, S3Server
from textseg.cli import main

IMAGES = 12
DENIED, VANISHED = "denied.png", "gone/vanished.png"


def _options(s3_server: S3Server, endpoint_url: str) -> list[str]:
    """`textseg label` storage options: the proxy, moto's fake credentials, botocore cut to 2 attempts and
    1 s timeouts (numbers given on the command line, as a nightly job's config would give them)."""
    return [
        f"--storage-option=client_kwargs.endpoint_url={endpoint_url}",
        f"--storage-option=client_kwargs.region_name={REGION}",
        f"--storage-option=key={s3_server.storage_options['key']}",
        f"--storage-option=secret={s3_server.storage_options['secret']}",
        "--storage-option=config_kwargs.retries.max_attempts=2",
        "--storage-option=config_kwargs.retries.mode=standard",
        "--storage-option=config_kwargs.read_timeout=1",
        "--storage-option=config_kwargs.connect_timeout=1.0",
    ]


@pytest.fixture(scope="module")
def flaky_run(
    s3_server: S3Server,
    tiny_clipseg_dir: pathlib.Path,
    tmp_path_factory: pytest.TempPathFactory,
    ray_session: None,
) -> dict:
    """One labeling run from S3 to S3 through a proxy that fails ~25% of requests (seeded), plus every
    transient fault kind once on a known request, a 403 on one object and a 404 on another."""
    bucket = s3_server.create_bucket()
    images = tiny_images(IMAGES, seed=3)
    for relpath, data in {**images, DENIED: tiny_png(1), VANISHED: tiny_png(2)}.items():
        s3_server.put_object(bucket, f"raw/{relpath}", data)
    first = sorted(images)
    rules = [Rule("GET", rf"^raw/{DENIED}$", "deny"), Rule("GET", rf"^raw/{VANISHED}$", "missing")]
    # Each transient kind three times in a row on one request: more than botocore's 2 attempts absorb.
    rules += [
        Rule("GET", "^raw/" + first[i].replace(" ", ".") + "$", kind, times=3)
        for i, kind in enumerate(TRANSIENT_FAULTS)
    ]
    rules += [
        Rule("PUT", "/masks/" + first[-1].replace(" ", "."), "commit_then_reset", times=3),
        Rule("PUT", "/metadata/.*part-", "slowdown", times=3),
    ]
    proxy = FaultyS3Proxy(
        s3_server.endpoint_url,
        seed=11,
        rate=0.25,
        faults=TRANSIENT_FAULTS,
        max_consecutive=3,
        timeout_delay_s=2.5,
        rules=rules,
    )
    with proxy:
        args = label_args(
            f"s3://{bucket}/raw/", f"s3://{bucket}/labels", tiny_clipseg_dir, "--max-error-rate", "1"
        )
        assert main([*args, *_options(s3_server, proxy.endpoint_url)]) == 0
    fs = fsspec.filesystem("s3", skip_instance_cache=True, **s3_server.storage_options)
    runs = Runs.read(fs, f"{bucket}/labels")
    return {
        "summary": runs.summaries[-1],
        "runs": runs,
        "masks": mask_bytes(fs, f"{bucket}/labels"),
        "reference": reference_masks(tiny_clipseg_dir, images, tmp_path_factory.mktemp("reference")),
        "images": images,
        "proxy": proxy,
    }


def test_transient_s3_faults_are_retried_and_no_row_is_lost_or_duplicated(flaky_run: dict, ledger) -> None:
    runs: Runs = flaky_run["runs"]
    proxy: FaultyS3Proxy = flaky_run["proxy"]
    expected = [*flaky_run["images"], DENIED, VANISHED]
    lost, duplicated = lost_and_duplicated(runs.rows, expected)
    injected = {kind: proxy.injected[kind] for kind in TRANSIENT_FAULTS}
    ledger(
        f"S3 503/500/reset/timeout/lost-answer ({sum(injected.values())} injected) + 403 + 404",
        runs=1,
        images=len(expected),
        lost=lost,
        duplicated=duplicated,
    )

    assert all(count >= 3 for count in injected.values()), injected  # every kind, more than botocore absorbs
    assert (lost, duplicated) == (0, 0)
    ok = {row["relpath"] for row in runs.ok_rows()}
    assert ok == set(flaky_run["images"])
    summary = flaky_run["summary"]
    assert (summary["listed"], summary["skipped"], summary["ok"], summary["error"]) == (
        IMAGES + 2,
        0,
        IMAGES,
        2,
    )
    assert summary["status"] == "succeeded"
    assert flaky_run["masks"] == flaky_run["reference"]
    # Published by single PUTs: no multipart upload, so no reader can ever see part of a mask.
    assert not proxy.requests(lambda r: "uploads" in r.query or "uploadId" in r.query)
    assert len(runs.summaries) == 1


def test_a_permanent_error_for_one_object_becomes_that_images_error_row(flaky_run: dict) -> None:
    rows = {row["relpath"]: row for row in flaky_run["runs"].rows}
    assert rows[DENIED]["status"] == "error"
    assert rows[DENIED]["error"] == "access denied reading the source object"
    assert rows[VANISHED]["status"] == "error"
    assert rows[VANISHED]["error"] == "source object not found (deleted or renamed after listing)"
    # Permanent: asked once, not retried five times with backoff.
    gets = Counter(r.key for r in flaky_run["proxy"].requests(lambda r: r.method == "GET"))
    assert gets[f"raw/{DENIED}"] == 1 and gets[f"raw/{VANISHED}"] == 1, gets


FAIL_FAST_SCRIPT = """
import json, sys
from textseg.cli import main
results = [main(args) for args in json.loads(sys.argv[1])]
heavy = ("ray", "torch", "transformers", "textseg.pipeline.label", "textseg.plan.runner_ray")
loaded = sorted(m for m in heavy if m in sys.modules)
print("SENTINEL " + json.dumps({"exit": results, "loaded": loaded}))
"""


def test_unwritable_dest_or_missing_bucket_fails_fast_before_any_model_loads(
    s3_server: S3Server,
    s3_bucket: str,
    tiny_clipseg_dir: pathlib.Path,
    tmp_path: pathlib.Path,
    ray_tmpdir,
    ledger,
) -> None:
    images = tiny_images(3, seed=4)
    for relpath, data in images.items():
        s3_server.put_object(s3_bucket, f"raw/{relpath}", data)
    a_file = tmp_path / "a-file"
    a_file.write_bytes(b"not a folder")
    missing_bucket = f"no-such-bucket-{uuid.uuid4().hex[:8]}"
    deny_writes = Rule("PUT", "^read-only/", "deny")
    with FaultyS3Proxy(s3_server.endpoint_url, rules=[deny_writes]) as proxy:
        s3 = [
            f"--storage-option=client_kwargs.endpoint_url={proxy.endpoint_url}",
            f"--storage-option=key={s3_server.storage_options['key']}",
            f"--storage-option=secret={s3_server.storage_options['secret']}",
        ]
        common = ["--model", str(tiny_clipseg_dir), "--prompts", PROMPTS, "--device", "cpu", *s3]
        cases = {
            "missing bucket": ["label", f"s3://{s3_bucket}/raw/", f"s3://{missing_bucket}/out", *common],
            "writes denied": ["label", f"s3://{s3_bucket}/raw/", f"s3://{s3_bucket}/read-only/out", *common],
            "folder is a file": ["label", f"s3://{s3_bucket}/raw/", str(a_file / "out"), *common],
        }
        done = subprocess.run(
            [sys.executable, "-c", FAIL_FAST_SCRIPT, json.dumps(list(cases.values()))],
            env=subprocess_env(ray_tmpdir),
            capture_output=True,
            text=True,
            timeout=300,
        )
    ledger(
        "DEST unwritable / bucket missing (refused before listing: no rows expected)",
        runs=len(cases),
        images=0,
        lost=0,
        duplicated=0,
    )
    sentinel = json.loads(done.stdout.split("SENTINEL ", 1)[1])
    assert sentinel["exit"] == [2, 2, 2], done.stderr
    assert sentinel["loaded"] == [], "the model (or Ray) was loaded before DEST was checked"
    assert not any(ray_tmpdir.iterdir()), "Ray was started"
    errors = [line for line in done.stderr.splitlines() if line.startswith("textseg: ")]
    assert len(errors) == 3 and "Traceback" not in done.stderr, done.stderr
    assert f"bucket '{missing_bucket}' does not exist" in errors[0]
    assert "access denied writing to" in errors[1] and "read-only/out" in errors[1]
    assert str(a_file) in errors[2] and "cannot" in errors[2]
    assert not proxy.requests(lambda r: r.method == "GET" and r.key.startswith("raw/")), "images were read"


def test_timeouts_and_retry_counts_from_the_command_line_are_numbers_but_secrets_stay_strings() -> None:
    from textseg.config import parse_storage_options

    options = parse_storage_options(
        [
            "config_kwargs.read_timeout=5",
            "config_kwargs.retries.max_attempts=3",
            "secret=12345678",
            "key=424242",
        ]
    )
    assert options == {
        "config_kwargs": {"read_timeout": 5, "retries": {"max_attempts": 3}},
        "secret": "12345678",  # a secret that looks like a number is still found and redacted
        "key": "424242",
    }
