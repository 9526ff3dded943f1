"""The benchmark's production edges: a host boot storm, container stop, a leader failover, the plugin's
own overhead per Mount and the Vault requests of a container's life. Each is a function of the `Bench`
(bench/run.py), measured side by side with a plain local volume where there is one to compare with.
"""

from __future__ import annotations

import random
import statistics
import threading
import time
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.stats import progress, summary, timed
from devenv.openbao import seed_demo, wrapped_secret_id
from tests.support.cluster import OpenBaoCluster
from tests.support.plugin import PluginProcess

if TYPE_CHECKING:
    from bench.run import Bench

# A container that exits at once on SIGTERM (docker stop), reads its secret at every start and then leaves a
# mark (a file named by its hostname, the short container ID, written anew: its mtime says when) in a host
# directory the bench reads: no docker exec per container.
# (A local volume is empty: nothing to read there.)
MARKING = (
    'trap \'exit 0\' TERM; for f in /run/secrets/*; do [ ! -e "$f" ] || cat "$f" > /dev/null || exit 1; done; '
    "echo read > /marks/$(hostname); while true; do sleep 0.2; done"
)


def metrics_text(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()


def vault_requests(port: int) -> dict[str, float]:
    """Vault requests made so far, by operation (mint, read, renew_token, revoke_token, lookup, ...)."""
    calls = {}
    for line in metrics_text(port).splitlines():
        if line.startswith("vault_secrets_vault_request_duration_seconds_count{"):
            calls[line.split('operation="')[1].split('"')[0]] = float(line.rsplit(" ", 1)[1])
    return calls


def delta(after: dict[str, float], before: dict[str, float], per: float = 1) -> dict[str, float]:
    return {k: round((v - before.get(k, 0)) / per, 2) for k, v in after.items() if v != before.get(k, 0)}


def histogram_quantile(port: int, name: str, q: float) -> float:
    """The upper bound (seconds) of the bucket holding quantile `q` of histogram `name`."""
    buckets = []
    for line in metrics_text(port).splitlines():
        if line.startswith(f"{name}_bucket{{"):
            bound = line.split('le="')[1].split('"')[0]
            buckets.append((float("inf") if bound == "+Inf" else float(bound), float(line.rsplit(" ", 1)[1])))
    total = buckets[-1][1] if buckets else 0
    for bound, count in buckets:
        if total and count >= q * total:
            return bound
    return float("nan")


# -- Vault load and overhead per container ------------------------------------------------------


def lifecycle(bench: Bench) -> dict[str, Any]:
    """Per container (Mount of 5 KV secrets, then Unmount): the Vault requests by kind on each path, and
    the plugin's own time per Mount (the vault_secrets_mount_overhead_seconds histogram, p50 and p99)."""
    count = bench.n(200, 5)
    ids = [f"{random.getrandbits(256):064x}" for _ in range(count)]
    before = vault_requests(bench.metrics_port)
    for mount_id in ids:
        bench.client.ok("VolumeDriver.Mount", {"Name": "kv5", "ID": mount_id})
    mounted = vault_requests(bench.metrics_port)
    for mount_id in ids:
        bench.client.ok("VolumeDriver.Unmount", {"Name": "kv5", "ID": mount_id})
    unmounted = vault_requests(bench.metrics_port)
    name = "vault_secrets_mount_overhead_seconds"
    return {
        "containers": count,
        "mount_path": delta(mounted, before, count),
        "unmount_path": delta(unmounted, mounted, count),
        # Every Mount made so far counts: the buckets are the whole run's.
        "overhead_p50_ms": histogram_quantile(bench.metrics_port, name, 0.5) * 1000,
        "overhead_p99_ms": histogram_quantile(bench.metrics_port, name, 0.99) * 1000,
    }


# -- container stop ------------------------------------------------------------------------------


def container_stop(bench: Bench) -> dict[str, Any]:
    """docker stop + docker rm of a running container with a vault-secrets volume vs a local one, alternating;
    and how long after `docker rm` returned its token was still alive (polled)."""
    d = bench.docker
    marks = bench.workdir / "marks-stop"
    marks.mkdir(mode=0o777)
    marks.chmod(0o777)  # written by the containers' user
    d.docker("volume", "create", "-d", bench.name, "-o", "role=web", "-o", "refresh=0", "-o", "uid=1000",
             "-o", "secret.s0=secret/data/web/s0#v", "stop-secrets")  # fmt: skip
    d.docker("volume", "create", "stop-local")
    samples: dict[str, list[float]] = {"secrets": [], "local": []}
    revoked_after: list[float] = []
    root = bench.bao.client()
    for i in range(bench.n(30, 2) + 2):
        for kind in ["secrets", "local"] if i % 2 == 0 else ["local", "secrets"]:
            container = d.docker(
                "run", "-d", "--network", "none", "--user", "1000", "-v", f"stop-{kind}:/run/secrets",
                "-v", f"{marks}:/marks", bench.image, "sh", "-c", MARKING,
            ).stdout.strip()  # fmt: skip
            accessor = _accessor_of(root, "stop-secrets") if kind == "secrets" else None
            elapsed = timed(lambda: (d.docker("stop", container), d.docker("rm", container)))
            if i >= 2:
                samples[kind].append(elapsed)
                if accessor:
                    gone = time.perf_counter()
                    while _alive(root, accessor) and time.perf_counter() - gone < 5:
                        time.sleep(0.01)
                    revoked_after.append(time.perf_counter() - gone)
    d.docker("volume", "rm", "stop-secrets", "stop-local")
    result: dict[str, Any] = {kind: summary(xs) for kind, xs in samples.items()}
    result["ratio"] = result["secrets"]["median"] / result["local"]["median"]
    result["token_alive_after_rm_max_s"] = max(revoked_after) if revoked_after else 0.0
    return result


def _accessor_of(root: Any, volume: str) -> str:
    """The accessor of the one live token minted for `volume`."""
    for accessor in root.list("auth/token/accessors")["data"]["keys"]:
        try:
            if (root.auth.token.lookup_accessor(accessor)["data"].get("meta") or {}).get("volume") == volume:
                return str(accessor)
        except Exception:  # revoked between the list and the lookup
            continue
    raise AssertionError(f"no live token for volume {volume}")


def _alive(root: Any, accessor: str) -> bool:
    try:
        root.auth.token.lookup_accessor(accessor)
        return True
    except Exception:  # revoked: InvalidRequest or Forbidden
        return False


# -- host boot storm -----------------------------------------------------------------------------


def boot_storm(bench: Bench) -> dict[str, Any]:
    """dockerd restarted (SIGTERM, start) with `--restart always` containers, half on distinct vault-secrets
    volumes and half sharing one, vs the same count on local volumes: from dockerd's start until every
    container runs again and has read its secret (each leaves a timestamped mark at every start)."""
    d = bench.docker
    count = bench.n(100, 4)
    results: dict[str, Any] = {}
    for kind in ("local", "secrets"):
        marks = bench.workdir / f"marks-{kind}"
        marks.mkdir()
        marks.chmod(0o777)  # written by the containers' user
        volumes = []
        for i in range(count // 2):
            volumes.append(_volume(bench, f"storm-{kind}-{i}", kind))
        shared = _volume(bench, f"storm-{kind}-shared", kind)
        volumes += [shared] * (count - count // 2)
        containers = [
            d.docker(
                "run", "-d", "--restart", "always", "--network", "none", "--user", "1000",
                "-v", f"{volume}:/run/secrets", "-v", f"{marks}:/marks", bench.image, "sh", "-c", MARKING,
            ).stdout.strip()
            for volume in volumes
        ]  # fmt: skip
        _wait_marks(marks, containers, 0, timeout=120)
        requests_before = vault_requests(bench.metrics_port)
        progress(f"   boot storm: restarting dockerd with {count} containers on {kind} volumes")
        d.stop_daemon()
        started = time.time()
        d.start_daemon()
        done = _wait_marks(marks, containers, started, timeout=300)
        elapsed = max(done.values()) - started if len(done) == len(containers) else float("nan")
        running = d.docker("ps", "-q", "--filter", "status=running").stdout.split()
        results[kind] = {
            "containers": count,
            "seconds": elapsed,
            "left_down": count - len([c for c in containers if c[:12] in {r[:12] for r in running}]),
            "not_read": count - len(done),
            "vault_requests": delta(vault_requests(bench.metrics_port), requests_before),
        }
        d.docker("rm", "-f", *containers)
        d.docker("volume", "rm", *sorted(set(volumes)))
    results["ratio"] = results["secrets"]["seconds"] / results["local"]["seconds"]
    return results


def _volume(bench: Bench, name: str, kind: str) -> str:
    if kind == "local":
        bench.docker.docker("volume", "create", name)
    else:
        bench.docker.docker("volume", "create", "-d", bench.name, "-o", "role=web", "-o", "refresh=0",
                            "-o", "uid=1000", "-o", "secret.s0=secret/data/web/s0#v", name)  # fmt: skip
    return name


def _wait_marks(marks: Path, containers: list[str], after: float, timeout: float) -> dict[str, float]:
    """When each container last left its mark, once each has left one since `after` (seconds since the
    epoch); those that did not within `timeout` are missing from the answer."""
    deadline = time.monotonic() + timeout
    while True:
        done = {}
        for container in containers:
            mark = marks / container[:12]
            if mark.exists() and mark.stat().st_mtime > after:
                done[container] = mark.stat().st_mtime
        if len(done) == len(containers) or time.monotonic() > deadline:
            return done
        time.sleep(0.2)


# -- leader failover -----------------------------------------------------------------------------


def failover(bench: Bench) -> dict[str, Any]:
    """A stream of Mount+Unmount pairs against a standby of a 3-node Raft cluster while its leader is
    SIGKILLed: Mount latency (p50, p99, max) across the kill, against the election time the cluster shows
    (kill to the first node that is active and takes a write)."""
    cluster = OpenBaoCluster(bench.workdir / "cluster")
    plugin = None
    try:
        seed = seed_demo(cluster.client())
        wrapped = bench.workdir / "cluster-wrapped"
        wrapped.write_text(wrapped_secret_id(cluster.client()))
        plugin = PluginProcess(
            bench.workdir / "ha.sock",
            bench.workdir / "ha-state",
            cluster.standby().addr,
            role_id=seed.role_id,
            wrapped_secret_id_file=wrapped,
            log_path=bench.workdir / "ha-plugin.log",
            extra=["--log-level", "info", "--mount-root", str(bench.workdir / "ha-m")],
        )
        plugin.wait_until_serving().wait_until_authenticated(timeout=30)
        client = plugin.client
        client.ok(
            "VolumeDriver.Create", {"Name": "ha", "Opts": {"role": "web", "secret.pw": "secret/data/web/db#password"}}
        )
        results: list[tuple[float, float, bool]] = []
        stop = threading.Event()

        def stream() -> None:
            n = 0
            while not stop.is_set():
                n += 1
                started = time.monotonic()
                status, reply = client.call("VolumeDriver.Mount", {"Name": "ha", "ID": f"f{n:06d}"})
                ok = status == 200 and not reply.get("Err")
                results.append((started, time.monotonic() - started, ok))
                if ok:
                    client.call("VolumeDriver.Unmount", {"Name": "ha", "ID": f"f{n:06d}"})

        worker = threading.Thread(target=stream)
        worker.start()
        time.sleep(bench.n(4, 2))
        leader = cluster.leader()
        killed_at = cluster.kill(leader)
        cluster.wait_for_leader(excluding=leader)
        election = time.monotonic() - killed_at
        time.sleep(bench.n(10, 3))
        stop.set()
        worker.join(60)
        across = [seconds for started, seconds, _ in results if started + seconds >= killed_at]
        ordered = sorted(across)
        return {
            "mounts": len(results),
            "failed": sum(not ok for _, _, ok in results),
            "election_s": election,
            "across_p50_ms": statistics.median(ordered) * 1000,
            "across_p99_ms": ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))] * 1000,
            "across_max_s": ordered[-1],
            "max_over_election_s": ordered[-1] - election,
        }
    finally:
        if plugin is not None:
            plugin.stop()
        cluster.stop()
