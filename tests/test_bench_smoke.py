"""`make bench` with tiny counts, so the benchmark cannot rot between measurements (its figures here
mean nothing; bench/results/latest.md holds a real run)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import require_postgres, require_root

pytestmark = [pytest.mark.docker, pytest.mark.openbao]

ROOT = Path(__file__).resolve().parent.parent


def test_bench_quick_run_produces_every_figure(tmp_path):
    require_root()
    require_postgres()
    run = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick", "--output", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,  # bench is a package of the project: python -m bench.run
    )
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads((tmp_path / "latest.json").read_text())
    assert set(results["verdicts"]) == {
        "docker_run_ratio",
        "mount_kv5_p50_ms",
        "mount_kv5_p99_ms",
        "agent_over_mount",
        "throughput_errors",
        "throughput_leaked_tokens",
        "memory_idle_mb",
        "memory_per_mount_kb",
        "boot_storm_ratio",
        "boot_storm_left_down",
        "stop_ratio",
        "stop_revoked_s",
        "failover_failed",
        "failover_over_election_s",
        "overhead_p50_ms",
        "lifecycle_extra_requests",
    }
    assert results["throughput"]["errors"] == 0 and results["throughput"]["leaked_tokens"] == 0
    # The mint, the extension of the provisional token once recorded, and one read per secret.
    assert results["mount"]["kv5"]["vault_requests_per_mount"] == {"mint": 1, "renew_token": 1, "read": 5}
    assert results["renewer"]["real"]["renewals"] > 0
    # Correctness even with tiny counts: nothing left down or failed, the Vault requests of a container's life.
    assert results["verdicts"]["boot_storm_left_down"] == 0 and results["verdicts"]["failover_failed"] == 0
    assert results["lifecycle"]["unmount_path"] == {"revoke_token": 1}
    assert "| Mount, 5 KV secrets: p50 (ms) |" in (tmp_path / "latest.md").read_text()
