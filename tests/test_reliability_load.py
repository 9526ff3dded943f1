"""Reliability under load, against real OpenBao, real dockerd and real tmpfs.

- 50 containers started at once on 50 volumes, and 50 at once on one shared volume: every one reads its
  secrets, each has its own tmpfs, token and database lease, and once they stop no token, lease, database
  user or tmpfs is left.
- 500 concurrent Mount/Unmount calls on the plugin socket: no error, no deadlock, no tmpfs or token left.

Measured numbers are printed (`-s` shows them) and recorded in docs/reliability.md.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import SECRET
from tests.support.faults import (
    VaultView,
    mount_ids_of,
    mounts_below,
    state_query,
    wait_for,
)
from tests.support.plugin import PluginClient

pytestmark = [pytest.mark.openbao]

READ = "cat /run/secrets/db_password; echo; cat /run/secrets/db_user; echo; exec sleep 600"


@pytest.mark.docker
@pytest.mark.heavy
def test_100_containers_at_once_on_distinct_and_shared_volumes_get_their_own_tmpfs_token_and_lease(
    docker, plugin, bao, databases, unique_name
):
    view = VaultView(bao.root)
    distinct = [f"{unique_name}-d{i:02}" for i in range(50)]
    shared = f"{unique_name}-shared"
    volumes = [*distinct, shared]

    def create(volume: str) -> None:
        docker.docker(
            "volume",
            "create",
            "-d",
            plugin.name,
            "-o",
            "role=web",
            "-o",
            "uid=1000",
            "-o",
            "secret.db_password=secret/data/web/db#password",
            "-o",
            "secret.db_user=db/creds/app#username",
            volume,
        )

    def start(volume: str) -> str:
        return docker.docker(
            "run",
            "-d",
            "--network",
            "none",
            "--user",
            "1000",
            "-v",
            f"{volume}:/run/secrets:ro",
            docker.image,
            "sh",
            "-c",
            READ,
        ).stdout.strip()

    with ThreadPoolExecutor(max_workers=50) as pool:
        list(pool.map(create, volumes))
        started = time.monotonic()
        on_distinct = list(pool.map(start, distinct))
        distinct_seconds = time.monotonic() - started
        started = time.monotonic()
        on_shared = list(pool.map(start, [shared] * 50))
        shared_seconds = time.monotonic() - started
    containers = on_distinct + on_shared

    try:

        def output(container: str) -> list[str]:
            return wait_for(
                lambda: docker.docker("logs", container).stdout.split() or None, 30, f"{container}'s output"
            )

        with ThreadPoolExecutor(max_workers=10) as pool:
            outputs = list(pool.map(output, containers))
        assert all(lines[0] == SECRET for lines in outputs), "a container did not get its secret"
        users = [lines[1] for lines in outputs]
        assert len(set(users)) == 100, "each container has its own database user (its own lease)"
        in_list = ", ".join(f"'{u}'" for u in users)
        assert databases.pg.psql(f"select count(*) from pg_roles where rolname in ({in_list})").strip() == "100"

        mount_ids = mount_ids_of(docker, containers)
        assert len(set(mount_ids.values())) == 100
        tmpfs = mounts_below(plugin.mount_root)
        assert set(tmpfs) == {
            str(plugin.mount_root / v / m / d)
            for v, c in [*zip(distinct, on_distinct, strict=True), *((shared, c) for c in on_shared)]
            for m in [mount_ids[c]]
            for d in ("data", "view")
        }
        assert {t["fstype"] for t in tmpfs.values()} == {"tmpfs"}
        tokens = view.tokens_of_volumes(set(volumes))
        assert sorted(d["meta"]["mount_id"] for d in tokens.values()) == sorted(mount_ids.values()), (
            "one token per container"
        )
        leases = [lease for (lease,) in state_query(plugin.state_dir, "SELECT lease_id FROM leases")]
        assert len(set(leases)) == 100
        assert json.loads(docker.docker("volume", "inspect", shared).stdout)[0]["Status"] == {"activeMounts": 50}
    finally:
        started = time.monotonic()
        with ThreadPoolExecutor(max_workers=50) as pool:
            list(pool.map(lambda c: docker.docker("rm", "-f", c), containers))
        stop_seconds = time.monotonic() - started

    wait_for(lambda: not view.tokens_of_volumes(set(volumes)), 30, "every token to be revoked")
    wait_for(lambda: all(view.lease_ttl(lease) is None for lease in leases), 60, "every lease to be revoked")
    assert databases.pg.psql(f"select count(*) from pg_roles where rolname in ({in_list})").strip() == "0"
    assert mounts_below(plugin.mount_root) == {}
    assert state_query(plugin.state_dir, "SELECT COUNT(*) FROM mounts") == [(0,)]
    assert list(plugin.mount_root.iterdir()) == []
    assert "Traceback" not in plugin.log()
    print(
        f"\n50 containers on 50 volumes started in {distinct_seconds:.1f}s, 50 on one volume in {shared_seconds:.1f}s; "
        f"100 tmpfs, 100 tokens, 100 leases/DB users; all 100 removed in {stop_seconds:.1f}s, then 0 tokens, "
        f"0 leases, 0 DB users, 0 tmpfs"
    )


def test_500_concurrent_mount_and_unmount_calls_end_without_error_deadlock_or_leak(start_plugin, bao, short_tmp):
    plugin = start_plugin()
    client = PluginClient(plugin.socket_path, timeout=120)
    volumes = [f"load{i}" for i in range(5)]
    for volume in volumes:
        client.ok(
            "VolumeDriver.Create",
            {
                "Name": volume,
                "Opts": {
                    "role": "web",
                    "secret.db_password": "secret/data/web/db#password",
                    "secret.api_key": "secret/data/web/api#key",
                },
            },
        )
    # 200 mounts mounted and unmounted once, and 25 mounted twice and unmounted twice (as `docker cp` on a
    # running container does): 500 calls, from 225 threads released together.
    plans = [(volumes[i % 5], f"{i:04x}" * 16, 1) for i in range(200)] + [
        (volumes[i % 5], f"{i:04x}" * 16, 2) for i in range(200, 225)
    ]
    barrier = threading.Barrier(len(plans))
    calls: list[tuple[str, int, dict, float]] = []
    lock = threading.Lock()

    def call(verb: str, volume: str, mount_id: str) -> dict:
        began = time.monotonic()
        status, reply = client.call(f"VolumeDriver.{verb}", {"Name": volume, "ID": mount_id})
        with lock:
            calls.append((verb, status, reply, time.monotonic() - began))
        return reply

    errors: list[str] = []

    def run(plan: tuple[str, str, int]) -> None:
        volume, mount_id, times = plan
        try:
            barrier.wait()
            points = {call("Mount", volume, mount_id).get("Mountpoint") for _ in range(times)}
            if len(points) != 1:
                errors.append(f"two Mounts of {mount_id} got different mountpoints: {points}")
            elif (Path(points.pop()) / "db_password").read_text() != SECRET:
                errors.append(f"mount {mount_id} does not hold the secret")
            for _ in range(times):
                call("Unmount", volume, mount_id)
        except Exception as e:  # noqa: BLE001 - reported below, with the others
            errors.append(f"{mount_id}: {e!r}")

    started = time.monotonic()
    threads = [threading.Thread(target=run, args=(plan,), daemon=True) for plan in plans]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=max(1.0, 180 - (time.monotonic() - started)))
        if thread.is_alive():
            errors.append("deadlock: a call did not return within 180 s")
            break
    elapsed = time.monotonic() - started
    assert not errors
    assert len(calls) == 500
    failed = [(verb, status, reply) for verb, status, reply, _ in calls if status != 200 or reply.get("Err")]
    assert failed == []
    assert mounts_below(short_tmp) == {}
    assert list((short_tmp / "state-mounts").iterdir()) == []
    assert state_query(short_tmp / "state", "SELECT COUNT(*) FROM mounts") == [(0,)]
    assert VaultView(bao.root).tokens_of_volumes(set(volumes)) == {}
    assert "Traceback" not in plugin.log() and "unexpected error" not in plugin.log()
    client.ok("VolumeDriver.List")
    seconds = sorted(s for *_, s in calls)
    print(
        f"\n500 concurrent Mount/Unmount calls (225 mounts, 25 refcounted twice) in {elapsed:.1f}s: "
        f"0 errors; latency median {statistics.median(seconds) * 1000:.0f} ms, "
        f"p95 {seconds[int(len(seconds) * 0.95)] * 1000:.0f} ms, max {seconds[-1] * 1000:.0f} ms; 0 tmpfs, 0 tokens left"
    )
