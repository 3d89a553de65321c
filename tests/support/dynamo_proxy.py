"""An HTTP reverse proxy in front of the moto server that injects DynamoDB faults.

Point an AWS client's `endpoint_url` at `DynamoProxy.url` and it reaches moto
through the proxy. While the test runs, it can make the proxy return DynamoDB
error bodies, delay responses, fail a Scan from its Nth page on, or refuse
connections. It counts the requests it receives per operation, the
name in the `X-Amz-Target` header ("DynamoDB_20120810.Scan" counts as "Scan").

How botocore 1.43 in `standard` retry mode (the variant used without
AWS_NEW_RETRIES_2026) with aiobotocore 3.10 treats each fault, as measured
through this proxy:

- HTTP 400 with ProvisionedThroughputExceededException or ThrottlingException:
  a throttling error, retried. The ClientError raised when the retries run out
  carries the code.
- HTTP 500 with InternalServerError: a transient error, retried.
- A connection reset while the response is awaited: retried. The error is
  ConnectionClosedError when the request went over a reused keep-alive
  connection, and EndpointConnectionError over a new one.
- A refused connection: EndpointConnectionError, retried. A request on a
  keep-alive connection that refuse_connections() closed fails with
  ConnectionClosedError, and is retried too.
- HTTP 400 with ValidationException: not retried.

The retry budget is botocore's, and it was measured the same way:
`retries={"max_attempts": N}` allows N retries after the first attempt, so N + 1
requests, while `total_max_attempts` counts the first attempt too.

From botocore's source (retries/standard.py and quota.py), not measured: retry
number k waits rand(0, 1) times 2 ** (k - 1) seconds, at most 20 s. Each retry
takes 5 units from the client's retry quota of 500, and a request that succeeds
at once gives 1 back. So after about 100 retryable errors in a row a client
stops retrying until its successes refill the quota.

The proxy runs its own event loop in a thread, so the test may block (for
example in DaemonProcess.wait_for) while it serves. Every public method is
safe to call from any thread. Requests are read as HTTP/1.1 with a
Content-Length body, which is how botocore sends them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
import threading
import uuid
from collections import Counter
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

from . import LOOPBACK

ScanFailure = Literal["http_500", "reset"]

THROTTLING_ERRORS = ("ProvisionedThroughputExceededException", "ThrottlingException")

_ERROR_TYPE_PREFIX = "com.amazonaws.dynamodb.v20120810#"
_TARGET_PREFIX = "DynamoDB_20120810."
_CONTROL_TIMEOUT_SECONDS = 10.0
# Headers that describe one hop of the connection, not the message. The proxy
# sets its own Content-Length and keeps the client connection open.
_HOP_BY_HOP_HEADERS = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "content-length"}
)

_Result = TypeVar("_Result")


class ProxyError(RuntimeError):
    """The proxy could not start, or a control call did not finish in time."""


@dataclass(slots=True)
class _ErrorRule:
    error_type: str
    status: int
    message: str
    operation: str | None
    # None: every matching request until the rule is cleared.
    remaining: int | None


@dataclass(slots=True)
class _ScanPageRule:
    first_failing_page: int
    failure: ScanFailure


@dataclass(slots=True)
class _Request:
    method: str
    path: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        lowered = name.lower()
        for key, value in self.headers:
            if key.lower() == lowered:
                return value
        return None

    @property
    def operation(self) -> str:
        target = self.header("X-Amz-Target") or ""
        return target.removeprefix(_TARGET_PREFIX) or "<none>"


@dataclass(slots=True)
class _Response:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes


@dataclass(slots=True)
class _Decision:
    """What the proxy does with one request."""

    error: _Response | None = None
    reset: bool = False
    delay_seconds: float = 0.0
    scan_page: int | None = None


@dataclass(slots=True)
class _State:
    """Fault settings and counters, guarded by DynamoProxy._lock."""

    error_rules: list[_ErrorRule] = field(default_factory=list)
    delays: dict[str | None, float] = field(default_factory=dict)
    scan_page_rule: _ScanPageRule | None = None
    scan_page_size: int | None = None
    requests: Counter[str] = field(default_factory=Counter)
    injected: Counter[str] = field(default_factory=Counter)
    in_flight: Counter[str] = field(default_factory=Counter)
    max_in_flight: Counter[str] = field(default_factory=Counter)
    # Numbers of the Scan pages that moto returned with HTTP 200, in order.
    scan_pages_forwarded: list[int] = field(default_factory=list)
    # Table -> ExclusiveStartKey JSON -> page number, for the scan under way.
    scan_pages: dict[str, dict[str, int]] = field(default_factory=dict)


class DynamoProxy:
    """A reverse proxy on 127.0.0.1 in front of one DynamoDB endpoint."""

    def __init__(self, upstream_url: str) -> None:
        parts = urlsplit(upstream_url)
        if parts.scheme != "http" or parts.hostname is None or parts.port is None:
            raise ValueError(
                f"invalid upstream URL {upstream_url!r}: use http://HOST:PORT"
            )
        self._upstream_host = parts.hostname
        self._upstream_port = parts.port
        self._lock = threading.Lock()
        self._state = _State()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        # Bound but never listening, so that the port stays reserved for the
        # proxy while connections are refused. A SYN to a port with no
        # listening socket gets a RST, which the client sees as ECONNREFUSED.
        self._placeholder = _reusable_socket()
        self._placeholder.bind((LOOPBACK, 0))
        self.port: int = self._placeholder.getsockname()[1]
        self._connections: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        """URL to pass as `endpoint_url` to an AWS client."""
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def is_refusing_connections(self) -> bool:
        """Whether the proxy is refusing connections (started, not listening)."""
        return self._loop is not None and self._server is None

    def start(self) -> None:
        """Start the event loop thread and accept connections."""
        if self._thread is not None:
            raise RuntimeError("the proxy is already started")
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(
            target=loop.run_forever, name="dynamo-proxy", daemon=True
        )
        self._thread.start()
        self._call(self._listen())

    def close(self) -> None:
        """Close every connection, stop the loop thread and free the port."""
        loop = self._loop
        if loop is not None and self._thread is not None:
            with contextlib.suppress(ProxyError):
                self._call(self._shutdown())
            loop.call_soon_threadsafe(loop.stop)
            self._thread.join(timeout=_CONTROL_TIMEOUT_SECONDS)
            if not self._thread.is_alive():
                loop.close()
            self._thread = None
            self._loop = None
        self._placeholder.close()

    def __enter__(self) -> DynamoProxy:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # Faults. Each applies to requests that arrive after the call.

    def fail_requests(
        self,
        error_type: str = "ProvisionedThroughputExceededException",
        *,
        count: int | None = None,
        operation: str | None = None,
        status: int = 400,
        message: str | None = None,
    ) -> None:
        """Fail the next `count` requests (all, when None) with a DynamoDB error.

        The body is DynamoDB's JSON error form, `{"__type": ..., "message": ...}`.
        `operation` limits the rule to one operation, such as "Scan". Rules
        added earlier are used up first.
        """
        if count is not None and count < 1:
            raise ValueError(f"invalid count {count}: must be at least 1, or None")
        rule = _ErrorRule(
            error_type=error_type,
            status=status,
            message=message or f"injected by the test proxy: {error_type}",
            operation=operation,
            remaining=count,
        )
        with self._lock:
            self._state.error_rules.append(rule)

    def delay_responses(self, seconds: float, *, operation: str | None = None) -> None:
        """Hold each request `seconds` before forwarding it, or stop holding with 0."""
        if seconds < 0:
            raise ValueError(f"invalid delay {seconds}: must not be negative")
        with self._lock:
            if seconds == 0:
                self._state.delays.pop(operation, None)
            else:
                self._state.delays[operation] = seconds

    def fail_scan_from_page(self, page: int, failure: ScanFailure = "http_500") -> None:
        """Fail every Scan request for page `page` (1 is the first) or a later one.

        With "http_500" the response is HTTP 500 with an InternalServerError
        body. With "reset" the proxy resets the TCP connection instead of
        responding. Earlier pages are forwarded, so a scan is only partly read.
        A page is numbered by its ExclusiveStartKey, so a retried page keeps
        its number.
        """
        if page < 1:
            raise ValueError(f"invalid page {page}: pages are numbered from 1")
        with self._lock:
            self._state.scan_page_rule = _ScanPageRule(page, failure)

    def set_scan_page_size(self, items: int | None) -> None:
        """Add `Limit: items` to Scan requests that have no Limit, or stop with None.

        moto, like DynamoDB, ends a page at 1 MB, so a small table fits one
        page. A Limit makes it span several. Rewriting the body breaks the
        request signature, which moto does not check.
        """
        if items is not None and items < 1:
            raise ValueError(f"invalid page size {items}: must be at least 1")
        with self._lock:
            self._state.scan_page_size = items

    def refuse_connections(self) -> None:
        """Stop listening and close open connections, so clients get ECONNREFUSED."""
        self._call(self._stop_listening())

    def accept_connections(self) -> None:
        """Listen again on the same port after refuse_connections()."""
        self._call(self._listen())

    def clear_faults(self) -> None:
        """Remove every error rule, delay and Scan page failure, and listen again.

        The Scan page size and the counters are kept.
        """
        with self._lock:
            self._state.error_rules.clear()
            self._state.delays.clear()
            self._state.scan_page_rule = None
        self._call(self._listen())

    # Observations.

    def request_count(self, operation: str | None = None) -> int:
        """Return how many requests arrived, for one operation or for all."""
        with self._lock:
            if operation is None:
                return sum(self._state.requests.values())
            return self._state.requests[operation]

    def injected_count(self, operation: str | None = None) -> int:
        """Return how many requests got an injected error or reset."""
        with self._lock:
            if operation is None:
                return sum(self._state.injected.values())
            return self._state.injected[operation]

    def max_concurrent(self, operation: str) -> int:
        """Return the most requests of `operation` that were in the proxy at once."""
        with self._lock:
            return self._state.max_in_flight[operation]

    def scan_pages_forwarded(self) -> list[int]:
        """Return the page numbers of the Scan requests moto returned, in order."""
        with self._lock:
            return list(self._state.scan_pages_forwarded)

    # Event loop side.

    def _call(self, coroutine: Coroutine[Any, Any, _Result]) -> _Result:
        loop = self._loop
        if loop is None:
            coroutine.close()
            raise RuntimeError("the proxy is not started")
        future = asyncio.run_coroutine_threadsafe(coroutine, loop)
        try:
            return future.result(timeout=_CONTROL_TIMEOUT_SECONDS)
        except TimeoutError as exc:
            future.cancel()
            raise ProxyError(
                f"the proxy on port {self.port} did not respond within"
                f" {_CONTROL_TIMEOUT_SECONDS} s"
            ) from exc

    async def _listen(self) -> None:
        if self._server is not None:
            return
        listener = _reusable_socket()
        try:
            listener.bind((LOOPBACK, self.port))
            listener.listen(64)
        except OSError:
            listener.close()
            raise
        self._server = await asyncio.start_server(self._serve, sock=listener)

    async def _stop_listening(self) -> None:
        server = self._server
        self._server = None
        if server is not None:
            server.close()
        for writer in list(self._connections):
            writer.transport.abort()
        self._connections.clear()

    async def _shutdown(self) -> None:
        await self._stop_listening()
        current = asyncio.current_task()
        tasks = [task for task in asyncio.all_tasks() if task is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self._connections.add(writer)
        try:
            while True:
                request = await _read_request(reader)
                if request is None:
                    return
                if not await self._handle(request, writer):
                    return
        except (
            ConnectionError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            ValueError,
        ):
            # A client that hung up, or a request this proxy cannot parse.
            return
        except asyncio.CancelledError:
            # close() cancels the connection tasks. Python 3.11's stream
            # server calls exception() on a finished task, which raises for a
            # cancelled one, so the task ends normally instead.
            return
        finally:
            self._connections.discard(writer)
            writer.transport.abort()

    async def _handle(self, request: _Request, writer: asyncio.StreamWriter) -> bool:
        """Respond to one request, and return False when the connection must end."""
        operation = request.operation
        decision = self._decide(request)
        try:
            if decision.delay_seconds:
                await asyncio.sleep(decision.delay_seconds)
            if decision.reset:
                _reset(writer)
                return False
            if decision.error is not None:
                response = decision.error
            else:
                response = await self._forward(request)
                if decision.scan_page is not None and response.status == 200:
                    with self._lock:
                        self._state.scan_pages_forwarded.append(decision.scan_page)
            writer.write(_encode_response(response))
            await writer.drain()
        finally:
            with self._lock:
                self._state.in_flight[operation] -= 1
        return True

    def _decide(self, request: _Request) -> _Decision:
        operation = request.operation
        decision = _Decision()
        with self._lock:
            state = self._state
            state.requests[operation] += 1
            state.in_flight[operation] += 1
            state.max_in_flight[operation] = max(
                state.max_in_flight[operation], state.in_flight[operation]
            )
            decision.delay_seconds = state.delays.get(
                operation, state.delays.get(None, 0.0)
            )

            if operation == "Scan":
                request.body, decision.scan_page = self._prepare_scan(request.body)
                rule = state.scan_page_rule
                if rule is not None and decision.scan_page >= rule.first_failing_page:
                    state.injected[operation] += 1
                    if rule.failure == "reset":
                        decision.reset = True
                    else:
                        decision.error = _error_response(
                            500,
                            "InternalServerError",
                            f"injected by the test proxy: Scan page {decision.scan_page}",
                        )
                    return decision

            for error_rule in state.error_rules:
                if error_rule.operation not in (None, operation):
                    continue
                if error_rule.remaining is not None:
                    error_rule.remaining -= 1
                    if error_rule.remaining == 0:
                        state.error_rules.remove(error_rule)
                state.injected[operation] += 1
                decision.error = _error_response(
                    error_rule.status, error_rule.error_type, error_rule.message
                )
                return decision
        return decision

    def _prepare_scan(self, body: bytes) -> tuple[bytes, int]:
        """Number the page a Scan request reads, and add the page size.

        Called with the lock held.
        """
        state = self._state
        document = json.loads(body or b"{}")
        table = str(document.get("TableName", ""))
        start_key = document.get("ExclusiveStartKey")
        if start_key is None:
            pages = {"": 1}
            state.scan_pages[table] = pages
            page = 1
        else:
            pages = state.scan_pages.setdefault(table, {"": 1})
            key_text = json.dumps(start_key, sort_keys=True)
            page = pages.setdefault(key_text, len(pages) + 1)
        if state.scan_page_size is not None and "Limit" not in document:
            document["Limit"] = state.scan_page_size
            body = json.dumps(document).encode()
        return body, page

    async def _forward(self, request: _Request) -> _Response:
        reader, writer = await asyncio.open_connection(
            self._upstream_host, self._upstream_port
        )
        try:
            headers = [
                (name, value)
                for name, value in request.headers
                if name.lower() not in _HOP_BY_HOP_HEADERS
            ]
            headers.append(("Content-Length", str(len(request.body))))
            headers.append(("Connection", "close"))
            head = f"{request.method} {request.path} HTTP/1.1\r\n"
            head += "".join(f"{name}: {value}\r\n" for name, value in headers)
            writer.write(head.encode("latin-1") + b"\r\n" + request.body)
            await writer.drain()
            raw = await reader.read()
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        return _parse_response(raw)


def _reusable_socket() -> socket.socket:
    # SO_REUSEPORT lets the listening socket share the port with the
    # placeholder, and SO_REUSEADDR lets it bind while old connections to the
    # port are in TIME_WAIT.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    return sock


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close the connection with a TCP RST instead of a FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        # A zero linger time makes close() discard unsent data and send RST.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def _error_response(status: int, error_type: str, message: str) -> _Response:
    body = json.dumps(
        {"__type": f"{_ERROR_TYPE_PREFIX}{error_type}", "message": message}
    ).encode()
    reason = "Bad Request" if status == 400 else "Internal Server Error"
    headers = [
        ("Content-Type", "application/x-amz-json-1.0"),
        ("x-amzn-RequestId", uuid.uuid4().hex),
    ]
    return _Response(status, reason, headers, body)


async def _read_request(reader: asyncio.StreamReader) -> _Request | None:
    """Read one request, or return None when the client closed the connection."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise
        return None
    lines = head.decode("latin-1").split("\r\n")
    method, path, _version = lines[0].split(" ", 2)
    headers = _parse_headers(lines[1:])
    request = _Request(method, path, headers, b"")
    length = int(request.header("Content-Length") or 0)
    if request.header("Transfer-Encoding"):
        raise ValueError("chunked request bodies are not supported")
    request.body = await reader.readexactly(length)
    return request


