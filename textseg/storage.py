"""Filesystems from URIs + options, retries, atomic writes and redaction of secrets.

Every byte textseg reads or writes goes through fsspec, so one code path serves local disk, S3 (and any
S3-compatible endpoint), GCS and the rest. Credentials are never read here: fsspec/botocore resolve them in
the standard way (the AWS_* environment including AWS_ENDPOINT_URL, config files, instance roles), or they
come in `storage_options` (the CLI's --storage-option). What this module adds is what fsspec leaves to
callers: which errors are worth retrying, writes no reader can see half-done, and messages without secrets.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import random
import re
import shutil
import stat
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar
from urllib.parse import quote, unquote

import fsspec
from fsspec.implementations.local import LocalFileSystem

if TYPE_CHECKING:
    import pyarrow.fs

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Protocols whose URI userinfo is an access key id (and secret), never a harmless user or container name.
S3_PROTOCOLS = frozenset({"s3", "s3a"})

# Every hidden file textseg writes starts with this: atomic-write temporaries and DEST write probes.
TEMPORARY_PREFIX = ".textseg-"
PROBE_PREFIX = TEMPORARY_PREFIX + "probe-"


class StorageError(RuntimeError):
    """A job-level storage problem (no access, missing bucket, service down); the message says what to do.

    Messages never contain credentials: URIs go through `redact_uri` before they are put in one.
    """


# ----------------------------------------------------------------------------------------------------------
# URIs and credentials

# `scheme://userinfo@rest`. The user part never contains '/', ':' or '@' (an access key id is alphanumeric),
# which is what tells `s3://KEY:SECRET@bucket/k` apart from a key like `s3://bucket/a:b@c.jpg`.
_USERINFO_URI = re.compile(
    r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*)://(?P<user>[^/:@]+)(?::(?P<password>[^@]*))?@"
)

# Query parameters that carry a signature, a credential or a token (AWS, GCS and Azure presigned URLs, ...).
_SECRET_QUERY_NAMES = frozenset({"sig", "key", "pass", "pwd", "awsaccesskeyid"})
_SECRET_QUERY_PARTS = ("signature", "credential", "token", "secret", "password", "api_key", "apikey")

# storage_options keys whose values are secrets (matched on the lowercased key name).
_SECRET_OPTION_NAMES = frozenset(
    {"key", "secret", "token", "password", "passwd", "pwd", "sas", "credentials"}
)
_SECRET_OPTION_PARTS = (
    "secret", "token", "password", "passwd", "access_key", "account_key", "private_key", "api_key",
    "apikey", "credential", "connection_string", "signature",
)  # fmt: skip

_MIN_SECRET_LEN = 4  # shorter values would redact ordinary words and digits out of messages


def _protocol(uri: str) -> str:
    """'s3://b/k' -> 's3'; a local path -> 'file' (a Windows drive letter is not a protocol)."""
    scheme, sep, _ = uri.partition("://")
    return scheme.lower() if sep and len(scheme) > 1 else "file"


def _match_userinfo(uri: str) -> re.Match[str] | None:
    match = _USERINFO_URI.match(uri)
    if match is None:
        return None
    password = match.group("password")
    # In s3:// URIs an unescaped secret may contain '/' (AWS secrets often do) and there are no ports.
    # Elsewhere 'host:8080/a@b' is a host, a port and a path with an '@', so the password may not hold '/'.
    if password is not None and "/" in password and match.group("scheme").lower() not in S3_PROTOCOLS:
        return None
    return match


def split_credentials(uri: str) -> tuple[str, dict[str, str]]:
    """`s3://KEY:SECRET@bucket/k` -> (`s3://bucket/k`, {"key": KEY, "secret": SECRET}).

    Credentials in an S3 URI are accepted so that such a URI works, but they must not live on in any string
    we keep (metadata rows, logs, run summaries). The job's configuration should call this once and merge the
    options into the job's storage options, so that every later read (of URIs without credentials) has them.
    Other protocols are returned unchanged: there the userinfo may be meaningful (an Azure container, an FTP
    user) and the fsspec implementation parses it itself.
    """
    match = _match_userinfo(uri)
    if match is None or match.group("scheme").lower() not in S3_PROTOCOLS:
        return uri, {}
    if match.group("password") is None:
        raise StorageError(
            f"the URI '{redact_uri(uri)}' embeds an access key without a secret: pass both with "
            "--storage-option key=... --storage-option secret=... (or the AWS_* environment) instead"
        )
    clean = f"{match.group('scheme')}://{uri[match.end() :]}"
    return clean, {"key": unquote(match.group("user")), "secret": unquote(match.group("password"))}


def redact_uri(uri: str) -> str:
    """The URI without credentials: safe to log, to show and to store in metadata.

    Drops `user:password@` (and, for S3, a lone `KEY@`, which is an access key id) and credential-like query
    parameters (X-Amz-Signature, X-Amz-Credential, X-Amz-Security-Token, AWSAccessKeyId, Signature, sig,
    token, ...). Local paths are returned unchanged.
    """
    if _protocol(uri) == "file":
        return uri
    match = _match_userinfo(uri)
    if match is not None and (
        match.group("password") is not None or match.group("scheme").lower() in S3_PROTOCOLS
    ):
        uri = f"{match.group('scheme')}://{uri[match.end() :]}"
    base, sep, query = uri.partition("?")
    if not sep:
        return uri
    kept = [param for param in query.split("&") if param and not _is_secret_query_param(param)]
    return f"{base}?{'&'.join(kept)}" if kept else base


def _is_secret_query_param(param: str) -> bool:
    name = unquote(param.partition("=")[0]).lower()
    return name in _SECRET_QUERY_NAMES or any(part in name for part in _SECRET_QUERY_PARTS)


def secret_values(storage_options: Mapping[str, Any]) -> list[str]:
    """The values of `storage_options` that are secrets, to pass to `redact` before a message is shown.

    A key is secret when its name looks like one (key, secret, token, password, aws_access_key_id,
    aws_secret_access_key, aws_session_token, account_key, connection_string, ...); nested mappings such as
    `client_kwargs` or `config_kwargs` are searched too, and everything under a secret key is secret.
    """
    found: list[str] = []

    def visit(value: Any, secret: bool) -> None:
        if isinstance(value, Mapping):
            for name, inner in value.items():
                visit(inner, secret or _is_secret_option_name(str(name)))
        elif isinstance(value, (list, tuple)):
            for inner in value:
                visit(inner, secret)
        elif secret and isinstance(value, (str, bytes)):
            text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
            if text and text not in found:
                found.append(text)

    visit(storage_options, False)
    return found


def _is_secret_option_name(name: str) -> bool:
    lowered = name.lower()
    return lowered in _SECRET_OPTION_NAMES or any(part in lowered for part in _SECRET_OPTION_PARTS)


def redact(text: str, secrets: Iterable[str]) -> str:
    """`text` with every secret value (of at least 4 characters) replaced by '***'.

    Also replaces a secret's percent-encoded form (AWS secrets hold '/' and '+', which URIs encode), and the
    longest secrets first, so a secret that contains another is hidden whole.
    """
    forms = {
        form
        for secret in secrets
        if len(secret) >= _MIN_SECRET_LEN
        for form in (secret, quote(secret, safe=""))
    }
    for form in sorted(forms, key=len, reverse=True):
        text = text.replace(form, "***")
    return text


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    """Whether `fs` is the local disk, where writes need a rename to be atomic and folders must exist."""
    return isinstance(fs, LocalFileSystem)


def uri_for(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """The user-facing URI of `path` on `fs`: 's3://bucket/key', or the absolute path on local disk."""
    return path if is_local(fs) else fs.unstrip_protocol(path)


def filesystem_for(
    uri: str, storage_options: Mapping[str, Any] | None = None
) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for `uri` and the path on it (`bucket/key` for S3, an absolute path locally).

    Local paths, file://, s3:// and every protocol fsspec knows work. Credentials embedded in an S3 URI are
    moved into the filesystem's options (see `split_credentials`), so the returned path never holds them.
    """
    clean, embedded = split_credentials(uri)
    options = dict(storage_options or {})
    for name, value in embedded.items():
        if name in options and options[name] != value:
            raise StorageError(
                f"the URI '{redact_uri(uri)}' embeds credentials that differ from the storage option "
                f"'{name}': give them one way only"
            )
        options[name] = value
    try:
        fs, path = fsspec.core.url_to_fs(clean, **options)
    except ImportError as err:
        # fsspec's message names the package to install (e.g. "Install gcsfs to access Google Storage").
        raise StorageError(f"cannot open '{redact_uri(clean)}': {err}") from err
    except (ValueError, TypeError) as err:
        message = redact(str(err), secret_values(options))
        raise StorageError(
            f"cannot open '{redact_uri(clean)}': {message}; check the URI and storage options"
        ) from err
    return fs, path


