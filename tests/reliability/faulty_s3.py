"""A fault-injecting HTTP proxy on 127.0.0.1 in front of an S3 protocol server (moto), for reliability tests.

Point the code under test at `proxy.endpoint_url` (`client_kwargs.endpoint_url`, or `AWS_ENDPOINT_URL`)
and it talks real HTTP to a real S3 implementation, except that some requests fail the way S3 and networks
fail in production:

- `slowdown`: 503 with S3's `SlowDown` error XML (throttling);
- `internal`: 500 with S3's `InternalError` XML;
- `reset`: the connection is reset (RST) after the request was read, before any response;
- `timeout`: no answer for `timeout_delay_s` (longer than the client's read timeout), then a reset;
- `commit_then_reset`: the request is forwarded (a PUT lands!) and then the connection is reset, so the
  client sees a failure for a write that happened, and must retry it without duplicating anything.

Which request fails is decided by a seeded RNG keyed on (seed, method, path, attempt number of that
request), not on arrival order, so a schedule replays the same way however the workers interleave. At most
`max_consecutive` attempts of one request fail in a row, so every request eventually succeeds. `Rule`s add
deterministic faults for matching requests: a permanent `403 AccessDenied` or `404 NoSuchKey`, `hold`
(park the request until the test releases it, to kill the process that sent it), or a fixed number of
transient faults.

The proxy also plays one part of S3's contract that moto does not: keys longer than 1024 bytes are refused
with `400 KeyTooLongError`, as S3 does. Every request is logged (method, key, query, fault), so tests can
count attempts and check that a mask was published by one PUT (no multipart upload).
"""

from __future__ import annotations

import collections
import http.client
import random
import re
import socket
import struct
import threading
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

TRANSIENT_FAULTS = ("slowdown", "internal", "reset", "timeout", "commit_then_reset")
S3_MAX_KEY_BYTES = 1024

_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "expect",
    }
)
_ERROR_XML = (
    '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
    "<Resource>{resource}</Resource><RequestId>faulty-s3-{n}</RequestId></Error>"
)


@dataclass
class Rule:
    """Deterministic faults for requests whose method matches `method` ('*' = any) and whose key (the URL
    path without the bucket, unquoted) matches the regex `key`.

    fault: 'deny' (403 AccessDenied), 'missing' (404 NoSuchKey), 'hold' (park until `release()`), or one
        of TRANSIENT_FAULTS.
    times: how many matching requests get the fault (None = all of them).
    """

    method: str
    key: str
    fault: str
    times: int | None = None
    hits: int = 0
    arrived: threading.Event = field(default_factory=threading.Event)
    released: threading.Event = field(default_factory=threading.Event)
    held_client_ports: list[int] = field(default_factory=list)

    def matches(self, method: str, key: str) -> bool:
        return (self.method in ("*", method)) and re.search(self.key, key) is not None

    def release(self) -> None:
        self.released.set()


@dataclass
class LoggedRequest:
    method: str
    bucket: str
    key: str
    query: str
    fault: str | None
    body_bytes: int


class FaultyS3Proxy:
    """A ThreadingHTTPServer that forwards to `upstream_url` and injects faults (module docstring)."""

    def __init__(
        self,
        upstream_url: str,
        *,
        seed: int = 0,
        rate: float = 0.0,
        faults: tuple[str, ...] = ("slowdown", "internal", "reset", "commit_then_reset"),
        max_consecutive: int = 2,
        timeout_delay_s: float = 3.0,
        rules: list[Rule] | None = None,
        enforce_key_limit: bool = True,
    ) -> None:
        parsed = urllib.parse.urlsplit(upstream_url)
        self.upstream = (parsed.hostname or "127.0.0.1", parsed.port or 80)
        self.seed, self.rate, self.faults = seed, rate, faults
        self.max_consecutive = max_consecutive
        self.timeout_delay_s = timeout_delay_s
        self.rules = list(rules or [])
        self.enforce_key_limit = enforce_key_limit
        self.log: list[LoggedRequest] = []
        self.injected: collections.Counter[str] = collections.Counter()
        self._attempts: collections.Counter[tuple[str, str]] = collections.Counter()
        self._consecutive: collections.Counter[tuple[str, str]] = collections.Counter()
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="faulty-s3", daemon=True)

    @property
    def endpoint_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FaultyS3Proxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        for rule in self.rules:
            rule.release()
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FaultyS3Proxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def requests(self, predicate: Callable[[LoggedRequest], bool] = lambda r: True) -> list[LoggedRequest]:
        with self._lock:
            return [r for r in self.log if predicate(r)]

    # -- the decision for one request ------------------------------------------------------------------

    def decide(self, method: str, bucket: str, key: str, target: str) -> tuple[str | None, Rule | None]:
        with self._lock:
            for rule in self.rules:
                if rule.matches(method, key) and (rule.times is None or rule.hits < rule.times):
                    rule.hits += 1
                    return rule.fault, rule
            if self.enforce_key_limit and len(key.encode("utf-8")) > S3_MAX_KEY_BYTES:
                return "key_too_long", None
            request_id = (method, target)
            attempt = self._attempts[request_id]
            self._attempts[request_id] += 1
            if self.rate <= 0 or self._consecutive[request_id] >= self.max_consecutive:
                self._consecutive[request_id] = 0
                return None, None
            rng = random.Random(f"{self.seed}:{method}:{target}:{attempt}")
            if rng.random() >= self.rate:
                self._consecutive[request_id] = 0
                return None, None
            self._consecutive[request_id] += 1
            return rng.choice(self.faults), None

    def record(self, entry: LoggedRequest) -> None:
        with self._lock:
            self.log.append(entry)
            if entry.fault is not None:
                self.injected[entry.fault] += 1


