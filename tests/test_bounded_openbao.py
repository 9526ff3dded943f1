"""Runaway templates against the real plugin and real OpenBao: one whose cost shows without the secrets is
refused at Create; 20 concurrent Mounts of one that runs away on the real data leave the plugin answering
other calls, and no token, tmpfs or record behind."""

from __future__ import annotations

import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.support.faults import VaultView, state_query

pytestmark = pytest.mark.openbao

RUNAWAY = "{% for a in 'x' * 1000000 %}{% for b in 'x' * 1000000 %}{% endfor %}{% endfor %}"
# Placeholder data has no items, so Create cannot tell; on the real secret the two loops never end.
RUNAWAY_ON_THE_DATA = (
    '{% for k, v in secret("secret/data/web/db").items() %}'
    "{% for a in v * 100000 %}{% for b in v * 100000 %}{% endfor %}{% endfor %}{% endfor %}"
)


def test_a_template_that_runs_away_without_the_secrets_is_refused_at_create(start_plugin):
    plugin = start_plugin()
    started = time.monotonic()
    status, reply = plugin.client.call(
        "VolumeDriver.Create", {"Name": "never", "Opts": {"role": "web", "template.t": RUNAWAY}}
    )
    assert status == 500 and "option template.t: did not finish within 2s even with placeholder data" in reply["Err"]
    assert time.monotonic() - started < 4
    assert plugin.client.ok("VolumeDriver.List")["Volumes"] == []


def _list_latencies(client, count: int) -> list[float]:
    samples = []
    for _ in range(count):
        started = time.monotonic()
        client.ok("VolumeDriver.List")
        samples.append(time.monotonic() - started)
        time.sleep(0.02)
    return samples


def test_twenty_runaway_mounts_leave_the_plugin_responsive_and_nothing_behind(start_plugin, bao, short_tmp):
    plugin = start_plugin()
    client = plugin.client
    client.ok("VolumeDriver.Create", {"Name": "runaway", "Opts": {"role": "web", "template.t": RUNAWAY_ON_THE_DATA}})
    before = statistics.median(_list_latencies(client, 20))
    with ThreadPoolExecutor(max_workers=21) as pool:
        mounts = [
            pool.submit(client.call, "VolumeDriver.Mount", {"Name": "runaway", "ID": f"r{i:03d}"}) for i in range(20)
        ]
        time.sleep(0.2)
        during = statistics.median(_list_latencies(client, 20))
        started = time.monotonic()
        replies = [future.result() for future in mounts]
        waited = time.monotonic() - started
    assert all(status == 500 for status, _ in replies)
    errors = {reply["Err"].split(";")[0] for _, reply in replies}
    assert errors <= {
        "template t: did not finish within 2s",
        "template t: no renderer was free within 0.5s (at most 2 at once)",
    }
    assert waited < 10
    assert during < max(10 * before, 0.25), f"List p50 {during * 1000:.0f} ms during, {before * 1000:.0f} ms before"
    assert state_query(plugin.state_dir, "SELECT COUNT(*) FROM mounts") == [(0,)]
    assert VaultView(bao.root).live_tokens(volume="runaway") == {}
    print(
        f"\n20 runaway Mounts: List p50 {before * 1000:.1f} ms before, {during * 1000:.1f} ms during; all refused "
        f"within {waited:.1f}s ({', '.join(sorted(errors))})"
    )