def relpath_problem(relpath: str) -> str | None:
    """Why `relpath` may not be joined under DEST, or None when it is safe.

    Safe means: '/'-separated, relative, and every segment a real name, so DEST + relpath stays inside DEST
    on every filesystem. Rejected: empty, absolute, '..' or '.' or empty segments ('a//b' is one key on S3
    but collapses to 'a/b' on disk), backslashes (a separator on Windows) and NUL characters.
    """
    if not relpath:
        return "the relative path is empty"
    if relpath.startswith("/"):
        return f"the relative path {relpath!r} is absolute"
    if "\\" in relpath or "\0" in relpath:
        return f"the relative path {relpath!r} contains a backslash or NUL character"
    segments = relpath.split("/")
    if ".." in segments:
        return f"the relative path {relpath!r} contains a '..' segment and would escape DEST"
    if "." in segments or "" in segments:
        return f"the relative path {relpath!r} contains an empty or '.' segment"
    return None


def join_uri(base: str, relpath: str) -> str:
    """`base` + '/' + `relpath`, keeping base's protocol: join_uri('s3://b/out/', 'masks/a.png').

    Raises ValueError for a relpath that `relpath_problem` rejects: a name from SOURCE never escapes DEST.
    """
    problem = relpath_problem(relpath)
    if problem is not None:
        raise ValueError(f"refusing to join to '{redact_uri(base)}': {problem}")
    stem = base.rstrip("/")
    return f"{stem}/{relpath}" if stem else f"/{relpath}"