def _parse_headers(lines: list[str]) -> list[tuple[str, str]]:
    headers: list[tuple[str, str]] = []
    for line in lines:
        if not line:
            continue
        name, _, value = line.partition(":")
        headers.append((name.strip(), value.strip()))
    return headers


def _parse_response(raw: bytes) -> _Response:
    """Parse a whole response that ended when the server closed the connection."""
    head, separator, body = raw.partition(b"\r\n\r\n")
    if not separator:
        raise ValueError(f"incomplete response from the upstream server: {raw[:200]!r}")
    lines = head.decode("latin-1").split("\r\n")
    status_line = lines[0].split(" ", 2)
    status = status_line[1]
    reason = status_line[2] if len(status_line) > 2 else ""
    headers = _parse_headers(lines[1:])
    encoding = next(
        (value for name, value in headers if name.lower() == "transfer-encoding"), ""
    )
    if "chunked" in encoding.lower():
        body = _decode_chunked(body)
    else:
        length = next(
            (value for name, value in headers if name.lower() == "content-length"),
            None,
        )
        if length is not None:
            body = body[: int(length)]
    kept = [
        (name, value)
        for name, value in headers
        if name.lower() not in _HOP_BY_HOP_HEADERS
    ]
    return _Response(int(status), reason, kept, body)


def _decode_chunked(data: bytes) -> bytes:
    body = bytearray()
    position = 0
    while True:
        line_end = data.index(b"\r\n", position)
        size = int(data[position:line_end].split(b";")[0], 16)
        if size == 0:
            return bytes(body)
        start = line_end + 2
        body += data[start : start + size]
        position = start + size + 2


def _encode_response(response: _Response) -> bytes:
    head = f"HTTP/1.1 {response.status} {response.reason}\r\n"
    headers = [
        *response.headers,
        ("Content-Length", str(len(response.body))),
        ("Connection", "keep-alive"),
    ]
    head += "".join(f"{name}: {value}\r\n" for name, value in headers)
    return head.encode("latin-1") + b"\r\n" + response.body