def _handler_for(proxy: FaultyS3Proxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
            pass  # one line per request would bury real failures

        def handle(self) -> None:
            try:
                super().handle()
            except (OSError, ValueError):
                pass  # the client went away, or we reset the connection on purpose

        def finish(self) -> None:
            try:
                super().finish()
            except (OSError, ValueError):
                pass

        def do_GET(self) -> None:
            self._proxy()

        def do_HEAD(self) -> None:
            self._proxy()

        def do_PUT(self) -> None:
            self._proxy()

        def do_POST(self) -> None:
            self._proxy()

        def do_DELETE(self) -> None:
            self._proxy()

        def _read_body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                body = b""
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass  # trailers
                        return body
                    body += self.rfile.read(size)
                    self.rfile.readline()
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def _proxy(self) -> None:
            body = self._read_body()
            split = urllib.parse.urlsplit(self.path)
            path = urllib.parse.unquote(split.path)
            bucket, _, key = path.lstrip("/").partition("/")
            fault, rule = proxy.decide(self.command, bucket, key, f"{split.path}?{split.query}")
            proxy.record(LoggedRequest(self.command, bucket, key, split.query, fault, len(body)))
            if fault == "hold" and rule is not None:
                rule.held_client_ports.append(self.client_address[1])
                rule.arrived.set()
                rule.released.wait(timeout=300)
                fault = None  # released: forward it as if nothing happened
            if fault == "deny":
                self._error(403, "AccessDenied", "Access Denied", path)
            elif fault == "missing":
                self._error(404, "NoSuchKey", "The specified key does not exist.", path)
            elif fault == "key_too_long":
                self._error(400, "KeyTooLongError", "Your key is too long", path)
            elif fault == "slowdown":
                self._error(503, "SlowDown", "Please reduce your request rate.", path)
            elif fault == "internal":
                self._error(500, "InternalError", "We encountered an internal error. Please try again.", path)
            elif fault == "reset":
                self._reset()
            elif fault == "timeout":
                threading.Event().wait(proxy.timeout_delay_s)  # the fault: no answer in time
                self._reset()
            elif fault == "commit_then_reset":
                self._forward(body, respond=False)
                self._reset()
            else:
                self._forward(body, respond=True)

        def _forward(self, body: bytes, respond: bool) -> None:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
            if body or self.command in ("PUT", "POST"):
                headers["Content-Length"] = str(len(body))
            connection = http.client.HTTPConnection(*proxy.upstream, timeout=60)
            try:
                connection.request(self.command, self.path, body=body, headers=headers)
                response = connection.getresponse()
                payload = response.read()
                response_headers = response.getheaders()
                status = response.status
            finally:
                connection.close()
            if not respond:
                return
            self.send_response_only(status)
            has_length = False
            for name, value in response_headers:
                lowered = name.lower()
                if lowered in _HOP_BY_HOP:
                    continue
                if lowered == "content-length":
                    if self.command != "HEAD":
                        continue
                    has_length = True
                self.send_header(name, value)
            if self.command != "HEAD":
                self.send_header("Content-Length", str(len(payload)))
            elif not has_length:
                self.send_header("Content-Length", "0")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)
            self.wfile.flush()

        def _error(self, status: int, code: str, message: str, resource: str) -> None:
            payload = _ERROR_XML.format(
                code=code, message=message, resource=resource, n=len(proxy.log)
            ).encode()
            self.send_response_only(status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", "0" if self.command == "HEAD" else str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)
            self.wfile.flush()

        def _reset(self) -> None:
            """Close with RST (SO_LINGER 0): the client sees ECONNRESET, not a clean end of stream."""
            self.close_connection = True
            try:
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.connection.close()
            except OSError:
                pass

    return Handler
