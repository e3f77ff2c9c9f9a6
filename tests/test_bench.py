"""``manage.py bench``, scaled down: it starts its own web and workers and reports every figure.

The figures of a run this small mean nothing; what is tested is that the
benchmark runs end to end on the test's database engine and measures each
thing it claims to.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.conf import settings
from django.core.management import call_command
from django.db import connection

from orchestration.chaos.processes import database_url
from orchestration.models import Run, RunEvent

TINY = ["--shapes", "chain3", "chord10", "--rounds", "1", "--batch", "5", "--latency-runs", "3"]
TINY += ["--memory-runs", "20", "--api-rate", "10", "--api-seconds", "3", "--steps", "2000", "--reads", "10"]


@pytest.mark.bench
@pytest.mark.timeout(300)
def test_bench_measures_ours_and_raw_side_by_side(tmp_path: Path) -> None:
    # A bench database next to the test database (PostgreSQL: test_agentsite_bench), Redis db 11.
    env = {**os.environ, "DATABASE_URL": database_url(connection.settings_dict)}
    command = [sys.executable, "manage.py", "bench", *TINY, "--redis-db", "11", "--dir", str(tmp_path), "--json"]
    done = subprocess.run(command, cwd=settings.BASE_DIR, env=env, capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)

    assert report["database"] == connection.vendor
    assert set(report["shapes"]) == {"chain3", "chord10"}
    for shape in report["shapes"].values():
        assert shape["ours_per_s"] > 0
        assert shape["raw_per_s"] > 0
        assert shape["ratio"] == pytest.approx(shape["ours_per_s"] / shape["raw_per_s"], abs=0.01)
        assert 0 < shape["ours_p50_ms"] <= shape["ours_p99_ms"]
    assert report["api"]["requests"] >= 20
    assert report["api"]["failures"] == 0
    assert 0 < report["api"]["post_p50_ms"] <= report["api"]["post_p99_ms"]
    assert report["step_runtime_ms_p50"] > 0
    assert "step_overhead_loaded_ms_p50" in report
    assert report["raw_task_runtime_ms_p50"] > 0
    assert report["steps_stored"] >= 2000
    assert 0 < report["list_p50_ms"] <= report["list_p99_ms"]
    assert 0 < report["detail_p50_ms"] <= report["detail_p99_ms"]
    assert report["worker_rss_before_mb"] > 0
    assert report["worker_rss_mb"] > 0


@pytest.mark.django_db(transaction=True)
def test_bench_events_prints_what_an_event_costs_and_leaves_nothing_behind():
    out = io.StringIO()

    call_command("bench_events", "--events", "20", stdout=out)

    lines = out.getvalue().splitlines()
    assert lines[0].endswith("20 transactions each, p50:")
    assert [line.split()[0] for line in lines[1:]] == ["ORM", "state.record"]
    assert all(float(line.split()[-2]) > 0 for line in lines[1:])
    assert not Run.objects.exists()
    assert not RunEvent.objects.exists()
