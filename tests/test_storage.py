"""textseg.storage against local disk and a real S3 protocol server (moto over loopback, through s3fs)."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, ReadTimeoutError
from s3fs.errors import translate_boto_error

from tests.s3_server import S3Server
from textseg.storage import (
    StorageError,
    call_with_retry,
    check_writable,
    filesystem_for,
    is_transient,
    join_uri,
    pyarrow_filesystem,
    read_bytes,
    redact,
    redact_uri,
    relpath_problem,
    secret_values,
    split_credentials,
    write_bytes_atomic,
)


def _client_error(code: str, status: int) -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "Op"
    )


class _Flaky:
    """Our own test double: raises the given errors in turn, then returns 'done'."""

    def __init__(self, *errors: BaseException) -> None:
        self.errors = list(errors)
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "done"


# ----------------------------------------------------------------------------------------------------------
# Filesystems and URIs


def test_filesystem_for_local_path_and_file_uri_give_the_same_absolute_path(tmp_path: Path) -> None:
    fs_plain, path_plain = filesystem_for(str(tmp_path / "imgs"))
    fs_uri, path_uri = filesystem_for(f"file://{tmp_path}/imgs/")
    assert path_plain == path_uri == f"{tmp_path}/imgs"
    assert "file" in fs_plain.protocol and "file" in fs_uri.protocol


def test_filesystem_for_s3_reaches_the_endpoint_in_storage_options(
    s3_server: S3Server, s3_bucket: str
) -> None:
    s3_server.put_object(s3_bucket, "raw/a.jpg", b"abc")
    fs, path = filesystem_for(f"s3://{s3_bucket}/raw/", s3_server.storage_options)
    assert path == f"{s3_bucket}/raw"
    assert fs.ls(path) == [f"{s3_bucket}/raw/a.jpg"]


def test_filesystem_for_moves_credentials_out_of_an_s3_uri(s3_server: S3Server, s3_bucket: str) -> None:
    s3_server.put_object(s3_bucket, "a.jpg", b"abc")
    options = {"client_kwargs": s3_server.storage_options["client_kwargs"]}
    fs, path = filesystem_for(f"s3://textseg-test-key:textseg-test-secret@{s3_bucket}/a.jpg", options)
    assert path == f"{s3_bucket}/a.jpg"
    assert "textseg-test-secret" not in path
    assert read_bytes(fs, path) == b"abc"


def test_conflicting_credentials_in_uri_and_options_fail_without_showing_them() -> None:
    with pytest.raises(StorageError, match="one way only") as caught:
        filesystem_for(
            "s3://AKIAEXAMPLE:uri-secret-value@bucket/x", {"key": "AKIAOTHER", "secret": "opt-secret"}
        )
    assert "uri-secret-value" not in str(caught.value) and "AKIAEXAMPLE" not in str(caught.value)


def test_split_credentials_unquotes_and_leaves_other_protocols_alone() -> None:
    assert split_credentials("s3://AKIA1:se%2Fcr%2Bet@bucket/k.jpg") == (
        "s3://bucket/k.jpg",
        {"key": "AKIA1", "secret": "se/cr+et"},
    )
    assert split_credentials("s3://AKIA1:se/cret@bucket/k.jpg")[1] == {"key": "AKIA1", "secret": "se/cret"}
    assert split_credentials("abfs://container@account.dfs.core.windows.net/p") == (
        "abfs://container@account.dfs.core.windows.net/p",
        {},
    )
    assert split_credentials("s3://bucket/user@example.com.jpg") == ("s3://bucket/user@example.com.jpg", {})


def test_unknown_protocol_fails_with_a_storage_error() -> None:
    with pytest.raises(StorageError, match="cannot open 'nosuchproto://"):
        filesystem_for("nosuchproto://bucket/x")


def test_aws_endpoint_url_from_the_environment_is_honoured(
    s3_server: S3Server, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Documented: an S3-compatible endpoint may come from AWS_ENDPOINT_URL alone (botocore 1.31+)."""
    for name in ("AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "env-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    s3_server.put_object(s3_bucket, "env/a.jpg", b"abc")
    fs, path = filesystem_for(f"s3://{s3_bucket}/env", {"skip_instance_cache": True})
    assert fs.ls(path) == [f"{s3_bucket}/env/a.jpg"]


def test_join_uri_keeps_the_protocol_and_refuses_paths_that_escape() -> None:
    assert join_uri("s3://b/out/", "masks/a b.png") == "s3://b/out/masks/a b.png"
    assert join_uri("file:///data/out", "masks/ü.png") == "file:///data/out/masks/ü.png"
    assert join_uri("/data/out", "x.png") == "/data/out/x.png"
    for unsafe in ("../x.png", "a/../../x.png", "/etc/passwd", "a//b.png", "./a.png", "a\\..\\b.png", ""):
        with pytest.raises(ValueError, match="refusing"):
            join_uri("s3://b/out", unsafe)


def test_relpath_problem_accepts_ordinary_names() -> None:
    assert relpath_problem("a/b c/ü.jpg") is None
    assert relpath_problem("..a/b..c.jpg") is None  # dots inside a name are just characters
    assert "'..'" in (relpath_problem("a/../b.jpg") or "")


# ----------------------------------------------------------------------------------------------------------
# Redaction


def test_redact_uri_drops_userinfo_and_signature_query_parameters() -> None:
    assert redact_uri("s3://AKIA1:se/cr+et@bucket/k.jpg") == "s3://bucket/k.jpg"
    assert redact_uri("s3://AKIA1@bucket/k.jpg") == "s3://bucket/k.jpg"
    assert redact_uri("https://user:pw@host/x.jpg") == "https://host/x.jpg"
    presigned = (
        "https://b.s3.amazonaws.com/k.jpg?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIA%2F20250101"
        "&X-Amz-Signature=abcdef&X-Amz-Security-Token=tok&versionId=3"
    )
    assert (
        redact_uri(presigned)
        == "https://b.s3.amazonaws.com/k.jpg?X-Amz-Algorithm=AWS4-HMAC-SHA256&versionId=3"
    )
    assert redact_uri("https://a.blob.core.windows.net/c/x.png?sv=2020&sig=SECRET") == (
        "https://a.blob.core.windows.net/c/x.png?sv=2020"
    )
    assert (
        redact_uri("https://h/x.png?AWSAccessKeyId=AK&Signature=S&Expires=1") == "https://h/x.png?Expires=1"
    )


def test_redact_uri_keeps_names_that_only_look_like_userinfo() -> None:
    for uri in (
        "s3://bucket/photos/john@example.com.jpg",
        "s3://bucket/a:b@c.jpg",
        "https://host:8080/a@b.jpg",
        "abfs://container@account.dfs.core.windows.net/p.png",
        "/data/user:pw@x.jpg",
        "gs://bucket/k.jpg",
    ):
        assert redact_uri(uri) == uri


def test_secret_values_finds_secrets_at_any_depth_and_redact_hides_them() -> None:
    options = {
        "key": "AKIAEXAMPLEKEY",
        "secret": "wJalr/XUtnFEMI+K7MDENG",
        "client_kwargs": {
            "endpoint_url": "http://minio:9000",
            "region_name": "eu-west-1",
            "aws_session_token": "TOK3N",
        },
        "config_kwargs": {"retries": {"max_attempts": 3}},
        "anon": False,
    }
    secrets = secret_values(options)
    assert sorted(secrets) == sorted(["AKIAEXAMPLEKEY", "wJalr/XUtnFEMI+K7MDENG", "TOK3N"])
    message = "denied for AKIAEXAMPLEKEY at http://minio:9000/b?s=wJalr%2FXUtnFEMI%2BK7MDENG token TOK3N"
    assert redact(message, secrets) == "denied for *** at http://minio:9000/b?s=*** token ***"


def test_redact_ignores_values_too_short_to_be_secrets() -> None:
    assert redact("a b c 123", ["a", "12"]) == "a b c 123"


# ----------------------------------------------------------------------------------------------------------
# Transient or permanent


@pytest.mark.parametrize(
    "err",
    [
        _client_error("SlowDown", 503),
        _client_error("InternalError", 500),
        _client_error("503", 503),  # HEAD responses carry only the status
        _client_error("BadGateway", 502),
        _client_error("GatewayTimeout", 504),
        _client_error("ThrottlingException", 400),
        _client_error("RequestTimeout", 400),
        translate_boto_error(_client_error("SlowDown", 503)),  # what s3fs raises: OSError(EBUSY) from it
        EndpointConnectionError(endpoint_url="http://127.0.0.1:9"),
        ReadTimeoutError(endpoint_url="http://127.0.0.1:9"),
        ConnectionResetError(errno.ECONNRESET, "reset by peer"),
        OSError(errno.ECONNRESET, "reset by peer"),
        TimeoutError("timed out"),
    ],
    ids=lambda err: f"{type(err).__name__}:{err}"[:60],
)
def test_is_transient_retries_throttling_server_errors_and_network_faults(err: BaseException) -> None:
    assert is_transient(err)


@pytest.mark.parametrize(
    "err",
    [
        _client_error("NoSuchKey", 404),
        _client_error("NoSuchBucket", 404),
        _client_error("AccessDenied", 403),
        _client_error("InvalidAccessKeyId", 403),
        translate_boto_error(_client_error("NoSuchKey", 404)),  # FileNotFoundError from ClientError
        translate_boto_error(_client_error("AccessDenied", 403)),  # PermissionError from ClientError
        translate_boto_error(_client_error("RestoreAlreadyInProgress", 409)),  # EBUSY, but the code decides
        StorageError("write 'x' failed 5 times"),  # already retried: never again around an outer loop
        FileNotFoundError(errno.ENOENT, "gone"),
        PermissionError(errno.EACCES, "denied"),
        IsADirectoryError(errno.EISDIR, "a folder"),
        OSError(errno.ENOSPC, "disk full"),
        ValueError("bad argument"),
    ],
    ids=lambda err: f"{type(err).__name__}:{err}"[:60],
)
def test_is_transient_refuses_permanent_errors(err: BaseException) -> None:
    assert not is_transient(err)


def test_a_refused_connection_through_s3fs_is_transient() -> None:
    """A real fault, not a constructed one: what s3fs raises when nothing listens on the endpoint."""
    fs, path = filesystem_for(
        "s3://bucket/x.jpg",
        {
            "key": "k",
            "secret": "s",
            "skip_instance_cache": True,
            "client_kwargs": {"endpoint_url": "http://127.0.0.1:9", "region_name": "us-east-1"},
            "config_kwargs": {"retries": {"max_attempts": 1, "mode": "standard"}, "connect_timeout": 1},
        },
    )
    fs.retries = 1  # s3fs's own retry loop; ours is the one under test
    with pytest.raises(Exception) as caught:
        fs.cat_file(path)
    assert is_transient(caught.value)


def test_a_missing_key_on_s3_is_permanent(s3_server: S3Server, s3_bucket: str) -> None:
    fs, path = filesystem_for(f"s3://{s3_bucket}/missing.jpg", s3_server.storage_options)
    with pytest.raises(FileNotFoundError) as caught:
        fs.cat_file(path)
    assert not is_transient(caught.value)


# ----------------------------------------------------------------------------------------------------------
# Retries


def test_call_with_retry_retries_a_transient_error_until_it_succeeds() -> None:
    flaky = _Flaky(_client_error("SlowDown", 503), ConnectionResetError(errno.ECONNRESET, "reset"))
    assert call_with_retry(flaky, "write 's3://b/a.png'", base_delay=0.001) == "done"
    assert flaky.calls == 3


def test_call_with_retry_raises_a_permanent_error_at_once_and_unchanged() -> None:
    flaky = _Flaky(FileNotFoundError(errno.ENOENT, "no such key"))
    with pytest.raises(FileNotFoundError, match="no such key"):
        call_with_retry(flaky, "read 's3://b/a.jpg'", base_delay=0.001)
    assert flaky.calls == 1


def test_call_with_retry_names_what_it_was_doing_when_attempts_run_out() -> None:
    flaky = _Flaky(*[_client_error("SlowDown", 503)] * 5)
    with pytest.raises(StorageError, match=r"^write 's3://b/masks/a.png' failed 3 times") as caught:
        call_with_retry(flaky, "write 's3://b/masks/a.png'", attempts=3, base_delay=0.001)
    assert flaky.calls == 3
    assert isinstance(caught.value.__cause__, ClientError)


def test_call_with_retry_backs_off_with_jitter_below_the_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    delays: list[float] = []
    monkeypatch.setattr("textseg.storage.time.sleep", delays.append)  # record instead of waiting
    flaky = _Flaky(*[TimeoutError("slow")] * 4)
    call_with_retry(flaky, "read x", attempts=5, base_delay=1.0, max_delay=2.5)
    assert len(delays) == 4
    for attempt, delay in enumerate(delays, start=1):
        assert 0.0 <= delay <= min(2.5, 1.0 * 2 ** (attempt - 1))


# ----------------------------------------------------------------------------------------------------------
# Reads and writes


def test_atomic_local_write_creates_folders_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    fs, root = filesystem_for(str(tmp_path))
    target = f"{root}/masks/a b/ü.png"
    write_bytes_atomic(fs, target, b"first")
    write_bytes_atomic(fs, target, b"second, longer")
    assert Path(target).read_bytes() == b"second, longer"
    assert os.listdir(tmp_path / "masks" / "a b") == ["ü.png"]
    assert read_bytes(fs, target) == b"second, longer"


def test_atomic_local_write_never_shows_a_partial_file(tmp_path: Path) -> None:
    """A reader racing a writer sees the old or the new bytes in full, never a prefix or a mix."""
    target = tmp_path / "mask.png"
    versions = [b"a" * 2_000_000, b"b" * 3_000_000]
    fs, path = filesystem_for(str(target))
    write_bytes_atomic(fs, path, versions[0])
    stop = threading.Event()

    def keep_writing() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            write_bytes_atomic(fs, path, versions[i % 2])

    writer = threading.Thread(target=keep_writing)
    writer.start()
    try:
        for _ in range(200):
            assert target.read_bytes() in versions
    finally:
        stop.set()
        writer.join()
    assert [p.name for p in tmp_path.iterdir()] == ["mask.png"]


def test_a_failed_local_write_keeps_the_old_file_and_removes_the_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fs, path = filesystem_for(str(tmp_path / "mask.png"))
    write_bytes_atomic(fs, path, b"old")

    def disk_error(fd: int) -> None:  # a failing disk cannot be had here; fail the one call that would
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr("textseg.storage.os.fsync", disk_error)
    with pytest.raises(OSError, match="Input/output error"):
        write_bytes_atomic(fs, path, b"new")
    assert (tmp_path / "mask.png").read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["mask.png"]


def test_atomic_local_write_gives_files_the_usual_permissions(tmp_path: Path) -> None:
    fs, path = filesystem_for(str(tmp_path / "mask.png"))
    write_bytes_atomic(fs, path, b"x")
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask


def test_write_and_read_bytes_on_s3(s3_server: S3Server, s3_bucket: str) -> None:
    fs, path = filesystem_for(f"s3://{s3_bucket}/out/masks/a b/ü.png", s3_server.storage_options)
    write_bytes_atomic(fs, path, b"png bytes")
    assert read_bytes(fs, path) == b"png bytes"
    body = s3_server.client().get_object(Bucket=s3_bucket, Key="out/masks/a b/ü.png")["Body"].read()
    assert body == b"png bytes"


def test_pyarrow_filesystem_writes_parquet_through_the_same_endpoint(
    s3_server: S3Server, s3_bucket: str
) -> None:
    fs, path = filesystem_for(f"s3://{s3_bucket}/out/metadata", s3_server.storage_options)
    table = pa.table({"relpath": ["a.jpg", "b/ü.jpg"], "status": ["ok", "error"]})
    pq.write_table(table, f"{path}/part-0.parquet", filesystem=pyarrow_filesystem(fs))
    assert pq.read_table(f"{path}/part-0.parquet", filesystem=pyarrow_filesystem(fs)).equals(table)
    assert fs.exists(f"{path}/part-0.parquet")


# ----------------------------------------------------------------------------------------------------------
# DEST checks


def test_check_writable_creates_a_missing_local_folder_and_cleans_up(tmp_path: Path) -> None:
    fs, root = filesystem_for(str(tmp_path / "new" / "dest"))
    check_writable(fs, root)
    assert os.listdir(root) == []


def test_check_writable_fails_when_dest_cannot_be_a_folder(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_bytes(b"x")
    fs, root = filesystem_for(str(tmp_path / "a-file" / "dest"))
    with pytest.raises(StorageError, match="a-file/dest"):
        check_writable(fs, root)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_check_writable_fails_on_a_read_only_folder(tmp_path: Path) -> None:
    read_only = tmp_path / "ro"
    read_only.mkdir(mode=0o500)
    fs, root = filesystem_for(str(read_only))
    with pytest.raises(StorageError, match="access denied"):
        check_writable(fs, root)


def test_check_writable_on_s3_leaves_the_bucket_as_it_was(s3_server: S3Server, s3_bucket: str) -> None:
    fs, root = filesystem_for(f"s3://{s3_bucket}/not/yet/there/", s3_server.storage_options)
    check_writable(fs, root)
    assert s3_server.client().list_objects_v2(Bucket=s3_bucket).get("KeyCount") == 0


def test_check_writable_names_a_missing_bucket(s3_server: S3Server) -> None:
    fs, root = filesystem_for("s3://textseg-no-such-bucket/out", s3_server.storage_options)
    with pytest.raises(StorageError, match="bucket 'textseg-no-such-bucket' does not exist"):
        check_writable(fs, root)
