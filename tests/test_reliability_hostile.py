"""Reliability: hostile input on every endpoint, property-based (hypothesis).

Whatever arrives on the socket (random bytes, malformed or deeply nested JSON, bodies over the size limit,
names, IDs and option keys with `/`, `..`, NUL, unicode, lone surrogates, 64 KiB strings, thousands of
options), the plugin answers with a JSON `Err` that is one of its own messages (never a traceback, never
the generic "internal error" of an unexpected exception, never a secret or token), stays up, and the
mounter is never asked for a path outside its root.

The bulk runs through Flask's test client with the real driver and store over fakes (fast); a smaller
run goes to the real plugin process on its Unix socket, with real OpenBao and real tmpfs, and checks
that nothing was mounted or written outside the mount root. Deterministic: derandomized, bounded
example counts, no example database.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

from plugin.core.spec import FILE_OPTION_PREFIXES, SCALAR_OPTIONS
from plugin.edge.app import MAX_BODY, create_app
from tests.support.fakes import OPTIONS, FakeMounter, driver_over_fakes
from tests.support.faults import mounts_below

ACCEPT = {"Accept": "application/vnd.docker.plugins.v1.2+json"}
VERBS = ["Plugin.Activate"] + [
    f"VolumeDriver.{v}" for v in ("Create", "Remove", "Mount", "Unmount", "Path", "Get", "List", "Capabilities")
]
INTERNAL = "internal error in the vault-secrets plugin"
# What the fakes hold: a secret value and the tokens they hand out. None may reach an Err.
FAKE_SECRETS = ("hunter2", "child-token-", "plugin-token")
MAX_ERR = 2048  # an Err is shown by the docker CLI: user input in it must be bounded

# Hypothesis keeps caches (unicode tables, constants) in ./.hypothesis by default: not in the repository.
set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "vault-secrets-hypothesis")
DETERMINISTIC = settings(
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=False,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
        HealthCheck.filter_too_much,
    ],
)

# -- strategies ---------------------------------------------------------------------------------

NASTY = [
    "",
    ".",
    "..",
    "/",
    "//",
    "../..",
    "../../../etc/passwd",
    "a/b",
    "/etc",
    "..\\..",
    "a\x00b",
    "\x00",
    " ",
    "\t\n",
    "web",
    "WEB",
    "web ",
    " web",
    "-web",
    ".web",
    "web/",
    "名前",
    "\u202eexe.txt",
    "ümlaut",
    "😀",
    "\ud800",
    "x\udfffy",
    "\ufeffweb",
    "a" * 128,
    "a" * 129,
    "%2e%2e%2f",
    "$(id)",
    "`id`",
    "'; DROP TABLE volumes;--",
    "\\x00",
    "CON",
    "nul",
]


def repeated(unit: str, n: int) -> str:
    return unit * n


text = st.one_of(
    st.sampled_from(NASTY),
    st.text(max_size=24),
    st.text(alphabet=st.characters(codec=None, categories=["Cs", "Cc", "Zs", "So", "Lo", "Mn"]), max_size=12),
    # Up to and beyond 64 KiB.
    st.builds(
        repeated,
        st.sampled_from(["a", "/", "..", "\x00", "é", "\ud800", "%", "名"]),
        st.sampled_from([1024, 16384, 65536, 65537]),
    ),
)
hex_ids = st.text(alphabet="0123456789abcdef", min_size=1, max_size=64)
names = st.one_of(
    text, st.sampled_from(["web", "other"]), st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,20}", fullmatch=True)
)
ids = st.one_of(text, hex_ids)
option_keys = st.one_of(
    text,
    st.sampled_from(SCALAR_OPTIONS),
    st.builds(lambda prefix, rest: prefix + rest, st.sampled_from(FILE_OPTION_PREFIXES), text),
)
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True), text)
json_values = st.recursive(
    json_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4), max_leaves=12
)
options = st.one_of(
    st.dictionaries(option_keys, st.one_of(text, json_values), max_size=12),
    st.builds(
        lambda base, extra: {**base, **extra}, st.just(dict(OPTIONS)), st.dictionaries(option_keys, text, max_size=4)
    ),
    json_values,
)


def many_options(n: int, kind: int) -> dict[str, str]:
    """Thousands of options: many files, many unknown keys, or many hostile keys."""
    if kind == 0:
        return {"role": "web", **{f"secret.f{i}": "secret/data/web/db#password" for i in range(n)}}
    if kind == 1:
        return {"role": "web", "secret.pw": "secret/data/web/db#password", **{f"x{i}": "y" for i in range(n)}}
    return {"role": "web", **{f"secret.{'../' * (i % 7)}{i}\x00": "a/b" for i in range(n)}}


bodies_as_objects = st.one_of(
    st.fixed_dictionaries(
        {}, optional={"Name": st.one_of(names, json_values), "ID": st.one_of(ids, json_values), "Opts": options}
    ),
    st.builds(
        lambda name, n, kind: {"Name": name, "Opts": many_options(n, kind)},
        names,
        st.sampled_from([1000, 3000, 5000]),
        st.integers(0, 2),
    ),
    json_values,
)


def encode(body, ascii_only: bool) -> bytes:
    # Without ensure_ascii a lone surrogate is sent as the raw (invalid UTF-8) bytes a careless client would send.
    return json.dumps(body, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


def truncate(raw: bytes, at: int) -> bytes:
    return raw[: at % (len(raw) + 1)]


raw_bodies = st.one_of(
    st.builds(encode, bodies_as_objects, st.booleans()),
    st.binary(max_size=512),
    st.builds(truncate, st.builds(encode, bodies_as_objects, st.booleans()), st.integers(0, 10**6)),  # malformed JSON
    st.sampled_from(
        [
            b"",
            b" ",
            b"null",
            b"{}",
            b"[]",
            b'"x"',
            b"1e999999",
            b"1" * 5000,
            b'{"Name": NaN}',
            b'{"Name": "web", "Name": "x"}',
            b"\xef\xbb\xbf{}",
            b'{"a":' * 1000,
        ]
    ),
    st.builds(lambda n: b"[" * n + b"]" * n, st.sampled_from([100, 1000, 5000, 100_000])),  # nesting
    st.builds(
        lambda n: b'{"Name": "web", "Pad": "' + b"x" * n + b'"}',
        st.sampled_from([MAX_BODY - 40, MAX_BODY, 2 * MAX_BODY]),
    ),
)
paths = st.one_of(
    st.sampled_from(VERBS),
    st.sampled_from(
        [
            "",
            "VolumeDriver.",
            "Plugin.Activate/..",
            "VolumeDriver.Mount/x",
            "volumedriver.mount",
            "VolumeDriver.Explode",
            "..%2fetc",
        ]
    ),
)


# -- the driver over fakes, through Flask's test client -----------------------------------------


class ConfinedMounter(FakeMounter):
    """The fake mounter, refusing (by failing the test) any request whose path would leave its root."""

    def __init__(self, root: Path):
        super().__init__(root)
        self.asked: list[tuple[str, str]] = []

    def _confine(self, volume: str, mount_id: str) -> None:
        self.asked.append((volume, mount_id))
        for part in (volume, mount_id):
            assert (
                isinstance(part, str) and part and "/" not in part and "\x00" not in part and part not in (".", "..")
            ), f"the mounter was asked for an unsafe path component {part!r}"
        path = Path(os.path.normpath(self.root / volume / mount_id / "view"))
        assert path.is_relative_to(self.root), f"{path} is outside the mount root"

    def view_path(self, volume, mount_id):
        self._confine(volume, mount_id)
        return super().view_path(volume, mount_id)

    def mount(self, volume, mount_id, files, **kwargs):
        self._confine(volume, mount_id)
        for name in files:
            assert "/" not in name and name not in (".", "..") and not name.startswith("."), (
                f"unsafe file name {name!r}"
            )
        return super().mount(volume, mount_id, files, **kwargs)

    def unmount(self, volume, mount_id):
        self._confine(volume, mount_id)
        super().unmount(volume, mount_id)


class UnexpectedErrors(logging.Handler):
    """Collects the log records of unexpected exceptions (the app logs them with a traceback)."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def hostile_app(store, vault, identity, scheduler, tmp_path):
    mounter = ConfinedMounter(tmp_path / "mounts")
    driver = driver_over_fakes(store, vault, identity, mounter, scheduler)
    driver.create("web", OPTIONS)
    handler = UnexpectedErrors()
    logging.getLogger().addHandler(handler)
    try:
        yield create_app(driver).test_client(), mounter, handler
    finally:
        logging.getLogger().removeHandler(handler)