# ----------------------------------------------------------------------------------------------------------
# Retries

# S3 and friends: error codes and HTTP statuses that mean "try again later", not "this will never work".
_TRANSIENT_ERROR_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottled",
    "RequestThrottledException", "TooManyRequestsException", "RequestLimitExceeded", "BandwidthLimitExceeded",
    "ProvisionedThroughputExceededException", "RequestTimeout", "RequestTimeoutException", "InternalError",
    "ServiceUnavailable", "ServiceUnavailableException", "OperationAborted", "PriorRequestNotComplete",
})  # fmt: skip
_TRANSIENT_HTTP_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
_TRANSIENT_ERRNO_NAMES = (
    "ECONNRESET", "ECONNABORTED", "ECONNREFUSED", "ETIMEDOUT", "EPIPE", "EAGAIN", "EBUSY",
    "ENETDOWN", "ENETUNREACH", "ENETRESET", "EHOSTUNREACH", "EREMOTEIO",
)  # fmt: skip
_TRANSIENT_ERRNOS = frozenset(getattr(errno, name) for name in _TRANSIENT_ERRNO_NAMES if hasattr(errno, name))
# Network errors of the libraries under s3fs, matched by (module prefix, class name) anywhere in the class's
# MRO so that this module needs to import none of them (botocore alone takes a noticeable time to import).
_TRANSIENT_LIBRARY_ERRORS = frozenset({
    ("botocore", "HTTPClientError"),  # ConnectionClosedError, ReadTimeoutError, ResponseStreamingError
    ("botocore", "ConnectionError"),  # EndpointConnectionError, ConnectTimeoutError (not the builtin)
    ("botocore", "IncompleteReadError"),
    ("botocore", "ResponseParserError"),  # throttling responses sometimes carry invalid XML (s3fs #484)
    ("aiohttp", "ClientConnectionError"),  # ServerDisconnectedError, ClientOSError, ServerTimeoutError
    ("aiohttp", "ClientPayloadError"),
    ("urllib3", "ProtocolError"),
    ("http", "IncompleteRead"),
    ("fsspec", "FSTimeoutError"),
})  # fmt: skip
_PERMANENT_TYPES = (
    FileNotFoundError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
    FileExistsError,
)


