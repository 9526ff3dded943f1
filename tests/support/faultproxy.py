"""A fault-injecting HTTP proxy on loopback in front of a real Vault/OpenBao server.

A test points a real client (hvac, requests, the plugin) at `FaultProxy.addr` instead of the server and
adds rules; each request the proxy reads is matched against them and either forwarded untouched or made
to meet one of the failures a production Vault (or the network in front of it) produces:

- `fail`: an answer with an error status and a Vault-style body `{"errors": [...]}`, never forwarded, as a
  standby without an active node (500), a sealed node (503), a rate limit quota (429) or a performance
  standby missing the index state (412) would answer;
- `reset`: the connection reset (TCP RST) after the request was read, never forwarded;
- `delay`: the request held for some seconds, then forwarded;
- `withhold`: the request forwarded, so the server does the work, then no answer for some seconds and the
  connection closed: a client with a shorter timeout sees a timeout although its write took effect.

Everything the proxy read is recorded (`seen`). It speaks HTTP/1.1 with keep-alive on both sides: one
upstream connection per client connection, so a client's connection pool behaves as against the server.
Bodies are read whole and sent on with a Content-Length, byte for byte. Only loopback, only plain HTTP.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import select
import socket
import socketserver
import struct
import sys
import threading
import time
import traceback
import urllib.parse
from http import HTTPStatus
from http.client import HTTPConnection, HTTPException
from http.server import BaseHTTPRequestHandler

# RFC 9110 7.6.1: they describe one connection, not the message; the proxy frames each side itself.
# Expect is answered here (the body is read whole before forwarding), so it is not passed on either.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "expect",
    }
)

# What Vault itself writes for these statuses (vault/http, vault/core). 404's empty list is what Vault
# answers for a path with nothing at it; hvac then raises InvalidPath without a message.
_DEFAULT_ERRORS = {
    403: "permission denied",
    404: None,
    412: "required index state not present",
    500: "local node not active but active cluster node not found",
    503: "Vault is sealed",
}

_NO_BODY_STATUSES = frozenset({204, 304})


@dataclasses.dataclass(frozen=True)
class Seen:
    """One request the proxy read. `action` is "forwarded", "failed <status>", "reset", "delayed",
    "withheld" or "upstream error" (the server could not be reached or broke off: the client's connection
    was reset). `status` is what the client was answered (None: no answer at all); `upstream` is what the
    server answered (None: the request never reached it, or it did not answer)."""

    method: str
    path: str  # without the query string
    action: str
    status: int | None
    upstream: int | None


@dataclasses.dataclass
class _Rule:
    action: str  # "fail", "reset", "delay", "withhold", "answer"
    pattern: str
    method: str | None
    times: int | None  # requests left; None: no count
    deadline: float | None  # time.monotonic() after which it no longer applies; None: no deadline
    status: int = 0
    message: str | None = None
    seconds: float = 0.0
    body: bytes = b""
    content_type: str = "application/json"

    def live(self, now: float) -> bool:
        return (self.times is None or self.times > 0) and (self.deadline is None or now < self.deadline)

    def matches(self, method: str, path: str) -> bool:
        return (self.method is None or self.method == method) and path_matches(self.pattern, path)


def path_matches(pattern: str, path: str) -> bool:
    """`pattern` is an exact path ("/v1/auth/token/renew-self") or a prefix ending in "*" ("/v1/secret/*")."""
    return path.startswith(pattern[:-1]) if pattern.endswith("*") else path == pattern


class FaultProxy:
    """An HTTP proxy on a random loopback port (`addr`) in front of `upstream` ("http://127.0.0.1:8200").

    Rules are checked in the order they were added; the first live one matching a request's method and
    path (query string ignored) applies to it, and a request no rule matches is forwarded untouched. A rule
    lives for its next `times` matching requests and/or until `for_seconds` after it was added, whichever
    ends first. Given neither, a `fail`, `reset` or `withhold` rule applies once and a `delay` rule until
    `clear()`. Methods are HTTP methods as sent: hvac reads with GET, writes with POST, lists with LIST.

    Threaded (one thread per client connection); `stop()` ends it and every connection, and is idempotent.
    Usable as a context manager. Exceptions the proxy itself raised while serving (a bug, not a client
    going away) are kept in `errors`, for a test to assert there are none.
    """

    def __init__(self, upstream: str, *, connect_timeout: float = 10):
        parts = urllib.parse.urlsplit(upstream)
        host = "127.0.0.1" if parts.hostname == "localhost" else parts.hostname
        if parts.scheme != "http" or not host or not ipaddress.ip_address(host).is_loopback or not parts.port:
            raise ValueError(f"upstream must be http://<loopback address>:<port>, not {upstream!r}")
        if parts.path not in ("", "/") or parts.query:
            raise ValueError(f"upstream must have no path: {upstream!r}")
        self.upstream = (host, parts.port)
        self.upstream_netloc = f"{host}:{parts.port}"
        self.connect_timeout = connect_timeout
        self.errors: list[BaseException] = []
        self._lock = threading.Lock()
        self._rules: list[_Rule] = []
        self._seen: list[Seen] = []
        self._handlers: set[_Handler] = set()
        # Set to let held requests go (clear(), stop()); a new one replaces it on each clear().
        self._release = threading.Event()
        self._stopped = False
        self._server = _Server(self)
        self.port = self._server.server_address[1]
        self.addr = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"faultproxy:{self.port}",
            daemon=True,
        )
        self._thread.start()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    # -- rules -------------------------------------------------------------------------------------

    def fail(
        self,
        path: str,
        status: int = 500,
        *,
        times: int | None = None,
        for_seconds: float | None = None,
        method: str | None = None,
        message: str | None = None,
    ) -> None:
        """Answer matching requests with `status` and `{"errors": [message]}` without forwarding them.
        `message` defaults to what Vault writes for that status (429: the rate limit quota message naming
        the request's path); for 404 the default is Vault's empty list."""
        if not 400 <= status <= 599:
            raise ValueError(f"not an error status: {status}")
        self._add(
            _Rule("fail", path, method, *self._bound(times, for_seconds, once=True), status=status, message=message)
        )

    def reset(
        self, path: str, *, times: int | None = None, for_seconds: float | None = None, method: str | None = None
    ) -> None:
        """Read matching requests, then reset their connection (TCP RST) without forwarding them."""
        self._add(_Rule("reset", path, method, *self._bound(times, for_seconds, once=True)))

    def delay(
        self,
        path: str,
        seconds: float,
        *,
        times: int | None = None,
        for_seconds: float | None = None,
        method: str | None = None,
    ) -> None:
        """Hold matching requests for `seconds` (less if `clear()` comes first), then forward them."""
        self._add(_Rule("delay", path, method, *self._bound(times, for_seconds, once=False), seconds=seconds))

    def withhold(
        self,
        path: str,
        seconds: float,
        *,
        times: int | None = None,
        for_seconds: float | None = None,
        method: str | None = None,
    ) -> None:
        """Forward matching requests and read the server's answer, then give the client nothing for `seconds`
        (or until `clear()`) and close its connection: the server did the work, the client never learns."""
        self._add(_Rule("withhold", path, method, *self._bound(times, for_seconds, once=True), seconds=seconds))

    def answer(
        self,
        path: str,
        body: bytes,
        status: int = 200,
        *,
        content_type: str = "application/json",
        trickle: float = 0.0,
        times: int | None = None,
        for_seconds: float | None = None,
        method: str | None = None,
    ) -> None:
        """Answer matching requests with `status` and exactly `body`, without forwarding them: a garbled,
        empty, HTML or oversized answer. With `trickle`, the body is sent one byte every `trickle` seconds
        (until the client gives up): each read is quick, the whole never is."""
        self._add(
            _Rule(
                "answer",
                path,
                method,
                *self._bound(times, for_seconds, once=True),
                status=status,
                seconds=trickle,
                body=body,
                content_type=content_type,
            )
        )

    def clear(self) -> None:
        """Drop every rule. Requests being delayed are forwarded now; withheld ones are closed now."""
        with self._lock:
            self._rules.clear()
            self._release.set()
            self._release = threading.Event()

    def seen(self, path: str | None = None, method: str | None = None) -> list[Seen]:
        """Every request read so far, in the order the proxy decided on it, optionally only those matching
        `path` (exact, or a prefix ending in "*") and `method`. A request is recorded before its client gets
        anything (answer, reset, close), so a client that has seen the outcome finds the record here."""
        method = method.upper() if method else None
        with self._lock:
            return [
                s
                for s in self._seen
                if (path is None or path_matches(path, s.path)) and (method is None or s.method == method)
            ]

    def stop(self) -> None:
        """Stop accepting, end every connection (held requests included) and wait for the threads to end."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            self._release.set()
        self._server.shutdown()  # no more accepts once this returns; a handler starting later sees _stopped
        with self._lock:
            handlers = list(self._handlers)
        for handler in handlers:
            handler.abort()
        self._server.server_close()  # closes the listener and joins the handler threads
        self._thread.join()

    # -- internals ---------------------------------------------------------------------------------

    @staticmethod
    def _bound(times: int | None, for_seconds: float | None, *, once: bool) -> tuple[int | None, float | None]:
        if times is not None and times < 1:
            raise ValueError(f"times must be at least 1, not {times}")
        if times is None and for_seconds is None and once:
            times = 1
        return times, None if for_seconds is None else time.monotonic() + for_seconds

    def _add(self, rule: _Rule) -> None:
        if not rule.pattern.startswith("/"):
            raise ValueError(f'a path starts with / ("/v1/..."), not {rule.pattern!r}')
        rule.method = rule.method.upper() if rule.method else None
        with self._lock:
            self._rules.append(rule)

    def _match(self, method: str, path: str) -> tuple[_Rule | None, threading.Event]:
        """The first live rule for this request, its use counted, and the event that releases held requests."""
        with self._lock:
            now = time.monotonic()
            self._rules = [rule for rule in self._rules if rule.live(now)]
            for rule in self._rules:
                if rule.matches(method, path):
                    if rule.times is not None:
                        rule.times -= 1
                    return rule, self._release
            return None, self._release

    def _record(self, seen: Seen) -> None:
        with self._lock:
            self._seen.append(seen)

    def _opened(self, handler: _Handler) -> bool:
        with self._lock:
            if self._stopped:
                return False
            self._handlers.add(handler)
            return True

    def _closed(self, handler: _Handler) -> None:
        with self._lock:
            self._handlers.discard(handler)

    @property
    def stopped(self) -> bool:
        return self._stopped


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


class _Server(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    block_on_close = True  # server_close() joins the handler threads
    request_queue_size = 128  # the default 5 drops connections under a load test's burst

    def __init__(self, proxy: FaultProxy):
        self.proxy = proxy
        super().__init__(("127.0.0.1", 0), _Handler)

    def handle_error(self, request, client_address) -> None:
        error = sys.exc_info()[1]
        if isinstance(error, OSError):  # a client (or the server) went away mid-request: not the proxy's fault
            return
        self.proxy.errors.append(error)
        traceback.print_exc()


class _UpstreamFailed(Exception):
    pass


class _Upstream(HTTPConnection):
    """The connection to the server for one client connection: a connect timeout, but reads wait as long
    as the server takes (the client's own timeout decides when to give up), and `stop()` can break in."""

    def __init__(self, proxy: FaultProxy):
        super().__init__(*proxy.upstream, timeout=proxy.connect_timeout)
        self.proxy = proxy

    def connect(self) -> None:
        super().connect()
        self.sock.settimeout(None)
        if self.proxy.stopped:  # stop() may have looked for this socket before it existed
            self.close()
            raise ConnectionAbortedError("the proxy is stopping")

    def dropped(self) -> bool:
        """The server closed the idle connection (readable with nothing asked means EOF): reconnect, as
        urllib3 does, rather than send a request into a closed socket."""
        return self.sock is not None and bool(select.select([self.sock], [], [], 0)[0])


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive unless the client asks for close
    disable_nagle_algorithm = True  # answers are small: no Nagle/delayed-ACK stalls on the client's reads
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.proxy = self.server.proxy
        self.upstream: _Upstream | None = None
        if not self.proxy._opened(self):
            self.abort()

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.proxy._closed(self)
            if self.upstream is not None:
                self.upstream.close()

    def log_message(self, format, *args) -> None:  # noqa: A002 - the stdlib's signature
        pass  # `seen()` is the record; stderr would only clutter a failing test's output

    def abort(self) -> None:
        """Break off both connections from another thread (stop()): blocked reads on them return."""
        for sock in (self.connection, self.upstream.sock if self.upstream is not None else None):
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def handle_one_request(self) -> None:
        # The stdlib's version dispatches to do_<METHOD>; every method (Vault's LIST too) is proxied alike.
        try:
            self.raw_requestline = self.rfile.readline(65537)
        except OSError:
            self.close_connection = True
            return
        if not self.raw_requestline or self.proxy.stopped:
            self.close_connection = True
            return
        if len(self.raw_requestline) > 65536:
            self.requestline = self.request_version = self.command = ""
            self.send_error(HTTPStatus.REQUEST_URI_TOO_LONG)
            return
        if not self.parse_request():
            return  # it answered the client with an error
        try:
            self._serve()
        except OSError:
            self.close_connection = True  # the client went away; nothing more to do on this connection

    # -- one request -------------------------------------------------------------------------------

    def _serve(self) -> None:
        method, target = self.command, self.path
        path = urllib.parse.urlsplit(target).path
        try:
            body = self._read_body()
        except ValueError as error:
            self.send_error(HTTPStatus.BAD_REQUEST, str(error))
            self.close_connection = True
            return
        rule, release = self.proxy._match(method, path)
        if rule is None:
            self._forward(method, target, path, body, "forwarded")
        elif rule.action == "fail":
            self.proxy._record(Seen(method, path, f"failed {rule.status}", rule.status, None))
            self._answer_error(method, path, rule.status, rule.message)
        elif rule.action == "reset":
            self.proxy._record(Seen(method, path, "reset", None, None))
            self._reset()
        elif rule.action == "answer":
            self.proxy._record(Seen(method, path, f"answered {rule.status}", rule.status, None))
            self._answer_raw(rule, release)
        elif rule.action == "delay":
            release.wait(rule.seconds)
            if self.proxy.stopped:
                self.close_connection = True
                return
            self._forward(method, target, path, body, "delayed")
        else:  # withhold
            answer = self._exchange(method, target, path, body)
            if answer is None:
                return
            self.proxy._record(Seen(method, path, "withheld", None, answer[0]))
            release.wait(rule.seconds)
            self.close_connection = True  # closed with a FIN, no answer: as a broken return path ends

    def _read_body(self) -> bytes | None:
        """The request's body, whole (None: the request had none). Chunked bodies are decoded, to go on
        with a Content-Length."""
        encoding = self.headers.get("Transfer-Encoding")
        if encoding is not None:
            if encoding.strip().lower() != "chunked":
                raise ValueError(f"unsupported Transfer-Encoding {encoding!r}")
            return self._read_chunked()
        length = self.headers.get("Content-Length")
        if length is None:
            return None
        if not length.strip().isdigit():
            raise ValueError(f"bad Content-Length {length!r}")
        return self._read_exact(int(length))

    def _read_exact(self, size: int) -> bytes:
        data = self.rfile.read(size)
        if len(data) != size:
            raise ConnectionAbortedError("the client closed its connection inside the request body")
        return data

    def _read_chunked(self) -> bytes:
        parts = []
        while True:
            line = self.rfile.readline(65537)
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise ValueError(f"bad chunk size line {line[:40]!r}") from None
            if size == 0:
                while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                    pass  # trailers: dropped, as hop-by-hop framing
                return b"".join(parts)
            parts.append(self._read_exact(size))
            self.rfile.readline(65537)  # the CRLF after the chunk

    def _exchange(
        self, method: str, target: str, path: str, body: bytes | None
    ) -> tuple[int, str, list[tuple[str, str]], bytes] | None:
        """Send the request to the server and read its whole answer: (status, reason, headers, body), or
        None when the server could not be reached or broke off (recorded; the client's connection reset)."""
        if self.upstream is not None and self.upstream.dropped():
            self.upstream.close()
        if self.upstream is None:
            self.upstream = _Upstream(self.proxy)
        upstream = self.upstream
        try:
            upstream.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
            connection_tokens = {t.strip().lower() for t in self.headers.get("Connection", "").split(",")}
            has_host = False
            for name, value in self.headers.items():
                lowered = name.lower()
                if lowered in HOP_BY_HOP or lowered in connection_tokens or lowered == "content-length":
                    continue
                has_host |= lowered == "host"
                upstream.putheader(name, value)
            if not has_host:  # an HTTP/1.0 client may send none; Go's server refuses HTTP/1.1 without
                upstream.putheader("Host", self.proxy.upstream_netloc)
            if body is not None:
                upstream.putheader("Content-Length", str(len(body)))
            upstream.endheaders(body)
            response = upstream.getresponse()
            data = response.read()
        except (OSError, HTTPException):
            # Not retried: the server may have carried the request out. A client talking to the server
            # directly would see its connection fail too.
            upstream.close()
            if self.proxy.stopped:
                self.close_connection = True
                return None
            self.proxy._record(Seen(method, path, "upstream error", None, None))
            self._reset()
            return None
        return response.status, response.reason, response.getheaders(), data

    def _forward(self, method: str, target: str, path: str, body: bytes | None, action: str) -> None:
        answer = self._exchange(method, target, path, body)
        if answer is None:
            return
        status, reason, headers, data = answer
        self.proxy._record(Seen(method, path, action, status, status))
        self._respond(method, status, reason, headers, data)

    def _answer_error(self, method: str, path: str, status: int, message: str | None) -> None:
        if message is None:
            if status == 429:
                # Vault names the logical path (without /v1/), Go-quoted.
                message = f"request path {json.dumps(path.removeprefix('/v1/'))}: rate limit quota exceeded"
            elif status in _DEFAULT_ERRORS:
                message = _DEFAULT_ERRORS[status]
            else:
                message = _phrase(status).lower()
        errors = [] if message is None else [message]
        # As Vault's respondError writes it: a JSON encoder's output, newline included.
        data = (json.dumps({"errors": errors}) + "\n").encode()
        headers = [
            ("Cache-Control", "no-store"),
            ("Content-Type", "application/json"),
            ("Date", self.date_time_string()),
        ]
        self._respond(method, status, _phrase(status), headers, data)

    def _respond(self, method: str, status: int, reason: str, headers: list[tuple[str, str]], data: bytes) -> None:
        """Write one answer in a single send (status line, headers, body): framing is the proxy's own."""
        no_body = method == "HEAD" or status in _NO_BODY_STATUSES or status < 200
        connection_tokens = {
            t.strip().lower() for name, v in headers if name.lower() == "connection" for t in v.split(",")
        }
        lines = [f"{self.protocol_version} {status} {reason}"]
        for name, value in headers:
            lowered = name.lower()
            if lowered in HOP_BY_HOP or lowered in connection_tokens:
                continue
            if lowered == "content-length" and not no_body:
                continue  # recomputed below, from the body as read
            lines.append(f"{name}: {value}")
        if not no_body:
            lines.append(f"Content-Length: {len(data)}")
        if self.close_connection:
            lines.append("Connection: close")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        self.wfile.write(head if no_body else head + data)

    def _answer_raw(self, rule: _Rule, release: threading.Event) -> None:
        headers = [("Content-Type", rule.content_type)]
        if not rule.seconds:
            self._respond(self.command, rule.status, _phrase(rule.status), headers, rule.body)
            return
        self.close_connection = True
        head = f"{self.protocol_version} {rule.status} {_phrase(rule.status)}\r\nContent-Type: {rule.content_type}\r\n"
        self.wfile.write(f"{head}Content-Length: {len(rule.body)}\r\nConnection: close\r\n\r\n".encode("latin-1"))
        try:
            for byte in rule.body:
                if release.wait(rule.seconds) or self.proxy.stopped:
                    return
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
        except OSError:  # the client gave up, as it should
            return

    def _reset(self) -> None:
        """Close the client's connection with a TCP RST (SO_LINGER 0) rather than a FIN."""
        self.close_connection = True
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        # rfile holds a reference to the socket that would keep its descriptor open past close().
        self.rfile.close()
        self.connection.close()