def check_reply(status: int, raw: bytes, where: str) -> dict:
    """The invariant of every answer: JSON, an object, and on failure an Err of the plugin's own."""
    reply = json.loads(raw)
    assert isinstance(reply, dict), f"{where}: reply is not an object: {raw[:200]!r}"
    err = reply.get("Err", "")
    assert isinstance(err, str)
    if status != 200:
        assert err, f"{where}: status {status} without an Err"
    assert "Traceback" not in err and INTERNAL not in err, f"{where}: unexpected exception: {err[:300]}"
    assert len(err) <= MAX_ERR, f"{where}: Err of {len(err)} characters echoes unbounded input: {err[:120]}..."
    for value in FAKE_SECRETS:
        assert value not in err, f"{where}: Err carries a secret or token"
    return reply


def still_serves(client) -> None:
    """A whole lifecycle still works (on a volume of its own: a generated call may have removed "web")."""
    for verb, body in (
        ("Create", {"Name": "alive", "Opts": OPTIONS}),
        ("Mount", {"Name": "alive", "ID": "feedface"}),
        ("Unmount", {"Name": "alive", "ID": "feedface"}),
        ("Remove", {"Name": "alive"}),
    ):
        response = client.post(f"/VolumeDriver.{verb}", data=json.dumps(body), headers=ACCEPT)
        assert response.status_code == 200, f"{verb} after hostile input: {response.data[:300]!r}"


