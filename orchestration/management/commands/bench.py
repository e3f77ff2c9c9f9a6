"""``manage.py bench``: agentsite against raw Celery on this machine, side by side.

    python manage.py bench [--json] [--rounds 3] [--batch 100] [--memory-runs 10000] ...

Prints a table (or one JSON object). What it starts and measures: docs/performance.md, "The benchmark".
"""

from __future__ import annotations

import fcntl
import json
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import connection
from psycopg import sql

from orchestration.bench.child import RESULT_FILE
from orchestration.bench.shapes import SHAPES
from orchestration.chaos.processes import database_url, run_driver


class Command(BaseCommand):
    help = "Benchmark agentsite against raw Celery (starts its own web and workers; see docs/performance.md)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
        parser.add_argument("--rounds", type=int, default=3, help="ours/raw rounds per shape, interleaved")
        parser.add_argument("--batch", type=int, default=100, help="runs sent at once per round (throughput)")
        parser.add_argument("--latency-runs", type=int, default=30, help="runs one at a time per round (latency)")
        parser.add_argument(
            "--memory-runs", type=int, default=10_000, help="runs between the worker RSS readings (0: none)"
        )
        parser.add_argument("--api-rate", type=int, default=100, help="run creations per second (locust)")
        parser.add_argument("--api-seconds", type=int, default=20, help="0: no API phase")
        parser.add_argument("--steps", type=int, default=100_000, help="steps stored before timing list and detail")
        parser.add_argument("--reads", type=int, default=200, help="list and detail requests each (0: no reads phase)")
        parser.add_argument("--redis-db", type=int, default=12, help="the benchmark's Redis database number")
        parser.add_argument("--dir", type=Path, help="for its logs and SQLite database (default: var/bench)")
        parser.add_argument("--json", action="store_true", dest="as_json", help="print one JSON object")

    def handle(self, *args: Any, as_json: bool, redis_db: int, dir: Path | None, **options: Any) -> None:
        directory = (dir or Path(settings.BASE_DIR) / "var" / "bench").resolve()
        directory.parent.mkdir(parents=True, exist_ok=True)
        with _only_one(directory.with_name(f"{directory.name}.lock")):
            self._bench(directory, as_json, redis_db, options)

    def _bench(self, directory: Path, as_json: bool, redis_db: int, options: dict[str, Any]) -> None:
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        command = [sys.executable, "-m", "orchestration.bench.child", "--dir", str(directory)]
        command += ["--database-url", _bench_database(directory), "--redis-url", _redis_url(redis_db)]
        command += ["--shapes", *options["shapes"]]
        for name in ("rounds", "batch", "latency_runs", "memory_runs", "api_rate", "api_seconds", "steps", "reads"):
            command += [f"--{name.replace('_', '-')}", str(options[name])]
        if not as_json:
            self.stdout.write(f"benchmarking, about 5 minutes with the defaults (logs in {directory}/) ...")
        returncode, _ = run_driver(command, Path(settings.BASE_DIR), directory, "bench.log")
        result = directory / RESULT_FILE
        if returncode != 0 or not result.exists():
            tail = (directory / "bench.log").read_text(errors="replace")[-3000:]
            raise CommandError(f"the benchmark failed (exit {returncode}); end of its log:\n{tail}")
        report = json.loads(result.read_text())
        self.stdout.write(json.dumps(report, indent=2) if as_json else format_report(report))


@contextmanager
def _only_one(lock_path: Path) -> Iterator[None]:
    """Hold the benchmark's lock: a second benchmark in the same directory would wreck the first."""
    with lock_path.open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CommandError(f"another benchmark is running in {lock_path.with_suffix('')}") from None
        yield


def _redis_url(database: int) -> str:
    url = urlsplit(settings.REDIS_URL)
    return urlunsplit(url._replace(path=f"/{database}"))


def _bench_database(directory: Path) -> str:
    """A fresh database for the benchmark, on the configured database's engine."""
    db = settings.DATABASES["default"]
    if connection.vendor == "sqlite":
        return f"sqlite:///{directory / 'bench.sqlite3'}"
    if connection.vendor != "postgresql":
        raise CommandError(f"the benchmark runs on SQLite or PostgreSQL, not {connection.vendor}")
    bench = {**db, "NAME": f"{db['NAME']}_bench", "HOST": db["HOST"] or "127.0.0.1", "PORT": db["PORT"] or 5432}
    params = {"host": bench["HOST"], "port": bench["PORT"], "user": db["USER"], "password": db.get("PASSWORD") or None}
    with psycopg.connect(dbname="postgres", autocommit=True, **params) as admin:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(bench["NAME"])))
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(bench["NAME"])))
    return database_url(bench)


def format_report(report: dict[str, Any]) -> str:
    lines = [f"{'shape':<9}{'ours/s':>9}{'raw/s':>9}{'ratio':>7}{'ours p50':>10}{'ours p99':>10}{'raw p50':>9}"]
    for shape, row in report["shapes"].items():
        lines.append(
            f"{shape:<9}{row['ours_per_s']:>9.1f}{row['raw_per_s']:>9.1f}{row['ratio']:>7.2f}"
            f"{row['ours_p50_ms']:>8.1f}ms{row['ours_p99_ms']:>8.1f}ms{row['raw_p50_ms']:>7.1f}ms"
        )
    lines += [
        "",
        f"database {report['database']}, worker concurrency {report['worker_concurrency']}, "
        f"{report['machine']['cpus']} CPUs",
    ]
    if api := report.get("api"):
        lines.append(
            f"API run creation at {api['post_rps']:.1f}/s for {api['seconds']} s (locust): "
            f"p50 {api['post_p50_ms']:g} ms, p99 {api['post_p99_ms']:g} ms, "
            f"{api['requests']} requests, {api['failures']} failed"
        )
    lines.append(
        f"step overhead p50 {report['step_overhead_ms_p50']:.2f} ms one run at a time "
        f"(run_step {report['step_runtime_ms_p50']:.2f} ms - raw task {report['raw_task_runtime_ms_p50']:.2f} ms), "
        f"{report['step_overhead_loaded_ms_p50']:.2f} ms in batches"
    )
    if "list_p99_ms" in report:
        lines.append(
            f"reads with {report['steps_stored']} steps stored: list p50 {report['list_p50_ms']} ms, "
            f"p99 {report['list_p99_ms']} ms (?status= p99 {report['list_filtered_p99_ms']} ms); "
            f"detail p50 {report['detail_p50_ms']} ms, p99 {report['detail_p99_ms']} ms"
        )
    if "worker_rss_mb" in report:
        lines.append(
            f"worker RSS {report['worker_rss_before_mb']} MB before, {report['worker_rss_mb']} MB after "
            f"{report['memory_runs']} runs"
        )
    lines.append(f"took {report['seconds']} s")
    return "\n".join(lines)