def is_transient(err: BaseException) -> bool:
    """Whether retrying the operation that raised `err` may succeed.

    Transient: throttling (S3 503 SlowDown, 429), server errors (500, 502, 504), timeouts, connection resets
    and refusals, botocore's EndpointConnectionError/ReadTimeoutError. Permanent: not found (404, NoSuchKey,
    NoSuchBucket, FileNotFoundError), access denied (403, PermissionError), bad requests, anything unknown,
    and a StorageError (already the final word of a retry loop).
    s3fs turns botocore's ClientError into OSError subclasses and keeps the original as `__cause__`, so the
    chain of causes is searched: the service's own answer (error code, HTTP status) decides when there is
    one, as it is more precise than the errno s3fs picked for it; otherwise the first exception type that
    is known either way.
    """
    if isinstance(err, StorageError):
        return False
    chain: list[BaseException] = []
    current: BaseException | None = err
    while current is not None and all(current is not seen for seen in chain):
        chain.append(current)
        current = current.__cause__
    for link in chain:
        response = getattr(link, "response", None)
        if isinstance(response, Mapping) and isinstance(response.get("Error"), Mapping):  # a ClientError
            return _is_transient_response(response)
    for link in chain:
        verdict = _is_transient_type(link)
        if verdict is not None:
            return verdict
    return False


def _is_transient_response(response: Mapping[str, Any]) -> bool:
    code = str(response["Error"].get("Code", ""))
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    if code.isdigit():  # HEAD requests have no body, so their code is the bare HTTP status
        status = int(code)
    return code in _TRANSIENT_ERROR_CODES or status in _TRANSIENT_HTTP_STATUSES


def _is_transient_type(err: BaseException) -> bool | None:
    """True/False when the exception's type decides; None when it does not."""
    if isinstance(err, _PERMANENT_TYPES):
        return False
    if isinstance(err, (TimeoutError, asyncio.TimeoutError, ConnectionError)):
        return True
    for cls in type(err).__mro__:
        module = cls.__module__.split(".", 1)[0]
        if (module, cls.__name__) in _TRANSIENT_LIBRARY_ERRORS:
            return True
    if isinstance(err, OSError) and err.errno in _TRANSIENT_ERRNOS:
        return True
    return None


def call_with_retry(
    fn: Callable[[], T],
    description: str,
    *,
    attempts: int = 5,
    base_delay: float = 0.2,
    max_delay: float = 10.0,
) -> T:
    """fn(), retried on transient errors with exponential backoff and full jitter.

    Every storage call goes through here so that one throttled request (S3 answers bursts with 503 SlowDown)
    does not fail an image or a job. Permanent errors (see `is_transient`) are raised at once and unchanged,
    so callers can tell a missing object from a forbidden one. When the attempts run out the last error is
    raised as a `StorageError` whose message starts with `description` (e.g. "write 's3://b/masks/a.png'").
    The delay before retry n is uniform in [0, min(max_delay, base_delay * 2**(n-1))] ("full jitter"), which
    spreads out many workers that were throttled at the same moment.
    """
    if attempts < 1:
        raise ValueError(f"attempts must be at least 1, got {attempts}")
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as err:
            if not is_transient(err):
                raise
            if attempt == attempts:
                raise StorageError(
                    f"{description} failed {attempts} times with a transient error; last: "
                    f"{type(err).__name__}: {err}. The storage service is unreachable or throttling: check "
                    "the endpoint and network, then run the job again (finished images are skipped)"
                ) from err
            delay = random.uniform(0.0, min(max_delay, base_delay * 2 ** (attempt - 1)))
            logger.info("%s: %s: %s; retry %d of %d in %.2fs", description, type(err).__name__, err, attempt,
                        attempts - 1, delay)  # fmt: skip
            time.sleep(delay)
    raise AssertionError("unreachable")  # the loop returns or raises


