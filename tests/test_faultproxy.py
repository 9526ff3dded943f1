"""The fault-injecting proxy itself, against a real OpenBao dev server, through hvac and requests."""

from __future__ import annotations

import http.client
import secrets
import socket
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import hvac
import pytest
import requests

from devenv.openbao import OpenBaoDevServer, free_loopback_port
from tests.support.faultproxy import FaultProxy, Seen

pytestmark = pytest.mark.openbao


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[OpenBaoDevServer]:
    server = OpenBaoDevServer(tmp_path_factory.mktemp("faultproxy"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def proxy(server) -> Iterator[FaultProxy]:
    with FaultProxy(server.addr) as proxy:
        yield proxy
    assert proxy.errors == []


@pytest.fixture
def client(server) -> Iterator[Callable[..., hvac.Client]]:
    """hvac clients with the root token, their sessions closed at the end (no unclosed sockets)."""
    made: list[hvac.Client] = []

    def make(url: str | None = None, timeout: float = 10) -> hvac.Client:
        made.append(hvac.Client(url=url or server.addr, token=server.root_token, timeout=timeout))
        return made[-1]

    yield make
    for each in made:
        each.adapter.close()


@pytest.fixture
def session(server) -> Iterator[requests.Session]:
    with requests.Session() as session:
        session.headers["X-Vault-Token"] = server.root_token
        yield session


def kv_path() -> str:
    return f"fp/{secrets.token_hex(4)}"


def read_kv(client: hvac.Client, path: str) -> dict:
    return client.secrets.kv.v2.read_secret_version(path=path, raise_on_deleted_version=True)["data"]


def test_reads_writes_lists_and_wrapping_go_through_unchanged(proxy, client, session):
    via, direct = client(proxy.addr), client()
    path = kv_path()
    big = secrets.token_hex(50_000)  # 100 KB: more than Go's server buffers, so it answers chunked
    via.secrets.kv.v2.create_or_update_secret(path=path, secret={"big": big, "n": "1"})
    assert read_kv(direct, path)["data"] == {"big": big, "n": "1"}
    assert read_kv(via, path)["data"] == {"big": big, "n": "1"}
    folder, _, leaf = path.partition("/")
    assert leaf in via.secrets.kv.v2.list_secrets(path=folder)["data"]["keys"]
    # X-Vault-Wrap-TTL reaches the server: it answers with a wrapping token instead of the data.
    wrapped = via.write_data("sys/wrapping/wrap", data={"k": "v"}, wrap_ttl="60s")
    assert direct.sys.unwrap(wrapped["wrap_info"]["token"])["data"] == {"k": "v"}

    response = session.get(f"{proxy.addr}/v1/secret/data/{path}", headers={"Accept-Encoding": "identity"})
    assert response.status_code == 200 and response.json()["data"]["data"]["big"] == big
    assert response.headers["Content-Length"] == str(len(response.content))
    assert "Transfer-Encoding" not in response.headers
    assert response.headers["Content-Type"] == "application/json"

    assert proxy.seen() == [
        Seen("POST", f"/v1/secret/data/{path}", "forwarded", 200, 200),
        Seen("GET", f"/v1/secret/data/{path}", "forwarded", 200, 200),
        Seen("LIST", f"/v1/secret/metadata/{folder}", "forwarded", 200, 200),
        Seen("POST", "/v1/sys/wrapping/wrap", "forwarded", 200, 200),
        Seen("GET", f"/v1/secret/data/{path}", "forwarded", 200, 200),
    ]


def test_fail_twice_then_the_third_write_reaches_the_server(proxy, client):
    via, direct = client(proxy.addr), client()
    path = kv_path()
    proxy.fail(f"/v1/secret/data/{path}", status=500, times=2, method="POST")
    for attempt in range(2):
        with pytest.raises(hvac.exceptions.InternalServerError) as raised:
            via.secrets.kv.v2.create_or_update_secret(path=path, secret={"attempt": str(attempt)})
        assert raised.value.errors == ["local node not active but active cluster node not found"]
    written = via.secrets.kv.v2.create_or_update_secret(path=path, secret={"attempt": "2"})
    assert written["data"]["version"] == 1  # the failed attempts never reached the server
    assert read_kv(direct, path)["data"] == {"attempt": "2"}
    assert [(s.action, s.status, s.upstream) for s in proxy.seen()] == [
        ("failed 500", 500, None),
        ("failed 500", 500, None),
        ("forwarded", 200, 200),
    ]


@pytest.mark.parametrize(
    ("status", "message", "raises", "errors"),
    [
        (500, None, hvac.exceptions.InternalServerError, ["local node not active but active cluster node not found"]),
        (503, None, hvac.exceptions.VaultDown, ["Vault is sealed"]),
        (
            429,
            None,
            hvac.exceptions.RateLimitExceeded,
            ['request path "secret/data/fp/status": rate limit quota exceeded'],
        ),
        (412, None, hvac.exceptions.UnexpectedError, ["required index state not present"]),
        (403, None, hvac.exceptions.Forbidden, ["permission denied"]),
        (404, None, hvac.exceptions.InvalidPath, []),
        (502, "upstream connect error", hvac.exceptions.BadGateway, ["upstream connect error"]),
    ],
)
def test_failures_read_as_vault_errors(proxy, client, session, status, message, raises, errors):
    proxy.fail("/v1/secret/data/fp/status", status=status, message=message, times=2)
    with pytest.raises(raises) as raised:
        client(proxy.addr).secrets.kv.v2.read_secret_version(path="fp/status", raise_on_deleted_version=True)
    assert (raised.value.errors or []) == errors
    response = session.get(f"{proxy.addr}/v1/secret/data/fp/status")
    assert response.status_code == status
    assert response.headers["Content-Type"] == "application/json"
    assert response.json() == {"errors": errors}


def test_reset_gives_a_connection_error_and_the_request_never_reaches_the_server(proxy, client, session):
    path = kv_path()
    proxy.reset(f"/v1/secret/data/{path}")
    with pytest.raises(requests.ConnectionError) as raised:
        session.post(f"{proxy.addr}/v1/secret/data/{path}", json={"data": {"k": "v"}})
    assert isinstance(raised.value.args[0].args[1], ConnectionResetError)  # a RST, not a clean close
    with pytest.raises(hvac.exceptions.InvalidPath):
        read_kv(client(), path)
    # The same session opens a new connection and goes on.
    assert session.post(f"{proxy.addr}/v1/secret/data/{path}", json={"data": {"k": "v"}}).status_code == 200
    assert [s.action for s in proxy.seen()] == ["reset", "forwarded"]


def test_delay_makes_a_request_slower_by_about_the_delay(proxy, session):
    url = f"{proxy.addr}/v1/sys/health"
    session.get(url)  # a warm connection, as in the timed requests
    proxy.delay("/v1/sys/health", 0.6, times=1)
    started = time.monotonic()
    assert session.get(url).status_code == 200
    delayed = time.monotonic() - started
    started = time.monotonic()
    assert session.get(url).status_code == 200
    plain = time.monotonic() - started
    assert 0.6 <= delayed < 0.6 + 1.0 and plain < 0.5
    assert [(s.action, s.status) for s in proxy.seen()] == [("forwarded", 200), ("delayed", 200), ("forwarded", 200)]


def test_withheld_write_times_out_at_the_client_but_the_server_carried_it_out(proxy, client):
    path = kv_path()
    proxy.withhold(f"/v1/secret/data/{path}", 1.5, method="POST")
    via = client(proxy.addr, timeout=0.4)
    started = time.monotonic()
    with pytest.raises(requests.exceptions.ReadTimeout):
        via.secrets.kv.v2.create_or_update_secret(path=path, secret={"k": "v"})
    assert time.monotonic() - started < 1.4
    assert read_kv(client(), path)["data"] == {"k": "v"}
    assert proxy.seen() == [Seen("POST", f"/v1/secret/data/{path}", "withheld", None, 200)]
    # The rule was used up: the retry is answered (a second version, as a real retry would make).
    assert via.secrets.kv.v2.create_or_update_secret(path=path, secret={"k": "v2"})["data"]["version"] == 2


def test_a_withheld_answer_ends_in_a_close_without_answer_at_clear(proxy):
    proxy.withhold("/v1/sys/health", 30, method="GET")
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(b"GET /v1/sys/health HTTP/1.1\r\nHost: vault\r\n\r\n")
        deadline = time.monotonic() + 5
        while not proxy.seen() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert proxy.seen() == [Seen("GET", "/v1/sys/health", "withheld", None, 200)]
        started = time.monotonic()
        proxy.clear()
        assert sock.recv(1024) == b""  # closed, nothing sent
        assert time.monotonic() - started < 2


def test_for_seconds_rules_apply_to_every_request_until_they_expire(proxy, session):
    url = f"{proxy.addr}/v1/sys/health"
    proxy.fail("/v1/sys/health", status=503, for_seconds=0.6)
    assert [session.get(url).status_code for _ in range(3)] == [503, 503, 503]
    time.sleep(0.7)
    assert session.get(url).status_code == 200
    assert [s.action for s in proxy.seen()] == ["failed 503"] * 3 + ["forwarded"]


def test_rules_match_on_method_and_exact_or_prefix_path_first_live_rule_first(proxy, client, session):
    path = kv_path()
    client().secrets.kv.v2.create_or_update_secret(path=path, secret={"k": "v"})
    folder = path.split("/")[0]
    proxy.fail("/v1/secret/*", status=403, method="post", times=5)
    proxy.fail(f"/v1/secret/metadata/{folder}", status=500, method="LIST")
    proxy.fail(f"/v1/secret/metadata/{folder}", status=503, times=2)
    v1 = proxy.addr + "/v1"
    assert session.get(f"{v1}/secret/data/{path}").status_code == 200  # POST only
    assert session.post(f"{v1}/secret/data/{path}", json={"data": {}}).status_code == 403
    assert session.post(f"{v1}/sys/capabilities-self", json={"paths": ["secret/"]}).status_code == 200  # not below
    assert session.get(f"{v1}/secret/metadata/{folder}/absent").status_code == 404  # exact means exact
    assert session.request("LIST", f"{v1}/secret/metadata/{folder}").status_code == 500  # first of the two
    assert session.request("LIST", f"{v1}/secret/metadata/{folder}").status_code == 503  # the first used up
    assert session.get(f"{v1}/secret/metadata/{folder}?list=true").status_code == 503  # query ignored
    assert session.request("LIST", f"{v1}/secret/metadata/{folder}").status_code == 200  # all used up

    assert [(s.method, s.action) for s in proxy.seen("/v1/secret/*")] == [
        ("GET", "forwarded"),
        ("POST", "failed 403"),
        ("GET", "forwarded"),
        ("LIST", "failed 500"),
        ("LIST", "failed 503"),
        ("GET", "failed 503"),
        ("LIST", "forwarded"),
    ]
    assert [s.path for s in proxy.seen(method="post")] == [f"/v1/secret/data/{path}", "/v1/sys/capabilities-self"]
    assert proxy.seen(f"/v1/secret/metadata/{folder}", method="LIST")[0] == Seen(
        "LIST", f"/v1/secret/metadata/{folder}", "failed 500", 500, None
    )


def test_keeps_client_connections_alive_and_serves_many_at_once(proxy, server):
    connection = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=5)
    try:
        sockets = []
        for _ in range(3):
            connection.request("GET", "/v1/sys/health")
            response = connection.getresponse()
            assert response.status == 200 and response.read()
            sockets.append(connection.sock)
        assert sockets[0] is not None and all(s is sockets[0] for s in sockets)
    finally:
        connection.close()

    def reads(_: int) -> list[int]:
        with requests.Session() as session:
            session.headers["X-Vault-Token"] = server.root_token
            return [session.get(f"{proxy.addr}/v1/auth/token/lookup-self", timeout=10).status_code for _ in range(8)]

    with ThreadPoolExecutor(12) as pool:
        statuses = [status for each in pool.map(reads, range(12)) for status in each]
    assert statuses == [200] * 96
    assert len(proxy.seen("/v1/auth/token/lookup-self")) == 96


def test_an_unreachable_server_resets_the_client(client):
    with FaultProxy(f"http://127.0.0.1:{free_loopback_port()}") as proxy:
        with pytest.raises(requests.ConnectionError):
            client(proxy.addr).sys.read_health_status(method="GET")
        assert proxy.seen() == [Seen("GET", "/v1/sys/health", "upstream error", None, None)]
    assert proxy.errors == []


def test_stop_ends_held_requests_and_is_idempotent(server):
    proxy = FaultProxy(server.addr)
    proxy.withhold("/v1/sys/health", 30)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(b"GET /v1/sys/health HTTP/1.1\r\nHost: vault\r\n\r\n")
        deadline = time.monotonic() + 5
        while not proxy.seen() and time.monotonic() < deadline:
            time.sleep(0.02)
        started = time.monotonic()
        proxy.stop()
        assert time.monotonic() - started < 2
        assert sock.recv(1024) == b""
    proxy.stop()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", proxy.port), timeout=1).close()
    assert proxy.errors == []


def test_refuses_what_it_is_not_for(server):
    for upstream in ("http://10.1.2.3:8200", "https://127.0.0.1:8200", "http://127.0.0.1", "http://127.0.0.1:8200/v1"):
        with pytest.raises(ValueError):
            FaultProxy(upstream)
    with FaultProxy(server.addr) as proxy:
        with pytest.raises(ValueError):
            proxy.fail("v1/sys/health")  # no leading slash: a rule that would never match
        with pytest.raises(ValueError):
            proxy.reset("/v1/sys/health", times=0)
