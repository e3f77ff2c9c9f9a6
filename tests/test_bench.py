"""``manage.py bench``, scaled down: it starts its own web and workers and reports every figure.

The figures of a run this small mean nothing; what is tested is that the
benchmark runs end to end on the test's database engine and measures each
thing it claims to.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from django.conf import settings
from django.core.management import call_command
from django.db import connection

from orchestration.bench.cpu import CpuMeter
from orchestration.chaos.processes import database_url
from orchestration.management.commands.bench import format_report
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
        # Our runs cost the web and the worker CPU; raw canvases cost the raw worker.
        ours_cpu, raw_cpu = shape["ours_cpu_ms_per_run"], shape["raw_cpu_ms_per_run"]
        assert ours_cpu["web"] > 0
        assert ours_cpu["worker"] > 0
        assert raw_cpu["raw_worker"] > 0
        assert ours_cpu["total"] == pytest.approx(sum(v for k, v in ours_cpu.items() if k != "total"), abs=0.05)
    # 3 s at 10 a second: 26 to 28 against a server that answers at once, fewer
    # where a loaded machine answers slower than the 100 ms between requests.
    assert report["api"]["requests"] >= 10
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


class _ArrivalsHandler(BaseHTTPRequestHandler):
    """Answers every POST 202 and notes when it came."""

    protocol_version = "HTTP/1.1"  # keep-alive, as gunicorn's gthread workers answer
    arrivals: list[float] = []

    def do_POST(self) -> None:
        self.arrivals.append(time.monotonic())
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(202)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.timeout(60)
def test_the_load_generator_sends_at_an_even_rate_not_in_bursts() -> None:
    # 5 users at 10 requests a second each: one request every 20 ms. Started
    # as locust starts them, the five came within a millisecond of each other.
    _ArrivalsHandler.arrivals.clear()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _ArrivalsHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = {**os.environ, "BENCH_TOKEN": "t", "BENCH_RUNS_PATH": "/runs/", "BENCH_USER_RATE": "10", "BENCH_USERS": "5"}
    locustfile = Path(settings.BASE_DIR) / "orchestration" / "bench" / "locustfile.py"
    command = [sys.executable, "-m", "locust", "-f", str(locustfile), "--headless", "--only-summary"]
    command += ["--host", f"http://127.0.0.1:{server.server_port}", "--users", "5", "--spawn-rate", "5"]
    command += ["--run-time", "5s", "--loglevel", "WARNING"]
    try:
        subprocess.run(command, env=env, capture_output=True, timeout=50, check=True)
    finally:
        server.shutdown()
        server.server_close()

    steady = [t for t in _ArrivalsHandler.arrivals if t >= _ArrivalsHandler.arrivals[0] + 1.5]  # all users started
    gaps = [(later - earlier) * 1000 for earlier, later in itertools.pairwise(steady)]
    assert len(steady) >= 100
    assert 15 <= statistics.median(gaps) <= 25
    assert sum(gap < 5 for gap in gaps) <= len(gaps) // 10


def test_the_table_leaves_out_the_phases_that_were_left_out() -> None:
    shape = {"ours_per_s": 10.0, "raw_per_s": 40.0, "ratio": 0.25, "ours_p50_ms": 5.0, "ours_p99_ms": 9.0}
    report = {
        "shapes": {"chain3": {**shape, "raw_p50_ms": 1.0, "raw_p99_ms": 2.0}},
        "database": "sqlite",
        "worker_concurrency": 4,
        "machine": {"cpus": 2},
        "step_overhead_ms_p50": 2.0,
        "step_runtime_ms_p50": 2.5,
        "raw_task_runtime_ms_p50": 0.5,
        "step_overhead_loaded_ms_p50": 4.0,
        "seconds": 12.3,
    }

    table = format_report(report)

    assert "chain3" in table
    assert "step overhead p50 2.00 ms" in table
    assert "took 12.3 s" in table
    for left_out in ("API run creation", "reads with", "worker RSS"):
        assert left_out not in table


def test_the_cpu_meter_counts_a_process_groups_cpu_and_not_an_idle_ones() -> None:
    # Burns 0.3 s of CPU, says so, then stays alive (an exited process's CPU can no longer be read).
    burn = "import sys, time\nend = time.process_time() + 0.3\nwhile time.process_time() < end: pass\n"
    burn += "print('done', flush=True)\ntime.sleep(30)"
    busy = subprocess.Popen([sys.executable, "-c", burn], start_new_session=True, stdout=subprocess.PIPE, text=True)
    idle = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], start_new_session=True)
    try:
        meter = CpuMeter.for_groups({"busy": busy.pid, "idle": idle.pid})
        before = meter.read()
        assert busy.stdout is not None
        assert busy.stdout.readline() == "done\n"
        used = meter.used(before, meter.read())
    finally:
        for process in (busy, idle):
            process.kill()
            process.wait()
    assert set(used) == {"busy", "idle", "postgresql", "redis", "client"}
    assert 0.1 <= used["busy"] < 1.0
    assert used["idle"] < 0.1


@pytest.mark.django_db(transaction=True)
def test_bench_events_prints_what_an_event_costs_and_leaves_nothing_behind():
    out = io.StringIO()

    call_command("bench_events", "--events", "20", stdout=out)

    lines = out.getvalue().splitlines()
    assert lines[0].endswith("20 transactions each, p50:")
    assert [line.split()[0] for line in lines[1:]] == ["ORM", "transitions.record"]
    assert all(float(line.split()[-2]) > 0 for line in lines[1:])
    assert not Run.objects.exists()
    assert not RunEvent.objects.exists()