@settings(DETERMINISTIC, max_examples=700)
@given(path=paths, raw=raw_bodies)
def test_any_bytes_on_any_endpoint_get_an_err_of_the_plugins_own(hostile_app, path, raw):
    client, _, unexpected = hostile_app
    unexpected.records.clear()
    response = client.post(f"/{path}", data=raw, headers=ACCEPT)
    check_reply(response.status_code, response.data, f"POST /{path} with {raw[:80]!r}")
    assert not unexpected.records, f"POST /{path}: {unexpected.records[0].getMessage()}"
    still_serves(client)


@settings(DETERMINISTIC, max_examples=500)
@given(verb=st.sampled_from(VERBS), body=bodies_as_objects, ascii_only=st.booleans())
def test_hostile_names_ids_and_options_never_leave_the_mount_root(hostile_app, verb, body, ascii_only):
    client, mounter, unexpected = hostile_app
    unexpected.records.clear()
    response = client.post(f"/{verb}", data=encode(body, ascii_only), headers=ACCEPT)
    reply = check_reply(response.status_code, response.data, verb)
    assert not unexpected.records, f"{verb}: {unexpected.records[0].getMessage()}"
    if verb == "VolumeDriver.Mount" and response.status_code == 200:
        assert Path(reply["Mountpoint"]).is_relative_to(mounter.root)


@settings(DETERMINISTIC, max_examples=60)
@given(method=st.sampled_from(["GET", "PUT", "DELETE", "PATCH", "OPTIONS"]), path=paths, raw=st.binary(max_size=64))
def test_other_methods_get_an_err(hostile_app, method, path, raw):
    client, _, unexpected = hostile_app
    unexpected.records.clear()
    response = client.open(f"/{path}", method=method, data=raw, headers=ACCEPT)
    if method == "OPTIONS" and response.status_code == 200:  # HTTP's own answer (Flask): the methods, nothing else
        assert response.data == b"" and set(response.headers["Allow"].split(", ")) == {"OPTIONS", "POST"}
        return
    check_reply(response.status_code, response.data, f"{method} /{path}")
    assert response.status_code != 200 and not unexpected.records


# -- the real plugin on its socket, with real OpenBao and real tmpfs ----------------------------