# ----------------------------------------------------------------------------------------------------------
# Reads and writes


def exists(fs: fsspec.AbstractFileSystem, path: str) -> bool:
    """Whether `path` exists, with transient errors retried."""
    return call_with_retry(lambda: fs.exists(path), f"look up '{uri_for(fs, path)}'")


def glob(fs: fsspec.AbstractFileSystem, pattern: str) -> list[str]:
    """Sorted paths matching `pattern`, listed afresh (other workers write them: a cached listing, as
    s3fs keeps, would miss files), with transient errors retried."""
    folder = pattern.split("*", 1)[0].rsplit("/", 1)[0]

    def listed() -> list[str]:
        fs.invalidate_cache(folder)
        return sorted(fs.glob(pattern))

    return call_with_retry(listed, f"list '{uri_for(fs, pattern)}'")


def names(fs: fsspec.AbstractFileSystem, folder: str) -> list[str]:
    """Sorted names of what `folder` holds (none when it does not exist), listed afresh, retried."""

    def listed() -> list[str]:
        fs.invalidate_cache(folder)
        if not fs.exists(folder):
            return []
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(folder, detail=False))

    return call_with_retry(listed, f"list '{uri_for(fs, folder)}'")


def remove(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """`path` and everything under it, if it exists, with transient errors retried."""

    def removed() -> None:
        if fs.exists(path):
            fs.rm(path, recursive=True)

    call_with_retry(removed, f"remove '{uri_for(fs, path)}'")


def read_bytes(fs: fsspec.AbstractFileSystem, path: str) -> bytes:
    """The whole object at `path`, with transient errors retried."""
    return call_with_retry(lambda: fs.cat_file(path), f"read '{uri_for(fs, path)}'")


def write_bytes_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write `data` to `path` so that no reader ever sees a partial file, with transient errors retried.

    On local disk the bytes go to a hidden temporary file in the same folder (same filesystem, so the rename
    is atomic), are fsynced, and the file is renamed over `path`; parent folders are created. On object stores
    (S3, GCS, Azure) a single PUT publishes the object atomically (s3fs's multipart upload for very large
    bodies too: the object appears at CompleteMultipartUpload). Other fsspec filesystems get no more than
    their own `pipe_file` guarantees.
    """
    if is_local(fs):
        call_with_retry(
            lambda: _write_local_atomic(path, lambda stream: stream.write(data)), f"write '{path}'"
        )
    else:
        call_with_retry(lambda: fs.pipe_file(path, data), f"write '{uri_for(fs, path)}'")


def write_file_atomic(fs: fsspec.AbstractFileSystem, path: str, local_path: str) -> None:
    """Publish a finished local file (an index assembled on disk, too large to hold in memory) at `path`
    with `write_bytes_atomic`'s guarantee: a hidden copy renamed over `path` on local disk, one upload on
    object stores (the object appears when it completes)."""
    if is_local(fs):
        call_with_retry(
            lambda: _write_local_atomic(path, lambda stream: _copy_file_into(local_path, stream)),
            f"write '{path}'",
        )
    else:
        call_with_retry(lambda: fs.put_file(local_path, path), f"upload '{uri_for(fs, path)}'")


def _copy_file_into(local_path: str, stream: BinaryIO) -> None:
    with open(local_path, "rb") as source:
        shutil.copyfileobj(source, stream)


def _write_local_atomic(path: str, write: Callable[[BinaryIO], object]) -> None:
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    # Not named after the target: a long file name plus a suffix could exceed the 255-byte name limit.
    # Not tempfile.mkstemp: its 0600 mode would make every mask unreadable to other users of a shared disk.
    temporary = os.path.join(folder, f"{TEMPORARY_PREFIX}{uuid.uuid4().hex}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())  # without it a crash right after the rename can leave an empty file
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        raise


def remove_stale_temporaries(
    fs: fsspec.AbstractFileSystem, root: str, subfolders: Iterable[str], older_than: float
) -> list[str]:
    """Delete the hidden files (TEMPORARY_PREFIX) that writers killed mid-write left in `root` and below
    its `subfolders`, on local disk; returns their paths. Object stores publish with one PUT, so there is
    nothing to clean up there.

    A SIGKILLed writer (a worker, or a whole run) cannot remove its temporary file; without this they pile
    up beside the masks forever. Only files last modified before `older_than` (a time.time() value: the
    start of a run that has finished) are removed, so a concurrent run's write in progress is left alone.
    """
    if not is_local(fs):
        return []
    removed: list[str] = []
    folders = [(root, False)] + [(os.path.join(root, name), True) for name in subfolders]
    for top, recursive in folders:
        walk = os.walk(top) if recursive else [(top, [], os.listdir(top) if os.path.isdir(top) else [])]
        for folder, _, files in walk:
            for name in files:
                if not name.startswith(TEMPORARY_PREFIX):
                    continue
                path = os.path.join(folder, name)
                try:
                    status = os.lstat(path)
                    if stat.S_ISREG(status.st_mode) and status.st_mtime < older_than:
                        os.unlink(path)
                        removed.append(path)
                except FileNotFoundError:
                    continue  # renamed or removed by its writer meanwhile
    return removed


def pyarrow_filesystem(fs: fsspec.AbstractFileSystem) -> pyarrow.fs.FileSystem:
    """`fs` as a pyarrow filesystem, for pyarrow's and Ray Data's Parquet readers and writers.

    Wrapping the fsspec filesystem (rather than letting pyarrow build its own S3FileSystem from the URI) means
    Parquet goes to the same endpoint with the same credentials as every mask write, honouring the same
    storage options and AWS_* environment. pyarrow's native S3 client knows nothing of s3fs's storage options
    and resolves endpoints its own way, so metadata could land elsewhere than the masks, or fail where they
    succeed.
    """
    from pyarrow.fs import FSSpecHandler, PyFileSystem  # pyarrow is heavy; only metadata writers need it

    return PyFileSystem(FSSpecHandler(fs))


def check_writable(fs: fsspec.AbstractFileSystem, root: str) -> None:
    """Fail fast, before any model loads, when DEST cannot be written.

    Writes and deletes a small probe object `root/.textseg-probe-<uuid>`. A DEST folder or prefix that does
    not exist yet is simply created (on object stores it exists as soon as something is written under it).
    Raises StorageError naming the missing bucket, or saying that access is denied, in words a user can act
    on. A probe that cannot be deleted (write-only credentials) is left behind with a warning in the log.
    """
    root = root.rstrip("/")
    display = uri_for(fs, root or "/")
    probe = f"{root}/{PROBE_PREFIX}{uuid.uuid4().hex}"
    try:
        write_bytes_atomic(fs, probe, b"textseg write probe\n")
    except FileNotFoundError as err:
        if is_local(fs):
            raise StorageError(f"cannot create the output folder '{display}': {err}") from err
        bucket = root.split("/", 1)[0]
        raise StorageError(
            f"bucket '{bucket}' does not exist (or these credentials cannot see it): create it or fix DEST "
            f"'{display}'"
        ) from err
    except PermissionError as err:
        raise StorageError(
            f"access denied writing to '{display}': check that the credentials (AWS_* environment or "
            f"--storage-option) may write there ({err})"
        ) from err
    except OSError as err:
        raise StorageError(f"cannot write to '{display}': {type(err).__name__}: {err}") from err
    try:
        call_with_retry(lambda: fs.rm_file(probe), f"delete '{uri_for(fs, probe)}'")
    except (OSError, StorageError) as err:
        logger.warning("DEST is writable but the probe '%s' was not deleted: %s", uri_for(fs, probe), err)