def raw_post(sock_path: Path, path: str, body: bytes, timeout: float = 30) -> tuple[int, bytes] | None:
    """POST as dockerd does (no Content-Type). None when the plugin closed the connection before answering
    (it may do so once a body is over the limit, while the client is still sending)."""
    head = (
        f"POST /{path} HTTP/1.1\r\nHost: plugin.moby.localhost\r\nAccept: {ACCEPT['Accept']}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(sock_path))
        try:
            s.sendall(head + body)
        except (BrokenPipeError, ConnectionResetError):
            pass
        chunks = []
        try:
            while chunk := s.recv(65536):
                chunks.append(chunk)
        except ConnectionResetError:
            pass
    response = b"".join(chunks)
    if not response:
        return None
    head, _, payload = response.partition(b"\r\n\r\n")
    return int(head.split()[1]), payload


def state_rows(state_dir: Path) -> list[tuple[str, str, int]]:
    from tests.support.faults import state_query

    return state_query(state_dir, "SELECT volume, mount_id, refcount FROM mounts")


@pytest.mark.openbao
def test_the_real_plugin_answers_hostile_input_with_err_stays_up_and_writes_only_below_its_mount_root(
    start_plugin, short_tmp
):
    plugin = start_plugin()
    web = {"Name": "web", "Opts": {"role": "web", "secret.pw": "secret/data/web/db#password"}}
    state, mount_root = short_tmp / "state", plugin.mount_root
    answers = {"err": 0, "ok": 0, "closed": 0, "mounted": 0}
    refused_mounts: list[str] = []

    @settings(DETERMINISTIC, max_examples=300)
    @given(
        path=paths,
        raw=raw_bodies,
        ascii_only=st.booleans(),
        body=st.one_of(bodies_as_objects, st.fixed_dictionaries({"Name": st.just("web"), "ID": hex_ids})),
    )
    def hammer(path, raw, ascii_only, body):
        plugin.client.ok("VolumeDriver.Create", web)  # idempotent; a generated Remove may have removed it
        for where, payload in (
            (path, raw),
            (path if path in VERBS else "VolumeDriver.Mount", encode(body, ascii_only)),
        ):
            answer = raw_post(plugin.socket_path, where, payload)
            if answer is None:
                assert len(payload) > MAX_BODY, f"POST /{where}: connection closed without an answer"
                answers["closed"] += 1
                continue
            reply = check_reply(answer[0], answer[1], f"POST /{where} with {payload[:80]!r}")
            answers["err" if reply.get("Err") else "ok"] += 1
            if where == "VolumeDriver.Mount" and answer[0] == 200:
                assert Path(reply["Mountpoint"]).is_relative_to(mount_root)
                answers["mounted"] += 1
            elif (
                where == "VolumeDriver.Mount"
                and isinstance(body, dict)
                and body.get("Name") == "web"
                and str(body.get("ID")).isalnum()
            ):
                refused_mounts.append(reply.get("Err", "")[:200])
        assert plugin.process.poll() is None, "the plugin died"

    hammer()

    assert answers["mounted"] >= 10 and answers["err"] >= 150, (answers, refused_mounts[:5])
    # Nothing outside the mount root: no mount, no file; inside it only the mounts the state records.
    mounted = mounts_below(short_tmp)
    assert all(Path(m).is_relative_to(mount_root) for m in mounted), sorted(mounted)
    rows = state_rows(state)
    assert {str(mount_root / v / m / suffix) for v, m, _ in rows for suffix in ("data", "view")} == set(mounted)
    assert {p.name for p in short_tmp.iterdir()} <= {"p.sock", "state", "state-mounts", "wrapped", "plugin0.log"}
    assert {p.name for p in state.iterdir()} <= {
        "state.db",
        "state.db-wal",
        "state.db-shm",
        "seal.key",
        "control.sock",
        "lock",
    }
    for volume, mount_id, refcount in rows:  # dockerd would unmount each as often as it mounted
        for _ in range(refcount):
            plugin.client.ok("VolumeDriver.Unmount", {"Name": volume, "ID": mount_id})
    assert mounts_below(short_tmp) == {} and list(mount_root.iterdir()) == []
    log = plugin.log()
    assert "Traceback" not in log and "unexpected error" not in log
    plugin.client.ok("VolumeDriver.Mount", {"Name": "web", "ID": "c0ffee"})
    plugin.client.ok("VolumeDriver.Unmount", {"Name": "web", "ID": "c0ffee"})
    print(f"real socket: {answers}")
